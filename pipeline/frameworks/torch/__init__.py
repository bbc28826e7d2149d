"""The `torch` framework: `backend` (the `Backend`), `model` (the networks and checkpoints),
`weights` (pretrained backbones' files), `recipe` (train_one_epoch / evaluate / fit),
`export` (TorchScript and ONNX), `runtime` (seeds, deterministic kernels, threads, device),
`resume` (per-epoch checkpoints), `distributed` (DDP) and `torchrun` (its agent)."""
