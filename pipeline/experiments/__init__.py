"""Many runs on DVC's engines: `dvc_queue` drives and watches DVC's experiment queue,
`queue_workers` sees its live workers (threads auto divides the cores among them), `batch`
(`python -m pipeline.experiments.batch`) runs a grid of experiments on it, none lost, `sweep`
(`python -m pipeline.experiments.sweep`) is an Optuna study whose trials are queued DVC
experiments, `search_space` reads sweep.yaml, and `trial` is a stage's side of a trial."""
