"""Running pw.x as a process that never outlives its owner: timeout, stop requests, a reaper for sudden deaths."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from qe_factory.engine.outcomes import CarriesOutcome, EnvironmentFault, Outcome

# Set (by a signal handler of the process that runs pw.x) to stop the running pw.x and take no further attempt.
STOP = threading.Event()
POLL_SECONDS = 0.5  # how often a running pw.x is checked for a stop request

# A separate watcher per pw.x run: it waits on a pipe from the owner; when the pipe closes without the owner's "done"
# (the owner died, even by SIGKILL), it kills pw.x's whole process group (mpirun and every rank).
REAPER = """
import os, signal, sys, time
group = int(sys.argv[1])
if sys.stdin.buffer.read(1) == b"d":
    sys.exit(0)
for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        sys.exit(0)
    for _ in range(50):
        time.sleep(0.1)
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            sys.exit(0)
"""


class ExecutableNotFoundError(EnvironmentFault):
    """pw.x (or the MPI launcher) is not installed, not on PATH or cannot be launched."""


class Interrupted(CarriesOutcome, BaseException):  # noqa: N818 - like KeyboardInterrupt: a request, not an error
    """The owner was asked to stop (STOP set, e.g. on SIGTERM/SIGINT): pw.x was stopped; the attempt is nobody's
    failure and must be run again later. `execution`: how the pw.x run ended, when one was running."""

    outcome = Outcome.INTERRUPTED

    def __init__(self, message: str, execution: Execution | None = None):
        super().__init__(message)
        self.execution = execution


@dataclass(frozen=True)
class Execution:
    """How one process ended."""

    returncode: int | None
    timed_out: bool
    wall_time: float


def execute(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> Execution:
    """Run argv in cwd with stdout/stderr to pw.out/pw.err, in its own process group.

    The group is killed after `timeout` seconds (timed_out), when STOP is set (raises Interrupted), on any exception
    here, and — by the reaper — when this process dies.
    """
    if STOP.is_set():  # nothing ran: nothing to record
        raise Interrupted("stop requested before pw.x started")
    start = time.monotonic()
    with open(cwd / "pw.out", "wb") as stdout, open(cwd / "pw.err", "wb") as stderr:
        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise ExecutableNotFoundError(
                f"cannot run {argv[0]!r}: not found. Install Quantum ESPRESSO (apt-get install quantum-espresso) "
                "or set DFTConfig.command / QE_FACTORY_COMMAND"
            ) from exc
        reaper = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", REAPER, str(proc.pid)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            timed_out = _wait(proc, start + timeout)
        except BaseException as stop:
            kill_group(proc)
            if isinstance(stop, Interrupted):
                stop.execution = Execution(proc.returncode, False, time.monotonic() - start)
            raise
        finally:
            with contextlib.suppress(BrokenPipeError):  # the reaper was killed too (SLURM signals every process)
                reaper.stdin.write(b"d")  # type: ignore[union-attr]
                reaper.stdin.close()  # type: ignore[union-attr]
            reaper.wait()
    return Execution(proc.returncode, timed_out, time.monotonic() - start)


def _wait(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait for proc; True if the deadline passed (the group is then killed). Raises Interrupted on STOP."""
    while True:
        if STOP.is_set():
            kill_group(proc)
            raise Interrupted(f"pw.x (pid {proc.pid}) stopped on request")
        left = deadline - time.monotonic()
        if left <= 0:
            kill_group(proc)
            return True
        try:
            proc.wait(timeout=min(POLL_SECONDS, left))
            return False
        except subprocess.TimeoutExpired:
            continue


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of proc, SIGKILL it after 5 s."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
