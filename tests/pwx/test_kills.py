"""A real pw.x killed three ways gets three error types: our own timeout (TIMEOUT), the kernel's OOM killer
(OUT_OF_MEMORY) and a SIGKILL nothing explains (KILLED, "cause unknown"). SLURM's scancel is the fourth, on the real
cluster: tests/slurm/test_slurm_kills.py.

The OOM killer is simulated: the test sends pw.x the SIGKILL itself and mocks only the cgroup's OOM counter
(errors.oom_kill_count, as the runner reads it before and after the run) — a real OOM kill would need this machine's
memory exhausted, which the other runs on it share.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from ase.build import bulk

from qe_factory import QERunner
from qe_factory.engine import runner as runner_module

ENDLESS = {"electrons": {"conv_thr": 0.0, "electron_maxstep": 100000}}  # pw.x iterates until stopped


def pw_pids(attempt_dir: Path) -> list[int]:
    """Processes named pw.x whose working directory is `attempt_dir`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "pw.x" and \
                    (proc / "cwd").resolve() == attempt_dir.resolve():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def kill_when_iterating(attempt_dir: Path, limit: float = 120) -> threading.Thread:
    """A thread that SIGKILLs the pw.x run in `attempt_dir` once it printed its second SCF iteration."""

    def kill() -> None:
        start = time.monotonic()
        while time.monotonic() - start < limit:
            out = attempt_dir / "pw.out"
            if out.exists() and "iteration #  2" in out.read_text(errors="replace") and (pids := pw_pids(attempt_dir)):
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def run_killed(config, uid: str):
    runner = QERunner(config.with_changes(pw_parameters=ENDLESS, max_retries=1))
    killer = kill_when_iterating(runner.run_dir(uid) / "attempt_1")
    result = runner.run(bulk("Si"), uid=uid, raise_on_failure=False)
    killer.join()
    return result


def test_our_timeout_is_timeout(fast_config):
    result = QERunner(fast_config.with_changes(pw_parameters=ENDLESS, timeout=3, max_retries=1)).run(
        bulk("Si"), uid="timeout", raise_on_failure=False)
    assert [a.error_type for a in result.attempts] == ["TIMEOUT"], result.error_message
    killed = result.attempts[0]
    assert killed.wall_time >= 3 and killed.returncode in (-signal.SIGTERM, -signal.SIGKILL)  # SIGTERM, then SIGKILL


def test_a_sigkill_with_the_oom_counter_risen_is_out_of_memory(fast_config, monkeypatch):
    counts = iter([3, 4])  # mocked: the cgroup's oom_kill counter before the run and after it
    monkeypatch.setattr(runner_module, "oom_kill_count", lambda: next(counts))
    result = run_killed(fast_config, "oom")
    assert [a.error_type for a in result.attempts] == ["OUT_OF_MEMORY"], result.error_message
    assert result.attempts[0].returncode == -signal.SIGKILL and "OOM killer" in result.error_message


def test_an_unexplained_sigkill_is_killed_cause_unknown(fast_config, monkeypatch):
    monkeypatch.setattr(runner_module, "oom_kill_count", lambda: 3)  # mocked: the counter did not move
    result = run_killed(fast_config, "killed")
    assert [a.error_type for a in result.attempts] == ["KILLED"], result.error_message
    assert result.attempts[0].returncode == -signal.SIGKILL and "cause unknown" in result.error_message

