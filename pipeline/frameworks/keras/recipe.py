"""The recipe in Keras, from the same params as torch's: AdamW / Adam / SGD with torch's
semantics, the one-cycle / cosine / constant schedules with torch's formulas, label smoothing,
global gradient clipping, random shifts, and `frameworks.recipe.EpochLoop`'s early stopping
on the unsmoothed validation loss with the best weights restored.
"""

from __future__ import annotations

import gc
import math
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.formats import Split
from pipeline.frameworks.interface import float_batches
from pipeline.frameworks.keras.batch_norm import fused_batch_norm
from pipeline.frameworks.keras.resume import KerasResume
from pipeline.frameworks.recipe import EpochLoop, FitParams, FitResult, augmentation, resolve_auto, schedule

if TYPE_CHECKING:
    import keras

    from pipeline.tracking.run import StageRun

def learning_rate(p: FitParams, total_steps: int) -> Any:
    """The schedule with torch's formulas (OneCycleLR: cosine, div 25, final div 1e4)."""
    import keras

    @keras.saving.register_keras_serializable(package="pipeline")
    class TorchSchedule(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, kind: str, peak: float, total: int, warmup: float) -> None:
            self.kind, self.peak, self.total, self.warmup = kind, peak, total, warmup
            self.traced = weakref.WeakKeyDictionary()  # graph -> its rate

        def __call__(self, step):
            import tensorflow as tf

            if tf.executing_eagerly():
                return self.rate(step)
            # once per traced graph: Keras asks for the rate once per variable (AdamW's decay)
            # and once more for the update, all before the step count moves
            graph = tf.compat.v1.get_default_graph()
            if graph not in self.traced:
                self.traced[graph] = self.rate(step)
            return self.traced[graph]

        def rate(self, step):
            import tensorflow as tf

            return tf.cast(schedule_value(self.kind, self.peak, self.total, self.warmup, step), tf.float32)

        def get_config(self) -> dict:
            return {"kind": self.kind, "peak": self.peak, "total": self.total, "warmup": self.warmup}

    kind, warmup = schedule(p, total_steps)
    return TorchSchedule(kind, p.lr, total_steps, warmup)


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


RESIDENT_BYTES = 1 << 30  # as torch's: a split whose float copy fits is held in memory for the whole fit


def resident(split: Split) -> Any:
    """The split's uint8 (N, H, W, C) images as one tensor when their float copy fits
    `RESIDENT_BYTES`, else None: a larger split stays its memory map and streams."""
    import tensorflow as tf

    return tf.constant(np.asarray(split.images)) if split.images.size * 4 <= RESIDENT_BYTES else None


def train_batches(split: Split, p: FitParams, begin: int, images: Any = None) -> Any:
    """Every epoch's training batches from `begin` on, as one tf.data pipeline: per epoch a
    seeded order, float input, shifts or crops.

    One pipeline and one iterator for the whole fit: building a pipeline and its iterator for
    each epoch cost 0.08 s an epoch, a quarter of an epoch on the digits. With `images` (the
    split held as a tensor, `resident`) each batch is gathered by index inside the graph;
    without, each batch reads exactly its own rows from the split, usually its memory map, as
    `frameworks.torch.inputs.Images` streams them for torch: a split larger than memory trains,
    and nothing is copied whole. Both give the same batches bit for bit (tested). Epoch e's
    order comes from NumPy's generator seeded with seed * 1,000,003 + e, its shifts from
    stateless draws keyed by (that seed, batch index): a rerun, or a resumed fit, sees the
    same epochs."""
    import tensorflow as tf

    n, labels = len(split), tf.constant(np.asarray(split.labels, np.int64))
    side, channels = split.image_size, split.channels

    def permutation(seed: np.ndarray) -> np.ndarray:
        return np.random.default_rng(int(seed)).permutation(n).astype(np.int64)

    def rows(idx: np.ndarray) -> np.ndarray:
        return split.images[idx]  # fancy indexing reads only these rows

    def pixels(idx):
        if images is not None:
            return tf.gather(images, idx)
        x = tf.numpy_function(rows, [idx], tf.uint8, stateful=False)
        return tf.ensure_shape(x, (None, side, side, channels))

    mode = augmentation(p, split.image_size)

    def epoch_batches(epoch):
        seed = p.seed * 1_000_003 + epoch  # int64: the same number the NumPy seed was before
        order = tf.ensure_shape(tf.numpy_function(permutation, [seed], tf.int64, stateful=False), (n,))
        ds = tf.data.Dataset.from_tensor_slices(order).batch(p.batch_size)  # (None,) index batches
        ds = ds.map(lambda idx: (tf.cast(pixels(idx), tf.float32) / 255.0, tf.gather(labels, idx)))
        if mode == "shift":
            ds = ds.enumerate().map(lambda i, xy: shift_batch(i, xy, p.augment_shift, seed))
        elif mode == "crop_flip":
            ds = ds.enumerate().map(lambda i, xy: crop_flip_batch(i, xy, p.crop_scale, seed))
        return ds

    # tf.data's autotuner off: nothing here asks it to tune (one map at a time, a fixed prefetch),
    # and stopping its thread at the end of the fit stalled 3.3 to 3.9 s in four runs of five
    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.range(begin, p.epochs).flat_map(epoch_batches).prefetch(1).with_options(options)


def shift_batch(index, batch, s: int, seed):
    """Each image moved by its own offset in [-s, s], zero-filled; the draw depends on
    (seed, batch index) only, so every rerun sees the same shifts."""
    import tensorflow as tf

    x, y = batch
    n, h, w = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    padded = tf.pad(x, [[0, 0], [s, s], [s, s], [0, 0]])
    offsets = tf.random.stateless_uniform(
        [n, 2], seed=tf.stack([tf.cast(seed, tf.int64), index]), minval=0, maxval=2 * s + 1, dtype=tf.int32
    )
    rows = offsets[:, :1] + tf.range(h)[None]  # (N, H) source rows of each output row
    cols = offsets[:, 1:] + tf.range(w)[None]  # (N, W)
    x = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(x, cols, axis=2, batch_dims=1), y


def crop_flip_batch(index, batch, min_scale: float, seed):
    """torch's random_crop_flip in TensorFlow: random resized crops (area share in
    [min_scale, 1], aspect ratio in [3/4, 4/3]), half of them flipped left-right, drawn from
    (seed, batch index) only."""
    import tensorflow as tf

    x, y = batch
    n, side = tf.shape(x)[0], tf.shape(x)[1]
    u = tf.random.stateless_uniform([n, 5], seed=tf.stack([tf.cast(seed, tf.int64), index]), dtype=tf.float32)
    area = min_scale + (1 - min_scale) * u[:, 0]
    ratio = tf.exp((2 * u[:, 1] - 1) * math.log(4 / 3))
    w, h = tf.minimum(tf.sqrt(area * ratio), 1.0), tf.minimum(tf.sqrt(area / ratio), 1.0)
    left, top = u[:, 2] * (1 - w), u[:, 3] * (1 - h)
    flip = u[:, 4] < 0.5
    x1, x2 = tf.where(flip, left + w, left), tf.where(flip, left, left + w)  # x1 > x2: crop_and_resize flips
    boxes = tf.stack([top, x1, top + h, x2], axis=1)
    return tf.image.crop_and_resize(x, boxes, tf.range(n), tf.stack([side, side])), y


def fit(
    model: keras.Model, train: Split, val: Split, p: FitParams, run: StageRun | None = None, desc: str = "train",
    checkpoint: Path | None = None,
) -> FitResult:
    """`frameworks.torch.recipe.fit` in Keras: up to p.epochs, early stopping on val loss, the
    best weights restored. Both splits are read batch by batch, so they may be memory maps
    larger than memory. With `checkpoint` (a file), each epoch is saved there and a fit that
    finds one resumes it (`frameworks.keras.resume`)."""
    import keras

    p = resolve_auto(p, len(train))  # the stage resolved and recorded it already; a direct call may not have
    steps = math.ceil(len(train) / p.batch_size)
    num_classes = train.num_classes
    optimizer = make_optimizer(p, p.epochs * steps)
    smoothing = p.label_smoothing

    def loss(y_true, logits):  # sparse labels with torch's label smoothing
        onehot = keras.ops.one_hot(keras.ops.cast(y_true, "int32"), num_classes)
        return keras.losses.categorical_crossentropy(onehot, logits, from_logits=True, label_smoothing=smoothing)

    # XLA off on every device: Keras' "auto" turns it on for GPUs, where its autotuner picks
    # convolution algorithms by timing them, so two runs could take different kernels. A whole
    # epoch per call, its steps looped inside the graph: an epoch of the digits 0.19-0.20 s ->
    # 0.18 s for 0.1-0.2 s more tracing, the same weights (a call never runs past the epoch's
    # end, as one of fewer steps that does not divide the epoch would: Keras runs whole calls)
    model.compile(optimizer=optimizer, loss=loss, metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
                  jit_compile=False, steps_per_execution=steps)
    # the optimizer's moments made now, not inside the first training step: a tf.function that
    # creates variables is traced twice (once to make them, once without), 0.8 s on the digits
    optimizer.build(model.trainable_variables)
    val_labels = np.asarray(val.labels, np.int64)
    kind, warmup = schedule(p, p.epochs * steps)
    images = resident(train)
    forward = compiled(model)  # the validation pass as one graph, traced once per fit
    resume = KerasResume(checkpoint, run.attempt if run else "", model, optimizer) if checkpoint is not None else None
    loop = EpochLoop(p, model.get_weights, model.set_weights, run, desc=desc, resume=resume)
    begin = loop.begin()

    class EpochEnd(keras.callbacks.Callback):
        """Each epoch's end inside Keras' fit: the validation pass, then `EpochLoop`'s logging,
        checkpoint and early stopping."""

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logits = predict_logits(model, val.images, max(p.batch_size, 256), forward)
            val_losses = keras.losses.sparse_categorical_crossentropy(val_labels, logits, from_logits=True)
            lr = float(schedule_value(kind, p.lr, p.epochs * steps, warmup, epoch * steps))
            metrics = {"train/loss": float(logs["loss"]), "train/acc": float(logs["acc"]),
                       "val/loss": float(keras.ops.mean(val_losses)),
                       "val/acc": float((logits.argmax(1) == val_labels).mean()), "lr": lr}
            if loop.end(epoch, metrics):
                self.model.stop_training = True

    # TensorFlow and Keras leave some 400,000 objects for Python's collector, whose full
    # collections then paused training for 0.2 to 0.3 s each, the tracing of the first epoch
    # too; frozen, the collector skips them (it still collects what the fit makes)
    gc.freeze()
    try:
        if begin < p.epochs:
            # one fit for every epoch (a fit per epoch cost 0.04 s each in Keras' own set-up)
            with fused_batch_norm(model):
                model.fit(train_batches(train, p, begin, images), epochs=p.epochs, initial_epoch=begin,
                          steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[EpochEnd()])
    finally:
        loop.close()
    return loop.finish()


def compiled(model: keras.Model) -> Any:
    """The model's inference pass as a tf.function: a pass in eager mode dispatches op by op
    from Python, three times the cost of the whole validation pass on the digits (0.03 s
    against 0.01 s an epoch)."""
    import tensorflow as tf

    # any batch size: one trace, where the last, smaller batch traced it again (0.03 s a fit)
    spec = tf.TensorSpec((None, *model.input.shape[1:]), tf.float32)
    return tf.function(lambda x: model(x, training=False), input_signature=[spec])


def predict_logits(model: keras.Model, images: np.ndarray, batch_size: int = 256, forward: Any = None) -> np.ndarray:
    """Logits (N, classes) in input order for uint8 (N, H, W, C) images, read in batches (the
    array may be memory-mapped); `forward` (`compiled`) runs them, else the model eagerly."""
    forward = forward or (lambda x: model(x, training=False))
    out = [forward(x).numpy() for x in float_batches(images, batch_size)]
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)
