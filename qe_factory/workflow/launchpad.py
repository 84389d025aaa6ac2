"""The LaunchPad (MongoDB, or FireWorks' embedded file-backed mode) and the JobStore: clients, saving, queries.

The embedded LaunchPad holds the whole database in one process and writes it back as one JSON file: one LaunchPad
client process at a time. Functions import FireWorks and jobflow lazily (after `home.activate()`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qe_factory.engine.errors import DiskFullError
from qe_factory.engine.results import DFTResult
from qe_factory.workflow.fireworks_adapter import (
    after_state_changes,
    embedded_store,
    replace_keeping_previous,
    stop_exit_write,
    write_store,
)
from qe_factory.workflow.home import config_environment, embedded_file

if TYPE_CHECKING:
    from fireworks import LaunchPad
    from jobflow import JobStore


class StateError(RuntimeError):
    """The home's state (LaunchPad file or JobStore) is missing or damaged; the message names it and the repair."""


def _state_error(path: Path, what: str, cause: BaseException | str) -> StateError:
    return StateError(
        f"{path} {what} ({cause}). Nothing was changed. Run `qe-factory repair` to rebuild the state from the "
        f"previous good copy, the JobStore and the launch directories (it says what it could not)."
    )


def get_jobstore() -> JobStore:
    """The connected JobStore configured for the active home (never created here: `activate` creates it once)."""
    import jobflow

    from qe_factory.workflow.fireworks_adapter import connect_store
    from qe_factory.workflow.home import factory_home

    store = jobflow.SETTINGS.JOB_STORE
    folder = Path(getattr(store.docs_store, "database_path", "") or factory_home() / "state" / "jobstore")
    if embedded_file(factory_home()) is not None and not folder.is_dir():
        raise _state_error(folder, "is missing", "the JobStore's folder was deleted or moved")
    try:
        for sub in (store.docs_store, *store.additional_stores.values()):
            connect_store(sub)
        store.docs_store.count({"metadata.stage": "validate"})
    except Exception as exc:  # sqlite3.DatabaseError, OSError, bson errors: whatever a damaged file raises
        if (free := free_bytes(folder)) is not None and free < 1 << 20:  # sqlite says "disk I/O error"
            raise DiskFullError(errno.ENOSPC, f"the JobStore {folder} cannot be opened: {free} bytes left on its "
                                "device; free space, then run the command again") from exc
        raise _state_error(folder, "cannot be read", f"{type(exc).__name__}: {exc}") from exc
    return store


def free_bytes(path: Path) -> int | None:
    """Bytes available to this user on the filesystem of `path` (None if it cannot be told)."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def get_launchpad(read_only: bool = False) -> LaunchPad:
    """A LaunchPad client for the active home, initialised if its database is new.

    An embedded client never writes its file by itself (not at exit either): writers save explicitly
    (`save_launchpad`, atomic), and only as the home's coordinator. A missing, empty or damaged file is a
    StateError naming it and the repair.
    """
    from fireworks import LaunchPad
    from fireworks.fw_config import LAUNCHPAD_LOC, MONGOMOCK_SERVERSTORE_FILE

    file = Path(MONGOMOCK_SERVERSTORE_FILE) if MONGOMOCK_SERVERSTORE_FILE else None
    if file is not None and not file.is_file():
        raise _state_error(file, "is missing", "the embedded LaunchPad's file was deleted or moved")
    if file is not None and file.stat().st_size == 0:
        raise _state_error(file, "is empty", "0 bytes")
    try:
        launchpad = LaunchPad.from_file(LAUNCHPAD_LOC)
    except Exception as exc:
        if file is None:
            raise
        raise _state_error(file, "cannot be read", f"{type(exc).__name__}: {exc}") from exc
    store = embedded_store(launchpad)
    if store is not None:
        stop_exit_write(store)
    if not read_only and launchpad.fw_id_assigner.count_documents({}) == 0:  # a new, empty database
        launchpad.reset("", require_password=False)
        if store is not None:
            # The file keeps no indexes, and mongomock checks unique ones by scanning every document on each
            # insert (quadratic bulk adds): continue with a client loaded from the file, as every later one is.
            save_launchpad(launchpad)
            launchpad = LaunchPad.from_file(LAUNCHPAD_LOC)
            stop_exit_write(embedded_store(launchpad))
    return launchpad


def save_launchpad(launchpad: LaunchPad) -> None:
    """Write the embedded LaunchPad to its file now, atomically, keeping the previous state (no-op with MongoDB)."""
    store = embedded_store(launchpad)
    if store is not None:
        write_store(store)


def release_launchpad(launchpad: LaunchPad) -> None:
    """Save an embedded LaunchPad now (its client writes nothing more by itself), so another process can be the
    one writer."""
    save_launchpad(launchpad)


SAVE_INTERVAL = 5.0  # seconds: state changes closer together than this are saved together


class Saver:
    """Saves an embedded LaunchPad as the coordinator changes it, at most every `interval` seconds: a reader never
    sees a state older than that (the coordinator flushes while it waits, see `due`). A change lost with a killed
    coordinator is redone by the next one, which takes in the finished pw.x runs it finds (runner.finished_run)."""

    def __init__(self, launchpad: LaunchPad, interval: float = SAVE_INTERVAL):
        self.launchpad, self.interval = launchpad, interval
        self.dirty, self.last = False, time.monotonic()
        if embedded_store(launchpad) is not None:
            after_state_changes(launchpad, lambda name, result: self.changed())

    def changed(self) -> None:
        """Note a change (the wrapped LaunchPad methods note theirs); save if the last save is old enough."""
        self.dirty = True
        if time.monotonic() - self.last >= self.interval:
            self.flush()

    def due(self) -> float | None:
        """Seconds until unsaved changes are due to be saved (None: nothing unsaved)."""
        return max(0.0, self.last + self.interval - time.monotonic()) if self.dirty else None

    def flush(self) -> None:
        """Save now if anything changed since the last save."""
        if self.dirty:
            save_launchpad(self.launchpad)
            self.dirty, self.last = False, time.monotonic()


def failure_reason(launch: dict) -> tuple[str, str]:
    """(error type, message) of a FIZZLED launch, from the DFTResult report or the exception's last line."""
    exception = launch.get("action", {}).get("stored_data", {}).get("_exception", {})
    details = exception.get("_details") or {}
    if details.get("error_type"):
        return details["error_type"], details.get("error_message", "")
    last_line = (exception.get("_stacktrace") or "unknown error").strip().splitlines()[-1]
    return "REFUSED" if last_line.startswith(("qe_factory", "StructureError", "Pseudo")) else "ERROR", last_line


def status_report(launchpad: LaunchPad) -> dict[str, Any]:
    """Fireworks per state and stage, workflows per state, and every failure with its reason."""
    counts: dict[str, dict[str, int]] = {}
    stage_of = {}
    for fw in launchpad.fireworks.find({}, {"fw_id": 1, "state": 1, "spec.stage": 1, "spec.uid": 1}):
        stage = fw.get("spec", {}).get("stage")
        counts.setdefault(fw["state"], {}).setdefault(stage, 0)
        counts[fw["state"]][stage] += 1
        stage_of[fw["fw_id"]] = (fw.get("spec", {}).get("uid"), stage)
    workflows: dict[str, int] = {}
    for wf in launchpad.workflows.find({}, {"state": 1}):
        workflows[wf["state"]] = workflows.get(wf["state"], 0) + 1
    failures = []
    for launch in launchpad.launches.find({"state": "FIZZLED"}, {"fw_id": 1, "action.stored_data._exception": 1}):
        uid, stage = stage_of.get(launch["fw_id"], (None, None))
        error_type, message = failure_reason(launch)
        failures.append({"fw_id": launch["fw_id"], "uid": uid, "stage": stage, "error_type": error_type,
                         "message": message})
    return {"fireworks": counts, "workflows": workflows, "failures": failures}


def archive(launchpad: LaunchPad, fw_id: int) -> None:
    """Remove the workflow of `fw_id` from the LaunchPad (a COMPLETED one: its result and history are in the
    JobStore), so the embedded LaunchPad stays as small as the work in progress."""
    with contextlib.redirect_stdout(io.StringIO()):  # delete_wf prints every id it removes
        launchpad.delete_wf(fw_id, delete_launch_dirs=False)


def load_results(store: JobStore, uids: list[str] | None = None) -> list[DFTResult]:
    """Validated results from a JobStore (outputs of the workflows' validate jobs), in uid order."""
    criteria: dict[str, Any] = {"metadata.stage": "validate"}
    if uids is not None:
        criteria["metadata.uid"] = {"$in": list(uids)}
    docs = store.query(criteria, properties=["output"], load=True)
    results = [DFTResult.from_dict(doc["output"]) for doc in docs if doc.get("output")]
    return sorted(results, key=lambda r: r.uid)


def qlaunch_command(args: list[str], home: Path) -> tuple[list[str], dict[str, str]]:
    """argv and environment for stock `qlaunch` on a MongoDB home (an embedded home's qlaunch is the offline
    coordinator: `qe-factory qlaunch`)."""
    qlaunch = Path(sys.executable).with_name("qlaunch")
    return [str(qlaunch), "-c", str(home / "fw_config"), *args], {**os.environ, **config_environment(home)}


# lpad subcommands that only read (everything else may write)
READING_LPAD_COMMANDS = {
    "get_wflows", "get_fws", "get_fw_ids", "get_wf_ids", "get_launchdir", "get_qids", "get_tracker", "report",
    "introspect", "version", "get_fw_ids_from_launch_dir",
}


def run_lpad(args: list[str], home: Path) -> int:
    """Stock `lpad` on this home. With the embedded LaunchPad it works on a copy of the file (its exit-time write
    lands there): a reading command on a snapshot, beside anything; any other as the home's coordinator (refused
    while one runs), the copy then replacing the file atomically when lpad succeeded."""
    import shutil
    import subprocess

    from qe_factory.workflow.coordinator import command_line, coordinate

    lpad = [str(Path(sys.executable).with_name("lpad")), "-c", str(home / "fw_config"), *args]
    env = {**os.environ, **config_environment(home)}
    file = embedded_file(home)
    if file is None:
        return subprocess.run(lpad, env=env).returncode
    command = next((a for a in args if not a.startswith("-")), "")
    if command == "webgui":  # stock webgui would show the copy, never refreshed
        print("qe-factory: on an embedded home use `qe-factory webgui [--port N]` (read-only, fresh on each "
              "reload, 127.0.0.1 only)", file=sys.stderr)
        return 2
    copy = file.with_name(f"lpad-{os.getpid()}.json")
    env["MONGOMOCK_SERVERSTORE_FILE"] = str(copy)
    try:
        if command in READING_LPAD_COMMANDS or not command:
            shutil.copyfile(file, copy)
            return subprocess.run(lpad, env=env).returncode
        with coordinate(home, command_line()):
            shutil.copyfile(file, copy)
            returncode = subprocess.run(lpad, env=env).returncode
            if returncode == 0:
                import bson.json_util

                bson.json_util.loads(copy.read_text())  # lpad left a readable file
                replace_keeping_previous(copy, file)
            return returncode
    finally:
        copy.unlink(missing_ok=True)
