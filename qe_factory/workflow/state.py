"""The home's state — the LaunchPad (MongoDB, or FireWorks' embedded file-backed mode) and the JobStore: clients,
saving, and every query of FireWorks' collections and fields and of the JobStore, by name.

This is the one module (with fireworks_adapter.py, which holds the private attributes) that knows FireWorks'
database schema: tests/unit/test_fireworks_adapter.py has a contract test per behaviour relied on. The embedded
LaunchPad holds the whole database in one process and writes it back as one JSON file: one LaunchPad client process
at a time. Functions import FireWorks and jobflow lazily (after `home.activate()`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ase import Atoms

from qe_factory.engine.config import DFTConfig
from qe_factory.engine.outcomes import DiskFullError, Outcome, outcome_of
from qe_factory.engine.references import E0, Reference, element_references, references_for
from qe_factory.engine.results import DFTResult
from qe_factory.engine.runner import REFUSALS
from qe_factory.workflow.fireworks_adapter import (
    after_state_changes,
    embedded_store,
    index_embedded_collections,
    stop_exit_write,
    write_store,
)
from qe_factory.workflow.home import embedded_file

if TYPE_CHECKING:
    from fireworks import FWorker, LaunchPad
    from jobflow import JobStore


class StateError(RuntimeError):
    """The home's state (LaunchPad file or JobStore) is missing or damaged; the message names it and the repair."""


def _state_error(path: Path, what: str, cause: BaseException | str) -> StateError:
    return StateError(
        f"{path} {what} ({cause}). Nothing was changed. Run `qe-factory repair` to rebuild the state from the "
        f"previous good copy, the JobStore and the launch directories (it says what it could not)."
    )


def get_jobstore() -> JobStore:
    """The connected JobStore configured for the active home (never created here: `activate` creates it once); a
    full disk or a locked database raise the factory's named outcomes from it."""
    import jobflow

    from qe_factory.workflow.fireworks_adapter import connect_store, named_outcomes_store_class
    from qe_factory.workflow.home import factory_home

    store = jobflow.SETTINGS.JOB_STORE
    folder = Path(getattr(store.docs_store, "database_path", "") or factory_home() / "state" / "jobstore")
    embedded = embedded_file(factory_home()) is not None
    if embedded and not folder.is_dir():
        raise _state_error(folder, "is missing", "the JobStore's folder was deleted or moved")
    docs_store = store.docs_store
    try:
        for sub in (store.docs_store, *store.additional_stores.values()):
            connect_store(sub)
        if embedded:  # this process is the home's one writer (or a reader): recent_outputs.py; one read of it all
            from qe_factory.workflow.recent_outputs import RecentOutputs

            docs_store = RecentOutputs(docs_store)
            docs_store.read()
        else:
            store.docs_store.count({"metadata.stage": "validate"})
    except Exception as exc:  # sqlite3.DatabaseError, OSError, bson errors: whatever a damaged file raises
        if (free := free_bytes(folder)) is not None and free < 1 << 20:  # sqlite says "disk I/O error"
            raise DiskFullError(errno.ENOSPC, f"the JobStore {folder} cannot be opened: {free} bytes left on its "
                                "device; free space, then run the command again") from exc
        raise _state_error(folder, "cannot be read", f"{type(exc).__name__}: {exc}") from exc
    return named_outcomes_store_class()(docs_store, store.additional_stores, save=store.save, load=store.load)


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
    if store is not None:
        index_embedded_collections(launchpad)
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


class Failure(NamedTuple):
    """Why a Firework's launch FIZZLED, as its exception recorded it (`_exception._details`, never the traceback)."""

    outcome: Outcome
    error_type: str
    message: str
    details: dict[str, Any]


def launch_failure(launch: dict) -> Failure:
    """The Failure of a FIZZLED launch document."""
    details = launch.get("action", {}).get("stored_data", {}).get("_exception", {}).get("_details") or {}
    outcome = outcome_of(details)
    if not details:
        return Failure(outcome, "ERROR", f"an error raised outside the factory's jobs (FireWorks keeps its traceback: "
                                         f"qe-factory lpad get_fws -i {launch.get('fw_id')} -d all)", {})
    return Failure(outcome, details.get("error_type") or outcome.name, details.get("error_message", ""), details)


def last_failure(launchpad: LaunchPad, fw_id: int) -> Failure | None:
    """The Failure of a Firework's last FIZZLED launch, or None."""
    launch = launchpad.launches.find_one({"fw_id": fw_id, "state": "FIZZLED"}, {"fw_id": 1, "action": 1},
                                        sort=[("launch_id", -1)])
    return launch_failure(launch) if launch else None


def requeue(launchpad: LaunchPad, outcomes: Iterable[Outcome], fw_ids: Iterable[int] | None = None
            ) -> dict[int, Failure]:
    """Put FIZZLED Fireworks (of `fw_ids`; None: any) whose last launch ended with one of `outcomes` (nobody's
    failure: a stop request, a full disk, a worker that cannot run pw.x) back to READY; fw_id → its Failure."""
    names = [outcome.name for outcome in outcomes]
    query: dict[str, Any] = {"state": "FIZZLED", "action.stored_data._exception._details.outcome": {"$in": names}}
    if fw_ids is not None:
        query["fw_id"] = {"$in": list(fw_ids)}
    launches = {doc["fw_id"]: doc for doc in launchpad.launches.find(query, {"fw_id": 1, "action": 1})}
    fizzled = launchpad.fireworks.find({"fw_id": {"$in": sorted(launches)}, "state": "FIZZLED"}, {"fw_id": 1})
    requeued = {doc["fw_id"]: launch_failure(launches[doc["fw_id"]]) for doc in fizzled}
    for fw_id in sorted(requeued):
        launchpad.rerun_fw(fw_id)
    return requeued


def firework_counts(launchpad: LaunchPad) -> dict[str, dict[str, int]]:
    """Fireworks per state and stage."""
    counts: dict[str, dict[str, int]] = {}
    for fw in launchpad.fireworks.find({}, {"state": 1, "spec.stage": 1}):
        stage = fw.get("spec", {}).get("stage")
        counts.setdefault(fw["state"], {}).setdefault(stage, 0)
        counts[fw["state"]][stage] += 1
    return counts


def workflow_counts(launchpad: LaunchPad) -> dict[str, int]:
    """Workflows per state."""
    counts: dict[str, int] = {}
    for wf in launchpad.workflows.find({}, {"state": 1}):
        counts[wf["state"]] = counts.get(wf["state"], 0) + 1
    return counts


UNFINISHED = {"state": {"$nin": ["COMPLETED", "FIZZLED", "DEFUSED"]}}


def unfinished_count(launchpad: LaunchPad) -> int:
    """Workflows in the LaunchPad still to finish."""
    return launchpad.workflows.count_documents(UNFINISHED)


def _either(keys: Iterable[str | None], uids: Iterable[str | None]) -> dict:
    return {"$or": [{"metadata.qe_factory_key": {"$in": list(keys)}}, {"metadata.uid": {"$in": list(uids)}}]}


def workflows_with(launchpad: LaunchPad, keys: Iterable[str | None], uids: Iterable[str | None]) -> list[dict]:
    """Metadata ({uid, qe_factory_key}) of the LaunchPad's workflows with one of these calculation keys or uids."""
    return [doc["metadata"] for doc in launchpad.workflows.find(_either(keys, uids), {"metadata": 1})]


def labels_with(store: JobStore | None, keys: Iterable[str | None], uids: Iterable[str | None]) -> list[dict]:
    """Metadata of the labels in the JobStore with one of these calculation keys or uids (their workflows have left
    the LaunchPad)."""
    if store is None:
        return []
    if hasattr(store.docs_store, "labels_with"):  # recent_outputs.RecentOutputs: from memory
        return store.docs_store.labels_with(keys, uids)
    criteria = {"metadata.stage": "validate", **_either(keys, uids)}
    return [doc["metadata"] for doc in store.query(criteria, properties=["metadata"])]


def add_workflows(launchpad: LaunchPad, workflows: list) -> None:
    """FireWorks' bulk_add_wfs without the progress bar it draws on stderr (ours is the one the user watches)."""
    with contextlib.redirect_stderr(io.StringIO()):
        launchpad.bulk_add_wfs(workflows)


SCF = {"spec.stage": "scf"}  # Fireworks run by workers; the others (inputs, validate) run in the coordinator
QUICK = {"spec.stage": {"$ne": "scf"}}


STAGES = {"scf": SCF, "quick": QUICK, "validate": {"spec.stage": "validate"}}


def stage_fworker(fworker: FWorker, stages: str) -> FWorker:
    """The FWorker that takes only Fireworks of `stages` (STAGES): FireWorks then checks out or reserves the next
    READY one atomically (highest _priority first: a structure is finished before the next is started)."""
    from fireworks import FWorker

    return FWorker(fworker.name, fworker.category, {**(fworker.query or {}), **STAGES[stages]}, fworker.env)


def fw_launched_in(launchpad: LaunchPad, launch_dir: Path) -> int | None:
    """The Firework launched in `launch_dir`."""
    doc = launchpad.launches.find_one({"launch_dir": str(launch_dir)}, {"fw_id": 1})
    return doc["fw_id"] if doc else None


def ready_scf_count(launchpad: LaunchPad) -> int:
    """READY SCF Fireworks: work waiting for a worker."""
    return launchpad.fireworks.count_documents({**SCF, "state": "READY"})


def finished_structure(launchpad: LaunchPad, fw_id: int) -> tuple[str, str] | None:
    """(uid, state) if the Firework that just ran finished its structure: a validation that COMPLETED, or a
    failure (FIZZLED); else None."""
    doc = launchpad.fireworks.find_one({"fw_id": fw_id}, {"state": 1, "spec.stage": 1, "spec.uid": 1}) or {}
    spec = doc.get("spec", {})
    if doc.get("state") == "FIZZLED" or (doc.get("state") == "COMPLETED" and spec.get("stage") == "validate"):
        return spec.get("uid"), doc["state"]
    return None


def archive(launchpad: LaunchPad, fw_id: int) -> None:
    """Remove the workflow of `fw_id` from the LaunchPad (a COMPLETED one: its result and history are in the
    JobStore), so the embedded LaunchPad stays as small as the work in progress. What FireWorks' delete_wf does,
    without its look for other Fireworks sharing a launch (only its duplicate finders share them; the factory uses
    none), which read every Firework for every launch."""
    workflow = launchpad.workflows.find_one({"nodes": fw_id}, {"nodes": 1})
    if workflow is None:
        return
    fw_ids = workflow["nodes"]
    fireworks = launchpad.fireworks.find({"fw_id": {"$in": fw_ids}}, {"launches": 1, "archived_launches": 1})
    launch_ids = [launch for fw in fireworks for launch in fw.get("launches", []) + fw.get("archived_launches", [])]
    if launchpad.gridfs_fallback is not None:
        for launch_id in launch_ids:
            for file in launchpad.gridfs_fallback.find({"metadata.launch_id": launch_id}):
                launchpad.gridfs_fallback.delete(file._id)
    launchpad.launches.delete_many({"launch_id": {"$in": launch_ids}})
    launchpad.offline_runs.delete_many({"launch_id": {"$in": launch_ids}})
    launchpad.fireworks.delete_many({"fw_id": {"$in": fw_ids}})
    launchpad.workflows.delete_one({"nodes": fw_id})


# --- offline runs (offline.py): FireWorks' offline_runs collection, and the run state the coordinator records there

class OfflineEntry(NamedTuple):
    """An offline run the LaunchPad waits for (reserved, not yet taken back)."""

    launch_id: int
    fw_id: int
    launch_dir: Path
    job_id: str | None
    run_state: str | None
    owner: str | None  # the coordinator that reserved it (host.host_id_for): its local workers run it


def offline_entries(launchpad: LaunchPad) -> list[OfflineEntry]:
    """Offline runs the LaunchPad still waits for, with their SLURM job ids and recorded run states."""
    entries = []
    for entry in launchpad.offline_runs.find({"completed": False, "deprecated": False}):
        launch = launchpad.launches.find_one({"launch_id": entry["launch_id"]},
                                             {"launch_dir": 1, "state_history": 1, "state": 1})
        if launch is None or launch["state"] != "RESERVED":  # rerun, defused or deleted by hand meanwhile
            continue
        job_ids = [h["reservation_id"] for h in launch.get("state_history", []) if h.get("reservation_id")]
        entries.append(OfflineEntry(entry["launch_id"], entry["fw_id"], Path(launch["launch_dir"]),
                                    str(job_ids[-1]) if job_ids else None, entry.get(RUN_STATE), entry.get(OWNER)))
    return entries


RUN_STATE = "qe_factory_run_state"  # the field of an offline_runs document that holds its offline.RunState
OWNER = "qe_factory_owner"  # … and the coordinator that reserved it


def record_run_state(launchpad: LaunchPad, launch_id: int, run_state: str, owner: str | None = None) -> None:
    """Record an offline run's state (offline.RunState), and its owner, with FireWorks' own entry for it."""
    update = {RUN_STATE: run_state, **({OWNER: owner} if owner else {})}
    launchpad.offline_runs.update_one({"launch_id": launch_id}, {"$set": update})


def run_state_counts(launchpad: LaunchPad) -> dict[str, int]:
    """Offline runs per recorded state (runs taken back included)."""
    counts: dict[str, int] = {}
    for entry in launchpad.offline_runs.find({}, {RUN_STATE: 1}):
        name = entry.get(RUN_STATE) or "UNKNOWN"
        counts[name] = counts.get(name, 0) + 1
    return counts


def lost_runs(launchpad: LaunchPad, fw_id: int) -> int:
    """How many offline runs of this Firework were given up (their worker ended without finishing)."""
    return launchpad.offline_runs.count_documents({"fw_id": fw_id, "deprecated": True})


# --- what the home has seen (history.py) and repair

def fireworks_by_uid(launchpad: LaunchPad, uids: list[str] | None = None) -> dict[str | None, list[dict]]:
    """uid → its Fireworks (fw_id, name, state, stage, uid, the inputs job's arguments), in id order."""
    query = {} if uids is None else {"spec.uid": {"$in": list(uids)}}
    projection = {"fw_id": 1, "name": 1, "state": 1, "spec.stage": 1, "spec.uid": 1, "spec._tasks": 1}
    by_uid: dict[str | None, list[dict]] = {}
    for fw in sorted(launchpad.fireworks.find(query, projection), key=lambda fw: fw["fw_id"]):
        by_uid.setdefault(fw.get("spec", {}).get("uid"), []).append(fw)
    return by_uid


def fizzled_launches(launchpad: LaunchPad, fw_ids: list[int]) -> dict[int, dict]:
    """fw_id → its FIZZLED launch (launch_dir, exception), for those of `fw_ids` whose launch FIZZLED."""
    wanted = {"fw_id": 1, "launch_dir": 1, "action.stored_data._exception": 1}
    return {launch["fw_id"]: launch
            for launch in launchpad.launches.find({"state": "FIZZLED", "fw_id": {"$in": fw_ids}}, wanted)}


def inputs_formula(firework: dict[str, Any]) -> str | None:
    """The chemical formula of the structure an inputs Firework's job was given (None for other Fireworks)."""
    from ase import Atoms

    for task in firework.get("spec", {}).get("_tasks", []):
        args = task.get("job", {}).get("function_args") or [None]
        if isinstance(args[0], dict) and args[0].get("numbers"):
            return Atoms(numbers=args[0]["numbers"]).get_chemical_formula()
    return None


def workflow_uids(launchpad: LaunchPad) -> set[str]:
    """uids of the workflows in the LaunchPad."""
    return {doc["metadata"].get("uid") for doc in launchpad.workflows.find({}, {"metadata.uid": 1})}


def completed_workflows(launchpad: LaunchPad) -> list[tuple[int, str | None]]:
    """(a Firework id, uid) of each COMPLETED workflow still in the LaunchPad."""
    return [(wf["nodes"][0], wf["metadata"].get("uid"))
            for wf in launchpad.workflows.find({"state": "COMPLETED"}, {"nodes": 1, "metadata.uid": 1})]


def workflows_missing_outputs(launchpad: LaunchPad, store: JobStore) -> dict[str, int]:
    """uid → the inputs Firework of each unfinished workflow with a COMPLETED job whose output is not in the
    JobStore (its next jobs cannot resolve their references)."""
    lost = {}
    for wf in launchpad.workflows.find(UNFINISHED, {"nodes": 1, "metadata.uid": 1}):
        done = {fw["spec"]["_tasks"][0]["job"]["uuid"]: fw for fw in launchpad.fireworks.find(
            {"fw_id": {"$in": wf["nodes"]}, "state": "COMPLETED"}, {"fw_id": 1, "spec._tasks.job.uuid": 1})}
        stored = {doc["uuid"] for doc in store.query({"uuid": {"$in": list(done)}}, properties=["uuid"])}
        if set(done) - stored:
            inputs = launchpad.fireworks.find_one({"fw_id": {"$in": wf["nodes"]}, "spec.stage": "inputs"},
                                                  {"fw_id": 1})
            lost[wf["metadata"].get("uid")] = inputs["fw_id"]
    return lost


# --- the JobStore: labels and isolated-atom references

def labelled_uids(store: JobStore) -> set[str]:
    """uids with a label (a validate job's output) in the JobStore."""
    return {doc["metadata"]["uid"] for doc in store.query({"metadata.stage": "validate"}, properties=["metadata"])}


def label_summaries(store: JobStore, uids: list[str] | None = None, limit: int = 0) -> list[dict]:
    """What status, show and the web GUI list of each label (uid, formula, deviations, energy, attempts,
    completed_at), newest first."""
    criteria: dict[str, Any] = {"metadata.stage": "validate"}
    if uids is not None:
        criteria["metadata.uid"] = {"$in": list(uids)}
    docs = store.query(criteria, sort={"completed_at": -1}, limit=limit, properties=[
        "completed_at", "metadata.uid", "output.uid", "output.formula", "output.energy", "output.attempts.number",
        "output.label_deviations"])
    return [{**(doc.get("output") or {}), "uid": doc["metadata"]["uid"], "completed_at": doc.get("completed_at", "")}
            for doc in docs]


def load_results(store: JobStore, uids: list[str] | None = None, jobs: list[str] | None = None) -> list[DFTResult]:
    """Validated results from a JobStore (outputs of the workflows' validate jobs), in uid order; `jobs`: the
    uuids of the labels of `uids`, asked for by uuid (recent_outputs.RecentOutputs reads them by id)."""
    criteria: dict[str, Any] = {"metadata.stage": "validate"}
    if uids is not None:
        criteria["metadata.uid"] = {"$in": list(uids)}
    if jobs is not None and uids is not None:
        docs = [doc for doc in store.query({"uuid": {"$in": list(jobs)}}, properties=["output", "metadata"], load=True)
                if (doc.get("metadata") or {}).get("stage") == "validate" and doc["metadata"].get("uid") in uids]
    else:
        docs = store.query(criteria, properties=["output"], load=True)
    results = [DFTResult.from_dict(doc["output"]) for doc in docs if doc.get("output")]
    return sorted(results, key=lambda r: r.uid)


def stored_e0s(store: JobStore, references: Iterable[Reference]) -> dict[str, E0]:
    """uid → E0 of the references whose result is in the JobStore (failed ones are absent). A coordinator's store
    (recent_outputs.RecentOutputs) keeps the E0s it found (a reference's label never changes) and reads the store
    only for a reference it knows a label of: a validation no longer reads every document for its E0s."""
    wanted = {ref.uid: ref for ref in references}
    known: dict[str, E0 | None] | None = getattr(store.docs_store, "e0s", None)
    missing = [uid for uid in wanted if known is None or uid not in known]
    jobs = None
    if known is not None and missing:
        labels = store.docs_store.labels_with([], missing)
        missing = [meta["uid"] for meta in labels]
        if all(meta.get("uuid") for meta in labels):  # their jobs: read by id, not by a query of every document
            jobs = [meta["uuid"] for meta in labels]
    results = load_results(store, missing, jobs) if missing else []
    found = {r.uid: E0.from_result(r, wanted[r.uid].key) for r in results if r.succeeded}
    if known is None:
        return found
    known.update({r.uid: found.get(r.uid) for r in results})  # None: a failed reference, not read again
    return {uid: known[uid] for uid in wanted if known.get(uid) is not None}


def reference_energies(store: JobStore, config: DFTConfig, elements: Iterable[str]) -> dict[str, float]:
    """{element: E0 eV} of the elements whose isolated atom was computed with `config`'s settings (its cutoffs, or
    the element's own when the config leaves them to the family); elements without one are absent."""
    return {e0.element: e0.energy for e0 in stored_e0s(store, element_references(elements, config)).values()}


def structure_e0s(store: JobStore, atoms: Atoms, config: DFTConfig) -> dict[str, float]:
    """{element: E0 eV} of the structure's elements computed with exactly its label's settings (its cutoffs: the
    largest of its elements' when the config leaves them to the family); elements without one yet are absent."""
    try:
        references = references_for([atoms], config)
    except (*REFUSALS, ValueError):
        return {}
    return {e0.element: e0.energy for e0 in stored_e0s(store, references.values()).values()}
