"""One coordinator per factory home: the one process that writes the embedded LaunchPad, by an OS file lock.

A `run`, `worker`, `rerun-lost`, `repair` or `lpad` write command is the coordinator while it runs (a second one is
refused at once, with the holder's PID); `submit` beside a coordinator posts its workflows to the home's inbox,
which the coordinator takes in. Readers (`status`, `export`) never write. With MongoDB none of this applies.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from qe_factory.workflow.home import embedded_file

if TYPE_CHECKING:
    from fireworks import LaunchPad, Workflow

POST_FILE_SIZE = 20  # workflows per inbox file: the coordinator takes in (and saves) one file at a time
# Unfinished workflows the embedded LaunchPad holds before the coordinator takes in more (plus one inbox file): its
# file-backed store scans every document on each query, so it holds the work in progress, not the whole backlog.
LAUNCHPAD_WORKFLOWS = 20
_held: dict[Path, int] = {}  # homes whose lock this process holds → lock file descriptor


class HomeBusy(RuntimeError):
    """Another process is the home's coordinator; the message names it and says what to do."""


def lock_file(home: Path) -> Path:
    return home / "state" / "coordinator.lock"


def inbox(home: Path) -> Path:
    return home / "inbox"


def holder(home: Path) -> dict[str, Any] | None:
    """The home's running coordinator ({pid, host, command, since}), or None when there is none."""
    path = lock_file(home)
    if home in _held:
        return json.loads(path.read_text())
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
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
    process; nothing to hold for a MongoDB home."""
    if home in _held or embedded_file(home) is None:
        yield
        return
    path = lock_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HomeBusy(busy_message(home, holder(home) or {}, command)) from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "command": command,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }).encode())
    _held[home] = fd
    try:
        yield
    finally:
        del _held[home]
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def post(home: Path, workflows: Iterable[Workflow], per_file: int = POST_FILE_SIZE) -> list[Path]:
    """Leave workflows in the home's inbox for its coordinator to add, `per_file` to a file, in order; each file
    appears whole (atomically). Each workflow is serialised and written as it comes: given a generator, a bulk
    submission never holds them all. If writing fails, the files this call already posted are taken back (unless
    taken in meanwhile)."""
    folder = inbox(home)
    folder.mkdir(exist_ok=True)
    remaining, paths = iter(workflows), []
    try:
        while path := _post_file(folder, itertools.islice(remaining, per_file)):
            paths.append(path)
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise
    return paths


def _post_file(folder: Path, workflows: Iterable[Workflow]) -> Path | None:
    """One inbox file: the JSON list of the workflows' documents (the text json.dump gives), written beside and
    renamed into place; None (no file) when there are no workflows."""
    from monty.json import MontyEncoder

    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns():020d}.json"
    tmp, count = folder / f".{name}.tmp", 0
    try:
        with open(tmp, "w") as handle:
            for count, workflow in enumerate(workflows, 1):
                handle.write(("[" if count == 1 else ", ") + json.dumps(workflow.to_dict(), cls=MontyEncoder))
            handle.write("]")
            handle.flush()
            os.fsync(handle.fileno())
        if count:
            os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    return folder / name if count else None


def waiting(home: Path) -> list[Path]:
    """Submissions in the inbox, oldest first."""
    folder = inbox(home)
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


class Intake(NamedTuple):
    """What one inbox file brought: uid → Firework ids of each workflow added, and how many were already known."""

    file: str
    added: dict[str, list[int]]
    skipped: int

    def line(self) -> str:
        return f"took in {self.file}: {len(self.added)} workflow(s) added" + (
            f", {self.skipped} already here or labelled" if self.skipped else "")


UNFINISHED = {"state": {"$nin": ["COMPLETED", "FIZZLED", "DEFUSED"]}}


def take_in(home: Path, launchpad: LaunchPad, save, store=None, capacity: int | None = None) -> list[Intake]:
    """Add the inbox's workflows to the LaunchPad, oldest file first, while it holds fewer than `capacity`
    unfinished workflows (None: all); skip a uid or calculation already in the LaunchPad or labelled in `store` (a
    JobStore). Each file is saved in, then deleted. Only the coordinator calls this."""
    from fireworks import Workflow

    intakes = []
    for path in waiting(home):
        if capacity is not None and launchpad.workflows.count_documents(UNFINISHED) >= capacity:
            break
        workflows = [Workflow.from_dict(d) for d in json.loads(path.read_text())]
        keys = [wf.metadata.get("qe_factory_key") for wf in workflows]
        uids = [wf.metadata.get("uid") for wf in workflows]
        either = {"$or": [{"metadata.qe_factory_key": {"$in": keys}}, {"metadata.uid": {"$in": uids}}]}
        known = [doc["metadata"] for doc in launchpad.workflows.find(either, {"metadata": 1})]
        if store is not None:
            known += [doc["metadata"] for doc in store.query({"metadata.stage": "validate", **either},
                                                             properties=["metadata"])]
        taken = {value for meta in known for value in (meta.get("qe_factory_key"), meta.get("uid"))}
        new = [wf for wf in workflows if not {wf.metadata.get("qe_factory_key"), wf.metadata.get("uid")} & taken]
        if new:
            bulk_add(launchpad, new)
        save(launchpad)
        path.unlink()
        intakes.append(Intake(path.name, {wf.metadata["uid"]: sorted(wf.id_fw) for wf in new},
                              len(workflows) - len(new)))
    return intakes


def bulk_add(launchpad: LaunchPad, workflows: list[Workflow]) -> None:
    """FireWorks' bulk_add_wfs without the progress bar it draws on stderr (ours is the one the user watches)."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        launchpad.bulk_add_wfs(workflows)


def command_line() -> str:
    return " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))
