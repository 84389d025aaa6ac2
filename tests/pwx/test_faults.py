"""Faults with real pw.x and real processes: signals, kill -9, two runs at once, full disks. Each test checks the
accounting (every structure COMPLETED once, or back to READY — never FIZZLED by the fault) and that no pw.x
outlives its owner.

"Endless" structures ask for an unreachable conv_thr: pw.x iterates until it is stopped, on any machine, so a test
can act while pw.x runs without depending on the machine's speed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ase.io import read, write
from structures import rattled_si

BIN = Path(sys.executable).parent
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")
FAST = "kpoint_spacing: 0.8\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\nmpi_ranks: 1\n"
ENDLESS = FAST + "pw_parameters:\n  electrons:\n    conv_thr: 0.0\n    electron_maxstep: 100000\n"


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}


def qef(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "qe-factory"), "--home", str(home), *args], capture_output=True, text=True,
                          env=env(), cwd=home.parent)


def start(home: Path, *args: str) -> subprocess.Popen:
    """A qe-factory command in its own process group (as a shell runs a foreground job)."""
    return subprocess.Popen([str(BIN / "qe-factory"), "--home", str(home), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=home.parent, start_new_session=True)


def wait_until(condition, limit: float = 300) -> None:
    """Poll for a state; `limit` only keeps a broken build from hanging the suite."""
    give_up = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < give_up, "state not reached"
        time.sleep(0.1)


def pw_processes(under: Path) -> list[int]:
    """Live processes whose working directory is below `under` (pw.x runs in its attempt directory)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cwd = Path(os.readlink(proc / "cwd"))
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and (cwd == under or under in cwd.parents):
            pids.append(int(proc.name))
    return pids


def pw_is_iterating(home: Path, uid: str) -> bool:
    out = home / "runs" / f"run_{uid}" / "attempt_1" / "pw.out"
    return out.exists() and "iteration #  2" in out.read_text()


def states(home: Path) -> dict[str, str]:
    """Firework name → state, from stock lpad on a snapshot (qe-factory lpad)."""
    out = qef(home, "lpad", "get_fws", "-d", "more")
    assert out.returncode == 0, out.stderr
    docs = json.loads(out.stdout)
    return {d["name"]: d["state"] for d in (docs if isinstance(docs, list) else [docs])}


def labelled(home: Path) -> list[str]:
    """uids with a label in the home's JobStore (what `qe-factory export` writes)."""
    out = qef(home, "export", "-o", str(home / "labels.extxyz"))
    assert out.returncode == 0, out.stderr
    return sorted(atoms.info["uid"] for atoms in read(home / "labels.extxyz", ":")) if "0 of" not in out.stdout else []


def submit(home: Path, tmp_path: Path, config: str, *seeds: int) -> None:
    name = f"s{'-'.join(map(str, seeds))}"
    write(tmp_path / f"{name}.extxyz", [rattled_si(seed) for seed in seeds])
    (tmp_path / f"{name}.yaml").write_text(config)
    dataset = "endless" if config == ENDLESS else "default"  # its own protocol: an unreachable conv_thr is physics
    out = qef(home, "submit", str(tmp_path / f"{name}.extxyz"), "-c", str(tmp_path / f"{name}.yaml"), "--no-e0s",
              "--dataset", dataset)
    assert out.returncode == 0 and f"{len(seeds)} added" in out.stdout, out.stdout + out.stderr


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "home"
    assert qef(home, "init").returncode == 0
    return home


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_worker_stops_pw_and_puts_the_structure_back_to_ready(home, tmp_path, signum):
    submit(home, tmp_path, ENDLESS, 1)
    submit(home, tmp_path, FAST, 2)
    worker = start(home, "worker", "--parallel", "1")  # one structure at a time: the second must stay untouched
    wait_until(lambda: pw_is_iterating(home, "si-1"))
    os.killpg(worker.pid, signum)  # SIGINT to the whole group, as Ctrl-C in a terminal
    _, stderr = worker.communicate()
    assert worker.returncode == 128 + signum, stderr
    assert "back to READY" in stderr
    assert pw_processes(home / "runs") == []
    fireworks = states(home)
    assert fireworks["scf si-1 attempt 1"] == "READY" and "FIZZLED" not in fireworks.values(), fireworks
    # the next structure's pw.x never started (its inputs may have been prepared while si-1 ran)
    assert fireworks["scf si-2 attempt 1"] in ("WAITING", "READY")
    assert not list((home / "runs").glob("run_si-2/attempt_*/pw.out"))
    assert "scf si-1 attempt 2" not in fireworks  # the stop was not taken for a pw.x failure to recover from


def test_two_workers_and_two_runs_at_once_never_run_a_structure_twice(home, tmp_path):
    submit(home, tmp_path, ENDLESS, 1)
    first = start(home, "worker")
    wait_until(lambda: pw_is_iterating(home, "si-1"))
    second = qef(home, "worker")
    assert second.returncode == 3 and f"coordinated by PID {first.pid}" in second.stderr, second.stderr
    write(tmp_path / "run.extxyz", [rattled_si(5)])
    (tmp_path / "run.yaml").write_text(FAST)
    run = qef(home, "run", str(tmp_path / "run.extxyz"), "-c", str(tmp_path / "run.yaml"))
    assert run.returncode == 3 and "refused" in run.stderr and "Traceback" not in run.stderr, run.stderr
    lost = qef(home, "rerun-lost")
    assert lost.returncode == 3, lost.stderr  # a live worker's run is not lost
    assert len(list((home / "runs").glob("run_*/attempt_*"))) == 1  # one structure, one attempt, one pw.x
    os.killpg(first.pid, signal.SIGTERM)
    first.communicate()
    assert pw_processes(home / "runs") == []


def test_a_worker_killed_by_sigkill_takes_its_pw_with_it_and_the_next_worker_reruns(home, tmp_path):
    submit(home, tmp_path, ENDLESS, 1)
    submit(home, tmp_path, FAST, 2)
    worker = start(home, "worker", "--parallel", "1")
    wait_until(lambda: pw_is_iterating(home, "si-1"))
    worker.send_signal(signal.SIGKILL)  # the worker alone: no handler, no finally
    worker.communicate()
    wait_until(lambda: pw_processes(home / "runs") == [])  # its reaper stops pw.x
    assert states(home)["scf si-1 attempt 1"] == "RESERVED"  # as the dead worker left it (for its pw.x process)
    assert qef(home, "lpad", "defuse_fws", "-n", "scf si-1 attempt 1").returncode == 0  # no coordinator: allowed
    rest = qef(home, "worker")
    assert rest.returncode == 0, rest.stderr
    fireworks = states(home)
    assert fireworks["scf si-1 attempt 1"] == "DEFUSED"  # the user's action was not undone
    assert labelled(home) == ["si-2"] and "validate si-2" not in fireworks  # done: its workflow left the LaunchPad
    assert len(list((home / "runs" / "run_si-2").glob("attempt_*"))) == 1


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")


@pytest.fixture
def mounts():
    mounted: list[Path] = []
    yield lambda path, size: (mount_tmpfs(path, size), mounted.append(path))
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_scratch_disk_requeues_the_structure_until_space_is_back(home, tmp_path, mounts):
    scratch = tmp_path / "scratch"
    mounts(scratch, "200k")  # room for the inputs, not for pw.x's charge density
    submit(home, tmp_path, FAST, 1)
    (tmp_path / "exec.yaml").write_text(f"mpi_ranks: 1\nwork_dir: {scratch}\n")
    full = qef(home, "worker", "-c", str(tmp_path / "exec.yaml"))
    assert full.returncode == 4 and "scratch is full" in full.stderr, full.stderr
    assert states(home)["scf si-1 attempt 1"] == "READY"
    subprocess.run(["umount", str(scratch)], check=True)  # space is back (a plain directory again)
    again = qef(home, "worker", "-c", str(tmp_path / "exec.yaml"))
    assert again.returncode == 0, again.stderr
    assert labelled(home) == ["si-1"]


def test_a_full_home_disk_loses_no_state_and_resumes_when_space_is_back(tmp_path, mounts):
    home = tmp_path / "home"
    mounts(home, "8m")
    assert qef(home, "init").returncode == 0
    submit(home, tmp_path, FAST, 1)
    good = (home / "state" / "launchpad.json").read_text()
    filler = home / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)  # until the disk is full
    os.truncate(filler, filler.stat().st_size - 8192)  # room for the lock, not for a save of the LaunchPad
    (tmp_path / "exec.yaml").write_text(f"mpi_ranks: 1\nwork_dir: {tmp_path / 'runs'}\n")
    full = qef(home, "worker", "-c", str(tmp_path / "exec.yaml"))
    assert full.returncode != 0 and "Traceback" not in full.stderr, full.stderr
    assert "no space left" in full.stderr.lower() or "full" in full.stderr, full.stderr
    assert (home / "state" / "launchpad.json").read_text() == good  # the last saved state, intact
    assert not list((home / "state").glob("*.tmp*"))
    assert pw_processes(tmp_path / "runs") == []
    filler.unlink()
    again = qef(home, "worker", "-c", str(tmp_path / "exec.yaml"))
    assert again.returncode == 0, again.stderr
    assert labelled(home) == ["si-1"]
