"""The LaunchPad (MongoDB, or FireWorks' embedded file-backed mode) and the JobStore: clients, saving, queries.

The embedded LaunchPad holds the whole database in one process and writes it back as one JSON file: one LaunchPad
client process at a time. Functions import FireWorks and jobflow lazily (after `home.activate()`).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qe_factory.engine.results import DFTResult
from qe_factory.workflow.fireworks_adapter import (
    after_state_changes,
    embedded_store,
    stop_exit_write,
    write_store,
)
from qe_factory.workflow.home import config_environment, embedded_file

if TYPE_CHECKING:
    from fireworks import LaunchPad
    from jobflow import JobStore


def get_jobstore() -> JobStore:
    """The connected JobStore configured for the active home."""
    import jobflow

    store = jobflow.SETTINGS.JOB_STORE
    store.connect()
    return store


def get_launchpad(read_only: bool = False) -> LaunchPad:
    """A LaunchPad client for the active home, initialised if its database is new.

    `read_only` clients never write the embedded file back (safe beside a running worker).
    """
    from fireworks import LaunchPad
    from fireworks.fw_config import LAUNCHPAD_LOC

    launchpad = LaunchPad.from_file(LAUNCHPAD_LOC)
    store = embedded_store(launchpad)
    if read_only and store is not None:
        stop_exit_write(store)
    elif launchpad.fw_id_assigner.count_documents({}) == 0:  # a new, empty database
        launchpad.reset("", require_password=False)
        if store is not None:
            # The file keeps no indexes, and mongomock checks unique ones by scanning every document on each
            # insert (quadratic bulk adds): continue with a client loaded from the file, as every later one is.
            release_launchpad(launchpad)
            launchpad = LaunchPad.from_file(LAUNCHPAD_LOC)
    return launchpad


def save_launchpad(launchpad: LaunchPad) -> None:
    """Write the embedded LaunchPad to its file now, atomically (no-op with MongoDB)."""
    store = embedded_store(launchpad)
    if store is not None:
        write_store(store)


def release_launchpad(launchpad: LaunchPad) -> None:
    """Save an embedded LaunchPad now and stop this client from writing again (e.g. at exit), so another process
    (rlaunch, a worker) can be the one client."""
    save_launchpad(launchpad)
    store = embedded_store(launchpad)
    if store is not None:
        stop_exit_write(store)


def persist_every_change(launchpad: LaunchPad) -> LaunchPad:
    """Make an embedded LaunchPad save itself after each checkout and completion, so a killed worker leaves a
    RUNNING Firework (found by `lpad detect_lostruns`) instead of losing every state change."""
    if embedded_store(launchpad) is None:
        return launchpad
    return after_state_changes(launchpad, lambda: save_launchpad(launchpad))


def finished_count(launchpad: LaunchPad) -> int:
    """Structures finished so far: validated, or failed at any stage."""
    validated = launchpad.fireworks.count_documents({"state": "COMPLETED", "spec.stage": "validate"})
    return validated + launchpad.fireworks.count_documents({"state": "FIZZLED"})


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


def archive_completed(launchpad: LaunchPad) -> int:
    """Remove COMPLETED workflows (their results are in the JobStore) so the embedded LaunchPad stays small."""
    done = [wf["nodes"][0] for wf in launchpad.workflows.find({"state": "COMPLETED"}, {"nodes": 1})]
    with contextlib.redirect_stdout(io.StringIO()):  # delete_wf prints every id it removes
        for fw_id in done:
            launchpad.delete_wf(fw_id, delete_launch_dirs=False)
    save_launchpad(launchpad)
    return len(done)


def load_results(store: JobStore, uids: list[str] | None = None) -> list[DFTResult]:
    """Validated results from a JobStore (outputs of the workflows' validate jobs), in uid order."""
    criteria: dict[str, Any] = {"metadata.stage": "validate"}
    if uids is not None:
        criteria["metadata.uid"] = {"$in": list(uids)}
    docs = store.query(criteria, properties=["output"], load=True)
    results = [DFTResult.from_dict(doc["output"]) for doc in docs if doc.get("output")]
    return sorted(results, key=lambda r: r.uid)


def qlaunch_command(args: list[str], home: Path) -> tuple[list[str], dict[str, str]]:
    """argv and environment for stock `qlaunch` on this home.

    With the embedded LaunchPad, qlaunch gets a snapshot copy of the file: it only reads which Fireworks are READY,
    and its exit-time write must not overwrite what the worker jobs saved meanwhile. Workers read the real file
    (the queue adapter's pre_rocket points them at the configuration). Keep one worker job at a time (-m 1).
    """
    env = {**os.environ, **config_environment(home)}
    launchpad_file = embedded_file(home)
    if launchpad_file is not None:
        snapshot = launchpad_file.with_name("qlaunch-snapshot.json")
        snapshot.write_bytes(launchpad_file.read_bytes())
        env["MONGOMOCK_SERVERSTORE_FILE"] = str(snapshot)
    qlaunch = Path(sys.executable).with_name("qlaunch")
    return [str(qlaunch), "-c", str(home / "fw_config"), *args], env
