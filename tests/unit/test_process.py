"""pw.x never outlives its owner: timeout, a stop request (SIGTERM/SIGINT in a worker), and the owner's sudden death.

pw.x is tests/fake_pw.py's "hang" (a process that waits until it is killed): real pw.x cannot be made to wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qe_factory.engine.process import STOP, Interrupted, execute

FAKE_PW = Path(__file__).resolve().parents[1] / "fake_pw.py"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is dead


def wait_until(condition, limit: float = 120) -> None:
    """Poll for a state; `limit` only keeps a broken build from hanging the suite (the states come in ms)."""
    give_up = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < give_up, "state not reached"
        time.sleep(0.05)


@pytest.fixture
def hang_env(tmp_path):
    return {**os.environ, "FAKE_PW_PLAN": "hang", "FAKE_PW_COUNTER": str(tmp_path / "calls"),
            "FAKE_PW_PIDFILE": str(tmp_path / "pid")}


def started_pid(tmp_path: Path) -> int:
    pidfile = tmp_path / "pid"
    wait_until(lambda: pidfile.exists() and pidfile.read_text())
    return int(pidfile.read_text())


def test_a_stop_request_kills_pw_and_raises_interrupted(tmp_path, hang_env):
    def request_stop():
        started_pid(tmp_path)
        STOP.set()

    thread = threading.Thread(target=request_stop)
    thread.start()
    try:
        with pytest.raises(Interrupted):
            execute([sys.executable, str(FAKE_PW)], tmp_path, hang_env, timeout=3600)
    finally:
        STOP.clear()
        thread.join()
    assert not alive(started_pid(tmp_path))


OWNER = """
import sys
from pathlib import Path
from qe_factory.engine.process import execute
execute([sys.executable, sys.argv[1]], Path(sys.argv[2]), None, timeout=3600)
"""


def test_pw_dies_with_an_owner_killed_by_sigkill(tmp_path, hang_env):
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(FAKE_PW), str(tmp_path)], env=hang_env)
    pid = started_pid(tmp_path)
    assert alive(pid)
    owner.send_signal(signal.SIGKILL)  # no handler, no finally: only the reaper can act
    owner.wait()
    wait_until(lambda: not alive(pid))
