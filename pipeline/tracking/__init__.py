"""Results where users look: `run` is what stages call (DVCLive's DVC-tracked metrics and plots,
the MLflow run through a worker process); the rest reports to MLflow only and shapes no
output: `store` (where runs go, the worker's client), `worker` (the worker process), `models`
(logged models and the registry), `restore` and `lockfile` (the runs `sync` rebuilds from
what dvc.lock records)."""
