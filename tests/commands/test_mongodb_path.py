"""The MongoDB path, as far as it goes without a server: a home configured for MongoDB (no embedded LaunchPad file),
FireWorks' own LaunchPad over mongomock's in-memory client in place of the network connection (the one stand-in:
no MongoDB server can run here). Submission goes straight into the database (no inbox), the online coordinator
(`qe-factory worker` in each SLURM job) checks Fireworks out with FireWorks' atomic reservation and packs them onto
its local workers, a failed SCF comes back as a detour, labelled workflows leave the database, and a second
coordinator finds nothing left to run.
pw.x is tests/fake_pw.py replaying real runs."""

from __future__ import annotations

import sys
from pathlib import Path

import mongomock
import pytest
from ase.build import bulk

from qe_factory import DFTConfig
from qe_factory.engine.config import ExecutionSettings
from qe_factory.workflow.coordinator import run_coordinator
from qe_factory.workflow.home import activate, embedded_file
from qe_factory.workflow.state import get_jobstore, labelled_uids, load_results
from qe_factory.workflow.submit import submit

FAKE_PW = Path(__file__).resolve().parents[1] / "fake_pw.py"


@pytest.fixture
def mongodb_launchpad(home, monkeypatch):
    """The activated home switched to MongoDB as the README says (the MONGOMOCK_SERVERSTORE_FILE line deleted), and
    a LaunchPad of it whose client is mongomock's (FireWorks connects with the MongoClient its module imported)."""
    from fireworks import LaunchPad

    settings = home / "fw_config" / "FW_config.yaml"
    settings.write_text("".join(line for line in settings.read_text().splitlines(keepends=True)
                                if not line.startswith("MONGOMOCK_SERVERSTORE_FILE")))
    monkeypatch.delenv("MONGOMOCK_SERVERSTORE_FILE", raising=False)
    activate(home)
    assert embedded_file(home) is None
    monkeypatch.setattr("fireworks.core.launchpad.MongoClient", lambda *args, **kwargs: mongomock.MongoClient())
    launchpad = LaunchPad(host="localhost", name="qe_factory")
    launchpad.reset("", require_password=False)
    return launchpad


def test_a_mongodb_home_labels_through_the_database_with_packed_workers(mongodb_launchpad, home, tmp_path,
                                                                       monkeypatch):
    launchpad = mongodb_launchpad
    monkeypatch.setenv("FAKE_PW_PLAN", "replay:si_unconverged,replay:si_scf")  # the first SCF fails, then recovers
    monkeypatch.setenv("FAKE_PW_COUNTER", str(tmp_path / "calls"))
    frames = []
    for n in range(4):
        atoms = bulk("Si")
        atoms.rattle(0.01, seed=n)
        atoms.info["uid"] = f"si-{n}"
        frames.append(atoms)
    config = DFTConfig(kpoint_spacing=0.6, ecutwfc=25, ecutrho=200, allow_low_cutoffs=True, max_retries=2)
    report = submit(frames, config, launchpad=launchpad)
    assert sorted(report.fw_ids) == [f"si-{n}" for n in range(4)] and not report.inbox_files  # straight in
    assert not (home / "inbox").exists() or not any((home / "inbox").iterdir())
    execution = ExecutionSettings(command=f"{sys.executable} {FAKE_PW}", mpi_ranks=1)

    launched = run_coordinator(launchpad, launch_root=home / "launches", execution=execution, parallel=2,
                               log=tmp_path / "worker.log")

    store = get_jobstore()
    assert labelled_uids(store) == {f"si-{n}" for n in range(4)}
    attempts = sorted(len(result.attempts) for result in load_results(store, [f"si-{n}" for n in range(4)]))
    assert attempts == [1, 1, 1, 2], attempts  # one recovered, by a detour with its second attempt
    assert launched == 4 * 3 + 1  # inputs, SCF, validation each, and the detour's SCF
    assert launchpad.workflows.count_documents({}) == 0  # labelled workflows leave the database (the JobStore has them)
    assert run_coordinator(launchpad, launch_root=home / "launches", execution=execution, parallel=2) == 0
