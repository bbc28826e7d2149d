"""Using an export: `predict` (`python -m pipeline.serving.predict`: classify image files with
ONNX Runtime, no torch) and `pyfunc` (the MLflow model every export is logged as, which
`mlflow models serve` runs)."""
