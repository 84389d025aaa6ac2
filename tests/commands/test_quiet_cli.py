"""What `qe-factory run` shows on the terminal: one progress bar and one line per finished structure; FireWorks' and
jobflow's lines go to <home>/logs/, or to the terminal with -v. pw.x is tests/fake_pw.py replaying recorded real
pw.x runs: the terminal output is the subject here, not the physics."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from ase.build import bulk
from ase.io import read, write

BIN = Path(sys.executable).parent
FAKE_PW = Path(__file__).resolve().parents[1] / "fake_pw.py"
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")
LIBRARY_LINES = re.compile(r"INFO|Starting job|Finished job|Launching Rocket|RUNNING fw_id|Traceback|Exception")


def run(tmp_path: Path, plan: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}
    env.update(FAKE_PW_PLAN=plan, FAKE_PW_COUNTER=str(tmp_path / "calls"))
    # --no-e0s: the stand-in pw.x replays a 2-atom cell's output, which no isolated atom gives
    return subprocess.run([str(BIN / "qe-factory"), "--home", str(tmp_path / "home"), "run", *args, "-c", "fake.yaml",
                           "--no-e0s"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)


def structures(tmp_path: Path, *uids: str) -> str:
    frames = []
    for uid in uids:
        atoms = bulk("Si")
        atoms.rattle(0.01, seed=sum(map(ord, uid)))  # another structure for each uid
        atoms.info["uid"] = uid
        frames.append(atoms)
    write(tmp_path / f"{uids[0]}.extxyz", frames)
    return f"{uids[0]}.extxyz"


def test_run_shows_one_bar_and_a_line_per_structure_and_library_logs_only_with_v(tmp_path):
    (tmp_path / "fake.yaml").write_text(
        "kpoint_spacing: 0.6\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\nmax_retries: 1\nmpi_ranks: 1\n"
        f"command: {sys.executable} {FAKE_PW}\n")
    quiet = run(tmp_path, "replay:si_scf", structures(tmp_path, "si-a", "si-b"), "-o", "labels.extxyz",
                "--format", "nequip-extxyz", "--config-type", "md")
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    lines = quiet.stdout.splitlines()
    assert {line.split()[0] for line in lines[1:3]} == {"si-a", "si-b"}, quiet.stdout
    assert all(" OK  E=" in line for line in lines[1:3]) and lines[-1].startswith("2 labelled structures")
    assert not LIBRARY_LINES.search(quiet.stdout + quiet.stderr), quiet.stdout + quiet.stderr
    bars = {chunk.split(":")[0] for chunk in re.split(r"[\r\n]", quiet.stderr) if chunk.strip()}
    assert bars == {"structures"}, quiet.stderr  # one progress bar, nothing else on stderr
    log = (tmp_path / "home" / "logs" / "worker.log").read_text()
    assert "Starting job - inputs si-a" in log and "Finished job - validate si-b" in log
    labels = read(tmp_path / "labels.extxyz", index=":")
    assert {a.info["config_type"] for a in labels} == {"md"} and all("energy" in a.calc.results for a in labels)

    verbose = run(tmp_path, "replay:si_unconverged", structures(tmp_path, "si-c"), "-v", "-o", "c.extxyz")
    assert verbose.returncode == 1, verbose.stdout + verbose.stderr
    assert "Starting job - scf si-c attempt 1" in verbose.stdout + verbose.stderr  # jobflow's lines, live
    failed = [line for line in verbose.stdout.splitlines() if line.startswith("si-c")]
    assert len(failed) == 1 and "FAILED at scf: SCF_NOT_CONVERGED (410)" in failed[0], verbose.stdout

    again = run(tmp_path, "", structures(tmp_path, "si-a"), "-o", "again.extxyz")  # labelled already: no pw.x
    assert again.returncode == 0 and "1 labelled structures in again.extxyz" in again.stdout, again.stdout
    assert re.search(r"^si-a .* OK  E=.*\(labelled before\)$", again.stdout, re.M), again.stdout
