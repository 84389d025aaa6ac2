"""The pipelines as Python calls (workflow.pipelines), and what the coordinator does with a JobStore that another
process holds locked. pw.x is tests/fake_pw.py replaying a recorded real run: the orchestration is the subject."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from ase import Atoms
from ase.build import bulk
from ase.io import read, write

from qe_factory import DFTConfig
from qe_factory.workflow import coordinator, pipelines

FAKE_PW = Path(__file__).resolve().parents[1] / "fake_pw.py"
BIN = Path(sys.executable).parent
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")


@pytest.fixture
def fake_config(tmp_path, monkeypatch) -> DFTConfig:
    monkeypatch.setenv("FAKE_PW_PLAN", "replay:si_scf")
    monkeypatch.setenv("FAKE_PW_COUNTER", str(tmp_path / "calls"))
    return DFTConfig(kpoint_spacing=0.6, ecutwfc=25, ecutrho=200, allow_low_cutoffs=True, max_retries=1,
                     mpi_ranks=1, command=f"{sys.executable} {FAKE_PW}")


def silicon(*uids: str) -> list[Atoms]:
    frames = []
    for uid in uids:
        atoms = bulk("Si")
        atoms.rattle(0.01, seed=sum(map(ord, uid)))
        atoms.info["uid"] = uid
        frames.append(atoms)
    return frames


def test_the_run_pipeline_is_one_python_call(home, tmp_path, fake_config):
    overlapping = Atoms("Si2", positions=[[0, 0, 0], [0.3, 0, 0]], cell=[5, 5, 5], pbc=True)
    overlapping.info["uid"] = "too-close"
    heard = []

    class Heard(pipelines.Listener):
        def finished(self, story):
            heard.append((story.uid, story.outcome))

    report = pipelines.label([*silicon("si-a", "si-b"), overlapping], fake_config, home, tmp_path / "out.extxyz",
                             e0s=False, listener=Heard())
    assert report.labelled == ["si-a", "si-b"] and report.written == 2 and not report.failed, report
    assert list(report.refused) == ["too-close"] and report.neither == 0
    assert sorted(heard) == [("si-a", "labelled"), ("si-b", "labelled")]
    frames = read(tmp_path / "out.extxyz", index=":")
    assert [a.info["uid"] for a in frames] == ["si-a", "si-b"] and all("REF_energy" in a.info for a in frames)
    again = pipelines.label(silicon("si-a"), fake_config, home, None, e0s=False)  # labelled before: nothing runs
    assert again.labelled == ["si-a"] and again.duplicates == {"si-a": "si-a"} and again.written == 0


def test_a_jobstore_locked_by_another_process_is_waited_for_and_nothing_fails(home, tmp_path, fake_config,
                                                                              monkeypatch):
    """Another connection holds the sqlite JobStore with BEGIN EXCLUSIVE from the first quick stage on; it lets go
    when the coordinator says it found the store locked (state, not time). Before: both structures FIZZLED as
    `ERROR at inputs: sqlite3.OperationalError: database is locked`."""
    locker = sqlite3.connect(home / "state" / "jobstore" / "qe_factory" / "outputs.collection", timeout=0,
                             isolation_level=None)
    launch_here, said = coordinator.launch_here, []

    def lock_first(*args, **kwargs):
        if not said and not locker.in_transaction:
            locker.execute("BEGIN EXCLUSIVE")
        return launch_here(*args, **kwargs)

    def say(self, line):
        said.append(line)
        if locker.in_transaction:
            locker.execute("COMMIT")

    monkeypatch.setattr(coordinator, "launch_here", lock_first)
    monkeypatch.setattr(coordinator.Coordinator, "say", say)
    report = pipelines.label(silicon("si-a", "si-b"), fake_config, home, None, e0s=False)
    assert any("JobStore is locked by another process" in line for line in said), said
    assert report.labelled == ["si-a", "si-b"] and not report.failed and not report.refused, report


def test_a_jobstore_repaired_between_scf_and_validation_restarts_the_structure(tmp_path, fake_config):
    """Before: the validation FIZZLED with `ValueError: Could not resolve reference` (the SCF's output was in the
    lost JobStore)."""
    env = {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}
    home = tmp_path / "home"

    def qef(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "qe-factory"), "--home", str(home), *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path)

    write(tmp_path / "si.extxyz", silicon("si-a"))
    (tmp_path / "fake.yaml").write_text(
        "kpoint_spacing: 0.6\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\nmax_retries: 1\nmpi_ranks: 1\n"
        f"command: {sys.executable} {FAKE_PW}\n")
    assert qef("submit", "si.extxyz", "-c", "fake.yaml", "--no-e0s").returncode == 0
    ran = qef("worker", "-c", "fake.yaml", "--nlaunches", "2")  # inputs, scf: the validation waits READY
    assert ran.returncode == 0 and "READY" in qef("lpad", "get_fws", "-n", "validate si-a", "-d", "more").stdout
    for path in (home / "state" / "jobstore").rglob("*.collection"):
        path.write_bytes(b"this is not a database" * 100)
    repaired = qef("repair")
    assert repaired.returncode == 0 and "started again from their inputs: ['si-a']" in repaired.stdout, (
        repaired.stdout + repaired.stderr)
    assert qef("worker", "-c", "fake.yaml").returncode == 0
    status = qef("status").stdout
    assert "1 labelled" in status and "0 failed" in status, status


def test_structures_without_a_uid_are_reported_under_the_uid_submit_gives_them(home, fake_config):
    frames = silicon("a", "b")
    for atoms in frames:
        del atoms.info["uid"]
    report = pipelines.label(frames, fake_config, home, None, e0s=False)
    assert report.labelled == ["s-000000", "s-000001"] and report.neither == 0, report
