"""The factory's home: FireWorks/jobflow configuration, the LaunchPad (MongoDB or embedded file) and the JobStore.

FireWorks and jobflow read their configuration when first imported, so `activate()` must run before either is
imported; functions here import them lazily. The embedded LaunchPad (FireWorks' mongomock mode) holds the whole
database in one process and writes it back as a JSON file: one LaunchPad client process at a time.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from qe_factory.parallel import seconds_left_in_allocation

if TYPE_CHECKING:
    from fireworks import LaunchPad
    from jobflow import JobStore

HOME_ENV = "QE_FACTORY_HOME"
REPO = Path(__file__).resolve().parents[1]
CONFIG_TEMPLATES = {"fw_config": REPO / "fw_config", "templates": REPO / "templates"}


def factory_home(home: str | Path | None = None) -> Path:
    """The factory's working directory: `home`, else $QE_FACTORY_HOME, else ./factory."""
    return Path(home or os.environ.get(HOME_ENV) or "factory").expanduser().resolve()


def config_environment(home: Path) -> dict[str, str]:
    """Environment variables that make FireWorks, jobflow and qe_factory use this home."""
    return {
        HOME_ENV: str(home),
        "FW_CONFIG_FILE": str(home / "fw_config" / "FW_config.yaml"),
        "JOBFLOW_CONFIG_FILE": str(home / "fw_config" / "jobflow.yaml"),
    }


def init_home(home: Path) -> Path:
    """Create the home once: rendered fw_config/ and templates/, state/ (LaunchPad file, JobStore), logs/.

    Existing files are left alone, so a user's edits (e.g. a MongoDB host) survive.
    """
    values = {"QE_FACTORY_HOME": str(home), "QE_FACTORY_BIN": str(Path(sys.executable).parent)}
    for folder, source in CONFIG_TEMPLATES.items():
        if not source.is_dir():
            raise FileNotFoundError(f"{source} is missing: install qe_factory from its repository (pip install -e .)")
        for template in sorted(source.iterdir()):
            target = home / folder / template.name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                text = template.read_text()
                for name, value in values.items():  # only ours: FireWorks' own $${key} placeholders stay as they are
                    text = text.replace("${" + name + "}", value)
                target.write_text(text)
    (home / "logs").mkdir(exist_ok=True)
    launchpad_file = embedded_file(home)
    if launchpad_file is not None and not launchpad_file.exists():
        launchpad_file.parent.mkdir(parents=True, exist_ok=True)
        launchpad_file.write_text("{}")
    return home


def embedded_file(home: Path) -> Path | None:
    """The embedded LaunchPad's JSON file, or None when the home is configured for MongoDB."""
    settings = yaml.safe_load((home / "fw_config" / "FW_config.yaml").read_text()) or {}
    path = os.environ.get("MONGOMOCK_SERVERSTORE_FILE") or settings.get("MONGOMOCK_SERVERSTORE_FILE")
    return Path(path) if path else None


def activate(home: str | Path | None = None) -> Path:
    """Create the home if needed and point FireWorks and jobflow at it (also if they were imported already)."""
    home = factory_home(home)
    new_store = not (home / "state" / "jobstore").exists()
    init_home(home)
    os.environ.update(config_environment(home))
    if "fireworks.fw_config" in sys.modules:  # imported earlier: re-read the configuration
        fw_config = importlib.reload(sys.modules["fireworks.fw_config"])
        sys.modules["fireworks.core.launchpad"].MongoClient = fw_config.MongoClient
    if "jobflow" in sys.modules:
        import jobflow

        jobflow.SETTINGS = jobflow.settings.JobflowSettings()
    if new_store:
        _create_jobstore()
    return home


def _create_jobstore() -> None:
    """Create the JobStore's collections before any worker starts (montydb races when two processes create them)."""
    store = get_jobstore()
    for sub in (store.docs_store, *store.additional_stores.values()):
        sub.update([{"_qe_factory_init": True, sub.key: "_qe_factory_init"}], key=sub.key)
    store.close()


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
    store = _embedded_store(launchpad)
    if read_only and store is not None:
        store._finalizer.detach()
    elif launchpad.fw_id_assigner.count_documents({}) == 0:  # a new, empty database
        launchpad.reset("", require_password=False)
        if store is not None:
            # The file keeps no indexes, and mongomock checks unique ones by scanning every document on each
            # insert (quadratic bulk adds): continue with a client loaded from the file, as every later one is.
            release_launchpad(launchpad)
            launchpad = LaunchPad.from_file(LAUNCHPAD_LOC)
    return launchpad


def _embedded_store(launchpad: LaunchPad):
    store = getattr(launchpad.connection, "_store", None)
    return store if getattr(store, "_filename", None) else None


def save_launchpad(launchpad: LaunchPad) -> None:
    """Write the embedded LaunchPad to its file now, atomically (no-op with MongoDB)."""
    import bson.json_util

    store = _embedded_store(launchpad)
    if store is None:
        return
    tmp = Path(f"{store._filename}.tmp{os.getpid()}")
    tmp.write_text(bson.json_util.dumps(store.to_dict()))
    os.replace(tmp, store._filename)


def release_launchpad(launchpad: LaunchPad) -> None:
    """Save an embedded LaunchPad now and stop this client from writing again (e.g. at exit), so another process
    (rlaunch, a worker) can be the one client."""
    save_launchpad(launchpad)
    store = _embedded_store(launchpad)
    if store is not None:
        store._finalizer.detach()


def persist_every_change(launchpad: LaunchPad) -> LaunchPad:
    """Make an embedded LaunchPad save itself after each checkout and completion, so a killed worker leaves a
    RUNNING Firework (found by `lpad detect_lostruns`) instead of losing every state change."""
    if _embedded_store(launchpad) is None:
        return launchpad
    for name in ("checkout_fw", "complete_launch", "reserve_fw"):
        original = getattr(launchpad, name)

        def saving(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            save_launchpad(launchpad)
            return result

        setattr(launchpad, name, saving)
    return launchpad


def finished_count(launchpad: LaunchPad) -> int:
    """Structures finished so far: validated, or failed at any stage."""
    validated = launchpad.fireworks.count_documents({"state": "COMPLETED", "spec.stage": "validate"})
    return validated + launchpad.fireworks.count_documents({"state": "FIZZLED"})


MIN_SECONDS_FOR_A_LAUNCH = 60  # a worker in a SLURM job starts no Firework with less time left


def run_worker(
    launchpad: LaunchPad | None = None,
    max_structures: int | None = None,
    nlaunches: int | None = None,
    launch_root: Path | None = None,
    on_launch=None,
) -> int:
    """Run READY Fireworks one after another in this process, saving the LaunchPad after every state change.

    Stops when nothing is READY, after `max_structures` structures finished or `nlaunches` Fireworks ran, when
    less than a minute is left in its SLURM allocation, or after the current Firework once SIGUSR1 arrives (the
    SLURM template sends it before the time limit).
    Returns the number of Fireworks run; `on_launch(launchpad)` is called after each.
    """
    import signal
    import time

    from fireworks import FWorker
    from fireworks.core.rocket_launcher import launch_rocket
    from fireworks.fw_config import FWORKER_LOC

    launchpad = persist_every_change(launchpad or get_launchpad())
    fworker = FWorker.from_file(FWORKER_LOC) if FWORKER_LOC else FWorker()
    launch_root = Path(launch_root or Path.cwd()).resolve()
    stopping: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: stopping.append(signum))
    finished_before, launched = finished_count(launchpad), 0
    try:
        while not stopping and launchpad.run_exists(fworker):
            left = seconds_left_in_allocation()
            if left is not None and left < MIN_SECONDS_FOR_A_LAUNCH:
                break  # leave the rest to the next batch job rather than be killed mid-run
            launch_dir = launch_root / f"launcher_{time.strftime('%Y-%m-%d-%H-%M-%S')}_{os.getpid()}_{launched}"
            launch_dir.mkdir(parents=True)
            cwd = Path.cwd()
            os.chdir(launch_dir)
            try:
                launch_rocket(launchpad, fworker, strm_lvl="WARNING")
            finally:
                os.chdir(cwd)
            launched += 1
            if on_launch:
                on_launch(launchpad)
            if max_structures and finished_count(launchpad) - finished_before >= max_structures:
                break
            if nlaunches and launched >= nlaunches:
                break
    finally:
        signal.signal(signal.SIGUSR1, previous)
        save_launchpad(launchpad)
    return launched


def failure_reason(launch: dict) -> tuple[str, str]:
    """(error type, message) of a FIZZLED launch, from the DFTResult report or the exception's last line."""
    exception = launch.get("action", {}).get("stored_data", {}).get("_exception", {})
    details = exception.get("_details") or {}
    if details.get("error_type"):
        return details["error_type"], details.get("error_message", "")
    last_line = (exception.get("_stacktrace") or "unknown error").strip().splitlines()[-1]
    return "REFUSED" if last_line.startswith(("qe_factory", "StructureError", "Pseudo")) else "ERROR", last_line


def status_report(launchpad: LaunchPad) -> dict:
    """Fireworks per state and stage, workflows per state, and every failure with its reason."""
    counts: dict[str, dict[str, int]] = {}
    stage_of = {}
    for fw in launchpad.fireworks.find({}, {"fw_id": 1, "state": 1, "spec.stage": 1, "spec.uid": 1}):
        stage = fw.get("spec", {}).get("stage") or "scf retry"
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
    import contextlib
    import io

    done = [wf["nodes"][0] for wf in launchpad.workflows.find({"state": "COMPLETED"}, {"nodes": 1})]
    with contextlib.redirect_stdout(io.StringIO()):  # delete_wf prints every id it removes
        for fw_id in done:
            launchpad.delete_wf(fw_id, delete_launch_dirs=False)
    save_launchpad(launchpad)
    return len(done)


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
