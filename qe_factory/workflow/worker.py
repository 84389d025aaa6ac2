"""The in-process worker: the home's coordinator while it runs. It runs READY Fireworks one after another, saves
the embedded LaunchPad at every state change, takes in submissions posted to the home's inbox, and stops cleanly on
SIGTERM/SIGINT (the running structure goes back to READY)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qe_factory.engine.config import ExecutionSettings
from qe_factory.engine.errors import DiskFullError
from qe_factory.engine.parallel import seconds_left_in_allocation
from qe_factory.engine.process import STOP
from qe_factory.workflow.coordinator import command_line, coordinate, take_in
from qe_factory.workflow.home import embedded_file, factory_home, use_execution
from qe_factory.workflow.launchpad import (
    finished_count,
    get_jobstore,
    get_launchpad,
    persist_changes,
    save_launchpad,
)

if TYPE_CHECKING:
    from fireworks import LaunchPad

MIN_SECONDS_FOR_A_LAUNCH = 60  # a worker in a SLURM job starts no Firework with less time left
# A launch that FIZZLED with one of these in its traceback is no failure of its structure: it goes back to READY
# (a stop request; pw.x's scratch, the JobStore or the home on a full disk).
NOT_FAILURES = (
    r"qe_factory\.engine\.process\.Interrupted", r"qe_factory\.engine\.errors\.DiskFullError",
    r"No space left on device", r"database or disk is full", r"Disk quota exceeded",
)


class Stopped(Exception):  # noqa: N818 - the outcome of a request
    """The worker stopped on SIGTERM/SIGINT after putting its running structure back to READY."""

    def __init__(self, signum: int, requeued: list[int]):
        super().__init__(f"stopped by {signal.Signals(signum).name}; Firework(s) {requeued} back to READY")
        self.signum, self.requeued = signum, requeued


def requeue_not_failed(launchpad: LaunchPad) -> list[int]:
    """Put Fireworks whose last launch FIZZLED on a stop request or a full disk back to READY; their ids."""
    fw_ids = set()
    for name in NOT_FAILURES:
        query = {"state": "FIZZLED", "action.stored_data._exception._stacktrace": {"$regex": name}}
        fw_ids.update(doc["fw_id"] for doc in launchpad.launches.find(query, {"fw_id": 1}))
    fizzled = {doc["fw_id"] for doc in launchpad.fireworks.find({"fw_id": {"$in": sorted(fw_ids)}, "state": "FIZZLED"},
                                                                 {"fw_id": 1})}
    for fw_id in sorted(fizzled):
        launchpad.rerun_fw(fw_id)
    return sorted(fizzled)


def rerun_orphans(launchpad: LaunchPad) -> list[int]:
    """RUNNING Fireworks of an embedded home whose coordinator is this process: their worker is dead (the lock
    proves it); put them back to READY with FireWorks' detect_lostruns."""
    _, lost_fw_ids, _ = launchpad.detect_lostruns(expiration_secs=0, rerun=True)
    return sorted(lost_fw_ids)


def run_worker(
    launchpad: LaunchPad | None = None,
    max_structures: int | None = None,
    nlaunches: int | None = None,
    launch_root: Path | None = None,
    on_launch=None,
    execution: ExecutionSettings | None = None,
    log: Path | None = None,
) -> int:
    """Run READY Fireworks one after another in this process, as the home's coordinator.

    Stops when nothing is READY, after `max_structures` structures finished or `nlaunches` Fireworks ran, when
    less than a minute is left in its SLURM allocation, or after the current Firework once SIGUSR1 arrives (the
    SLURM template sends it before the time limit). SIGTERM/SIGINT stop the running pw.x, put its structure back
    to READY, save and raise Stopped (a second one exits at once). Returns the number of Fireworks run;
    `on_launch(launchpad)` is called after each. `execution`: where and how pw.x runs (default:
    home.worker_execution()). `log`: a file that FireWorks' and jobflow's own log lines (printed to stdout) go to
    instead of the terminal. Raises coordinator.HomeBusy if another process coordinates the home.
    """
    home = factory_home()
    with coordinate(home, command_line()):
        return _run(home, launchpad, max_structures, nlaunches, launch_root, on_launch, execution, log)


def _run(home, launchpad, max_structures, nlaunches, launch_root, on_launch, execution, log) -> int:
    from fireworks import FWorker
    from fireworks.core.rocket_launcher import launch_rocket
    from fireworks.fw_config import FWORKER_LOC

    launchpad = launchpad or get_launchpad()
    get_jobstore()  # connected once, here: jobs reuse the connection
    embedded = embedded_file(home) is not None
    if embedded and (orphans := rerun_orphans(launchpad)):
        print(f"qe-factory: {len(orphans)} Firework(s) left RUNNING by a dead worker put back to READY: {orphans}",
              file=sys.stderr)
    requeue_not_failed(launchpad)
    save_launchpad(launchpad)
    persist_changes(launchpad)
    fworker = FWorker.from_file(FWORKER_LOC) if FWORKER_LOC else FWorker()
    launch_root = Path(launch_root or Path.cwd()).resolve()
    finishing: list[int] = []  # SIGUSR1: finish the current Firework, take no new one
    signals: list[int] = []

    def stop_now(signum, frame):
        if signals:
            os._exit(128 + signum)  # a second request: at once (the reaper stops pw.x)
        signals.append(signum)
        STOP.set()
        print(f"qe-factory: {signal.Signals(signum).name}: stopping pw.x, the structure goes back to READY "
              "(again to exit at once)", file=sys.stderr)

    handlers = {
        signal.SIGUSR1: lambda signum, frame: finishing.append(signum),
        signal.SIGTERM: stop_now,
        signal.SIGINT: stop_now,
    }
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    finished_before, launched, completed = finished_count(launchpad), 0, False
    use_execution(execution)
    try:
        while not finishing and not signals:
            for line in take_in(home, launchpad, save_launchpad) if embedded else ():
                print(f"qe-factory: {line}", file=sys.stderr)
            if not launchpad.run_exists(fworker):
                break
            left = seconds_left_in_allocation()
            if left is not None and left < MIN_SECONDS_FOR_A_LAUNCH:
                break  # leave the rest to the next batch job rather than be killed mid-run
            launch_dir = launch_root / f"launcher_{time.strftime('%Y-%m-%d-%H-%M-%S')}_{os.getpid()}_{launched}"
            launch_dir.mkdir(parents=True)
            cwd = Path.cwd()
            os.chdir(launch_dir)
            try:
                with contextlib.ExitStack() as quiet:
                    if log:  # jobflow's handler (made anew in each task) and FireWorks' INFO lines write to stdout
                        quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(log, "a"))))
                    launch_rocket(launchpad, fworker, strm_lvl="WARNING")
            finally:
                os.chdir(cwd)
            launched += 1
            requeued = requeue_not_failed(launchpad)
            if requeued and not signals:  # a full disk: nothing more can run until space is back
                save_launchpad(launchpad)
                raise DiskFullError(28, f"pw.x's scratch is full; Firework(s) {requeued} back to READY. Free space "
                                    "in the work_dir, then run the worker again")
            if on_launch:
                on_launch(launchpad)
            if max_structures and finished_count(launchpad) - finished_before >= max_structures:
                break
            if nlaunches and launched >= nlaunches:
                break
        if signals:
            requeued = requeue_not_failed(launchpad)
            save_launchpad(launchpad)
            raise Stopped(signals[0], requeued)
        completed = True
    finally:
        use_execution(None)
        STOP.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            save_launchpad(launchpad)
        except DiskFullError:
            if completed:  # otherwise the exception on its way out says more
                raise
    return launched
