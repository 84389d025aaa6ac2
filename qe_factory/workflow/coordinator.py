"""The home's coordinator: the one process that moves work along. It takes submissions in from the inbox, runs the
quick stages of each workflow (inputs, validate) itself, hands each SCF Firework to a worker — local processes or
SLURM jobs (workers.py), which run it offline (offline.py) — takes the outcome back in, and keeps the embedded
LaunchPad small and saved.

Each step of the loop is one method of `Coordinator`; each offline run moves through explicit states
(offline.RunState: RESERVED → RUNNING → FINISHED | LOST → TAKEN_BACK), recorded in the LaunchPad and shown by
`status`. What became of a launch is read from the outcome its exception recorded (engine.outcomes): work that
ended as nobody's failure (interrupted, disk full, a worker that cannot run pw.x) goes back to READY.
SIGTERM/SIGINT stop the running pw.x runs cleanly (their structures go back to READY).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qe_factory.engine.config import ExecutionSettings
from qe_factory.engine.outcomes import DiskFullError, EnvironmentFault, Outcome, StoreBusy
from qe_factory.engine.parallel import available_ranks
from qe_factory.engine.process import STOP
from qe_factory.engine.scheduler import queue_job_alive, seconds_left_in_allocation
from qe_factory.workflow import state
from qe_factory.workflow.fireworks_adapter import jobflow_store, without_ping_thread
from qe_factory.workflow.home import embedded_file, executing, factory_home, worker_execution
from qe_factory.workflow.host import forget_ticket, host_alive, host_id_for, queue_folder, ticket_alive
from qe_factory.workflow.inbox import LAUNCHPAD_WORKFLOWS, take_in
from qe_factory.workflow.lock import command_line, coordinate
from qe_factory.workflow.offline import OfflineRun, RunState, pending_runs, reserve, take_back
from qe_factory.workflow.workers import LocalWorkers

if TYPE_CHECKING:
    from fireworks import LaunchPad

MIN_SECONDS_FOR_A_LAUNCH = 60  # a coordinator in a SLURM job starts no Firework with less time left
REQUEUED = [outcome for outcome in Outcome if outcome.requeued]  # nobody's failure: back to READY
STORE_PATIENCE = 600.0  # seconds a locked JobStore is waited for (each try waits sqlite's busy timeout) before stopping


class Stopped(Exception):  # noqa: N818 - the outcome of a request
    """The coordinator stopped on SIGTERM/SIGINT after putting its running structures back to READY."""

    def __init__(self, signum: int, requeued: list[int]):
        listed = f"Firework(s) {requeued} back to READY" if requeued else "no structure was running"
        super().__init__(f"stopped by {signal.Signals(signum).name}; {listed}")
        self.signum, self.requeued = signum, requeued


@dataclass
class Limits:
    """When the coordinator takes no new work: after `max_structures` finished structures, `nlaunches` Fireworks,
    at `deadline` (time.monotonic()), or with less than a minute left in its SLURM allocation."""

    max_structures: int | None = None
    nlaunches: int | None = None
    deadline: float | None = None


@dataclass
class Progress:
    """What the coordinator has done so far."""

    launched: int = 0  # Fireworks ended (quick stages and SCF runs)
    finished: int = 0  # structures finished (labelled or failed)
    requeued: list[int] = field(default_factory=list)  # Fireworks given back to READY (not failures)
    store_busy_since: float | None = None  # the JobStore has been locked by another process since then


def rerun_orphans(launchpad: LaunchPad) -> list[int]:
    """RUNNING Fireworks of an embedded home whose coordinator is this process: their worker is dead (the lock
    proves it); put them back to READY with FireWorks' detect_lostruns."""
    _, lost_fw_ids, _ = launchpad.detect_lostruns(expiration_secs=0, rerun=True)
    return sorted(lost_fw_ids)


def settle_offline_runs(launchpad: LaunchPad, store, queue_alive=None, queue: Path | None = None,
                        owners_alive: bool = False) -> tuple[list[int], list[int]]:
    """Take in the offline runs an earlier coordinator left: finished ones (also SLURM jobs that ended while no
    coordinator ran), and lost ones — a local worker dies with its coordinator; a SLURM job left the queue
    unfinished; a pilot host (its ticket in `queue`) ended without finishing it — back to READY. Runs whose SLURM
    job is still queued or running, or whose ticket still waits or is held by a live host, are left alone, and
    (`owners_alive`: a MongoDB LaunchPad, where other coordinators run beside this one) those of a coordinator
    still alive. Returns the Firework ids (taken in, lost)."""
    alive = queue_alive or queue_job_alive
    me = coordinator_id()
    taken_in, lost = [], []
    for run in pending_runs(launchpad):
        worker_alive = ticket_alive(queue, run) if queue is not None else None
        if worker_alive is None and run.job_id is not None:
            worker_alive = alive(run.job_id)
        elif worker_alive is None:  # run by a coordinator's local workers: they die with it
            worker_alive = owners_alive and run.owner not in (None, me) and host_alive(run.owner)
        if run.finished() or not worker_alive:
            (taken_in if run.finished() else lost).append(run.fw_id)
            take_back(launchpad, run, store)
            if queue is not None:
                forget_ticket(queue, run)
    return taken_in, lost


def coordinator_id() -> str:
    """This coordinator, as its offline runs name their owner: its SLURM job, else its host and process."""
    return host_id_for(os.environ.get("SLURM_JOB_ID"))


def choose_parallel(ranks: int, structures: int) -> int:
    """How many pw.x runs at once on `ranks` cores: one per core when there are as many structures to run (pw.x
    on a few ranks scales worse than independent runs), never more than the structures waiting."""
    return max(1, min(ranks, structures))


def local_workers(execution: ExecutionSettings, parallel: int | None, waiting: int, log: Path | None) -> LocalWorkers:
    """`parallel` local worker processes (default: choose_parallel for the cores and the structures `waiting`),
    each pw.x with its share of the cores."""
    ranks = execution.mpi_ranks or available_ranks()
    count = parallel or choose_parallel(ranks, waiting)
    return LocalWorkers(count, execution.model_copy(update={"mpi_ranks": max(1, ranks // count)}), log)


class Coordinator:
    """Runs a home's Fireworks: quick stages in this process, SCF Fireworks in `workers`. One method per step."""

    def __init__(self, home: Path, launchpad: LaunchPad, store, workers=None, *, execution: ExecutionSettings,
                 launch_root: Path, log: Path | None = None, limits: Limits | None = None, on_finished=None,
                 parallel: int | None = None):
        from fireworks import FWorker
        from fireworks.fw_config import FWORKER_LOC

        self.home, self.launchpad, self.store = home, launchpad, store
        self.embedded = embedded_file(home) is not None
        self.execution, self.launch_root, self.log = execution, Path(launch_root).resolve(), log
        self.limits, self.on_finished = limits or Limits(), on_finished
        self.fworker = FWorker.from_file(FWORKER_LOC) if FWORKER_LOC else FWorker()
        self.saver = state.Saver(launchpad)
        self.progress = Progress()
        self.finishing: list[int] = []  # SIGUSR1: finish the running Fireworks, take no new one
        self.signals: list[int] = []  # SIGTERM/SIGINT received
        self.settle()
        if self.embedded:  # a first share of the backlog, so that the workers are chosen for what waits
            self.admit(LAUNCHPAD_WORKFLOWS)
        self.workers = workers or local_workers(execution, parallel, state.unfinished_count(launchpad), log)
        self.capacity = max(LAUNCHPAD_WORKFLOWS, 2 * self.workers.max_running)

    # --- the steps ------------------------------------------------------------------------------------------------

    def settle(self) -> None:
        """Take over what an earlier coordinator left: RUNNING Fireworks of a dead worker, offline runs finished or
        lost meanwhile, SLURM jobs still queued or running, Fireworks that ended as nobody's failure."""
        if self.embedded and (orphans := rerun_orphans(self.launchpad)):
            self.say(f"{len(orphans)} Firework(s) left RUNNING by a dead worker put back to READY: {orphans}")
        if lost := settle_offline_runs(self.launchpad, self.store, queue=queue_folder(self.home),
                                       owners_alive=not self.embedded)[1]:
            self.say(f"{len(lost)} Firework(s) whose worker was lost put back to READY: {lost}")
        state.requeue(self.launchpad, REQUEUED)
        state.save_launchpad(self.launchpad)

    def admit(self, capacity: int) -> None:
        """Take submissions in from the inbox while the LaunchPad holds fewer than `capacity` unfinished workflows."""
        for intake in take_in(self.home, self.launchpad, state.save_launchpad, self.store, capacity):
            log_line(self.log, f"qe-factory: {intake.line()}")

    def dispatch(self) -> bool:
        """Reserve the next READY SCF Firework for a free worker and start it there (READY → RESERVED, and RUNNING
        once a local worker has it); False when no worker is free or no SCF waits."""
        if not self.workers.free():
            return False
        run = reserve(self.launchpad, state.stage_fworker(self.fworker, "scf"), new_launch_dir(self.launch_root, "scf"),
                      self.store, owner=coordinator_id())
        if run is None:  # no SCF waits (or another coordinator took the last one)
            return False
        self.workers.start(run)
        if run.job_id:
            self.launchpad.set_reservation_id(run.launch_id, run.job_id)
        else:  # a local worker process has it now
            run.move(self.launchpad, RunState.RUNNING)
        self.saver.changed()
        return True

    def run_quick_stage(self) -> bool:
        """Run the next READY inputs or validate Firework here; False when none waits, or when a new structure
        would start while as many SCF runs wait as there are workers."""
        new_structures = state.ready_scf_count(self.launchpad) < self.workers.max_running
        fworker = state.stage_fworker(self.fworker, "quick" if new_structures else "validate")
        with jobflow_store(self.store):
            fw_id = launch_here(self.launchpad, fworker, new_launch_dir(self.launch_root, "quick"), self.log)
        if fw_id is None:
            return False
        self.ended([fw_id])
        return True

    def collect(self) -> None:
        """Wait (until unsaved changes are due) for runs that ended and take them in (FINISHED | LOST →
        TAKEN_BACK); save when nothing ended."""
        self.observe()
        ended = self.workers.wait(self.saver.due())
        if not ended:  # unsaved changes are due, or (SLURM) time for another look at the queue
            self.saver.flush()
            return
        self.take_back(ended)

    def observe(self) -> None:
        """RESERVED runs whose worker (a SLURM job) has started them → RUNNING."""
        for run in self.workers.running():
            if run.state is RunState.RESERVED and run.started():
                run.move(self.launchpad, RunState.RUNNING)
                self.saver.changed()

    def take_back(self, runs: list[OfflineRun]) -> None:
        for run in runs:
            take_back(self.launchpad, run, self.store)
            self.saver.changed()
        self.ended([run.fw_id for run in runs])

    def ended(self, fw_ids: list[int]) -> None:
        """Account for Fireworks that just ended: those that ended as nobody's failure go back to READY (a full disk
        or a worker that cannot run pw.x then stops the coordinator, naming why); a finished structure leaves the
        LaunchPad (its result is in the JobStore) and is reported."""
        requeued = state.requeue(self.launchpad, REQUEUED, fw_ids)
        self.progress.requeued += sorted(requeued)
        self.progress.launched += len(fw_ids) - len(requeued)
        for fw_id in fw_ids:
            if fw_id not in requeued and (finished := state.finished_structure(self.launchpad, fw_id)):
                self.finished(fw_id, *finished)
        if not any(failure.error_type == StoreBusy.__name__ for failure in requeued.values()):
            self.progress.store_busy_since = None  # the JobStore answered
        for failure in requeued.values():
            self.stop_for(failure, sorted(requeued))

    def finished(self, fw_id: int, uid: str, fw_state: str) -> None:
        self.progress.finished += 1
        if fw_state == "COMPLETED":  # the result is in the JobStore: the LaunchPad stays small
            state.archive(self.launchpad, fw_id)
            self.saver.changed()
        if self.on_finished:
            self.on_finished(uid, fw_state)

    def stop_for(self, failure: state.Failure, requeued: list[int]) -> None:
        """Stop taking work when what put a Firework back to READY will not pass by itself; wait for a JobStore
        another process holds locked (up to STORE_PATIENCE)."""
        if self.signals or failure.outcome is Outcome.INTERRUPTED:
            return
        back = f"Firework(s) {requeued} back to READY"
        if failure.outcome is Outcome.DISK_FULL:
            with executing(self.execution):
                scratch = str(worker_execution().work_dir)
            where = "pw.x's scratch" if scratch in failure.message else "a disk"
            raise DiskFullError(28, f"{where} is full ({failure.message}); {back}. Free space, then run the same "
                                "command again")
        if failure.error_type == StoreBusy.__name__:
            self.progress.store_busy_since = since = self.progress.store_busy_since or time.monotonic()
            if time.monotonic() - since < STORE_PATIENCE:
                self.say(f"the JobStore is locked by another process; {back}, trying again")
                time.sleep(1.0)
                return
        raise EnvironmentFault(f"{failure.message}; {back}. Nothing was counted against the structures: mend this "
                               "machine, then run the same command again")

    # --- the loop -------------------------------------------------------------------------------------------------

    def accepting(self) -> bool:
        """Whether new work may start (no stop request, no limit reached, enough time left in the allocation)."""
        limits, progress = self.limits, self.progress
        if self.finishing or self.signals or (limits.deadline is not None and time.monotonic() >= limits.deadline):
            return False
        if limits.max_structures and progress.finished >= limits.max_structures:
            return False
        if limits.nlaunches and progress.launched + len(self.workers.running()) >= limits.nlaunches:
            return False
        left = seconds_left_in_allocation()
        return left is None or left >= MIN_SECONDS_FOR_A_LAUNCH  # else leave the rest to the next batch job

    def start_work(self) -> None:
        """Admit, then keep every free worker busy and run the quick stages while new work may start."""
        if self.embedded:  # the backlog waits in the inbox: the LaunchPad holds the work in progress
            self.admit(self.capacity)
        while self.accepting() and (self.dispatch() or self.run_quick_stage()):
            pass  # a free worker first: it never waits for the quick stages
        self.saver.flush()  # a reader sees what runs (and a killed coordinator leaves it reserved): at 64 slots one
        # save per structure, 17 ms of CPU each (benchmarks/README.md, coordinator.py)

    def run(self) -> int:
        """Until nothing is READY and nothing runs (or no new work may start and only SLURM jobs run on); returns
        the Fireworks run. Raises Stopped after SIGTERM/SIGINT, once the running structures are back to READY."""
        completed = False
        with self.signal_handlers(), executing(self.execution):
            try:
                while True:
                    if self.accepting():
                        self.start_work()
                    if not self.workers.running():
                        if not (self.accepting() and self.launchpad.run_exists(self.fworker)):
                            break
                        continue
                    if not self.accepting() and self.workers.outlive_coordinator:
                        break  # SLURM jobs run on by themselves: the next coordinator takes them in
                    self.collect()
                completed = True
            finally:
                self.close(completed)
        if self.signals:
            raise Stopped(self.signals[0], sorted(set(self.progress.requeued)))
        return self.progress.launched

    def close(self, completed: bool) -> None:
        """Bring the local workers' runs back (after an error or a stop), close the workers, save."""
        if self.workers.running() and not self.workers.outlive_coordinator:
            self.workers.signal(signal.SIGTERM)
            while self.workers.running():
                runs = self.workers.wait()
                for run in runs:
                    take_back(self.launchpad, run, self.store)
                self.progress.requeued += sorted(state.requeue(self.launchpad, REQUEUED, [r.fw_id for r in runs]))
        self.workers.close()
        try:
            state.save_launchpad(self.launchpad)
        except DiskFullError:
            if completed:  # otherwise the exception on its way out says more
                raise

    @contextlib.contextmanager
    def signal_handlers(self):
        """SIGUSR1: finish the running Fireworks, take no new one; SIGTERM/SIGINT: stop pw.x, structures back to
        READY (a second one exits at once)."""
        handlers = {signal.SIGUSR1: lambda signum, frame: self.finishing.append(signum),
                    signal.SIGTERM: self.stop_now, signal.SIGINT: self.stop_now}
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            yield
        finally:
            STOP.clear()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop_now(self, signum: int, frame: Any) -> None:
        if self.signals:
            os._exit(128 + signum)  # a second request: at once (the workers and the reaper stop pw.x)
        self.signals.append(signum)
        STOP.set()
        self.workers.signal(signal.SIGTERM)
        print(f"qe-factory: {signal.Signals(signum).name}: stopping pw.x, the structures go back to READY "
              "(again to exit at once)", file=sys.stderr)

    def say(self, line: str) -> None:
        print(f"qe-factory: {line}", file=sys.stderr)


def run_coordinator(
    launchpad: LaunchPad | None = None,
    max_structures: int | None = None,
    nlaunches: int | None = None,
    launch_root: Path | None = None,
    on_finished=None,
    execution: ExecutionSettings | None = None,
    log: Path | None = None,
    parallel: int | None = None,
    workers=None,
    timeout: float | None = None,
) -> int:
    """Run the home's Fireworks as its coordinator (Coordinator.run) until nothing is READY and nothing runs;
    returns the number of Fireworks run.

    SCF Fireworks run in `parallel` local worker processes (default: chosen from the cores and the structures
    waiting; each pw.x gets cores/parallel ranks) or in `workers` (e.g. workers.QueueWorkers: SLURM jobs). No new
    work after `max_structures` structures finished, `nlaunches` Fireworks, `timeout` seconds, SIGUSR1, or with less
    than a minute left in its SLURM allocation. `on_finished(uid, state)` is called for every structure finished
    (COMPLETED: its result is in the JobStore, and its workflow has left the LaunchPad; FIZZLED). `execution`:
    where and how pw.x runs (default: home.worker_execution()). `log`: a file that FireWorks' and jobflow's own log
    lines go to instead of the terminal. Raises lock.HomeBusy if another process coordinates the home, Stopped on
    SIGTERM/SIGINT, DiskFullError or EnvironmentFault when nothing more can run here.
    """
    home = factory_home()
    with coordinate(home, command_line()):
        deadline = None if timeout is None else time.monotonic() + timeout
        coordinator = Coordinator(
            home, launchpad or state.get_launchpad(), state.get_jobstore(), workers,
            execution=execution or worker_execution(), launch_root=launch_root or Path.cwd(), log=log,
            limits=Limits(max_structures, nlaunches, deadline), on_finished=on_finished, parallel=parallel)
        if hasattr(coordinator.workers, "adopt"):  # SLURM jobs an earlier coordinator submitted, still in the queue
            coordinator.workers.adopt(pending_runs(coordinator.launchpad))
        return coordinator.run()


def log_line(log: Path | None, line: str) -> None:
    """A line for the home's log (or the terminal when there is no log: qe-factory -v)."""
    if log is None:
        print(line, file=sys.stderr)
    else:
        with open(log, "a") as handle:
            handle.write(line + "\n")


def new_launch_dir(launch_root: Path, kind: str) -> Path:
    """A new, unique launch directory (unique also beside other coordinators on other machines)."""
    launch_root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"launcher_{time.strftime('%Y-%m-%d-%H-%M-%S')}_{kind}_", dir=launch_root))


def launch_here(launchpad: LaunchPad, fworker, launch_dir: Path, log: Path | None) -> int | None:
    """Run the next READY Firework for `fworker` in this process, in `launch_dir` (removed if none waits); its
    fw_id, or None. FireWorks checks it out atomically: two coordinators never run the same one."""
    from fireworks.core.rocket_launcher import launch_rocket

    with contextlib.ExitStack() as quiet:
        quiet.enter_context(contextlib.chdir(launch_dir))
        if log:  # jobflow's handler (made anew in each task), FireWorks' lines and a failed job's traceback
            handle = quiet.enter_context(open(log, "a"))
            quiet.enter_context(contextlib.redirect_stdout(handle))
            quiet.enter_context(contextlib.redirect_stderr(handle))
        quiet.enter_context(without_ping_thread())  # its last ping would race the rocket's own
        ran = launch_rocket(launchpad, fworker, strm_lvl="WARNING")
    if not ran:
        launch_dir.rmdir()
        return None
    return state.fw_launched_in(launchpad, launch_dir)
