"""Device check: the train and finetune recipes on CUDA, run twice, against the CPU.

    python -m bench.gpu [--out DIR]    # on a machine with a CUDA GPU and data/prepared

What docs/distributed.md and docs/determinism.md claim about GPUs, checked where one is lent (no GPU in CI):
1. with `runtime.configure` (deterministic algorithms, cuDNN deterministic, cuBLAS workspace),
   fitting the scratch CNN twice from the same seed gives bit-identical weights on CUDA, and
   the streamed path (split read from its memory map) gives the same weights as the resident one;
2. the fine-tune recipe (EfficientNet-Lite0 with the package's ImageNet weights) is also
   bit-identical across two CUDA runs;
3. test accuracy on CUDA is close to the CPU's (the two differ in the last bits of every sum,
   so not equal), with throughput on each;
4. `runtime.precision`: the fine-tune in bf16 and fp16 (autocast; fp16 with a gradient
   scaler) beside fp32: test accuracy within one point of fp32's, images/s, and the share of
   the GPU's peak dense throughput that makes (model FLOPs from torch's FlopCounterMode, x3
   for the backward pass; the peak from `PEAK_TFLOPS` or --peak-tflops);
5. Keras on the GPU (after `make setup-gpu`): the scratch CNN trained twice with op
   determinism (bit-identical weights?) and its images/s beside torch's on the same GPU, each a
   fresh process through `bench.frameworks`, as the train stage runs (TensorFlow and torch
   never share a process); without TensorFlow's CUDA build it reports why it did not run;
6. `runtime.portable` on another CPU: the whole pipeline on this machine's CPU (the GPU hidden,
   `runtime.threads: 2` as committed) in a copy of the repository, `dvc repro -f`, must give
   every output hash the committed dvc.lock records (`--no-portable-check` skips it).
Results go to stdout and <out>/gpu.json; nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import time
from pathlib import Path

import torch

from pipeline import config, finetune, train
from pipeline.data import formats
from pipeline.frameworks.interface import RuntimeParams
from pipeline.frameworks.torch import inputs, recipe, runtime, weights
from pipeline.frameworks.torch import model as torch_model


def weights_digest(model: torch.nn.Module) -> str:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()[:16]


def test_acc(model: torch.nn.Module, test: formats.Split, device: torch.device) -> float:
    logits = recipe.predict_logits(model, test.images, device)
    return float((logits.argmax(1).numpy() == test.labels).mean())


def fit_scratch(prepared: Path, device: torch.device, p: train.TrainParams) -> dict:
    generator = runtime.seed_everything(p.seed)
    tr, va, te = (formats.load_split(prepared, s) for s in formats.SPLITS)
    model = torch_model.ScratchCNN(**train.model_args(p, tr))
    started = time.perf_counter()
    result = recipe.fit(model, tr, va, p, device, generator, desc=f"scratch/{device.type}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"digest": weights_digest(model), "test_acc": test_acc(model, te, device), "epochs": result.epochs_run,
            "images_per_s": round(result.epochs_run * len(tr) / seconds)}


# dense tensor-core peaks (TFLOP/s, no sparsity) by precision, from the vendors' data sheets
PEAK_TFLOPS = {
    "H200": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "H100": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "A100": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0},
}


def forward_flops(model: torch.nn.Module, side: int, channels: int, device: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, channels, side, side, device=device))
    return counter.get_total_flops()


def fit_finetune(prepared: Path, device: torch.device, p: finetune.FinetuneParams) -> dict:
    generator = runtime.seed_everything(p.seed)
    tr, va, te = (formats.load_split(prepared, s) for s in formats.SPLITS)
    net, _ = weights.load_pretrained(p.backbone, p.weights, p.weights_sha256)
    model = torch_model.PretrainedCNN(**finetune.model_args(p, tr), net=net)
    started = time.perf_counter()
    results = finetune.finetune(model, tr, va, p, device, generator, None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    images = sum(r.epochs_run for r in results) * len(tr)
    return {"digest": weights_digest(model), "test_acc": test_acc(model, te, device), "seconds": round(seconds, 1),
            "images_per_s": round(images / seconds), "flops_per_image": forward_flops(model, tr.image_size,
                                                                                      tr.channels, device)}


def portable_check() -> dict:
    """`dvc repro -f` on the CPU in a copy of the repository; the stages whose outputs differ
    from the committed dvc.lock's (none, when portable mode holds on this machine's CPU)."""
    import os
    import subprocess
    import tempfile

    import yaml

    from bench import REPO
    from bench.pipeline import bench_env, copy_repo
    from pipeline.runtime import portable

    def outs(lock: dict) -> dict:
        return {s: {o["path"]: o.get("md5") for o in v.get("outs", [])} for s, v in lock["stages"].items()}

    committed = outs(yaml.safe_load((REPO / "dvc.lock").read_text()))
    with tempfile.TemporaryDirectory(prefix="gpu-portable-") as tmp:
        repo = Path(tmp)
        copy_repo(repo)
        env = {**bench_env(repo), "CUDA_VISIBLE_DEVICES": ""}  # runtime.device auto: the CPU, as committed
        started = time.perf_counter()
        done = subprocess.run(["dvc", "repro", "-f"], cwd=repo, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode:
            return {"error": done.stderr[-2000:]}
        rebuilt = outs(yaml.safe_load((repo / "dvc.lock").read_text()))
    differ = sorted(s for s in committed if committed[s] != rebuilt.get(s))
    return {"cpu": portable.cpu_model(), "cpu_isa": portable.cpu_isa(), "cores": os.cpu_count(),
            "seconds": round(seconds, 1), "stages_differing": differ}


def keras_on_gpu() -> dict:
    """The scratch CNN on the GPU: keras twice, torch once, each in a fresh `bench.frameworks` process."""
    import subprocess
    import sys

    from bench import REPO

    runs: dict = {"keras": [], "torch": []}
    for name in ("keras", "keras", "torch"):
        cmd = [sys.executable, "-m", "bench.frameworks", "--child", name, "--data", "digits", "--device", "cuda"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["failed"])[-1]
            return {"error": f"{name}: {last}"}
        runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    keras_runs, torch_run = runs["keras"], runs["torch"][0]
    return {"keras": keras_runs, "torch": torch_run,
            "keras_reruns_identical": keras_runs[0]["digest"] == keras_runs[1]["digest"],
            "keras_over_torch": round(keras_runs[0]["images_per_second"] / torch_run["images_per_second"], 3),
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when PEAK_TFLOPS lacks it")
    parser.add_argument("--no-portable-check", dest="portable_check", action="store_false")
    args = parser.parse_args()
    tp = config.load("train", train.TrainParams)
    fp = config.load("finetune", finetune.FinetuneParams)
    cuda = runtime.configure(RuntimeParams(device="cuda"))
    report: dict = {"gpu": torch.cuda.get_device_name(cuda), "torch": torch.__version__}
    report["scratch_cuda"] = [fit_scratch(args.data, cuda, tp) for _ in range(2)]
    resident_bytes, inputs.RESIDENT_BYTES = inputs.RESIDENT_BYTES, 0
    report["scratch_cuda_streamed"] = fit_scratch(args.data, cuda, tp)
    inputs.RESIDENT_BYTES = resident_bytes
    report["finetune_cuda"] = [fit_finetune(args.data, cuda, fp) for _ in range(2)]
    for precision in ("bf16", "fp16"):
        runtime.configure(RuntimeParams(device="cuda", precision=precision))
        report[f"finetune_cuda_{precision}"] = fit_finetune(args.data, cuda, fp)
    runtime.configure(RuntimeParams(device="cuda"))
    name = next((k for k in PEAK_TFLOPS if k in report["gpu"]), None)
    for precision in ("fp32", "bf16", "fp16"):
        run = report["finetune_cuda"][0] if precision == "fp32" else report[f"finetune_cuda_{precision}"]
        peak = (PEAK_TFLOPS[name][precision] if name else args.peak_tflops) or float("nan")
        # forward + backward (about twice the forward) per training image; the head phase's
        # epochs run on cached features, so this overstates them: a ceiling, not a measurement
        run["share_of_peak"] = round(3 * run["flops_per_image"] * run["images_per_s"] / (peak * 1e12), 4)
    report["scratch_cpu"] = fit_scratch(args.data, torch.device("cpu"), dataclasses.replace(tp))
    report["keras_cuda"] = keras_on_gpu()
    if args.portable_check:
        report["portable_cpu_repro"] = portable_check()
    runs = report["scratch_cuda"]
    report["checks"] = {
        "scratch_cuda_reruns_identical": runs[0]["digest"] == runs[1]["digest"],
        "scratch_streamed_equals_resident": report["scratch_cuda_streamed"]["digest"] == runs[0]["digest"],
        "finetune_cuda_reruns_identical": report["finetune_cuda"][0]["digest"] == report["finetune_cuda"][1]["digest"],
        "scratch_acc_cuda_minus_cpu": round(runs[0]["test_acc"] - report["scratch_cpu"]["test_acc"], 4),
        "finetune_bf16_within_one_point_of_fp32": abs(report["finetune_cuda_bf16"]["test_acc"]
                                                      - report["finetune_cuda"][0]["test_acc"]) <= 0.01,
        "finetune_fp16_within_one_point_of_fp32": abs(report["finetune_cuda_fp16"]["test_acc"]
                                                      - report["finetune_cuda"][0]["test_acc"]) <= 0.01,
    }
    if "error" not in report["keras_cuda"]:
        report["checks"]["keras_cuda_reruns_identical"] = report["keras_cuda"]["keras_reruns_identical"]
    if args.portable_check:
        differing = report["portable_cpu_repro"].get("stages_differing")
        report["checks"]["portable_cpu_repro_matches_dvc_lock"] = differing == []
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
