"""torchrun's agent inside a stage's process: `pipeline.launch` hands it a stage whose params
ask for more than one process. Its own module, apart from `distributed` (what each rank runs),
because every stage's entry point may reach it: each stage's dvc.yaml deps list it, and only
this small file."""

from __future__ import annotations

import os


def run_ranks(nproc: int, argv: list[str]) -> int:
    """torchrun's agent, in this process, running `python -m pipeline <argv>` as `nproc` ranks
    on this machine; the exit code. A rank's expected failure has already printed its one
    `error:` line, so the code is that rank's, without torchrun's failure report and traceback."""
    import logging
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # the agent's own notes (which ranks it stopped, how) repeat what the ranks' one line says
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # each sets its own level: the parent's is not enough
    # torchrun sets it to 1 with a warning when unset; each rank pins its threads (runtime.threads) anyway
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "pipeline", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        return 130 if 130 in codes else next((c for c in codes if c > 0), 1)
    except SignalException as exc:  # Ctrl-C or a kill: the agent passed it on, the ranks said so
        return 130 if exc.sigval == signal.SIGINT else 128 + int(exc.sigval)
    return 0
