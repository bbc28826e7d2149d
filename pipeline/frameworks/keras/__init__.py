"""The `keras` framework (Keras 3 on TensorFlow): `backend` (the `Backend` and TensorFlow's
deterministic configuration), `model` (the scratch CNN and its byte-stable `.keras` file),
`recipe` (schedules, optimizers, the fit) and `export` (SavedModel, TFLite, ONNX)."""
