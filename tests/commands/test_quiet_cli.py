"""What `qe-factory run` shows on the terminal: one progress bar and one line per finished structure; FireWorks' and
jobflow's lines go to <home>/logs/, or to the terminal with -v. pw.x is tests/fake_pw.py replaying recorded real
pw.x runs: the terminal output is the subject here, not the physics."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
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
    assert lines[1].startswith("data set 'default': protocol "), quiet.stdout
    assert {line.split()[0] for line in lines[2:4]} == {"si-a", "si-b"}, quiet.stdout
    assert all(" OK  E=" in line for line in lines[2:4]) and lines[-1].startswith("2 labelled structures")
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


def test_a_stopped_run_says_what_went_back_and_the_next_run_counts_each_structure_once(tmp_path):
    """Ctrl-C while pw.x runs: the structure goes back to READY, named, and nothing is called FAILED; the same
    command afterwards finishes the rest with the bar at 3/3, not past it. (Before: `FAILED at scf: REFUSED
    qe_factory.engine.process.Interrupted`, `Firework(s) [] back to READY`, and the bar counting past its total.)"""
    (tmp_path / "fake.yaml").write_text(
        "kpoint_spacing: 0.6\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\nmax_retries: 1\nmpi_ranks: 1\n"
        f"command: {sys.executable} {FAKE_PW}\n")
    file = structures(tmp_path, "si-x", "si-y", "si-z")
    env = {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}
    env.update(FAKE_PW_PLAN="hang", FAKE_PW_COUNTER=str(tmp_path / "calls"), FAKE_PW_PIDFILE=str(tmp_path / "pw.pid"))
    argv = [str(BIN / "qe-factory"), "--home", str(tmp_path / "home"), "run", file, "-c", "fake.yaml", "--no-e0s",
            "--parallel", "1"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "pw.pid").exists() and proc.poll() is None:  # pw.x (the stand-in) runs
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 130, stdout + stderr
    assert re.search(r"stopped by SIGINT; Firework\(s\) \[\d+\] back to READY", stderr), stderr
    assert "FAILED" not in stdout + stderr and "REFUSED" not in stdout + stderr, stdout + stderr
    again = run(tmp_path, "replay:si_scf", file, "-o", "labels.extxyz", "--parallel", "1")
    assert again.returncode == 0 and "3 labelled structures" in again.stdout, again.stdout + again.stderr
    counts = re.findall(r"(\d+)/3 \[", again.stderr)
    assert counts and max(map(int, counts)) == 3, again.stderr


def test_status_into_a_closed_pipe_ends_quietly(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}
    assert subprocess.run([str(BIN / "qe-factory"), "--home", str(home), "init"], env=env).returncode == 0
    shell = f"'{BIN / 'qe-factory'}' --home '{home}' status | true; echo ${{PIPESTATUS[0]}}"  # the reader is gone
    ran = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True)
    assert "Traceback" not in ran.stderr and "BrokenPipeError" not in ran.stderr, ran.stderr
    assert ran.stdout.strip() == "141", ran.stdout  # as a program killed by SIGPIPE says
