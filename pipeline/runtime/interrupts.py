"""Ctrl-C held off while native frameworks import.

torch and TensorFlow run Python code from C++ while they import (pybind11 callbacks); a
KeyboardInterrupt raised there cannot cross back, and the process aborts (`terminate called
after throwing an instance of 'pybind11::error_already_set'`, exit -6) instead of ending the
stage with its one-line message and exit 130. Seen in CI and on a loaded 2-core machine, both
times with Ctrl-C during `import torch.distributed`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def held() -> Iterator[None]:
    """A Ctrl-C (SIGINT) that arrives inside is delivered again when the block ends, to the
    handler that was in place before: a KeyboardInterrupt then, where Python can raise it."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)
