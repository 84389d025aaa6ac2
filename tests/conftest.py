"""Shared fixtures: a fast configuration for real pw.x runs on tiny cells."""

from __future__ import annotations

import shutil

import pytest

from qe_factory import DFTConfig


def pytest_collection_modifyitems(config, items):
    """Tests marked `pwx` need the real binary; without it they are skipped with the reason."""
    if shutil.which("pw.x") is None:
        skip = pytest.mark.skip(reason="pw.x not installed (run scripts/setup.sh)")
        for item in items:
            if "pwx" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def fast_config(tmp_path) -> DFTConfig:
    """Coarse k-points and low cutoffs: a 2-atom Si SCF takes about a second."""
    return DFTConfig(
        kpoint_density=0.8, ecutwfc=25, ecutrho=200, mpi_ranks=1, work_dir=tmp_path / "runs", timeout=300
    )
