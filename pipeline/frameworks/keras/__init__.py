"""The `keras` framework (Keras 3 on TensorFlow): `backend` (the `Backend` and TensorFlow's
deterministic configuration), `model` (the scratch CNN and its byte-stable `.keras` file),
`recipe` (schedules, optimizers, the fit), `export` (SavedModel, TFLite, ONNX) and `cuda`
(TensorFlow's CUDA 12 libraries, loaded from their own folder)."""
