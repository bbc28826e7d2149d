"""Grad-CAM heat-maps for Keras models: TorchCAM's maths (`frameworks.torch.explain`) with
`tf.GradientTape`, as no maintained Keras 3 CAM library installs here. The feature map is the
input of the layer that pools it into the head (`gap`, or the Flatten layer)."""

from __future__ import annotations

import numpy as np

from pipeline.frameworks.interface import float_batches


def head_input(net):
    """The symbolic feature map the head pools (the input of `gap` or of the Flatten layer)."""
    import keras

    for layer in net.layers:
        if layer.name == "gap" or isinstance(layer, keras.layers.Flatten):
            return layer.input
    raise ValueError(f"{net.name}: no GlobalAveragePooling2D named 'gap' or Flatten layer to explain")


def grad_cam(net, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(N, H, W) float32 maps in [0, 1] for uint8 (N, H, W, C) `images`, each for its class in
    `targets`; a map with no positive evidence is all zeros."""
    import keras
    import tensorflow as tf

    probe = keras.Model(net.inputs, [head_input(net), net.outputs[0]])
    side = images.shape[1:3]
    maps = np.zeros((len(images), *side), np.float32)
    for i, batch in enumerate(float_batches(images, 1)):
        with tf.GradientTape() as tape:
            features, scores = probe(tf.constant(batch), training=False)
            score = scores[0, int(targets[i])]
        grads = tape.gradient(score, features)  # (1, h, w, C)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))  # (1, h, w, 1)
        up = tf.image.resize(cam, side, method="bilinear")[0, ..., 0].numpy()  # half-pixel centres, as torch's
        peak = float(up.max())
        maps[i] = up / peak if peak > 0 else 0.0
    return maps
