"""The frameworks layer: everything the stages ask of PyTorch or Keras.

`interface` (the `Backend` every framework implements, and the runtime and export settings it
takes), `recipe` (the training recipe's params and result, and the early-stopping loop both
frameworks run), `card` (model folders and their model.json), `registry` (which framework
backs a model: the one place that imports a framework by name), `onnx_format` (ONNX metadata
and ONNX Runtime, shared by both). `torch/` and `keras/` each hold `backend`, `model`, `recipe`
and `export`. Nothing here but `torch/` imports torch, and nothing but `keras/` TensorFlow.
This file imports nothing, so importing `frameworks.torch` does not load Keras' code.
"""
