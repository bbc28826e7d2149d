"""The scratch CNN in Keras, layer for layer torch's `ScratchCNN`, and its `.keras` file.

The blocks follow the input size (`frameworks.shapes`), with a global-average-pooled or a
flattened head; batch norm with torch's momentum and epsilon, torch's initial weight scale.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.frameworks import shapes
from pipeline.frameworks.interface import INPUT_NAME

if TYPE_CHECKING:
    import keras

BN_MOMENTUM = 0.9  # torch's BatchNorm momentum 0.1 is Keras' 0.9 (the weight on the old value)
BN_EPSILON = 1e-5  # torch's default; Keras' is 1e-3


def build_scratch_cnn(
    num_classes: int,
    in_channels: int = 1,
    image_size: int = 32,
    input_size: int | None = None,
    width: int = 32,
    conv3: bool = True,
    batch_norm: bool = True,
    dropout: float = 0.3,
    hidden: int = 128,
    head: str = "gap",
    mean: tuple[float, ...] = (0.5,),
    std: tuple[float, ...] = (0.5,),
) -> keras.Model:
    """`frameworks.torch.model.ScratchCNN` in Keras, block for block (`shapes`): float [0, 1]
    NHWC in, logits out, resizing and normalisation inside."""
    import keras
    from keras import layers

    input_size = input_size or image_size
    inputs = keras.Input((image_size, image_size, in_channels), name=INPUT_NAME)
    x = inputs
    pool, bilinear = shapes.resize_steps(image_size, input_size)
    if pool > 1:
        x = layers.AveragePooling2D(pool, name="shrink")(x)
    if bilinear:  # half-pixel centres, as torch's align_corners=False
        x = layers.Resizing(input_size, input_size, interpolation="bilinear", name="resize")(x)
    # (x - mean) / std as constants, not Normalization's variables: tf2onnx left those as graph inputs
    scale = np.array([1 / s for s in std], np.float32)
    x = layers.Rescaling(scale=scale, offset=-np.array(mean, np.float32) * scale, name="normalize")(x)
    channels = in_channels
    for i, (out, pools) in enumerate(shapes.scratch_blocks(input_size, width, conv3)):
        init = torch_init(channels * 9)
        x = layers.Conv2D(out, 3, padding="same", use_bias=not batch_norm, name=f"conv{i + 1}", **init)(x)
        if batch_norm:
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"bn{i + 1}")(x)
        x = layers.ReLU()(x)
        if pools:
            x = layers.MaxPooling2D(2)(x)
        channels = out
    if head == "gap":
        x = layers.GlobalAveragePooling2D(name="gap")(x)
    elif head == "flatten":
        x = layers.Flatten()(x)  # (h, w, c) order where torch's is (c, h, w): a fixed permutation of the next weights
    else:
        raise ValueError(f"head {head!r}: expected 'gap' or 'flatten'")
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
    return {
        "kernel_initializer": keras.initializers.RandomUniform(-bound, bound),
        "bias_initializer": keras.initializers.RandomUniform(-bound, bound),
    }


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
        return {
            k: ids.setdefault(v, len(ids)) if k == "shared_object_id" else _renumber_shared_ids(v, ids)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_renumber_shared_ids(v, ids) for v in node]
    return node
