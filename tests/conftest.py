"""The suite in four folders, by what a test needs (markers follow the folder):

  tests/unit/      in this process: no pw.x, no SLURM; recorded real pw.x outputs (tests/data), tests/fake_pw.py
  tests/commands/  the installed `qe-factory` command in subprocesses, FireWorks' web GUI over HTTP, headless
                   Chromium; no pw.x (the stand-in tests/fake_pw.py)                            (marker `commands`)
  tests/pwx/       the real pw.x binary on tiny cells                                      (marker `pwx`)
  tests/slurm/     real pw.x through the single-node SLURM cluster (scripts/slurm_cluster.sh)
                                                                                          (markers `pwx`, `slurm`)

Quick loops (2 cores): `scripts/test.sh tests/unit` (about a minute), `scripts/test.sh tests/unit tests/commands`
(under 3 min); `scripts/test.sh` alone is the whole suite.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from qe_factory import DFTConfig

TESTS = Path(__file__).resolve().parent
MARKERS = {"unit": ("unit",), "commands": ("commands",), "pwx": ("pwx",), "slurm": ("pwx", "slurm")}
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Mark each test by its folder; tests that need pw.x are skipped, with the reason, where it is missing."""
    no_pw = shutil.which("pw.x") is None
    if getattr(config.option, "loadgroup", False) and items and not hasattr(items[0], "_nodeid"):
        # pytest-xdist 3.8 groups tests by rewriting Node._nodeid, which pytest 9.2 renamed: the groups below would
        # be ignored without a word (a module fixture built on both workers, SLURM tests on both)
        raise pytest.UsageError("--dist=loadgroup needs pytest < 9.2 (pyproject.toml's test extras)")
    for item in items:
        folder = Path(item.fspath).resolve().relative_to(TESTS).parts[0]
        for name in MARKERS.get(folder, ()):
            item.add_marker(name)
        # xdist (scripts/test.sh): one worker runs all the SLURM tests, in order, on the one cluster; a module's
        # tests stay together on one worker, so a module-scoped fixture (a home full of runs) is built once
        item.add_marker(pytest.mark.xdist_group("slurm" if folder == "slurm" else item.nodeid.split("::")[0]))
        if no_pw and "pwx" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="pw.x not installed (run scripts/setup.sh)"))


@pytest.fixture
def fast_config(tmp_path) -> DFTConfig:
    """Coarse k-points and low cutoffs: a 2-atom Si SCF takes about a second."""
    return DFTConfig(
        kpoint_spacing=0.8, ecutwfc=25, ecutrho=200, allow_low_cutoffs=True, mpi_ranks=1, work_dir=tmp_path / "runs",
        timeout=300,
    )


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh factory home (embedded LaunchPad and JobStore) activated for this test; the working directory is
    tmp_path, and the factory's environment variables are restored afterwards."""
    from qe_factory.workflow.home import activate

    monkeypatch.chdir(tmp_path)
    for key in FACTORY_ENV:
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    return activate(tmp_path / "home")


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """A stand-in `scontrol` first on PATH (no SLURM in unit tests; the real one: tests/slurm): `scontrol show job
    -o ID` prints what the test sets with `scontrol(text)` (a line as scontrol 22.05 prints it), or fails as for a job
    SLURM no longer knows; `squeue` beside it knows no job."""
    bin_dir = tmp_path / "scontrol-bin"
    bin_dir.mkdir()
    said = tmp_path / "scontrol.txt"
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\n[ -s "{said}" ] && exec cat "{said}"\n'
                      'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1\n')
    script.chmod(0o755)
    squeue = bin_dir / "squeue"  # no time left to tell (else a real squeue without a controller waits 30 s)
    squeue.write_text('#!/bin/sh\necho "slurm_load_jobs error: Invalid job id specified" >&2; exit 1\n')
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return said.write_text
