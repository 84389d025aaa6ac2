"""The in-process worker: runs READY Fireworks one after another, saving the embedded LaunchPad at every state
change, with the execution settings of this machine."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qe_factory.engine.config import ExecutionSettings
from qe_factory.engine.parallel import seconds_left_in_allocation
from qe_factory.workflow.home import use_execution
from qe_factory.workflow.launchpad import finished_count, get_launchpad, persist_every_change, save_launchpad

if TYPE_CHECKING:
    from fireworks import LaunchPad

MIN_SECONDS_FOR_A_LAUNCH = 60  # a worker in a SLURM job starts no Firework with less time left


def run_worker(
    launchpad: LaunchPad | None = None,
    max_structures: int | None = None,
    nlaunches: int | None = None,
    launch_root: Path | None = None,
    on_launch=None,
    execution: ExecutionSettings | None = None,
) -> int:
    """Run READY Fireworks one after another in this process, saving the LaunchPad after every state change.

    Stops when nothing is READY, after `max_structures` structures finished or `nlaunches` Fireworks ran, when
    less than a minute is left in its SLURM allocation, or after the current Firework once SIGUSR1 arrives (the
    SLURM template sends it before the time limit).
    Returns the number of Fireworks run; `on_launch(launchpad)` is called after each. `execution`: where and how
    pw.x runs (default: home.worker_execution()).
    """
    from fireworks import FWorker
    from fireworks.core.rocket_launcher import launch_rocket
    from fireworks.fw_config import FWORKER_LOC

    launchpad = persist_every_change(launchpad or get_launchpad())
    fworker = FWorker.from_file(FWORKER_LOC) if FWORKER_LOC else FWorker()
    launch_root = Path(launch_root or Path.cwd()).resolve()
    stopping: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: stopping.append(signum))
    finished_before, launched = finished_count(launchpad), 0
    use_execution(execution)
    try:
        while not stopping and launchpad.run_exists(fworker):
            left = seconds_left_in_allocation()
            if left is not None and left < MIN_SECONDS_FOR_A_LAUNCH:
                break  # leave the rest to the next batch job rather than be killed mid-run
            launch_dir = launch_root / f"launcher_{time.strftime('%Y-%m-%d-%H-%M-%S')}_{os.getpid()}_{launched}"
            launch_dir.mkdir(parents=True)
            cwd = Path.cwd()
            os.chdir(launch_dir)
            try:
                launch_rocket(launchpad, fworker, strm_lvl="WARNING")
            finally:
                os.chdir(cwd)
            launched += 1
            if on_launch:
                on_launch(launchpad)
            if max_structures and finished_count(launchpad) - finished_before >= max_structures:
                break
            if nlaunches and launched >= nlaunches:
                break
    finally:
        use_execution(None)
        signal.signal(signal.SIGUSR1, previous)
        save_launchpad(launchpad)
    return launched
