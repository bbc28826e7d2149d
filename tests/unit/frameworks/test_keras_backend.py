"""The keras framework: the same network and recipe as torch's, its stages and its exports.

TensorFlow runs in subprocesses only, never in pytest's process (not even to skip on it):
importing torch._dynamo (any torch optimizer) after TensorFlow segfaults, and the rest of the
suite builds torch optimizers in this process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from support import TINY_PARAMS, run

from pipeline.data import formats
from pipeline.frameworks import card

pytestmark = pytest.mark.slow  # TensorFlow starts in a subprocess in every test here

SCRIPT = r"""
import json, sys
import numpy as np
import torch  # before TensorFlow, always: torch._dynamo after TF segfaults
from pipeline import train
from pipeline.data import formats
from pipeline.frameworks.torch import model as torch_model
check, prepared = sys.argv[1], sys.argv[2]
p = train.TrainParams(epochs=2, batch_size=64)
trn = formats.load_split(prepared, "train")
args = train.model_args(p, trn)
if check == "unit":
    lrs = {}
    for kind in ("onecycle", "cosine", "constant"):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=p.lr)
        if kind == "onecycle":
            sch = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=p.lr, total_steps=50, pct_start=p.warmup_fraction, cycle_momentum=False,
            )
        elif kind == "cosine":
            sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
        else:
            sch = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
        lrs[kind] = []
        for _ in range(50):
            lrs[kind].append(opt.param_groups[0]["lr"]); opt.step(); sch.step()
    # three steps of each optimizer on f(w) = sum(w^3), weight decay 0.1, a constant rate
    start, steps = [1.0, -2.0, 0.5], {}
    for name, make in {"adam": lambda w: torch.optim.Adam(w, lr=0.01, weight_decay=0.1),
                       "adamw": lambda w: torch.optim.AdamW(w, lr=0.01, weight_decay=0.1),
                       "sgd": lambda w: torch.optim.SGD(
                           w, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1,
                       )}.items():
        w = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64)); opt = make([w])
        for _ in range(3):
            opt.zero_grad(); (w ** 3).sum().backward(); opt.step()
        steps[name] = w.detach().tolist()
    net = torch_model.ScratchCNN(**args)
    torch_params = sum(q.numel() for q in net.parameters())
    torch_bounds = [
        float(m.weight.abs().max()) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]

    from pipeline.frameworks.keras import backend as kb_backend, model as kb_model, recipe as kb_recipe
    from pipeline.config import ConfigError
    tf = kb_backend.configure(0, 1)
    import keras
    out = {"torch_lrs": lrs, "keras_lrs": {
        k: [float(kb_recipe.schedule_value(k, p.lr, 50, p.warmup_fraction, i)) for i in range(50)] for k in lrs
    }}
    out["torch_steps"], out["keras_steps"] = steps, {}
    for name in steps:
        q = train.TrainParams(
            optimizer=name, lr=0.01, weight_decay=0.1, schedule="constant", grad_clip=0.0, momentum=0.9,
        )
        opt, w = kb_recipe.make_optimizer(q, 3), keras.Variable(np.array(start), dtype="float64")
        for _ in range(3):
            opt.apply([3 * w.value ** 2], [w])
        out["keras_steps"][name] = np.asarray(w.value).tolist()
    # the one-cycle rate in a traced step: computed once per graph (Keras asks once per variable
    # and once more), and the same steps as eager Keras, which computes it each time it asks
    runs = {}
    for mode in ("eager", "traced"):
        opt = kb_recipe.make_optimizer(train.TrainParams(lr=0.01, weight_decay=0.1, schedule="onecycle"), 10)
        ws = [keras.Variable(np.linspace(-1, 1, 5, dtype=np.float32) * k) for k in (1, 2, 3)]
        def step():
            opt.apply([3 * w.value ** 2 for w in ws], ws)
        if mode == "traced":
            traced = tf.function(step)
            out["cos_ops"] = sum(op.type == "Cos" for op in traced.get_concrete_function().graph.get_operations())
            step = traced
        for _ in range(4):
            step()
        runs[mode] = [np.asarray(w.value).tolist() for w in ws]
    out["traced_as_eager"] = runs["traced"] == runs["eager"]
    model = kb_model.build_scratch_cnn(**args)
    out["trainable"], out["torch_params"] = sum(int(np.prod(v.shape)) for v in model.trainable_weights), torch_params
    out["output"] = list(model.output.shape[1:])
    out["bounds"] = torch_bounds, [float(np.abs(l.kernel.numpy()).max()) for l in model.layers if hasattr(l, "kernel")]
    # a photo-sized network: box averaging and bilinear resizing inside, four pooling blocks, gap head
    photo = {**args, "in_channels": 3, "image_size": 90, "input_size": 64, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    out["photo_params"] = [
        sum(q.numel() for q in torch_model.ScratchCNN(**photo).parameters()),
        sum(int(np.prod(v.shape)) for v in kb_model.build_scratch_cnn(**photo).trainable_weights),
    ]
    ramp = tf.broadcast_to(tf.reshape(tf.linspace(0.0, 1.0, 32), (1, 1, 32, 1)), (64, 32, 32, 1))
    crops, _ = kb_recipe.crop_flip_batch(tf.constant(0, tf.int64), (ramp, tf.zeros(64)), 0.35, 7)
    again, _ = kb_recipe.crop_flip_batch(tf.constant(0, tf.int64), (ramp, tf.zeros(64)), 0.35, 7)
    steps = np.diff(crops.numpy()[:, 16, :, 0], axis=1)
    out["crops"] = {"shape": list(crops.shape), "same": bool(np.array_equal(crops, again)),
                    "ramps": bool(((steps >= -1e-5).all(1) | (steps <= 1e-5).all(1)).all()),
                    "flipped": int((steps <= 1e-5).all(1).sum())}
    try:
        kb_backend.configure(0, 1, "cuda")
    except ConfigError as exc:
        out["cuda_error"] = str(exc)
    print(json.dumps(out))
elif check == "paths":
    # the split held as one tensor and gathered in the graph, or streamed from its memory map
    # by a Python generator: the same batches, so the same weights bit for bit; and a whole
    # epoch per call to the graph the same weights as one step per call
    from pipeline.frameworks.keras import backend as kb_backend, model as kb_model, recipe as kb_recipe
    kb_backend.configure(0, 2)
    q = train.TrainParams(epochs=2, batch_size=64)
    import keras
    built, fit, compile_, per_call = [], keras.Model.fit, keras.Model.compile, []
    def recorded(self, *a, **k):  # the optimizer made before the training step is traced
        built.append(self.optimizer.built)
        return fit(self, *a, **k)
    def steps_per_call(self, *a, **k):
        k["steps_per_execution"] = forced or k["steps_per_execution"]
        per_call.append(k["steps_per_execution"])
        return compile_(self, *a, **k)
    keras.Model.fit, keras.Model.compile = recorded, steps_per_call
    weights = {}
    for path, limit, forced in (("resident", kb_recipe.RESIDENT_BYTES, 0), ("streamed", 0, 0),
                                ("step_per_call", kb_recipe.RESIDENT_BYTES, 1)):
        kb_recipe.RESIDENT_BYTES = limit
        keras.utils.set_random_seed(0)
        net = kb_model.build_scratch_cnn(**args)
        result = kb_recipe.fit(net, trn, formats.load_split(prepared, "val"), q)
        weights[path] = [w.tobytes().hex() for w in net.get_weights()]
        weights[path + "_val_loss"] = result.history[-1]["val/loss"]
    print(json.dumps({"same": weights["resident"] == weights["streamed"],
                      "same_per_step": weights["resident"] == weights["step_per_call"], "built": built,
                      "per_call": per_call, "steps": -(-len(trn) // q.batch_size),
                      "val_loss": [weights[k + "_val_loss"] for k in ("resident", "streamed", "step_per_call")]}))
elif check == "onnx_photo":
    # a photo-sized network (box averaging, then bilinear resizing, five BatchNorm blocks) with
    # BatchNorm statistics far from their initial ones, exported to ONNX and run by onnxruntime
    import onnxruntime as ort
    from pipeline.frameworks.keras import backend as kb_backend, export as kb_export, model as kb_model
    kb_backend.configure(0, 1)
    import keras
    net = kb_model.build_scratch_cnn(num_classes=2, in_channels=3, image_size=180, input_size=64,
                                     mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.default_rng(0)
    for layer in net.layers:
        if layer.name.startswith("bn"):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma * rng.uniform(0.5, 1.5, gamma.shape), beta + rng.normal(0, 0.1, beta.shape),
                               mean + rng.normal(0, 0.2, mean.shape), var * rng.uniform(0.5, 2, var.shape)])
    x = rng.uniform(0, 1, (8, 180, 180, 3)).astype(np.float32)
    expected = keras.ops.softmax(net(x, training=False)).numpy()
    session = ort.InferenceSession(kb_export.to_onnx(net, (180, 180, 3), 17),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    print(json.dumps({"max_abs_diff": float(np.abs(got - expected).max())}))
elif check == "fused_bn":
    # one training call through FusedBatchNormV3 (inside `fused_batch_norm`) against Keras' own
    import contextlib, io, zipfile
    from pipeline.frameworks.keras import backend as kb_backend, batch_norm as kb_bn, model as kb_model
    tf = kb_backend.configure(0, 1)
    import keras
    x = tf.constant(np.random.default_rng(0).random((4, *trn.images.shape[1:]), np.float32))
    def op_types(net):
        graph = tf.function(lambda x: net(x, training=True)).get_concrete_function(x).graph
        return {op.type for op in graph.get_operations()}
    def train_call(fused):
        keras.utils.set_random_seed(0)
        net = kb_model.build_scratch_cnn(**{**args, "dropout": 0.0})
        bns = [layer for layer in net.layers if layer.name.startswith("bn")]
        with kb_bn.fused_batch_norm(net) if fused else contextlib.nullcontext([]) as switched:
            inside = op_types(net)
            with tf.GradientTape() as tape:
                y = net(x, training=True)
                loss = tf.reduce_sum(y * tf.range(10, dtype=tf.float32))
            grads = tape.gradient(loss, net.trainable_weights)
        saved = json.loads(zipfile.ZipFile(io.BytesIO(kb_model.save_keras(net))).read("config.json"))
        return {"switched": len(switched), "fused_op": "FusedBatchNormV3" in inside,
                "fused_after": "FusedBatchNormV3" in op_types(net),
                "own_call_back": all("call" not in vars(b) for b in bns),
                "classes": sorted({l["class_name"] for l in saved["config"]["layers"] if l["name"].startswith("bn")}),
                "y": y.numpy().tolist(), "grads": [g.numpy().ravel().tolist() for g in grads],
                "n": [4 * b.input.shape[1] * b.input.shape[2] for b in bns],
                "moving_mean": [b.moving_mean.numpy().tolist() for b in bns],
                "moving_variance": [b.moving_variance.numpy().tolist() for b in bns]}
    print(json.dumps({"fused": train_call(True), "keras": train_call(False), "momentum": kb_model.BN_MOMENTUM}))
elif check == "overfit":
    from pipeline.frameworks.keras import backend as kb_backend, model as kb_model, recipe as kb_recipe
    kb_backend.configure(0, 1)
    one = formats.Split(trn.images[:32], trn.labels[:32], trn.classes)
    q = train.TrainParams(
        epochs=60, batch_size=32, lr=3e-3, dropout=0.0, augment_shift=0, label_smoothing=0.0,
        early_stopping_patience=0,
    )
    result = kb_recipe.fit(kb_model.build_scratch_cnn(**{**args, "dropout": 0.0}), one, one, q)
    print(json.dumps({"loss": result.history[-1]["train/loss"], "acc": result.history[-1]["train/acc"]}))
"""


def keras_run(repo_root, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo_root), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_keras_builds_torchs_network_with_torchs_schedules_and_optimizers(repo_root, prepared):
    out = keras_run(repo_root, "unit", str(prepared))
    for kind, expected in out["torch_lrs"].items():
        assert np.allclose(out["keras_lrs"][kind], expected, rtol=1e-9, atol=1e-12), kind
    # torch's weight decay: decoupled in AdamW, L2 in Adam and SGD (Keras decouples all three)
    for name, expected in out["torch_steps"].items():
        assert np.allclose(out["keras_steps"][name], expected, rtol=1e-6, atol=1e-9), (
            name, out["keras_steps"][name], expected,
        )
    assert out["traced_as_eager"] and out["cos_ops"] == 2  # one-cycle's rise and fall, once
    assert out["trainable"] == out["torch_params"]  # layer for layer the same parameters
    assert out["photo_params"][0] == out["photo_params"][1]  # and at photo sizes, where the blocks deepen
    assert out["crops"]["shape"] == [64, 32, 32, 1] and out["crops"]["same"] and out["crops"]["ramps"]
    assert 16 <= out["crops"]["flipped"] <= 48  # random resized crops, about half of them mirrored
    assert out["output"] == [10]
    torch_bounds, keras_bounds = out["bounds"]  # torch's initial weight scale, layer by layer
    assert len(keras_bounds) == len(torch_bounds) and np.allclose(keras_bounds, torch_bounds, rtol=0.05)
    assert "runtime.device is 'cuda' but TensorFlow (tensorflow-cpu, which has no GPU support) sees no GPU" in out[
        "cuda_error"] and "make setup-gpu" in out["cuda_error"]


def test_the_resident_and_streamed_splits_and_an_epoch_per_call_train_the_same_weights(repo_root, prepared):
    out = keras_run(repo_root, "paths", str(prepared))
    assert out["same"] and out["same_per_step"], out["val_loss"]
    assert out["steps"] > 1 and out["per_call"] == [out["steps"], out["steps"], 1]  # an epoch a call; one step
    # a step that makes the optimizer's variables is traced twice: 0.8 s a fit on the digits
    assert out["built"] == [True, True, True]


def test_a_photo_sized_network_exports_to_onnx_in_inference_mode(repo_root, prepared):
    # traced without training=False, this network's ONNX file kept BatchNorm's training-mode
    # graph; tf2onnx "fixed" it, and on the pets photos it then disagreed by 0.46 (0.011 here)
    out = keras_run(repo_root, "onnx_photo", str(prepared))
    assert out["max_abs_diff"] < 1e-5, out


def test_batch_norm_trains_through_the_fused_kernel_and_saves_as_keras_own(repo_root, prepared):
    out = keras_run(repo_root, "fused_bn", str(prepared))
    fused, own = out["fused"], out["keras"]
    assert fused["switched"] == 3 and fused["fused_op"] and not own["fused_op"]
    assert not fused["fused_after"] and fused["own_call_back"]  # the switch ends with the fit
    assert fused["classes"] == own["classes"] == ["BatchNormalization"]  # a .keras file loads without us
    # the same training call: outputs, gradients and moving means agree to float rounding
    assert np.allclose(fused["y"], own["y"], rtol=1e-4, atol=1e-5)
    for got, expected in zip(fused["grads"], own["grads"], strict=True):
        assert np.allclose(got, expected, rtol=1e-3, atol=1e-4)
    momentum = out["momentum"]  # the weight on the old value (torch's 0.1 is Keras' 0.9)
    for layer, n in enumerate(fused["n"]):
        assert np.allclose(fused["moving_mean"][layer], own["moving_mean"][layer], rtol=1e-5, atol=1e-6)
        # the moving variance from the unbiased batch variance, as torch's running_var: n / (n - 1)
        # times Keras' biased one (n = 4 images x the layer's pixels: 1,024, 256 and 64 here)
        unbiased = (np.array(fused["moving_variance"][layer]) - momentum) / (1 - momentum)
        biased = (np.array(own["moving_variance"][layer]) - momentum) / (1 - momentum)
        assert np.allclose(unbiased, biased * n / (n - 1), rtol=2e-5), (layer, n)
        assert not np.allclose(unbiased, biased, rtol=2e-5)


def test_one_batch_is_learnt_by_heart(repo_root, prepared):
    out = keras_run(repo_root, "overfit", str(prepared))
    assert out["acc"] == 1.0 and out["loss"] < 0.05


KERAS_STAGES = r"""
import sys
from pipeline.__main__ import main
data = ["--data", sys.argv[1]]
for argv in (["train", *data], ["evaluate", "--model", "scratch", *data], ["export", "--model", "scratch", *data]):
    main(argv)
print("torch modules loaded:", sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def test_the_keras_stages_train_evaluate_and_export_with_parity(tmp_path, repo_root, prepared):
    """train, evaluate and export as DVC runs them, with train.framework: keras."""
    # four epochs: the global-average-pooled head needs more than two to pass 0.9 here (0.88 after two)
    keras_params = TINY_PARAMS.replace("framework: torch", "framework: keras").replace("epochs: 2,", "epochs: 4,")
    (tmp_path / "params.yaml").write_text(keras_params)
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    # the three stages in one process, through the entry point dvc.yaml runs: a keras run never imports torch
    done = run([sys.executable, "-c", KERAS_STAGES, str(prepared)], tmp_path, env)
    assert done.stdout.strip().splitlines()[-1] == "torch modules loaded: []"

    model_card = card.read_card(tmp_path / "models/scratch")
    assert model_card.framework == "keras" and model_card.arch == "scratch_cnn"
    assert model_card.classes == tuple(str(i) for i in range(10))
    folder = sorted(p.name for p in (tmp_path / "models/scratch").iterdir())
    assert folder == ["SHA256SUMS", "model.json", "model.keras"]
    trained = json.loads((tmp_path / "dvclive/train/metrics.json").read_text())
    loss_rows = (tmp_path / "dvclive/train/plots/metrics/val/loss.tsv").read_text().splitlines()
    assert trained["epochs_run"] == 4 and len(loss_rows) == 5
    tested = json.loads((tmp_path / "dvclive/evaluate/scratch/metrics.json").read_text())["test"]
    assert tested["acc"] > 0.9  # four epochs on the tiny split already learn the digits

    parity = json.loads((tmp_path / "dvclive/export/scratch/metrics.json").read_text())
    assert set(parity) == {"savedmodel", "tflite", "tflite_int8", "onnx"}
    for name in ("savedmodel", "tflite", "onnx"):
        assert parity[name]["max_abs_diff"] < 1e-5 and parity[name]["top1_agreement"] == 1.0, name
    assert parity["tflite_int8"]["max_abs_diff"] < 0.1 and parity["tflite_int8"]["top1_agreement"] >= 0.98

    out = tmp_path / "exports/scratch"
    assert {"model.json", "model.onnx", "model.tflite", "model_int8.tflite", "saved_model/1/saved_model.pb"} <= {
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    meta = json.loads((out / "model.json").read_text())
    assert (
        meta["framework"] == "keras" and meta["input"]["layout"] == "NHWC"
        and meta["input"]["shape"] == ["batch", 16, 16, 1]
    )
    # the ONNX file stands alone: NHWC floats in, probabilities out, the card embedded
    embedded = {p.key: json.loads(p.value) for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert embedded["classes"] == meta["classes"] and embedded["input"]["layout"] == "NHWC"
    x = np.asarray(formats.load_split(prepared, "test").images[:5], np.float32) / 255
    proba = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert proba.shape == (5, 10) and np.allclose(proba.sum(1), 1, atol=1e-5)


def test_tensorflows_cuda_libraries_load_from_their_own_folder(tmp_path):
    """`make setup-gpu` puts TensorFlow's CUDA 12 libraries beside torch's CUDA 13 ones: a keras
    process loads what it finds there; one that needs what this machine lacks is skipped."""
    from pipeline.frameworks.keras import cuda

    assert cuda.preload(tmp_path / "absent") == []
    zlib = next(p for p in (Path("/lib/x86_64-linux-gnu"), Path("/usr/lib/x86_64-linux-gnu"), Path("/lib64"))
                if (p / "libz.so.1").is_file()) / "libz.so.1"
    (tmp_path / "nvidia/zlib/lib").mkdir(parents=True)
    shutil.copy(zlib, tmp_path / "nvidia/zlib/lib/libz.so.1")
    (tmp_path / "nvidia/cudnn/lib").mkdir(parents=True)
    (tmp_path / "nvidia/cudnn/lib/libcudnn_broken.so.9").write_bytes(b"not a library")
    (tmp_path / "nvidia/cudnn/lib/notes.txt").write_text("not a library either")
    assert [p.name for p in cuda.libraries(tmp_path)] == ["libcudnn_broken.so.9", "libz.so.1"]
    assert cuda.preload(tmp_path) == ["libz.so.1"]
