"""One coordinator per factory home: the one process that writes the embedded LaunchPad, by an OS file lock.

A `run`, `worker`, `rerun-lost`, `repair` or `lpad` write command is the coordinator while it runs (a second one is
refused at once, with the holder's PID); `submit` beside a coordinator posts its workflows to the home's inbox
(inbox.py), which the coordinator takes in. Readers (`status`, `export`) never write. With MongoDB none of this
applies.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qe_factory.workflow.home import embedded_file


class HomeBusy(RuntimeError):
    """Another process is the home's coordinator; the message names it and says what to do."""


def lock_file(home: Path) -> Path:
    return home / "state" / "coordinator.lock"


def holder(home: Path) -> dict[str, Any] | None:
    """The home's running coordinator ({pid, host, command, since}), or None when there is none."""
    path = lock_file(home)
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: by another process, or by this one through another descriptor
            text = path.read_text()
            return json.loads(text) if text.strip() else {"pid": "?", "command": "?", "since": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def busy_message(home: Path, who: dict[str, Any], wanted: str) -> str:
    return (
        f"{wanted} refused: the factory home {home} is coordinated by PID {who.get('pid')} "
        f"({who.get('command')}, since {who.get('since')}); its embedded LaunchPad has one writer. Wait for it "
        f"to finish, or stop it (kill -TERM {who.get('pid')}: its running structure goes back to READY)."
    )


@contextmanager
def coordinate(home: Path, command: str) -> Iterator[None]:
    """Be the home's one coordinator while the block runs; raise HomeBusy if another process is. Re-entrant in one
    process (the lock itself says who holds it: no record in this process); nothing to hold for a MongoDB home."""
    if embedded_file(home) is None:
        yield
        return
    path = lock_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        fd = None
    if fd is None:
        who = holder(home) or {}
        if (who.get("pid"), who.get("host")) != (os.getpid(), socket.gethostname()):  # another process holds it
            raise HomeBusy(busy_message(home, who, command))
        yield  # this process holds it already
        return
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "command": command,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }).encode())
    try:
        yield
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def command_line() -> str:
    return " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))
