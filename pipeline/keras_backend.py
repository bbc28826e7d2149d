"""The scratch CNN and its training recipe in Keras 3 on TensorFlow: the `keras` framework.

Mirrors `models.ScratchCNN` and `engine.fit` from the same params: conv 32 -> pool -> conv 64
-> pool [-> conv 128] -> dense hidden -> dropout -> dense classes, batch norm with torch's
momentum and epsilon, AdamW / Adam / SGD, the one-cycle / cosine / constant schedules with
torch's formulas, label smoothing, global gradient clipping, random shifts, early stopping on
the unsmoothed validation loss with the best weights restored.

Exports (`Backend.export`): a SavedModel for TensorFlow Serving (`saved_model/1/`, signature
serving_default: float32 NHWC `image` in [0, 1] -> `probabilities`), TFLite in float32 and
full-integer int8 (`model.tflite`, `model_int8.tflite`) and ONNX (`model.onnx`, through
tf2onnx). Every file is byte-identical on a rerun; see each writer for what that took.

`backends` imports this module only for `train.framework: keras` or a keras model folder, so
the torch stages never import TensorFlow (about 8 s here, with its configuration). `configure` runs before anything else
touches TensorFlow: it fixes the environment TensorFlow reads once, at import.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import backends, data, files
from pipeline.config import ConfigError
from pipeline.engine import FitParams, FitResult

if TYPE_CHECKING:
    import keras

    from pipeline.export import ExportParams
    from pipeline.runtime import RuntimeParams
    from pipeline.tracking import StageRun

BN_MOMENTUM = 0.9  # torch's BatchNorm momentum 0.1 is Keras' 0.9 (the weight on the old value)
BN_EPSILON = 1e-5  # torch's default; Keras' is 1e-3


def configure(seed: int, threads: int, device: str = "cpu") -> Any:
    """Deterministic TensorFlow: fixed threads, deterministic ops, seeds, the device; returns the module.

    oneDNN is switched off explicitly: TensorFlow turns it on by itself on AVX-512 CPUs, and
    its kernels change results. The thread count changes float sums, so it is pinned."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no C++ start-up chatter in stage logs
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if device == "cuda" and not gpus:
        raise ConfigError(
            "params.yaml: runtime.device is 'cuda' but TensorFlow sees no GPU (the pinned tensorflow-cpu "
            "has no GPU support); use 'auto' or 'cpu' for train.framework keras, or install a CUDA build of TensorFlow 2.21"
        )
    try:
        if device == "cpu" and gpus:
            tf.config.set_visible_devices([], "GPU")
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised in this process (tests): the first setting stands
        pass
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)
    return tf


class Backend(backends.Backend):
    """`backends.Backend` for Keras 3 on TensorFlow; builds the scratch CNN only (the
    pretrained backbones are timm's and torchvision's, so `finetune` stays torch)."""

    framework = "keras"
    model_file = "model.keras"
    layout = "NHWC"

    def __init__(self, rt: RuntimeParams, seed: int = 0) -> None:
        self.runtime = rt
        self.tf = configure(seed, rt.threads, rt.device)

    def describe(self) -> dict[str, str]:
        import keras

        gpu = bool(self.tf.config.get_visible_devices("GPU"))
        return {"framework": self.framework, "tensorflow": self.tf.__version__, "keras": keras.__version__,
                "device": "gpu" if gpu else "cpu", "threads": str(self.runtime.threads), "deterministic": "true"}

    def build(self, arch: str, model_args: dict[str, Any]) -> keras.Model:
        if arch != "scratch_cnn":
            raise ConfigError(f"the keras framework builds 'scratch_cnn' only, not {arch!r}; use train.framework torch")
        return build_scratch_cnn(**{k: tuple(v) if isinstance(v, list) else v for k, v in model_args.items()})

    def fit(self, model, train, val, p, run=None, desc="train") -> FitResult:
        return fit(model, train, val, p, run, desc)

    def serialize(self, model: keras.Model, card: backends.ModelCard) -> bytes:
        return save_keras(model)

    def deserialize(self, path: Path, card: backends.ModelCard) -> keras.Model:
        import keras

        # safe_mode (the default, stated): a Lambda layer's pickled code would be refused
        return keras.saving.load_model(path, compile=False, safe_mode=True)

    def predict_proba(self, model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
        return backends.softmax64(predict_logits(model, images, batch_size))

    def export(self, model: keras.Model, out: Path, test: np.ndarray, calibration: np.ndarray, meta: dict, p: ExportParams) -> dict[str, np.ndarray]:
        shape = tuple(test.shape[1:])
        saved = out / "saved_model" / "1"  # <model>/<version>/ is the folder TF Serving watches
        save_savedmodel(model, str(saved), shape)
        calibration = np.asarray(calibration, np.float32) / 255
        tflite, int8 = to_tflite(str(saved)), to_tflite(str(saved), calibration)
        onnx_bytes = to_onnx(model, shape, p.opset, meta)
        files.write_bytes(out / "model.tflite", tflite)
        files.write_bytes(out / "model_int8.tflite", int8)
        files.write_bytes(out / "model.onnx", onnx_bytes)
        threads = self.runtime.threads
        return {
            "savedmodel": savedmodel_probabilities(str(saved), backends.float_batches(test, p.batch_size)),
            "tflite": tflite_predict(tflite, backends.float_batches(test, p.batch_size), threads),
            "tflite_int8": tflite_predict(int8, backends.float_batches(test, p.batch_size), threads),
            "onnx": backends.onnx_probabilities(onnx_bytes, backends.float_batches(test, p.batch_size), threads),
        }


def build_scratch_cnn(
    num_classes: int,
    in_channels: int = 1,
    image_size: int = 32,
    conv3: bool = True,
    batch_norm: bool = True,
    dropout: float = 0.3,
    hidden: int = 128,
    mean: tuple[float, ...] = (0.5,),
    std: tuple[float, ...] = (0.5,),
) -> keras.Model:
    """`models.ScratchCNN` in Keras: float [0, 1] NHWC in, logits out, normalisation inside."""
    import keras
    from keras import layers

    inputs = keras.Input((image_size, image_size, in_channels), name="image")
    # (x - mean) / std as constants, not Normalization's variables: tf2onnx left those as graph inputs
    scale = np.array([1 / s for s in std], np.float32)
    x = layers.Rescaling(scale=scale, offset=-np.array(mean, np.float32) * scale, name="normalize")(inputs)
    widths = [32, 64, 128] if conv3 else [32, 64]
    for i, width in enumerate(widths):
        fan_in = (in_channels if i == 0 else widths[i - 1]) * 9
        x = layers.Conv2D(width, 3, padding="same", use_bias=not batch_norm, name=f"conv{i + 1}", **torch_init(fan_in))(x)
        if batch_norm:
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"bn{i + 1}")(x)
        x = layers.ReLU()(x)
        if i < 2:
            x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)  # (h, w, c) order where torch's is (c, h, w): a fixed permutation of the next weights
    x = layers.Dense(hidden, activation="relu", name="hidden", **torch_init(x.shape[-1]))(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    logits = layers.Dense(num_classes, name="logits", **torch_init(hidden))(x)
    return keras.Model(inputs, logits, name="scratch_cnn")


def torch_init(fan_in: int) -> dict[str, Any]:
    """torch's default for nn.Conv2d and nn.Linear, kaiming_uniform(a=sqrt(5)), is U(-b, b)
    with b = 1 / sqrt(fan_in), and the bias the same; Keras' own (Glorot, zero bias) would
    start the two frameworks from differently scaled weights."""
    import keras

    bound = 1 / math.sqrt(fan_in)
    return {"kernel_initializer": keras.initializers.RandomUniform(-bound, bound),
            "bias_initializer": keras.initializers.RandomUniform(-bound, bound)}


def learning_rate(p: FitParams, total_steps: int) -> Any:
    """The schedule with torch's formulas (OneCycleLR: cosine, div 25, final div 1e4)."""
    import keras

    @keras.saving.register_keras_serializable(package="pipeline")
    class TorchSchedule(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, kind: str, peak: float, total: int, warmup: float) -> None:
            self.kind, self.peak, self.total, self.warmup = kind, peak, total, warmup

        def __call__(self, step):
            import tensorflow as tf

            return tf.cast(schedule_value(self.kind, self.peak, self.total, self.warmup, step), tf.float32)

        def get_config(self) -> dict:
            return {"kind": self.kind, "peak": self.peak, "total": self.total, "warmup": self.warmup}

    return TorchSchedule(p.schedule, p.lr, total_steps, p.warmup_fraction)


def schedule_value(kind: str, peak: float, total: int, warmup: float, step):
    """The learning rate at `step` (a number or a tensor), as torch's schedulers compute it."""
    import tensorflow as tf

    step = tf.cast(step, tf.float64)
    if kind == "constant":
        return tf.constant(peak, tf.float64)
    if kind == "cosine":  # CosineAnnealingLR(T_max=total, eta_min=0)
        return peak * (1 + tf.cos(math.pi * step / total)) / 2
    initial, final = peak / 25, peak / 25 / 1e4
    rise_end = float(warmup * total) - 1  # torch's phase boundary: pct_start * total_steps - 1
    fall_end = float(total - 1)

    def anneal(start, end, fraction):
        return end + (start - end) / 2 * (1 + tf.cos(math.pi * fraction))

    rising = anneal(initial, peak, step / rise_end)
    falling = anneal(peak, final, (step - rise_end) / (fall_end - rise_end))
    return tf.where(step <= rise_end, rising, falling)


def make_optimizer(p: FitParams, total_steps: int) -> Any:
    """torch's optimizer semantics. AdamW decays decoupled in both frameworks (w -= lr * wd * w
    before the update). torch's Adam and SGD take weight_decay as L2, wd * w added to the
    clipped gradient, where Keras' would decay decoupled: `with_l2` gives them torch's."""
    import keras

    lr = learning_rate(p, total_steps)
    clip = {"global_clipnorm": p.grad_clip} if p.grad_clip else {}
    if p.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=p.weight_decay, epsilon=1e-8, **clip)
    if p.optimizer == "adam":
        return with_l2(keras.optimizers.Adam)(lr, epsilon=1e-8, l2=p.weight_decay, **clip)
    return with_l2(keras.optimizers.SGD)(lr, momentum=p.momentum, nesterov=p.momentum > 0, l2=p.weight_decay, **clip)


def with_l2(optimizer: type) -> type:
    """`optimizer` with torch's coupled weight decay: g + l2 * w after clipping, before the update.
    (With momentum, SGD still differs in one way: Keras scales the velocity by the current rate
    when it accumulates, torch when it applies, which matters only while the rate changes.)"""

    class L2(optimizer):
        def __init__(self, *args, l2: float = 0.0, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.l2 = l2

        def _backend_update_step(self, grads, trainable_variables, learning_rate):
            if self.l2:
                grads = [g + self.l2 * v for g, v in zip(grads, trainable_variables, strict=True)]
            return super()._backend_update_step(grads, trainable_variables, learning_rate)

    L2.__name__ = f"{optimizer.__name__}L2"
    return L2


def train_batches(split: data.Split, p: FitParams, seed: int) -> Any:
    """One epoch of training batches as a tf.data pipeline: a seeded order, float input, shifts.

    Each batch reads exactly its own rows from the split, usually its memory map, as
    `engine.Images` streams them for torch: a split larger than memory trains, and nothing
    is copied whole. The order comes from NumPy's generator seeded with `seed`, the shifts
    from stateless draws keyed by (seed, batch index): a rerun sees the same epoch."""
    import tensorflow as tf

    order = np.random.default_rng(seed).permutation(len(split))
    labels = np.asarray(split.labels, np.int64)

    def rows():
        for start in range(0, len(order), p.batch_size):
            idx = order[start : start + p.batch_size]
            yield split.images[idx], labels[idx]  # fancy indexing reads only these rows

    side, channels = split.image_size, split.channels
    ds = tf.data.Dataset.from_generator(rows, output_signature=(
        tf.TensorSpec((None, side, side, channels), tf.uint8), tf.TensorSpec((None,), tf.int64)))
    ds = ds.apply(tf.data.experimental.assert_cardinality(math.ceil(len(order) / p.batch_size)))  # Keras knows the epoch's end
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y))
    if p.augment_shift:
        ds = ds.enumerate().map(lambda i, xy: shift_batch(i, xy, p.augment_shift, seed))
    return ds.prefetch(1)


def shift_batch(index, batch, s: int, seed: int):
    """Each image moved by its own offset in [-s, s], zero-filled; the draw depends on
    (seed, batch index) only, so every rerun sees the same shifts."""
    import tensorflow as tf

    x, y = batch
    n, h, w = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    padded = tf.pad(x, [[0, 0], [s, s], [s, s], [0, 0]])
    offsets = tf.random.stateless_uniform([n, 2], seed=tf.stack([tf.constant(seed, tf.int64), index]),
                                          minval=0, maxval=2 * s + 1, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(h)[None]  # (N, H) source rows of each output row
    cols = offsets[:, 1:] + tf.range(w)[None]  # (N, W)
    x = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(x, cols, axis=2, batch_dims=1), y


def fit(model: keras.Model, train: data.Split, val: data.Split, p: FitParams, run: StageRun | None = None, desc: str = "train") -> FitResult:
    """`engine.fit` in Keras: up to p.epochs, early stopping on val loss, best weights restored.
    Both splits are read batch by batch, so they may be memory maps larger than memory."""
    import keras
    from tqdm import tqdm

    steps = math.ceil(len(train) / p.batch_size)
    num_classes = train.num_classes
    optimizer = make_optimizer(p, p.epochs * steps)
    smoothing = p.label_smoothing

    def loss(y_true, logits):  # sparse labels with torch's label smoothing
        onehot = keras.ops.one_hot(keras.ops.cast(y_true, "int32"), num_classes)
        return keras.losses.categorical_crossentropy(onehot, logits, from_logits=True, label_smoothing=smoothing)

    model.compile(optimizer=optimizer, loss=loss, metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")])
    val_labels = np.asarray(val.labels, np.int64)
    result = FitResult(best_epoch=-1, best_val_loss=math.inf, best_val_acc=0.0, epochs_run=0)
    best_weights = model.get_weights()
    bar = tqdm(range(p.epochs), desc=desc, unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        lr = float(schedule_value(p.schedule, p.lr, p.epochs * steps, p.warmup_fraction, epoch * steps))
        # a pipeline per epoch, seeded by (seed, epoch): its order and shifts differ every epoch
        train_ds = train_batches(train, p, p.seed * 1_000_003 + epoch)
        logs = model.fit(train_ds, epochs=epoch + 1, initial_epoch=epoch, verbose=0, shuffle=False).history
        logits = predict_logits(model, val.images, max(p.batch_size, 256))
        val_loss = float(keras.ops.mean(keras.losses.sparse_categorical_crossentropy(val_labels, logits, from_logits=True)))
        val_acc = float((logits.argmax(1) == val_labels).mean())
        metrics = {"train/loss": logs["loss"][-1], "train/acc": logs["acc"][-1], "val/loss": val_loss, "val/acc": val_acc, "lr": lr}
        result.history.append(metrics)
        result.epochs_run = epoch + 1
        if run is not None:
            run.log_epoch(epoch, metrics)
        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.4f}")
        if val_loss < result.best_val_loss:
            result.best_epoch, result.best_val_loss, result.best_val_acc = epoch, val_loss, val_acc
            best_weights = model.get_weights()
        elif p.early_stopping_patience and epoch - result.best_epoch >= p.early_stopping_patience:
            break
    bar.close()
    model.set_weights(best_weights)
    return result


def predict_logits(model: keras.Model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits (N, classes) in input order for uint8 (N, H, W, C) images, read in batches (the
    array may be memory-mapped)."""
    out = [model(x, training=False).numpy() for x in backends.float_batches(images, batch_size)]
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)


# -- saving and export: every file byte-identical on a rerun ----------------------------------


def save_keras(model: keras.Model) -> bytes:
    """The `.keras` archive without what changes between identical saves: metadata.json's
    date_saved, the zip entries' timestamps and config.json's shared_object_id (an id()).

    Saved uncompiled (a new Model over the same layers): the optimizer's state and the
    training loss are not the model, and a loader would need this module to rebuild them."""
    import io
    import json
    import tempfile
    import zipfile

    import keras

    bare = keras.Model(model.input, model.output, name=model.name)  # .inputs would save a list structure
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "model.keras")
        bare.save(raw)
        out = io.BytesIO()
        with zipfile.ZipFile(raw) as zin, zipfile.ZipFile(out, "w") as zout:
            for name in sorted(zin.namelist()):
                content = zin.read(name)
                if name == "metadata.json":
                    meta = json.loads(content)
                    meta.pop("date_saved", None)
                    content = json.dumps(meta, sort_keys=True).encode()
                elif name == "config.json":
                    content = json.dumps(_renumber_shared_ids(json.loads(content), {}), sort_keys=True).encode()
                entry = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                entry.compress_type, entry.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
                zout.writestr(entry, content)
    return out.getvalue()


def _renumber_shared_ids(node: Any, ids: dict[int, int]) -> Any:
    if isinstance(node, dict):
        return {k: ids.setdefault(v, len(ids)) if k == "shared_object_id" else _renumber_shared_ids(v, ids) for k, v in node.items()}
    if isinstance(node, list):
        return [_renumber_shared_ids(v, ids) for v in node]
    return node


def save_savedmodel(model: keras.Model, export_dir: str, input_shape: tuple[int, int, int]) -> None:
    """A SavedModel for TF Serving: signature serving_default, input 'image' (float NHWC in
    [0, 1]), output 'probabilities'. Built from a tf.Module holding plain variables in model
    order, because Keras' own export orders variables by memory address, and with the random
    uuid in fingerprint.pb replaced by the content checksum: the directory is byte-stable."""
    import tensorflow as tf
    from tensorflow.core.protobuf import fingerprint_pb2

    class Serving(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weights = [v.value for v in model.variables]  # plain tf.Variables, tracked in order
            self.serve = tf.function(
                lambda image: {backends.OUTPUT_NAME: tf.nn.softmax(model(image, training=False))},
                input_signature=[tf.TensorSpec([None, *input_shape], tf.float32, name=backends.INPUT_NAME)],
            )

    module = Serving()
    tf.saved_model.save(module, export_dir, signatures={"serving_default": module.serve})
    path = os.path.join(export_dir, "fingerprint.pb")
    fingerprint = fingerprint_pb2.FingerprintDef()
    with open(path, "rb") as f:
        fingerprint.ParseFromString(f.read())
    fingerprint.uuid = str(fingerprint.saved_model_checksum)
    with open(path, "wb") as f:
        f.write(fingerprint.SerializeToString(deterministic=True))


def to_tflite(saved_model_dir: str, calibration: np.ndarray | None = None) -> bytes:
    """TFLite from the SavedModel: float, or full-integer int8 (int8 in and out) calibrated
    on `calibration` (float NHWC in [0, 1], a few hundred training images)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    if calibration is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


def savedmodel_probabilities(export_dir: str, images) -> np.ndarray:
    """The SavedModel's serving_default signature, as TF Serving calls it, on float NHWC batches."""
    import tensorflow as tf

    serve = tf.saved_model.load(export_dir).signatures["serving_default"]
    return np.concatenate([serve(**{backends.INPUT_NAME: tf.constant(x)})[backends.OUTPUT_NAME].numpy() for x in images])


def tflite_predict(model_bytes: bytes, images, threads: int = 1) -> np.ndarray:
    """Outputs of a TFLite model on float NHWC images (an array or batches of it), quantising
    in and out where it is int8. LiteRT's interpreter, not TensorFlow's deprecated one."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes, num_threads=threads)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    results = []
    for image in (row for batch in ([images] if isinstance(images, np.ndarray) else images) for row in batch):
        x = image[None]  # the converted graph has batch size 1
        if inp["dtype"] == np.int8:
            scale, zero = inp["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])[0]
        if out["dtype"] == np.int8:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        results.append(y)
    return np.stack(results)


def to_onnx(model: keras.Model, input_shape: tuple[int, int, int], opset: int, meta: dict | None = None) -> bytes:
    """ONNX through Keras' own exporter (tf2onnx underneath), outputting probabilities, with
    `meta` as metadata properties as torch's ONNX file has them."""
    import tempfile

    import keras
    import tensorflow as tf

    image = keras.Input(input_shape, name=backends.INPUT_NAME)
    shipped = keras.Model(image, keras.layers.Softmax(name=backends.OUTPUT_NAME)(model(image)))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # tf2onnx probes np.object, which NumPy deprecates
        path = os.path.join(tmp, "model.onnx")
        shipped.export(path, format="onnx", verbose=False, opset_version=opset,
                       input_signature=[tf.TensorSpec([None, *input_shape], tf.float32, name=backends.INPUT_NAME)])
        with open(path, "rb") as f:
            proto = canonical_onnx(f.read())
    return backends.onnx_with_metadata(proto, meta or {})


def canonical_onnx(model_bytes: bytes) -> Any:
    """tf2onnx names what it adds from a process-wide counter (Transpose__38 in one run,
    Transpose__40 in the next): rename nodes, inner tensors and constants by their first use
    in the graph, and sort the constants, so equal graphs give equal bytes."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    graph = proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    constants = {t.name for t in graph.initializer}
    names: dict[str, str] = {}
    for i, node in enumerate(graph.node):
        node.name = f"{node.op_type}_{i}"
        for j, inp in enumerate(node.input):
            if inp in constants and inp not in names:
                names[inp] = f"const_{sum(n in constants for n in names):04d}"
            node.input[j] = names.get(inp, inp)
        for j, out in enumerate(node.output):
            if out and out not in keep:
                names[out] = node.output[j] = f"{node.op_type}_{i}:{j}"
    for tensor in graph.initializer:
        tensor.name = names.get(tensor.name, tensor.name)
    ordered = sorted(graph.initializer, key=lambda t: t.name)
    del graph.initializer[:]
    graph.initializer.extend(ordered)
    for info in graph.value_info:
        info.name = names.get(info.name, info.name)
    return proto
