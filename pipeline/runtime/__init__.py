"""How a stage runs on this machine: `portable` (the CPU code paths, pinned before torch or
TensorFlow loads), `cpu_share` (threads auto), `launch` (torchrun's rank and nproc),
`checkpoints` (per-epoch checkpoints outside DVC's outputs); and the guards, which compute
nothing a stage writes: `workspace` (one run per workspace) and `interrupts` (Ctrl-C held
while a library loads)."""
