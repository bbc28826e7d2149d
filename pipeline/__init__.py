"""The pipeline's code, in layers that import downwards only.

Stages (`ingest`, `prepare`, `train`, `crossval`, `finetune`, `evaluate`, `export`, `register`,
`report`), each run as
`python -m pipeline <stage>`, sit on top. Beneath them: `data/` (the formats stages hand to
each other, image decoding, the sources, worker pools; no framework), `frameworks/` (the
interface every framework implements and its torch-free types; `torch/` and `keras/` behind
it) and the small cross-cutting modules (`config`, `files`, `cli`, `tracking`). A stage
imports layers, never another stage; a framework imports no stage; the data layer imports no
framework. `tests/unit/test_layout.py` checks each rule and that dvc.yaml lists every file a stage
imports.
"""
