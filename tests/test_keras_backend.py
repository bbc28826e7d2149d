"""The Keras scratch CNN: same architecture and recipe as torch's, deterministic across processes.

TensorFlow runs in subprocesses here: importing torch._dynamo (any torch optimizer) after
TensorFlow segfaults, and the rest of the suite uses torch in this process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")

SCRIPT = r"""
import hashlib, json, sys
import numpy as np
import torch  # before TensorFlow, always: torch._dynamo after TF segfaults
from pipeline import data, keras_backend as kb, models, train
check = sys.argv[1]
p = train.TrainParams(epochs=2, batch_size=64)
if check == "schedule":
    out = {}
    for kind in ("onecycle", "cosine", "constant"):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=p.lr)
        if kind == "onecycle":
            sch = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=50, pct_start=p.warmup_fraction, cycle_momentum=False)
        elif kind == "cosine":
            sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
        else:
            sch = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
        lrs = []
        for _ in range(50):
            lrs.append(opt.param_groups[0]["lr"]); opt.step(); sch.step()
        out[kind] = lrs
    kb.configure(0, 1)
    keras_lrs = {k: [float(kb.schedule_value(k, p.lr, 50, p.warmup_fraction, i)) for i in range(50)] for k in out}
    print(json.dumps({"torch": out, "keras": keras_lrs}))
    sys.exit()
prepared = sys.argv[2]
trn, val, tst = (data.load_split(prepared, s) for s in data.SPLITS)
args = train.model_args(p, trn)
torch_params = sum(q.numel() for q in models.ScratchCNN(**args).parameters())
kb.configure(p.seed, 1)
model = kb.build_scratch_cnn(**args)
if check == "build":
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    print(json.dumps({"trainable": trainable, "torch": torch_params, "out": list(model.output.shape[1:])}))
elif check == "overfit":
    one = data.Split(trn.images[:32], trn.labels[:32], trn.classes)
    q = train.TrainParams(epochs=60, batch_size=32, lr=3e-3, dropout=0.0, augment_shift=0, label_smoothing=0.0, early_stopping_patience=0)
    result = kb.fit(kb.build_scratch_cnn(**{**args, "dropout": 0.0}), one, one, q)
    print(json.dumps({"loss": result.history[-1]["train/loss"], "acc": result.history[-1]["train/acc"]}))
elif check == "export":
    import os, tempfile
    import keras, onnxruntime as ort
    kb.fit(model, trn, val, train.TrainParams(epochs=1))
    shape, x = trn.images.shape[1:], np.asarray(tst.images, np.float32) / 255
    probs = keras.ops.softmax(model(x, training=False)).numpy()
    files = {"keras": kb.save_keras(model, "unused")}
    saved = os.path.join(tempfile.mkdtemp(), "1")
    kb.save_savedmodel(model, saved, shape)
    files["savedmodel"] = b"".join(f.encode() + open(os.path.join(r, f), "rb").read() for r, _, fs in sorted(os.walk(saved)) for f in sorted(fs))
    files["tflite"] = kb.to_tflite(saved)
    files["int8"] = kb.to_tflite(saved, np.asarray(trn.images[:100], np.float32) / 255)
    files["onnx"] = kb.to_onnx(model, shape, 17)
    session = ort.InferenceSession(files["onnx"], providers=["CPUExecutionProvider"])
    outputs = {"tflite": kb.tflite_predict(files["tflite"], x), "int8": kb.tflite_predict(files["int8"], x),
               "onnx": session.run(None, {"image": x})[0]}
    print(json.dumps({"hashes": {k: hashlib.sha256(v).hexdigest() for k, v in files.items()},
                      "max_abs_diff": {k: float(np.abs(v - probs).max()) for k, v in outputs.items()},
                      "top1": {k: float((v.argmax(1) == probs.argmax(1)).mean()) for k, v in outputs.items()}}))
else:
    result = kb.fit(model, trn, val, p)
    digest = hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()
    logits = kb.predict_logits(model, tst)
    print(json.dumps({"digest": digest, "history": result.history, "test_acc": float((logits.argmax(1) == tst.labels).mean())}))
"""


def keras_run(repo_root, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo_root), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_schedules_follow_torchs_formulas(repo_root):
    out = keras_run(repo_root, "schedule")
    for kind, expected in out["torch"].items():
        assert np.allclose(out["keras"][kind], expected, rtol=1e-9, atol=1e-12), kind


def test_the_keras_model_has_the_torch_models_shape(repo_root, prepared):
    out = keras_run(repo_root, "build", str(prepared))
    assert out["trainable"] == out["torch"]  # layer for layer the same parameters
    assert out["out"] == [10]


def test_one_batch_is_learnt_by_heart(repo_root, prepared):
    out = keras_run(repo_root, "overfit", str(prepared))
    assert out["acc"] == 1.0 and out["loss"] < 0.05


def test_keras_training_is_identical_in_two_processes(repo_root, prepared):
    a = keras_run(repo_root, "fit", str(prepared))
    b = keras_run(repo_root, "fit", str(prepared))
    assert a["digest"] == b["digest"] and a["history"] == b["history"]
    assert a["test_acc"] > 0.9  # two epochs on the tiny split already learn the digits


def test_every_export_agrees_with_keras_and_is_byte_identical_on_rerun(repo_root, prepared):
    a = keras_run(repo_root, "export", str(prepared))
    b = keras_run(repo_root, "export", str(prepared))
    assert a["hashes"] == b["hashes"]  # .keras, SavedModel, TFLite float and int8, ONNX
    assert a["max_abs_diff"]["onnx"] < 1e-5 and a["max_abs_diff"]["tflite"] < 1e-5
    assert a["top1"]["onnx"] == a["top1"]["tflite"] == 1.0
    assert a["max_abs_diff"]["int8"] < 0.25 and a["top1"]["int8"] >= 0.97, a  # quantised: close, not equal
