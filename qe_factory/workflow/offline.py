"""Offline launches: SCF Fireworks run by workers that never touch the LaunchPad or the JobStore.

FireWorks' reservation + offline mode, with jobflow's JobStore kept off the workers too:
1. the coordinator reserves a Firework into its launch directory (`reserve`: `LaunchPad.reserve_fw` and
   `setup_offline_job`, i.e. FW.json and FW_offline.json) and adds the JobStore documents its job reads;
2. a worker — a child process of a local coordinator, or a SLURM job — runs it there (`run_offline`: FireWorks'
   offline Rocket, jobflow writing into an in-memory JobStore saved to the directory at the end);
3. the coordinator takes the outcome in (`take_back`: the job's documents into the JobStore, then
   `LaunchPad.recover_offline`, which completes the launch and applies its FWAction: a recovery detour included).

So the embedded LaunchPad file and the sqlite JobStore have one writer, the coordinator, however many workers run
and on whichever nodes; a worker needs only the shared filesystem.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qe_factory.engine.config import ExecutionSettings
from qe_factory.engine.errors import DFTErrorType, scheduler_error
from qe_factory.engine.outcomes import Outcome, outcome_details
from qe_factory.engine.scheduler import slurm_job_end
from qe_factory.workflow import state

if TYPE_CHECKING:
    from fireworks import Firework, FWorker, LaunchPad
    from jobflow import JobStore

log = logging.getLogger(__name__)

INPUTS = "jobstore_in.json"  # the JobStore documents the Firework's job reads (written by the coordinator)
OUTPUTS = "jobstore_out.json"  # the documents it wrote; written last, atomically: the worker is done


class RunState(Enum):
    """Where an offline run stands. Its Firework is READY before; the coordinator moves a run along
    RESERVED → RUNNING → FINISHED | LOST → TAKEN_BACK (one method per step, coordinator.Coordinator) and records each
    state with FireWorks' entry for the run (state.record_run_state), which `status` counts."""

    RESERVED = "RESERVED"  # in its launch directory, for a worker to take (a SLURM job may still be queued)
    RUNNING = "RUNNING"  # a worker has it
    FINISHED = "FINISHED"  # the worker left its outcome (OUTPUTS) in the launch directory
    LOST = "LOST"  # the worker ended (died, its job left the queue) without leaving an outcome
    TAKEN_BACK = "TAKEN_BACK"  # the coordinator took the outcome in, or gave the Firework back (READY/WORKER_LOST)


@dataclass
class OfflineRun:
    """A Firework reserved for a worker: its launch, the directory the worker runs it in, (on SLURM) the job, and
    its RunState."""

    launch_id: int
    fw_id: int
    launch_dir: Path
    job_id: str | None = None
    state: RunState = RunState.RESERVED
    pilot: bool = False  # claimed by a pilot host (host.py): its job's end is the host's, not the structure's
    owner: str | None = None  # the coordinator that reserved it (host.host_id_for), whose local workers run it

    def finished(self) -> bool:
        return (self.launch_dir / OUTPUTS).is_file()

    def started(self) -> bool:
        """Whether a worker has started it (FireWorks' offline Rocket writes `started_on` into FW_offline.json)."""
        try:
            return "started_on" in json.loads((self.launch_dir / "FW_offline.json").read_text())
        except (OSError, ValueError):  # being rewritten: not yet
            return False

    def move(self, launchpad: LaunchPad, to: RunState) -> None:
        """Record the run's next state."""
        self.state = to
        state.record_run_state(launchpad, self.launch_id, to.value)


def reserve(launchpad: LaunchPad, fworker: FWorker, launch_dir: Path, store: JobStore, fw_id: int | None = None,
            owner: str | None = None) -> OfflineRun | None:
    """Reserve the next READY Firework for `fworker` (atomically: FireWorks' reservation, so two coordinators of
    one MongoDB LaunchPad never take the same one), or READY Firework `fw_id`, for an offline worker in
    `launch_dir` (created; removed when nothing was READY). `owner`: the coordinator reserving it."""
    from fireworks.queue.queue_launcher import setup_offline_job

    launch_dir.mkdir(parents=True, exist_ok=True)
    fw, launch_id = launchpad.reserve_fw(fworker, str(launch_dir), fw_id=fw_id)
    if fw is None:
        launch_dir.rmdir()
        return None
    with contextlib.chdir(launch_dir):
        setup_offline_job(launchpad, fw, launch_id)  # FW.json, FW_offline.json, the offline_runs entry
    write_json(launch_dir / INPUTS, referenced_documents(fw, store))
    run = OfflineRun(launch_id, fw.fw_id, launch_dir, owner=owner)
    state.record_run_state(launchpad, launch_id, RunState.RESERVED.value, owner)
    return run


def referenced_documents(fw: Firework, store: JobStore) -> list[dict]:
    """The JobStore documents (every index of every job) that the Firework's job reads through its references."""
    from jobflow import Job

    uuids: set[str] = set()
    for task in fw.tasks:
        job = task.get("job")
        job = Job.from_dict(job) if isinstance(job, dict) else job
        uuids.update(ref.uuid for ref in getattr(job, "input_references", ()))
    if not uuids:
        return []
    return [_plain(doc) for doc in store.docs_store.query({"uuid": {"$in": sorted(uuids)}})]


def _plain(doc: dict) -> dict:
    from monty.json import jsanitize

    return jsanitize({k: v for k, v in doc.items() if k != "_id"}, strict=False, allow_bson=False)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader sees the whole file or none)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def run_offline(launch_dir: Path, execution: ExecutionSettings | None = None) -> str:
    """Run the Firework reserved in `launch_dir` with no LaunchPad and no JobStore connection; returns its final
    state (COMPLETED or FIZZLED, as FireWorks wrote it to FW_offline.json). What the job wrote to its JobStore
    goes to OUTPUTS for the coordinator, which stores it."""
    import jobflow
    from fireworks import FWorker
    from fireworks.core.rocket_launcher import launch_rocket
    from jobflow import JobStore
    from maggma.stores import MemoryStore

    from qe_factory.workflow.fireworks_adapter import jobflow_store, mend_offline_rocket, without_ping_thread
    from qe_factory.workflow.home import executing

    mend_offline_rocket()
    launch_dir = Path(launch_dir)
    configured = jobflow.SETTINGS.JOB_STORE
    store = JobStore(MemoryStore(), {name: MemoryStore() for name in configured.additional_stores})
    store.connect()
    given = json.loads((launch_dir / INPUTS).read_text())
    if given:
        store.docs_store.update(given, key=["uuid", "index"])
    known = {(doc["uuid"], doc["index"]) for doc in given}
    with contextlib.chdir(launch_dir), jobflow_store(store), executing(execution), without_ping_thread():
        launch_rocket(None, FWorker(), strm_lvl="WARNING")  # the rocket's own last ping: FW_ping.json in there
    written = {
        "docs": [_plain(d) for d in store.docs_store.query({}) if (d["uuid"], d["index"]) not in known],
        **{name: [_plain(d) for d in sub.query({})] for name, sub in store.additional_stores.items()},
    }
    write_json(launch_dir / OUTPUTS, written)
    return json.loads((launch_dir / "FW_offline.json").read_text()).get("state", "UNKNOWN")


MAX_LOST_RUNS = 3  # a Firework whose worker was lost this often FIZZLES (no endless reruns of a worker killer)


def take_back(launchpad: LaunchPad, run: OfflineRun, store: JobStore) -> str:
    """Take an ended offline run in (FINISHED or LOST → TAKEN_BACK); returns the launch's state.

    FINISHED: its JobStore documents first (later Fireworks read them), then FireWorks' recover_offline (completes the
    launch, applies detours). LOST (its worker died, its SLURM job left the queue): back to READY, or FIZZLED as
    WORKER_LOST the MAX_LOST_RUNS-th time; what SLURM said about its job's end is named (a cancelled job FIZZLES at
    once as SLURM_CANCELLED: never rerun)."""
    if run.finished() and "fwaction" in (offline := json.loads((run.launch_dir / "FW_offline.json").read_text())):
        run.move(launchpad, RunState.FINISHED)
        store_outputs(run, store)
        launchpad.recover_offline(run.launch_id, ignore_errors=False)
        ended = offline["state"]
    else:
        run.move(launchpad, RunState.LOST)
        ended = give_back(launchpad, run)
    run.move(launchpad, RunState.TAKEN_BACK)
    return ended


def store_outputs(run: OfflineRun, store: JobStore) -> None:
    """Store the JobStore documents a finished run's job wrote."""
    written = json.loads((run.launch_dir / OUTPUTS).read_text())
    if written["docs"]:
        store.docs_store.update(written["docs"], key=["uuid", "index"])
    for name, sub in store.additional_stores.items():
        if written.get(name):
            sub.update(written[name], key=sub.key)


def give_back(launchpad: LaunchPad, run: OfflineRun) -> str:
    """A lost run's Firework back to READY, or FIZZLED (WORKER_LOST, SLURM_CANCELLED); its new state."""
    lost = state.lost_runs(launchpad, run.fw_id) + 1
    launchpad.forget_offline(run.launch_id)
    where = f"SLURM job {run.job_id}" if run.job_id else "local worker process"
    said = job_end(run)
    if said and scheduler_error(said) is DFTErrorType.SLURM_CANCELLED and not run.pilot:
        return fizzle(launchpad, run, DFTErrorType.SLURM_CANCELLED.name,
                      f"{where} was cancelled before its worker recorded an outcome: {said}")
    if lost < MAX_LOST_RUNS:
        log.warning("Firework %s back to READY: its %s ended without finishing it (%s)", run.fw_id, where,
                    said or "cause unknown")
        launchpad.cancel_reservation(run.launch_id)  # RESERVED → READY, the launch kept in its history
        return "READY"
    return fizzle(launchpad, run, Outcome.WORKER_LOST.name, f"its worker ({where}) ended {lost} times without "
                  f"finishing it (last: {said or 'killed, node lost, or crashed'}; see {run.launch_dir} and the "
                  "home's logs/)")


def job_end(run: OfflineRun) -> str | None:
    """What SLURM said about the end of the run's job (scheduler.slurm_job_end; its stderr as the project's template
    names it, `<job name>-<job id>.error` in the launch directory); None for a local worker or when nothing says."""
    if not run.job_id:
        return None
    return slurm_job_end(run.job_id, next(run.launch_dir.glob(f"*-{run.job_id}.error"), None))


def fizzle(launchpad: LaunchPad, run: OfflineRun, error_type: str, message: str) -> str:
    """Complete the run's launch as FIZZLED with `error_type` and `message` as its failure (qe-factory status)."""
    from fireworks import FWAction

    outcome = Outcome.WORKER_LOST if error_type == Outcome.WORKER_LOST.name else Outcome.FAILED
    details = outcome_details(outcome, error_type, message)
    action = FWAction(stored_data={"_exception": {"_stacktrace": f"{error_type}: {message}", "_details": details}})
    launchpad.complete_launch(run.launch_id, action, "FIZZLED")
    return "FIZZLED"


def pending_runs(launchpad: LaunchPad) -> list[OfflineRun]:
    """Offline runs the LaunchPad still waits for (reserved and not yet taken back), with their SLURM job ids."""
    return [OfflineRun(e.launch_id, e.fw_id, e.launch_dir, e.job_id, RunState(e.run_state or "RESERVED"),
                       owner=e.owner) for e in state.offline_entries(launchpad)]
