"""torchrun's agent inside a stage's process, for the two training stages when
`pipeline.runtime.launch` says their params ask for more than one process. Its own module,
apart from `distributed` (what each rank runs), and torch imported only inside: train imports
it whichever framework it trains with."""

from __future__ import annotations

import os
import sys

from pipeline.runtime import launch


def relaunch(stage: str, argv: list[str]) -> None:
    """Run `stage` as `nproc` torchrun processes and exit with their outcome, when its params
    ask for more than one and this process is not already one of them; else return."""
    nproc = launch.relaunches(stage)
    if nproc:
        sys.exit(run_ranks(nproc, [stage, *argv]))


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
