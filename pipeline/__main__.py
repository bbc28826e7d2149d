"""`python -m pipeline <stage> [paths...]`: the one entry point dvc.yaml runs for every stage.

MLflow's start-up (~4 s of imports and opening the store) runs in a worker process started
here, before the stage module and its heavy imports (torch, TensorFlow) load, so the two
overlap on the machine's cores.

Expected failures (`errors.PipelineError`: bad params, data, weights, inputs, an unusable
MLflow store; a full disk) end the stage with one `error:` line and exit code 1, no
traceback (PIPELINE_DEBUG=1 shows it); Ctrl-C ends it with exit code 130. Anything else is a
bug and keeps its traceback. Each message also says how to get back what DVC removed: DVC
deletes a stage's outputs before it runs the command, and `dvc checkout <stage>` restores
the ones dvc.lock records from the cache.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
import signal
import sys
import time

# The pipeline's own modules load inside main()'s try, so a Ctrl-C while they import still
# ends in the one-line message; before it, Python dies by the signal with a traceback.
STAGES = ("ingest", "prepare", "audit", "train", "crossval", "finetune", "evaluate", "export", "register", "report",
          "sync")
UNTRACKED = ("sync",)  # stages with no MLflow run of their own (sync makes the others'), never under torchrun

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_heap() -> bool:
    """Serve large allocations from the heap and keep freed memory there (glibc only).

    By default glibc maps every block over 32 MB fresh from the kernel and unmaps it when
    freed, so each batch's activations (100 MB for 64 photos at 224 px) page-fault in again:
    the fine-tune spent as much time in the kernel as in its own code. A stage is one
    short-lived process with a stable working set, so it keeps what it freed instead
    (bench/finetune.py: fine-tune steps at 224 px in 0.80 of the time, 0.51 in a first
    probe). Numerics are untouched: where memory comes from does not change what kernels compute."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): keep the system allocator's defaults
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        given = repr(argv[0]) if argv else "no stage"
        sys.exit(f"usage: python -m pipeline <stage> [options]; got {given}, valid stages: {', '.join(STAGES)}")
    keep_heap()
    restore = restore_hint(argv)
    try:
        from pipeline.runtime import launch, portable

        portable.pin(portable.requested())  # before torch or TensorFlow loads: the CPU code paths they take
        if argv[0] not in UNTRACKED and launch.rank() == 0 and not launch.relaunches(argv[0]):
            from pipeline.tracking import store

            # the other ranks log nothing; a process that hands its stage to torchrun neither (its rank 0 does)
            store.start_worker()
        from pipeline.runtime import interrupts

        with interrupts.held():  # some stages import torch at the top: a Ctrl-C inside would abort
            stage = importlib.import_module(f"pipeline.{argv[0]}")
        stage.main(argv[1:])
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C (DVC forwards one) must not cut the message
        fail(f"{argv[0]}: interrupted.\n{restore}", 130)
    except Exception as exc:
        from pipeline.errors import PipelineError

        if isinstance(exc, PipelineError):
            fail(f"error: {exc}\n{restore}")
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            fail(f"error: {exc.filename or 'a file'}: no space left on the device while writing it; "
                 f"free some space and rerun.\n{restore}")
        raise


def restore_hint(argv: list[str]) -> str:
    """How to get back what DVC deleted before running this stage (its cached outputs; the
    metrics and plots are in git, not in DVC's cache)."""
    name = argv[0]
    if "--model" in argv[:-1]:
        name = f"{name}@{argv[argv.index('--model') + 1]}"  # a foreach stage: evaluate@scratch
    return (f"(DVC deleted this stage's outputs before running it: `dvc checkout {name}` restores the ones "
            f"dvc.lock records, `git checkout -- dvclive` the metrics)")


DEBUG_ENV = "PIPELINE_DEBUG"
RANK_ERROR_WAIT = 10.0  # seconds


def exit_now(code: int) -> None:
    """Exit with `code` after the atexit handlers, skipping the interpreter's own finalisation
    (a stage that imported torch and timm spends over a second in it).

    CPython remembers a KeyboardInterrupt that escaped code run through PyRun_String (some C
    extensions import that way) even when Python code caught it later, and then ends the
    process by SIGINT instead of with the exit code sys.exit gave (measured: 2 runs in 25
    with Ctrl-C during the imports died by signal 2, not exit 130)."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fail(message: str, code: int = 1) -> None:
    """End the stage on an expected failure: the message without a traceback, unless PIPELINE_DEBUG=1."""
    if os.environ.get(DEBUG_ENV) == "1":
        raise
    if os.environ.get("RANK", "0") != "0":
        # Under torchrun every rank meets the same error (Ctrl-C reaches them all) and rank 0
        # says it; torchrun stops this rank once rank 0 exits. An error of this rank alone
        # outlives the wait and is printed.
        if code == 130:
            exit_now(code)
        time.sleep(RANK_ERROR_WAIT)
    print(message, file=sys.stderr)
    if code == 130:
        exit_now(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
    # Done: every output is written and closed, the MLflow worker has finished. Tearing down the
    # interpreter's thousands of modules (torch, timm) would add a second or more to every stage.
    exit_now(0)
