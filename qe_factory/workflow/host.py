"""Pilot hosts: one process (a SLURM job, or a local process) runs launch after launch from the home's queue
directory, several at once, until no work is left or its time runs short — instead of one job per launch.

The coordinator reserves each SCF Firework into its launch directory as before (offline.py) and leaves a *ticket*
naming it in `<queue>/ready/`; a host claims a ticket by renaming it into `<queue>/claimed/<host id>/` (atomic: one
host wins), runs the launch in one of its local worker processes (workers.LocalWorkers), and the outcome stays in
the launch directory, where the coordinator takes it back. A host writes what it is doing to `<queue>/hosts/<host
id>.json`. Only the shared filesystem connects hosts and coordinator: no host touches the LaunchPad or the JobStore.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qe_factory.engine.config import ExecutionSettings
from qe_factory.engine.process import process_alive
from qe_factory.engine.scheduler import queue_job_alive, seconds_left_in_allocation
from qe_factory.workflow.offline import OfflineRun, write_json
from qe_factory.workflow.workers import LocalWorkers, poll_for_ended

READY, CLAIMED, HOSTS = "ready", "claimed", "hosts"
MIN_SECONDS_FOR_A_LAUNCH = 60  # a host in a SLURM job claims no ticket with less time left


def queue_folder(home: Path) -> Path:
    return home / "queue"


def ticket_name(run: OfflineRun) -> str:
    return f"{run.launch_id:09d}.json"


def post_ticket(queue: Path, run: OfflineRun) -> Path:
    """Leave a ticket for the run in the queue (atomically: a host sees the whole file or none)."""
    folder = queue / READY
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ticket_name(run)
    write_json(path, {"launch_id": run.launch_id, "fw_id": run.fw_id, "launch_dir": str(run.launch_dir)})
    return path


def claim(queue: Path, host_id: str) -> OfflineRun | None:
    """The oldest ticket in the queue, claimed for this host (renamed into its folder), or None when none waits."""
    mine = queue / CLAIMED / host_id
    mine.mkdir(parents=True, exist_ok=True)
    for ticket in sorted((queue / READY).glob("*.json")):
        try:
            os.rename(ticket, mine / ticket.name)
        except FileNotFoundError:  # another host was quicker
            continue
        data = json.loads((mine / ticket.name).read_text())
        return OfflineRun(data["launch_id"], data["fw_id"], Path(data["launch_dir"]))
    return None


def claimed_by(queue: Path) -> dict[str, str]:
    """Ticket name → the host that claimed it."""
    folder = queue / CLAIMED
    if not folder.is_dir():
        return {}
    return {ticket.name: host.name for host in folder.iterdir() if host.is_dir() for ticket in host.glob("*.json")}


def waiting_tickets(queue: Path) -> int:
    folder = queue / READY
    return sum(1 for _ in folder.glob("*.json")) if folder.is_dir() else 0


def forget_ticket(queue: Path, run: OfflineRun) -> None:
    """Remove the run's ticket, wherever it is (the coordinator took the run back)."""
    name = ticket_name(run)
    (queue / READY / name).unlink(missing_ok=True)
    for host in (queue / CLAIMED).glob("*"):
        (host / name).unlink(missing_ok=True)


@dataclass
class HostRecord:
    """What a host says of itself in `<queue>/hosts/<host id>.json`."""

    host_id: str
    pid: int
    hostname: str
    job_id: str | None
    slots: int
    state: str = "RUNNING"  # RUNNING, then ENDED when it exits by itself
    done: int = 0  # launches it finished
    running: int = 0
    idle_seconds: float = 0.0  # slot-seconds with no launch, so far
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def busy_fraction(self) -> float:
        span = max(1e-9, (self.updated - self.started) * self.slots)
        return max(0.0, 1.0 - self.idle_seconds / span)


def host_records(queue: Path) -> list[HostRecord]:
    folder = queue / HOSTS
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            records.append(HostRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):  # being written, or not one of ours
            continue
    return records


def host_id_for(job_id: str | None) -> str:
    return f"slurm-{job_id}" if job_id else f"local-{socket.gethostname()}-{os.getpid()}"


def run_host(queue: Path, slots: int, execution: ExecutionSettings, log: Path | None = None,
             idle_exit: float = 60.0, poll: float = 1.0) -> HostRecord:
    """Claim and run launches from `queue` in `slots` local worker processes until none has waited for
    `idle_exit` seconds with nothing running, or the allocation's time runs short (or SIGTERM/SIGUSR1: finish
    what runs, claim nothing more). Returns the host's final record."""
    job_id = os.environ.get("SLURM_JOB_ID")
    execution = execution.model_copy(update={"pilot": True})
    record = HostRecord(host_id_for(job_id), os.getpid(), socket.gethostname(), job_id, slots)
    stopping: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stopping.append(signum))
                for sig in (signal.SIGUSR1, signal.SIGTERM)}
    workers = LocalWorkers(slots, execution, log)
    idle_since, last = time.monotonic(), time.monotonic()
    try:
        while True:
            taking = not stopping and time_left_for_a_launch()  # one look at the allocation per round
            while taking and workers.free() and (run := claim(queue, record.host_id)) is not None:
                workers.start(run)
            now = time.monotonic()
            record.idle_seconds += workers.free() * (now - last)  # slots left free since the last round
            last = now
            if workers.running():
                idle_since = now
                record.done += len(workers.wait(poll))
            elif not taking or now - idle_since >= idle_exit:
                break
            else:
                time.sleep(poll)  # for new tickets
            record.running, record.updated = len(workers.running()), time.time()
            write_record(queue, record)
    finally:
        workers.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        record.state, record.running, record.updated = "ENDED", 0, time.time()
        write_record(queue, record)
    return record


def time_left_for_a_launch() -> bool:
    left = seconds_left_in_allocation()
    return left is None or left >= MIN_SECONDS_FOR_A_LAUNCH


def write_record(queue: Path, record: HostRecord) -> None:
    folder = queue / HOSTS
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{record.host_id}.json", asdict(record))


def host_alive(host_id: str) -> bool:
    """Whether a host still runs: its SLURM job is queued or running, or (a local host) its process lives."""
    if host_id.startswith("slurm-"):
        return queue_job_alive(host_id.removeprefix("slurm-"))
    hostname, _, pid = host_id.removeprefix("local-").rpartition("-")
    return hostname != socket.gethostname() or (pid.isdigit() and process_alive(int(pid)))


def ticket_alive(queue: Path, run: OfflineRun, claims: dict[str, str] | None = None) -> bool | None:
    """Whether a pilot host has or may still take the run: its ticket waits, or a live host claimed it; None when
    the run has no ticket (not a pilot run)."""
    name = ticket_name(run)
    if (queue / READY / name).is_file():
        return True
    host = (claims if claims is not None else claimed_by(queue)).get(name)
    if host is None:
        return None
    run.pilot = True
    if host.startswith("slurm-"):
        run.job_id = host.removeprefix("slurm-")  # what SLURM says of its end names a lost run's cause
    return host_alive(host)


class PilotJobs:
    """Pilot hosts (host.py) fed through the home's queue directory: each SCF launch becomes a ticket; up to
    `max_jobs` hosts — SLURM jobs (SlurmHosts) or local processes (LocalHosts) — are kept queued or running while
    tickets wait, each running `slots` launches at once, launch after launch."""

    outlive_coordinator = True  # hosts run on by themselves; the next coordinator takes their runs in

    def __init__(self, queue: Path, hosts, max_jobs: int, slots: int, poll_seconds: float, max_submissions: int = 0):
        self.queue, self.hosts, self.max_jobs, self.poll_seconds = queue, hosts, max_jobs, poll_seconds
        self.max_submissions = max_submissions  # 0: no limit
        self.slots = slots
        self.max_running = max_jobs * slots  # tickets waiting or running at once
        self.runs: list[OfflineRun] = []
        self.jobs: list[str] = []  # hosts submitted and, at the last look, alive
        self.submitted = 0

    def adopt(self, runs: list[OfflineRun]) -> None:
        """Runs an earlier coordinator ticketed, still waiting or with a live host."""
        self.runs.extend(run for run in runs if ticket_alive(self.queue, run))
        self.ensure_hosts()

    def free(self) -> int:
        return max(0, self.max_running - len(self.runs))

    def start(self, run: OfflineRun) -> None:
        post_ticket(self.queue, run)
        self.runs.append(run)
        self.ensure_hosts()

    def ensure_hosts(self) -> None:
        """Submit hosts while more tickets wait than the hosts not yet started (queued) will take, up to max_jobs
        queued or running."""
        self.jobs = [job for job in self.jobs if self.hosts.alive(job)]
        needed = -(-waiting_tickets(self.queue) // self.slots) - len(self.queued())
        while needed > 0 and len(self.jobs) < self.max_jobs and (
                not self.max_submissions or self.submitted < self.max_submissions):
            self.jobs.append(self.hosts.submit())
            self.submitted, needed = self.submitted + 1, needed - 1

    def running(self) -> list[OfflineRun]:
        return list(self.runs)

    def wait(self, timeout: float | None = None) -> list[OfflineRun]:
        """Runs whose host finished them, or whose host ended without finishing them; polls every poll_seconds
        until one ended or `timeout` (at most poll_seconds) passed."""
        ended = poll_for_ended(self.ended, self.poll_seconds, timeout)
        self.runs = [run for run in self.runs if run not in ended]
        for run in ended:
            forget_ticket(self.queue, run)
        return ended

    def ended(self) -> list[OfflineRun]:
        self.ensure_hosts()  # also the hosts' liveness, looked at before their claims
        claims = claimed_by(self.queue)
        return [run for run in self.runs if run.finished() or ticket_alive(self.queue, run, claims) is False]

    def signal(self, signum: int) -> None:
        """Nothing: hosts run on by themselves; the next coordinator takes their runs in."""

    def close(self) -> None:
        """Hosts still queued when no launch is left are cancelled (nothing waits for them); any other host runs on,
        and the next coordinator takes its runs in."""
        if self.runs or waiting_tickets(self.queue):
            return
        for job in self.queued():
            self.hosts.cancel(job)

    def queued(self) -> list[str]:
        """The hosts submitted that have not started yet (no record of their own in the queue)."""
        started = {record.host_id for record in host_records(self.queue)}
        return [job for job in self.jobs if job not in started]


def job_cores(qadapter) -> int:
    """The cores (MPI tasks) a job from this queue adapter gets: ntasks, else nodes × ntasks_per_node, else 1."""
    def number(key: str) -> int:
        value = qadapter.get(key)
        return int(value) if str(value).isdigit() else 0

    return number("ntasks") or max(1, number("nodes")) * max(1, number("ntasks_per_node"))


class SlurmHosts:
    """Pilot hosts as SLURM jobs, each `qe-factory host` for its whole allocation (the job script from the home's
    queue adapter and template)."""

    def __init__(self, qadapter, home: Path, slots: int, idle_exit: float = 60.0):
        self.qadapter, self.home, self.slots, self.idle_exit = qadapter, home, slots, idle_exit

    def submit(self) -> str:
        from fireworks.fw_config import SUBMIT_SCRIPT_NAME
        from fireworks.utilities.fw_serializers import load_object

        folder = self.home / "queue" / "jobs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns()}"
        folder.mkdir(parents=True)
        adapter = load_object(self.qadapter.to_dict())
        adapter.update(job_name="qe-factory-host")
        qe_factory = Path(sys.executable).with_name("qe-factory")
        slots = f" --slots {self.slots}" if self.slots else ""  # else one per core of the job
        adapter["rocket_launch"] = f"{qe_factory} -v --home {self.home} host{slots} --idle-exit {self.idle_exit}"
        with contextlib.chdir(folder):
            Path(SUBMIT_SCRIPT_NAME).write_text(adapter.get_script_str(str(folder)))
            job_id = adapter.submit_to_queue(SUBMIT_SCRIPT_NAME)
        if not job_id:
            raise RuntimeError(f"sbatch refused the pilot job script in {folder} (see the queue adapter's log)")
        return f"slurm-{job_id}"

    def alive(self, host_id: str) -> bool:
        return queue_job_alive(host_id.removeprefix("slurm-"))

    def cancel(self, host_id: str) -> None:
        subprocess.run(["scancel", host_id.removeprefix("slurm-")], capture_output=True, timeout=60)


class LocalHosts:
    """Pilot hosts as processes on this machine (`qe-factory host`), each with `slots` worker processes."""

    def __init__(self, home: Path, slots: int, config: Path | None = None, log: Path | None = None,
                 idle_exit: float = 60.0):
        self.home, self.slots, self.config, self.log, self.idle_exit = home, slots, config, log, idle_exit
        self.processes: dict[str, Any] = {}  # host id → its Popen (polled: an ended host is no zombie)

    def submit(self) -> str:
        argv = [str(Path(sys.executable).with_name("qe-factory")), "--home", str(self.home), "host", "--slots",
                str(self.slots), "--idle-exit", str(self.idle_exit), *(["-c", str(self.config)] if self.config else [])]
        out = open(self.log, "a") if self.log else subprocess.DEVNULL  # noqa: SIM115 - the host's own, to its end
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        host_id = f"local-{socket.gethostname()}-{process.pid}"
        self.processes[host_id] = process
        return host_id

    def alive(self, host_id: str) -> bool:
        process = self.processes.get(host_id)
        return process is not None and process.poll() is None

    def cancel(self, host_id: str) -> None:
        if (process := self.processes.get(host_id)) is not None:
            process.terminate()
