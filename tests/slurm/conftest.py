"""The single-node SLURM cluster the tests in this folder run on (scripts/slurm_cluster.sh)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

CLUSTER = Path(__file__).resolve().parents[2] / "scripts" / "slurm_cluster.sh"


@pytest.fixture(scope="session")
def slurm():
    """The single-node SLURM cluster, started for these tests and stopped after them (unless it was running before)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: scripts/slurm_cluster.sh installs and starts munged, slurmctld and slurmd")
    was_running = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    start = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=600)
    if start.returncode != 0:  # as root the script can install and start everything: a failure is a failure
        pytest.fail(f"scripts/slurm_cluster.sh start failed:\n{start.stdout[-2000:]}\n{start.stderr[-2000:]}")
    yield
    if not was_running:
        stop = subprocess.run([CLUSTER, "stop"], capture_output=True, text=True, timeout=120)
        print(stop.stdout + stop.stderr)
