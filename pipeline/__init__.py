"""The pipeline's code, in layers that import downwards only.

On top, the stages (`ingest`, `prepare`, `train`, `crossval`, `finetune`, `evaluate`,
`export`, `register`, `report`, `sync`), each run as `python -m pipeline <stage>`, beside four
small shared modules (`config`, `files`, `errors`, `cli`). Beneath them: `data/` (formats,
images, sources; no framework), `frameworks/` (the interface every framework implements;
`torch/` and `keras/` behind it), `evaluation/`, `tracking/` (DVCLive and MLflow), `runtime/`
(threads, portability, torchrun, guards), `experiments/` (the queue and sweeps) and `serving/`.
`tests/unit/test_layout.py` checks the rules and that dvc.yaml lists every file a stage runs.
"""
