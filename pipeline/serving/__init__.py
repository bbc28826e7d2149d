"""Using an export: `predict` (`python -m pipeline.serving.predict`: classify image files with
ONNX Runtime, no torch), `pyfunc` (the MLflow model every export is logged as, which
`mlflow models serve` runs), `contract` (the pixels it accepts; the rest is refused) and
`loadtest` (`python -m pipeline.serving.loadtest`: a served model under load and fault)."""
