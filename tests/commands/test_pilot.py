"""Pilot hosts (workflow/host.py): a few host processes, each running launch after launch from the home's queue
directory, instead of one worker (or one SLURM job) per launch. Here the hosts are local `qe-factory host`
processes (LocalHosts); on SLURM each is a job (SlurmHosts). pw.x is tests/fake_pw.py replaying a real run."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from ase.build import bulk

from qe_factory import DFTConfig
from qe_factory.workflow.coordinator import run_coordinator
from qe_factory.workflow.host import LocalHosts, PilotJobs, host_records, queue_folder
from qe_factory.workflow.state import get_jobstore, get_launchpad, labelled_uids
from qe_factory.workflow.submit import submit

FAKE_PW = Path(__file__).resolve().parents[1] / "fake_pw.py"


def silicon(count: int) -> list:
    frames = []
    for n in range(count):
        atoms = bulk("Si")
        atoms.rattle(0.01, seed=n)
        atoms.info["uid"] = f"si-{n}"
        frames.append(atoms)
    return frames


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def pilot_home(home: Path, tmp_path: Path, monkeypatch, plan: str, count: int):
    monkeypatch.setenv("FAKE_PW_PLAN", plan)
    monkeypatch.setenv("FAKE_PW_COUNTER", str(tmp_path / "calls"))
    monkeypatch.setenv("FAKE_PW_PIDFILE", str(tmp_path / "pw.pid"))
    config = DFTConfig(kpoint_spacing=0.6, ecutwfc=25, ecutrho=200, allow_low_cutoffs=True, max_retries=1)
    submit(silicon(count), config, launchpad=get_launchpad())
    (tmp_path / "exec.yaml").write_text(f"mpi_ranks: 1\ncommand: {sys.executable} {FAKE_PW}\n")
    hosts = LocalHosts(home, slots=2, config=tmp_path / "exec.yaml", log=tmp_path / "hosts.log", idle_exit=2)
    return PilotJobs(queue_folder(home), hosts, max_jobs=2, slots=2, poll_seconds=0.2)


def test_two_pilot_hosts_run_every_launch_and_the_coordinator_takes_each_back(home, tmp_path, monkeypatch):
    jobs = pilot_home(home, tmp_path, monkeypatch, "replay:si_scf", 6)
    run_coordinator(launch_root=home / "launches", workers=jobs, log=tmp_path / "coordinator.log")
    assert labelled_uids(get_jobstore()) == {f"si-{n}" for n in range(6)}
    assert jobs.submitted <= 2, jobs.submitted  # six SCF launches, at most two hosts (was: one job each)
    while any(jobs.hosts.alive(job) for job in jobs.jobs):  # they end after 2 s without work
        time.sleep(0.2)
    records = host_records(queue_folder(home))
    assert sum(record.done for record in records) == 6 and {record.state for record in records} == {"ENDED"}


def test_a_host_killed_mid_run_gives_its_launch_back_and_another_host_runs_it(home, tmp_path, monkeypatch, caplog):
    jobs = pilot_home(home, tmp_path, monkeypatch, "hang,replay:si_scf", 1)  # one pw.x at a time: one pid file

    def kill_the_host_with_the_hanging_run() -> None:
        while not (tmp_path / "pw.pid").exists():  # the first pw.x (it hangs) runs
            time.sleep(0.05)
        worker = parent(int((tmp_path / "pw.pid").read_text()))  # pw.x's parent: a worker of the host
        os.killpg(parent(worker), signal.SIGKILL)  # the host and its worker processes, no goodbye

    killer = threading.Thread(target=kill_the_host_with_the_hanging_run, daemon=True)
    killer.start()
    run_coordinator(launch_root=home / "launches", workers=jobs, log=tmp_path / "coordinator.log")
    killer.join(timeout=60)
    assert labelled_uids(get_jobstore()) == {"si-0"}
    assert jobs.submitted == 2  # the killed host was replaced while its launch waited again
    assert "back to READY: its local worker process ended without finishing it" in caplog.text
