"""keras models as shipped files, each byte-identical on a rerun: a SavedModel for TF
Serving, TFLite (float32 and full-integer int8) and ONNX, all outputting probabilities."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.frameworks import onnx_format
from pipeline.frameworks.interface import INPUT_NAME, OUTPUT_NAME, Runner

if TYPE_CHECKING:
    import keras

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
                lambda image: {OUTPUT_NAME: tf.nn.softmax(model(image, training=False))},
                input_signature=[tf.TensorSpec([None, *input_shape], tf.float32, name=INPUT_NAME)],
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


def savedmodel_runner(export_dir: str) -> Runner:
    """The SavedModel's serving_default signature, as TF Serving calls it, as a function from
    float NHWC batches to probabilities."""
    import tensorflow as tf

    serve = tf.saved_model.load(export_dir).signatures["serving_default"]
    return lambda images: np.concatenate([serve(**{INPUT_NAME: tf.constant(x)})[OUTPUT_NAME].numpy() for x in images])


def tflite_runner(model_bytes: bytes, threads: int = 1) -> Runner:
    """A TFLite model as a function from float NHWC batches to probabilities, quantising in and
    out where it is int8. LiteRT's interpreter, not TensorFlow's deprecated one."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes, num_threads=threads)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def run(images: Iterable[np.ndarray]) -> np.ndarray:
        results = []
        for image in (row for batch in images for row in batch):
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

    return run


def to_onnx(model: keras.Model, input_shape: tuple[int, int, int], opset: int, meta: dict | None = None) -> bytes:
    """ONNX through Keras' own exporter (tf2onnx underneath), outputting probabilities, with
    `meta` as metadata properties as torch's ONNX file has them."""
    import tempfile

    import keras
    import tensorflow as tf

    image = keras.Input(input_shape, name=INPUT_NAME)
    shipped = keras.Model(image, keras.layers.Softmax(name=OUTPUT_NAME)(model(image, training=False)))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # tf2onnx probes np.object, which NumPy deprecates
        path = os.path.join(tmp, "model.onnx")
        shipped.export(path, format="onnx", verbose=False, opset_version=opset,
                       input_signature=[tf.TensorSpec([None, *input_shape], tf.float32, name=INPUT_NAME)])
        with open(path, "rb") as f:
            proto = canonical_onnx(f.read())
    return onnx_format.with_metadata(proto, meta or {})


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
