"""Training-mode batch norm as TensorFlow's fused kernel, for the length of a fit on the CPU.

Keras 3's BatchNormalization trains through some fifteen ops a layer (the moments, the
normalisation and each one's gradient, every one a pass over the activations), where
TensorFlow's FusedBatchNormV3 is one op forward and one back, as torch's batch norm is.
Only the training call changes, and only while `fused_batch_norm` is open: the layers stay
Keras' own class, so a saved `.keras` file needs nothing of this module to load, and
inference and the exports run Keras' own call on the moving statistics.

Those statistics differ in one way: the moving variance is updated from the batch's unbiased
variance (n / (n - 1) times the one it normalises with), which is what the fused op returns
and what torch's running_var holds; Keras' own call takes the biased one. On a GPU Keras' own
call stays: TensorFlow's determinism work lists the fused op's gradient as nondeterministic
there.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras


@contextmanager
def fused_batch_norm(model: keras.Model) -> Iterator[list[Any]]:
    """Inside, `model`'s channels-last batch-norm layers train through FusedBatchNormV3 (on
    the CPU only); yields the layers it switched."""
    import keras
    import tensorflow as tf

    layers = [] if tf.config.list_logical_devices("GPU") else [
        layer for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization) and fusable(layer)
    ]
    for layer in layers:
        layer.call = types.MethodType(fused_call, layer)  # this instance only; the class keeps Keras' call
    try:
        yield layers
    finally:
        for layer in layers:
            del layer.call


def fusable(layer: Any) -> bool:
    """A plain batch norm over the last axis of 4-D inputs: what FusedBatchNormV3 computes."""
    return (layer.built and layer.input_spec.ndim == 4 and layer.axis in (-1, 3) and layer.center and layer.scale
            and not layer.renorm and not layer.synchronized and layer.compute_dtype == "float32")


def fused_call(self: Any, inputs: Any, training: Any = None, mask: Any = None) -> Any:
    import tensorflow as tf

    if not (training and self.trainable) or mask is not None:
        return type(self).call(self, inputs, training=training, mask=mask)
    empty = tf.constant([], tf.float32)  # no running statistics in: the batch's own are computed
    y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=self.gamma.value, offset=self.beta.value, mean=empty, variance=empty,
        epsilon=self.epsilon, data_format="NHWC", is_training=True,
    )
    # Keras' own update, with the unbiased variance (torch's running_var) the op returns
    self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
    self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
    return y
