"""The `keras` framework behind `frameworks.interface.Backend`: Keras 3 on TensorFlow.

The same scratch CNN and recipe as torch's, from the same params (`model`, `recipe`), and its
exports (`export`): a SavedModel for TensorFlow Serving (`saved_model/1/`, signature
serving_default: float32 NHWC `image` in [0, 1] -> `probabilities`), TFLite in float32 and
full-integer int8 (`model.tflite`, `model_int8.tflite`) and ONNX (`model.onnx`, through
tf2onnx). Every file is byte-identical on a rerun; see each writer for what that took.

`frameworks.registry` imports this module only for `train.framework: keras` or a keras model
folder, so the torch stages never import TensorFlow (about 3 s here, with its
configuration), and nothing here imports torch. `configure` runs before anything else
touches TensorFlow: it fixes the environment TensorFlow reads once, at import.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import files
from pipeline.config import ConfigError
from pipeline.frameworks import interface, onnx_format
from pipeline.frameworks.card import ModelCard
from pipeline.frameworks.interface import ExportOptions, RuntimeParams, Shipped
from pipeline.frameworks.keras import cuda, export, model, recipe, resume
from pipeline.runtime import portable

if TYPE_CHECKING:
    import keras


def configure(seed: int, threads: int, device: str = "cpu") -> Any:
    """Deterministic TensorFlow: fixed threads, deterministic ops, seeds, the device; returns the module.

    oneDNN's kernels are switched on explicitly, on every CPU: TensorFlow's own default turns
    them on for some CPUs only (AVX-512 and newer), so results would depend on the CPU's
    generation. With them, the scratch CNN trains about twice as fast as on TensorFlow's Eigen
    kernels (bench/frameworks.py), and reruns stay byte-identical for a fixed thread count
    (tested end to end); in portable mode ONEDNN_MAX_CPU_ISA caps them at AVX2, as it caps
    torch's (tests/stages/test_portable.py). The thread count changes float sums, so it is pinned;
    `threads` is also how many independent ops may run at once."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no C++ start-up chatter in stage logs
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"  # read once, when TensorFlow loads
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if device != "cpu":
        cuda.preload()  # TensorFlow's CUDA 12 libraries, where `make setup-gpu` put them
    with native_stderr_silenced():
        import keras
        import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if device == "cuda" and not gpus:
        build = "its CUDA build" if tf.test.is_built_with_cuda() else "tensorflow-cpu, which has no GPU support"
        raise ConfigError(
            f"params.yaml: runtime.device is 'cuda' but TensorFlow ({build}) sees no GPU; use 'auto' or 'cpu' "
            "for train.framework keras, or `make setup-gpu` on a machine with an NVIDIA GPU and driver"
        )
    try:
        if device == "cpu" and gpus:
            tf.config.set_visible_devices([], "GPU")
        elif gpus:  # take GPU memory as needed, not all of it at start-up
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        # independent ops side by side (AdamW updates each variable in some twenty small ops):
        # a step 14% shorter on the digits, 12% on MNIST-sized data, the same weights bit for bit;
        # the graph's control dependencies order every op on a shared variable, so order holds
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # already initialised in this process (tests): the first setting stands
        pass
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)
    return tf


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null while TensorFlow loads: its C++ start-up notices ("oneDNN
    custom operations are on", twice) ignore TF_CPP_MIN_LOG_LEVEL since TensorFlow logs through
    absl before absl is initialised. A Python exception raised meanwhile is printed after."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class KerasBackend(interface.Backend):
    """Keras 3 on TensorFlow; builds the scratch CNN only (the pretrained backbones are
    timm's and torchvision's, so `finetune` stays torch)."""

    framework = "keras"
    model_file = "model.keras"
    layout = "NHWC"
    checkpoint_suffix = resume.SUFFIX

    def __init__(self, rt: RuntimeParams, seed: int = 0) -> None:
        if rt.precision != "fp32":
            raise ConfigError(f"params.yaml: runtime.precision {rt.precision} is torch's (autocast); "
                              "the keras framework trains in fp32: set runtime.precision: fp32")
        self.runtime = rt
        self.tf = configure(seed, rt.thread_count, rt.device)

    def describe(self) -> dict[str, str]:
        import keras

        gpu = bool(self.tf.config.get_visible_devices("GPU"))
        return {
            "framework": self.framework,
            "tensorflow": self.tf.__version__,
            "keras": keras.__version__,
            "device": "gpu" if gpu else "cpu",
            "threads": str(self.runtime.thread_count),
            "deterministic": "true",
            **portable.record(self.runtime.portable),
        }

    def build(self, arch: str, model_args: dict[str, Any]) -> keras.Model:
        if arch != "scratch_cnn":
            raise ConfigError(f"the keras framework builds 'scratch_cnn' only, not {arch!r}; use train.framework torch")
        return model.build_scratch_cnn(**{k: tuple(v) if isinstance(v, list) else v for k, v in model_args.items()})

    def fit(self, net, train, val, p, run=None, desc="train", checkpoint=None) -> recipe.FitResult:
        return recipe.fit(net, train, val, p, run, desc, checkpoint)

    def serialize(self, net: keras.Model, card: ModelCard) -> bytes:
        return model.save_keras(net)

    def deserialize(self, path: Path, card: ModelCard) -> keras.Model:
        import keras

        # safe_mode (the default, stated): a Lambda layer's pickled code would be refused
        return keras.saving.load_model(path, compile=False, safe_mode=True)

    def predict(self, net: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
        return interface.softmax64(recipe.predict_logits(net, images, batch_size))

    def explain(self, net: keras.Model, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        from pipeline.frameworks.keras import explain

        return explain.grad_cam(net, images, targets)

    def count_parameters(self, net: keras.Model) -> int:
        # BatchNormalization's moving mean and variance are non-trainable weights; torch keeps them as buffers
        stats = sum(int(np.prod(w.shape)) for w in net.non_trainable_weights if "moving_" in w.path)
        return int(net.count_params()) - stats

    def export(
        self, net: keras.Model, out: Path, example: np.ndarray, calibration: np.ndarray, meta: dict,
        options: ExportOptions,
    ) -> dict[str, Shipped]:
        shape = tuple(example.shape[1:])
        saved = str(out / "saved_model" / "1")  # <model>/<version>/ is the folder TF Serving watches
        export.save_savedmodel(net, saved, shape)
        calibration = np.asarray(calibration, np.float32) / 255
        tflite, int8 = export.to_tflite(saved), export.to_tflite(saved, calibration)
        onnx_bytes = export.to_onnx(net, shape, options.opset, meta)
        files.write_bytes(out / "model.tflite", tflite)
        files.write_bytes(out / "model_int8.tflite", int8)
        files.write_bytes(out / "model.onnx", onnx_bytes)
        threads = self.runtime.thread_count
        return {
            "savedmodel": Shipped("saved_model", export.savedmodel_runner(saved)),
            "tflite": Shipped("model.tflite", export.tflite_runner(tflite, threads)),
            "tflite_int8": Shipped("model_int8.tflite", export.tflite_runner(int8, threads)),
            "onnx": Shipped("model.onnx", onnx_format.runner(onnx_bytes, threads)),
        }
