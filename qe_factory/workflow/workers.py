"""Workers: where offline runs (see offline.py) are executed — local worker processes, or SLURM jobs.

Both offer the same calls to the coordinator (coordinator.py): how many runs they can `start` now (`free`), `start`
one, the runs they hold (`running`), and `wait` a little for runs that ended (finished, or lost with their worker).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from qe_factory.engine.config import ExecutionSettings
from qe_factory.engine.scheduler import queue_job_alive
from qe_factory.workflow.offline import OfflineRun

PR_SET_PDEATHSIG = 1


def _worker_main(conn, execution: ExecutionSettings, log: str | None, environment: dict[str, str]) -> None:
    """A local worker process: runs the offline launches the coordinator sends, one at a time, until told to stop.
    It dies with the coordinator (even by SIGKILL: the kernel's parent-death signal), and its pw.x with it (the
    reaper); SIGTERM/SIGINT stop the running pw.x (the launch FIZZLES as interrupted and goes back to READY)."""
    from qe_factory.engine.process import STOP

    with contextlib.suppress(OSError, AttributeError):  # not Linux: this process would finish its launch alone
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)  # the coordinator died before the request took effect
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: STOP.set())
    os.environ.update(environment)
    if log:  # jobflow's and FireWorks' lines, and tracebacks, into the home's log
        sys.stdout = sys.stderr = open(log, "a", buffering=1)  # noqa: SIM115 - for the life of the process
    from qe_factory.workflow.offline import run_offline

    while True:
        try:
            launch_dir = conn.recv()
        except EOFError:
            return
        if launch_dir is None:
            return
        try:
            state = run_offline(Path(launch_dir), execution)
        except Exception:  # a fault of this process, not of the structure: the coordinator counts it as lost
            traceback.print_exc()
            state = "LOST"
        conn.send(state)


def start_method() -> str:
    """How a worker process starts: a fork of this one while it runs no other thread (its imports done: ready at
    once, where a fresh interpreter spends ~1 s of CPU importing; benchmarks/README.md, factory.py), else a fresh
    interpreter (a fork could copy a lock another thread holds)."""
    return "fork" if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods() else "spawn"


class LocalWorkers:
    """`count` worker processes on this machine, each running one launch at a time with `execution` (its
    mpi_ranks set to this slot's share of the cores)."""

    outlive_coordinator = False  # they die with it (and their pw.x with them)

    def __init__(self, count: int, execution: ExecutionSettings, log: Path | None = None):
        self.environment = {}
        if count > 1 and (execution.mpi_ranks or 1) > 1:  # else mpirun binds every run's ranks to the first cores
            self.environment["OMPI_MCA_hwloc_base_binding_policy"] = "none"
        self.execution, self.log = execution, str(log) if log else None
        self.max_running = count
        self.idle: list[tuple[Any, Any]] = [self._spawn() for _ in range(count)]  # (connection, process)
        self.busy: dict[Any, tuple[Any, OfflineRun]] = {}  # connection → (process, run)

    def _spawn(self) -> tuple[Any, Any]:
        context = multiprocessing.get_context(start_method())
        ours, theirs = context.Pipe()
        process = context.Process(target=_worker_main, args=(theirs, self.execution, self.log, self.environment),
                                  daemon=True)
        gc.freeze()  # a forked worker's collector then never walks (and so copies) the coordinator's objects
        try:
            process.start()
        finally:
            gc.unfreeze()
        theirs.close()
        return ours, process

    def free(self) -> int:
        return len(self.idle)

    def start(self, run: OfflineRun) -> None:
        conn, process = self.idle.pop()
        conn.send(str(run.launch_dir))
        self.busy[conn] = (process, run)

    def running(self) -> list[OfflineRun]:
        return [run for _, run in self.busy.values()]

    def wait(self, timeout: float | None = None) -> list[OfflineRun]:
        """Runs that ended: their worker replied, or died (the run is then unfinished; a new worker replaces it)."""
        if not self.busy:
            return []
        sentinels = {process.sentinel: conn for conn, (process, _) in self.busy.items()}
        ended = []
        for ready in wait([*self.busy, *sentinels], timeout):
            conn = sentinels.get(ready, ready)
            if conn not in self.busy:
                continue
            process, run = self.busy.pop(conn)
            try:
                conn.recv()
                self.idle.append((conn, process))
            except (EOFError, OSError):
                process.join()
                self.idle.append(self._spawn())
            ended.append(run)
        return ended

    def signal(self, signum: int) -> None:
        """Pass a stop request on to the busy workers (each stops its pw.x; the launch comes back interrupted)."""
        for process, _ in self.busy.values():
            if process.is_alive():
                os.kill(process.pid, signum)

    def close(self) -> None:
        for conn, _ in self.idle:
            with contextlib.suppress(OSError):
                conn.send(None)
        for _, process in self.idle:
            process.join(timeout=60)
        for process, _ in self.busy.values():
            process.kill()
            process.join()


class QueueWorkers:
    """Up to `max_jobs` SLURM jobs at once, one offline launch each, submitted with the home's queue adapter."""

    outlive_coordinator = True  # a job runs on without its coordinator; the next one takes its result in

    def __init__(self, qadapter, max_jobs: int, poll_seconds: float, max_submissions: int = 0):
        self.qadapter, self.max_jobs, self.poll_seconds = qadapter, max_jobs, poll_seconds
        self.max_submissions = max_submissions  # 0: no limit
        self.max_running = max_jobs
        self.runs: list[OfflineRun] = []  # submitted and not yet ended (also by an earlier coordinator: adopt)
        self.submitted = 0

    def adopt(self, runs: list[OfflineRun]) -> None:
        """Runs whose SLURM jobs an earlier coordinator submitted and that are still queued or running."""
        self.runs.extend(run for run in runs if run.job_id)

    def free(self) -> int:
        left = self.max_submissions - self.submitted if self.max_submissions else self.max_jobs
        return max(0, min(left, self.max_jobs - len(self.runs)))

    def start(self, run: OfflineRun) -> None:
        run.job_id = submit_job(self.qadapter, run)
        self.runs.append(run)
        self.submitted += 1

    def running(self) -> list[OfflineRun]:
        return list(self.runs)

    def wait(self, timeout: float | None = None) -> list[OfflineRun]:
        """Runs whose job finished the launch, or left the queue without finishing it; polls every poll_seconds
        until one ended or `timeout` (at most poll_seconds) passed."""
        ended = poll_for_ended(
            lambda: [run for run in self.runs if run.finished() or not queue_job_alive(run.job_id or "")],
            self.poll_seconds, timeout)
        self.runs = [run for run in self.runs if run not in ended]
        return ended

    def signal(self, signum: int) -> None:
        """Nothing: SLURM jobs run on by themselves; the next coordinator takes them in."""

    def close(self) -> None:
        """Nothing: jobs still queued or running are taken in by the next coordinator."""


def poll_for_ended(ended: Callable[[], list[OfflineRun]], poll_seconds: float, timeout: float | None
                   ) -> list[OfflineRun]:
    """`ended()` every poll_seconds until it names a run, or `timeout` (at most poll_seconds) passed."""
    deadline = time.monotonic() + (poll_seconds if timeout is None else min(poll_seconds, timeout))
    while not (runs := ended()) and time.monotonic() < deadline:
        time.sleep(min(poll_seconds, max(0.0, deadline - time.monotonic())))
    return runs


def submit_job(qadapter, run: OfflineRun) -> str:
    """Write the job script for an offline launch (FireWorks' queue adapter, the Firework's `_queueadapter`
    resources applied) and submit it; returns the SLURM job id."""
    from fireworks import Firework
    from fireworks.fw_config import QUEUE_JOBNAME_MAXLEN, SUBMIT_SCRIPT_NAME
    from fireworks.utilities.fw_serializers import load_object
    from fireworks.utilities.fw_utilities import get_slug

    fw = Firework.from_file(str(run.launch_dir / "FW.json"))
    adapter = load_object(qadapter.to_dict())  # a copy per job
    adapter.update(job_name=get_slug(fw.name)[:QUEUE_JOBNAME_MAXLEN])
    adapter.update(fw.spec.get("_queueadapter", {}))
    qe_factory = Path(sys.executable).with_name("qe-factory")
    adapter["rocket_launch"] = f"{qe_factory} -v launch-offline {run.launch_dir}"
    with contextlib.chdir(run.launch_dir):
        Path(SUBMIT_SCRIPT_NAME).write_text(adapter.get_script_str(str(run.launch_dir)))
        job_id = adapter.submit_to_queue(SUBMIT_SCRIPT_NAME)
    if not job_id:
        raise RuntimeError(f"sbatch refused the job script in {run.launch_dir} (see the queue adapter's log)")
    return str(job_id)
