"""A worker that cannot run pw.x is not the structure's fault (outcome ENVIRONMENT): the structure goes back to READY,
the coordinator stops and names the program it could not start, and nothing is counted against the structure. No
pw.x is needed: the commands here are a missing program and a script whose interpreter is missing (which mpirun
finds, but cannot start)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ase.build import bulk
from ase.io import write

BIN = Path(sys.executable).parent
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")


def qe_factory(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}
    return subprocess.run([str(BIN / "qe-factory"), "--home", str(tmp_path / "home"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("program", ["missing", "bad-interpreter"])
def test_a_worker_that_cannot_start_pw_x_leaves_the_structure_ready_and_names_the_program(tmp_path, ranks, program):
    command = tmp_path / "nowhere" / "pw.x"
    if program == "bad-interpreter":  # on PATH and executable, but execve fails: mpirun's own message (2 ranks)
        command = tmp_path / "pw.x"
        command.write_text("#!/nonexistent/interpreter\n")
        command.chmod(0o755)
    (tmp_path / "c.yaml").write_text(f"kpoint_spacing: 0.8\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\n"
                                     f"mpi_ranks: {ranks}\ncommand: {command}\n")
    write(tmp_path / "si.extxyz", bulk("Si"))
    ran = qe_factory(tmp_path, "run", "si.extxyz", "-c", "c.yaml", "--no-e0s", "-o", "out.extxyz")
    assert ran.returncode == 5, ran.stdout + ran.stderr
    assert "this machine cannot run the work" in ran.stderr and str(command) in ran.stderr, ran.stderr
    assert "back to READY" in ran.stderr and "FAILED" not in ran.stdout + ran.stderr, ran.stdout + ran.stderr
    status = qe_factory(tmp_path, "status")
    assert "0 labelled" in status.stdout and "0 failed" in status.stdout and "1 waiting" in status.stdout, status.stdout
    assert "READY" in status.stdout and "FIZZLED" not in status.stdout, status.stdout
