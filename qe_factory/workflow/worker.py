"""The home's coordinator loop: takes submissions in, runs the quick stages of each workflow (inputs, validate) in
this process, hands SCF Fireworks to workers — local worker processes or SLURM jobs (slots.py), which run them
offline (offline.py) — takes their results back in, and keeps the embedded LaunchPad small and saved. SIGTERM/SIGINT
stop the running pw.x runs cleanly (their structures go back to READY)."""

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
from qe_factory.engine.parallel import available_ranks, seconds_left_in_allocation
from qe_factory.engine.process import STOP
from qe_factory.workflow.coordinator import LAUNCHPAD_WORKFLOWS, UNFINISHED, command_line, coordinate, take_in
from qe_factory.workflow.fireworks_adapter import without_ping_thread
from qe_factory.workflow.home import embedded_file, factory_home, use_execution, worker_execution
from qe_factory.workflow.launchpad import (
    Saver,
    archive,
    get_jobstore,
    get_launchpad,
    save_launchpad,
)
from qe_factory.workflow.offline import pending_runs, queue_job_alive, reserve, take_back
from qe_factory.workflow.slots import LocalSlots

if TYPE_CHECKING:
    from fireworks import LaunchPad

MIN_SECONDS_FOR_A_LAUNCH = 60  # a worker in a SLURM job starts no Firework with less time left
# A launch that FIZZLED with one of these in its traceback is no failure of its structure: it goes back to READY
# (a stop request; pw.x's scratch, the JobStore or the home on a full disk).
STOPPED = (r"qe_factory\.engine\.process\.Interrupted",)
DISK_FULL = (
    r"qe_factory\.engine\.errors\.DiskFullError", r"No space left on device", r"database or disk is full",
    r"Disk quota exceeded",
)
NOT_FAILURES = STOPPED + DISK_FULL


class Stopped(Exception):  # noqa: N818 - the outcome of a request
    """The worker stopped on SIGTERM/SIGINT after putting its running structure back to READY."""

    def __init__(self, signum: int, requeued: list[int]):
        super().__init__(f"stopped by {signal.Signals(signum).name}; Firework(s) {requeued} back to READY")
        self.signum, self.requeued = signum, requeued


def requeue_not_failed(launchpad: LaunchPad, patterns: tuple[str, ...] = NOT_FAILURES) -> list[int]:
    """Put Fireworks whose last launch FIZZLED on a stop request or a full disk (`patterns` in its traceback) back
    to READY; their ids."""
    fw_ids = set()
    for name in patterns:
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


def settle_offline_runs(launchpad: LaunchPad, store, queue_alive=None) -> tuple[list[int], list[int]]:
    """Take in the offline runs an earlier coordinator left: finished ones (also SLURM jobs that ended while no
    coordinator ran), and lost ones — a local worker dies with its coordinator; a SLURM job left the queue
    unfinished — back to READY. Runs of SLURM jobs still queued or running are left alone. Returns the Firework ids
    (taken in, lost)."""
    alive = queue_alive or queue_job_alive
    taken_in, lost = [], []
    for run in pending_runs(launchpad):
        if run.finished() or run.job_id is None or not alive(run.job_id):
            (taken_in if run.finished() else lost).append(run.fw_id)
            take_back(launchpad, run, store)
    return taken_in, lost


def choose_parallel(ranks: int, structures: int) -> int:
    """How many pw.x runs at once on `ranks` cores: one per core when there are as many structures to run (pw.x
    on a few ranks scales worse than independent runs), never more than the structures waiting."""
    return max(1, min(ranks, structures))


def run_worker(
    launchpad: LaunchPad | None = None,
    max_structures: int | None = None,
    nlaunches: int | None = None,
    launch_root: Path | None = None,
    on_finished=None,
    execution: ExecutionSettings | None = None,
    log: Path | None = None,
    parallel: int | None = None,
    slots=None,
    timeout: float | None = None,
) -> int:
    """Run the home's Fireworks as its coordinator: quick stages (inputs, validate) in this process, SCF
    Fireworks offline in `parallel` local worker processes (default: chosen from the cores and the structures
    waiting; each pw.x gets cores/parallel ranks) or in `slots` (e.g. slots.QueueSlots: SLURM jobs).

    Stops when nothing is READY and nothing runs; takes no new work after `max_structures` structures finished,
    `nlaunches` Fireworks, `timeout` seconds, SIGUSR1, or with less than a minute left in its SLURM allocation.
    SIGTERM/SIGINT stop the running pw.x runs, put their structures back to READY, save and raise Stopped (a
    second one exits at once). Returns the number of Fireworks run; `on_finished(uid, state)` is called for every
    structure finished (COMPLETED: its result is in the JobStore, and its workflow has left the LaunchPad; FIZZLED).
    `execution`: where and how pw.x runs (default: home.worker_execution()). `log`: a file that FireWorks' and
    jobflow's own log lines go to instead of the terminal. Raises coordinator.HomeBusy if another process
    coordinates the home.
    """
    home = factory_home()
    with coordinate(home, command_line()):
        return _run(home, launchpad, max_structures, nlaunches, launch_root, on_finished, execution, log, parallel,
                    slots, None if timeout is None else time.monotonic() + timeout)


def _run(home, launchpad, max_structures, nlaunches, launch_root, on_finished, execution, log, parallel,
         slots, deadline) -> int:
    from fireworks import FWorker
    from fireworks.fw_config import FWORKER_LOC

    launchpad = launchpad or get_launchpad()
    store = get_jobstore()  # connected once, here: jobs reuse the connection
    embedded = embedded_file(home) is not None
    if embedded and (orphans := rerun_orphans(launchpad)):
        print(f"qe-factory: {len(orphans)} Firework(s) left RUNNING by a dead worker put back to READY: {orphans}",
              file=sys.stderr)
    if lost := settle_offline_runs(launchpad, store)[1]:
        print(f"qe-factory: {len(lost)} Firework(s) whose worker was lost put back to READY: {lost}", file=sys.stderr)
    if hasattr(slots, "adopt"):  # SLURM jobs an earlier coordinator submitted, still queued or running
        slots.adopt(pending_runs(launchpad))
    requeue_not_failed(launchpad)
    save_launchpad(launchpad)
    saver = Saver(launchpad)
    fworker = FWorker.from_file(FWORKER_LOC) if FWORKER_LOC else FWorker()
    launch_root = Path(launch_root or Path.cwd()).resolve()
    execution = execution or worker_execution()
    if embedded:  # a first share of the backlog, so that the workers are chosen for what waits
        for intake in take_in(home, launchpad, save_launchpad, store, LAUNCHPAD_WORKFLOWS):
            log_line(log, f"qe-factory: {intake.line()}")
    slots = slots or local_slots(execution, parallel, launchpad.workflows.count_documents(UNFINISHED), log)
    capacity = max(LAUNCHPAD_WORKFLOWS, 2 * slots.max_running)
    finishing: list[int] = []  # SIGUSR1: finish the running Fireworks, take no new one
    signals: list[int] = []

    def stop_now(signum, frame):
        if signals:
            os._exit(128 + signum)  # a second request: at once (the workers and the reaper stop pw.x)
        signals.append(signum)
        STOP.set()
        slots.signal(signal.SIGTERM)
        print(f"qe-factory: {signal.Signals(signum).name}: stopping pw.x, the structures go back to READY "
              "(again to exit at once)", file=sys.stderr)

    handlers = {
        signal.SIGUSR1: lambda signum, frame: finishing.append(signum),
        signal.SIGTERM: stop_now,
        signal.SIGINT: stop_now,
    }
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    count = {"launched": 0, "finished": 0}
    use_execution(execution)

    def accepting() -> bool:
        if finishing or signals or (deadline is not None and time.monotonic() >= deadline):
            return False
        if max_structures and count["finished"] >= max_structures:
            return False
        if nlaunches and count["launched"] + len(slots.running()) >= nlaunches:
            return False
        left = seconds_left_in_allocation()
        return left is None or left >= MIN_SECONDS_FOR_A_LAUNCH  # else leave the rest to the next batch job

    def ended(fw_id: int) -> None:
        count["launched"] += 1
        if finished := structure_finished(launchpad, fw_id):
            count["finished"] += 1
            if finished[1] == "COMPLETED":  # the result is in the JobStore: the LaunchPad stays small
                archive(launchpad, fw_id)
                saver.changed()
            if on_finished:
                on_finished(*finished)

    def take_back_ended(runs) -> None:
        for run in runs:
            take_back(launchpad, run, store)
            saver.changed()
            ended(run.fw_id)

    completed = False
    try:
        while True:
            if accepting():
                if embedded:  # the backlog waits in the inbox: the LaunchPad holds the work in progress
                    for intake in take_in(home, launchpad, save_launchpad, store, capacity):
                        log_line(log, f"qe-factory: {intake.line()}")
                while accepting():
                    if slots.free() and (ready := next_ready(launchpad, fworker, SCF)) is not None:
                        run = reserve(launchpad, fworker, launch_root / launch_name("scf", ready[0]), store, ready[0])
                        slots.start(run)  # a free worker first: it never waits for the quick stages
                        if run.job_id:
                            launchpad.set_reservation_id(run.launch_id, run.job_id)
                        saver.changed()
                        saver.flush()  # a reader sees what runs (and a killed coordinator leaves it reserved)
                        continue
                    if (ready := next_ready(launchpad, fworker, QUICK)) is None:
                        break
                    fw_id, stage = ready
                    if stage == "inputs" and next_ready_count(launchpad, SCF) >= slots.max_running:
                        break  # a new structure starts only while fewer SCF runs wait than there are workers
                    _launch_here(launchpad, fworker, fw_id, launch_root / launch_name(stage, fw_id), log)
                    ended(fw_id)
            if not slots.running():
                if not (accepting() and launchpad.run_exists(fworker)):
                    break
                continue
            if not accepting() and slots.outlive_coordinator:
                break  # SLURM jobs run on by themselves: the next coordinator takes them in
            finished_runs = slots.wait(saver.due())
            if not finished_runs:  # unsaved changes are due, or (SLURM) time for another look at the queue
                saver.flush()
                continue
            take_back_ended(finished_runs)
            requeue_not_failed(launchpad, STOPPED)  # e.g. a SLURM job's worker stopped by a SIGTERM not SLURM's
            if (requeued := requeue_not_failed(launchpad, DISK_FULL)) and not signals:  # nothing more can run
                raise DiskFullError(28, f"pw.x's scratch is full; Firework(s) {requeued} back to READY. Free "
                                    "space in the work_dir, then run the worker again")
        completed = True
    finally:
        if slots.running() and not slots.outlive_coordinator:  # an error or a stop: bring the workers' runs back
            slots.signal(signal.SIGTERM)
            while slots.running():
                take_back_ended(slots.wait())
        slots.close()
        requeued = requeue_not_failed(launchpad)
        use_execution(None)
        STOP.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            save_launchpad(launchpad)
        except DiskFullError:
            if completed:  # otherwise the exception on its way out says more
                raise
    if signals:
        raise Stopped(signals[0], requeued)
    return count["launched"]


SCF, QUICK = {"spec.stage": "scf"}, {"spec.stage": {"$ne": "scf"}}  # run by workers / here (inputs, validate)


def next_ready(launchpad: LaunchPad, fworker, stages: dict) -> tuple[int, str] | None:
    """(fw_id, stage) of the READY Firework of these stages this FWorker would run next (FireWorks' order:
    highest _priority first, so a structure is finished before the next is started)."""
    query = {**(fworker.query or {}), **stages, "state": "READY"}
    doc = launchpad.fireworks.find_one(query, {"fw_id": 1, "spec.stage": 1}, sort=[("spec._priority", -1)])
    return (doc["fw_id"], doc.get("spec", {}).get("stage")) if doc else None


def next_ready_count(launchpad: LaunchPad, stages: dict) -> int:
    return launchpad.fireworks.count_documents({**stages, "state": "READY"})


def local_slots(execution: ExecutionSettings, parallel: int | None, waiting: int, log: Path | None) -> LocalSlots:
    """`parallel` local workers (default: choose_parallel for the cores and the structures `waiting`), each pw.x
    with its share of the cores."""
    ranks = execution.mpi_ranks or available_ranks()
    count = parallel or choose_parallel(ranks, waiting)
    return LocalSlots(count, execution.model_copy(update={"mpi_ranks": max(1, ranks // count)}), log)


def structure_finished(launchpad: LaunchPad, fw_id: int) -> tuple[str, str] | None:
    """(uid, state) if the Firework that just ran finished its structure: a validation that COMPLETED, or a
    failure (FIZZLED); else None."""
    doc = launchpad.fireworks.find_one({"fw_id": fw_id}, {"state": 1, "spec.stage": 1, "spec.uid": 1}) or {}
    spec = doc.get("spec", {})
    if doc.get("state") == "FIZZLED" or (doc.get("state") == "COMPLETED" and spec.get("stage") == "validate"):
        return spec.get("uid"), doc["state"]
    return None


def log_line(log: Path | None, line: str) -> None:
    """A line for the home's log (or the terminal when there is no log: qe-factory -v)."""
    if log is None:
        print(line, file=sys.stderr)
    else:
        with open(log, "a") as handle:
            handle.write(line + "\n")


def launch_name(kind: str, fw_id: int) -> str:
    return f"launcher_{time.strftime('%Y-%m-%d-%H-%M-%S')}_{os.getpid()}_{kind}_{fw_id}"


def _launch_here(launchpad: LaunchPad, fworker, fw_id: int, launch_dir: Path, log: Path | None) -> None:
    """Run one Firework in this process, in its own launch directory."""
    from fireworks.core.rocket_launcher import launch_rocket

    launch_dir.mkdir(parents=True)
    cwd = Path.cwd()
    os.chdir(launch_dir)
    try:
        with contextlib.ExitStack() as quiet:
            if log:  # jobflow's handler (made anew in each task), FireWorks' lines and a failed job's traceback
                handle = quiet.enter_context(open(log, "a"))
                quiet.enter_context(contextlib.redirect_stdout(handle))
                quiet.enter_context(contextlib.redirect_stderr(handle))
            quiet.enter_context(without_ping_thread())  # its last ping would race the rocket's own
            launch_rocket(launchpad, fworker, fw_id=fw_id, strm_lvl="WARNING")
    finally:
        os.chdir(cwd)
