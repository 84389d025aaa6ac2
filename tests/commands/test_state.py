"""The home's state under concurrent commands and damage, without pw.x (the inputs job runs no pw.x): one
coordinator per home, submissions through the inbox, nothing written at exit, damage named and repaired."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ase.io import write
from structures import rattled_si

BIN = Path(sys.executable).parent
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")
FAST = "kpoint_spacing: 0.8\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\n"


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}


def qef(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "qe-factory"), "--home", str(home), *args], capture_output=True, text=True,
                          env=env(), cwd=home.parent)


def python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def workflows(home: Path) -> dict[str, str]:
    """uid → workflow state, through a read-only client in another process."""
    out = python(
        f"from qe_factory.workflow.home import activate; activate({str(home)!r}); import json; "
        "from qe_factory.workflow.state import get_launchpad; lp = get_launchpad(read_only=True); "
        "print(json.dumps({w['metadata']['uid']: w['state'] for w in lp.workflows.find({}, {'metadata': 1, "
        "'state': 1})}))"
    )
    return json.loads(out)


@pytest.fixture
def factory(tmp_path) -> Path:
    """A home with two submitted structures (si-1, si-2)."""
    home = tmp_path / "home"
    write(tmp_path / "two.extxyz", [rattled_si(1), rattled_si(2)])
    (tmp_path / "fast.yaml").write_text(FAST)
    submitted = qef(home, "submit", str(tmp_path / "two.extxyz"), "-c", str(tmp_path / "fast.yaml"), "--no-e0s")
    assert "2 added" in submitted.stdout, submitted.stdout + submitted.stderr
    return home


class Coordinator:
    """Another process holding the home's lock (as a running worker would), until the test lets it go."""

    CODE = (
        "import sys; from qe_factory.workflow.home import activate; home = activate(sys.argv[1]); "
        "from qe_factory.workflow.lock import coordinate\n"
        "with coordinate(home, 'qe-factory worker (test)'):\n"
        "    print('holding', flush=True); sys.stdin.read()"
    )

    def __init__(self, home: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(home)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env())
        assert self.proc.stdout.readline().strip() == "holding"

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait() == 0


def test_writers_beside_a_coordinator_are_refused_or_queued(factory, tmp_path):
    coordinator = Coordinator(factory)
    pid = str(coordinator.proc.pid)
    try:
        for args in (["worker"], ["rerun-lost"], ["repair"], ["lpad", "defuse_wflows", "-i", "1"],
                     ["run", str(tmp_path / "two.extxyz"), "-c", str(tmp_path / "fast.yaml")]):
            refused = qef(factory, *args)
            assert refused.returncode == 3, (args, refused.stdout, refused.stderr)
            assert f"coordinated by PID {pid}" in refused.stderr and "refused" in refused.stderr, args
        count = qef(factory, "lpad", "get_wflows", "-d", "count")  # reading beside it is fine
        assert count.returncode == 0 and count.stdout.strip() == "2"
        write(tmp_path / "more.extxyz", [rattled_si(3), rattled_si(1)])
        queued = qef(factory, "submit", str(tmp_path / "more.extxyz"), "-c", str(tmp_path / "fast.yaml"), "--no-e0s")
        assert queued.returncode == 0 and "1 queued in" in queued.stdout and "1 duplicates" in queued.stdout
        status = qef(factory, "status").stdout
        assert f"coordinator: PID {pid}" in status and "inbox: 1 submission(s) waiting" in status
        assert workflows(factory) == {"si-1": "READY", "si-2": "READY"}  # nothing written behind its back
    finally:
        coordinator.release()
    taken = qef(factory, "worker", "--nlaunches", "1")  # the next coordinator takes the inbox in first
    assert taken.returncode == 0, taken.stderr
    assert "1 workflow(s) added" in (factory / "logs" / "worker.log").read_text()
    assert set(workflows(factory)) == {"si-1", "si-2", "si-3"}
    assert "inbox" not in qef(factory, "status").stdout


def test_a_python_session_closing_after_a_worker_ran_undoes_nothing(factory):
    session = subprocess.Popen(
        [sys.executable, "-c", "import sys; from qe_factory.workflow.home import activate; activate(sys.argv[1]); "
         "from qe_factory.workflow.state import get_launchpad; lp = get_launchpad(); print('open', flush=True); "
         "sys.stdin.read()", str(factory)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env(),
    )
    assert session.stdout.readline().strip() == "open"
    worker = qef(factory, "worker", "--nlaunches", "1")  # runs one inputs job
    assert worker.returncode == 0, worker.stderr
    after_worker = (factory / "state" / "launchpad.json").read_bytes()
    session.stdin.close()
    assert session.wait() == 0
    assert (factory / "state" / "launchpad.json").read_bytes() == after_worker


@pytest.mark.parametrize("damage", ["delete", "truncate", "empty"])
def test_a_missing_or_damaged_launchpad_file_is_named_and_never_recreated(factory, tmp_path, damage):
    file = factory / "state" / "launchpad.json"
    if damage == "delete":
        file.unlink()
    else:
        file.write_text(file.read_text()[: 100 if damage == "truncate" else 0])
    before = file.read_bytes() if file.exists() else None
    for args in (["status"], ["worker"], ["submit", str(tmp_path / "two.extxyz"), "-c", str(tmp_path / "fast.yaml")]):
        result = qef(factory, *args)
        assert result.returncode == 4, (args, result.stdout, result.stderr)
        assert str(file) in result.stderr and "qe-factory repair" in result.stderr, args
        assert "Traceback" not in result.stderr
    assert (file.read_bytes() if file.exists() else None) == before


def test_repair_restores_the_previous_good_state(factory):
    file = factory / "state" / "launchpad.json"
    assert qef(factory, "worker", "--nlaunches", "1").returncode == 0  # a few more saves: .prev is recent
    file.write_text("{ not json")
    repaired = qef(factory, "repair")
    assert repaired.returncode == 0, repaired.stderr
    assert "moved to" in repaired.stdout and "restored the previous good state" in repaired.stdout
    assert list(file.parent.glob("launchpad.json.damaged-*"))  # kept for a post-mortem, never deleted
    assert set(workflows(factory)) == {"si-1", "si-2"}


def test_repair_rebuilds_started_workflows_from_their_launch_directories(factory):
    assert qef(factory, "worker", "--nlaunches", "1").returncode == 0  # si-1's inputs job ran
    for name in ("launchpad.json", "launchpad.json.prev"):
        (factory / "state" / name).unlink()
    repaired = qef(factory, "repair")
    assert repaired.returncode == 0, repaired.stderr
    assert "rebuilt 1 unfinished workflow(s) from launch directories: ['si-1']" in repaired.stdout
    assert "submit the same file again" in repaired.stdout  # si-2 never started: said, not pretended
    assert workflows(factory) == {"si-1": "READY"}


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_a_missing_or_damaged_jobstore_is_named(factory, tmp_path, damage):
    import shutil

    folder = factory / "state" / "jobstore"
    if damage == "delete":
        shutil.rmtree(folder)
    else:
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith(".") and not path.name.endswith(".cfg"):
                path.write_bytes(b"this is not a database" * 100)
    for args in (["status"], ["export", "-o", str(tmp_path / "x.extxyz")], ["worker"]):
        result = qef(factory, *args)
        assert result.returncode == 4, (args, result.stdout, result.stderr)
        assert str(folder) in result.stderr and "qe-factory repair" in result.stderr
        assert "Traceback" not in result.stderr
    assert folder.exists() == (damage == "garbage")  # never recreated behind the user's back
    repaired = qef(factory, "repair")
    assert repaired.returncode == 0 and "created a new, empty JobStore" in repaired.stdout, repaired.stderr
    assert qef(factory, "status").returncode == 0


def test_the_jobstore_configuration_is_not_rewritten_on_connect(factory):
    config = sorted((factory / "state" / "jobstore").glob(".monty.storage")) + sorted(
        (factory / "state" / "jobstore").glob("*.cfg"))
    assert config, "montydb keeps its storage configuration beside the database"
    stamps = [p.stat().st_mtime_ns for p in config]
    assert qef(factory, "status").returncode == 0 and qef(factory, "export", "-o", "x.extxyz").returncode == 0
    assert [p.stat().st_mtime_ns for p in config] == stamps
