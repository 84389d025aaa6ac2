"""`qe-factory repair`: rebuild a home's damaged or missing state from what survives, and say what could not be.

Sources, best first: the previous good LaunchPad file (kept at every save), the launch directories (FireWorks
writes each Firework it runs there as FW.json, with the workflow's Maker, config and policy), the JobStore
(finished results). Damaged files are moved aside, never deleted.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from qe_factory.workflow import state
from qe_factory.workflow.fireworks_adapter import reload_configuration
from qe_factory.workflow.home import embedded_file
from qe_factory.workflow.lock import command_line, coordinate


def _readable_json(path: Path) -> bool:
    import bson.json_util

    try:
        bson.json_util.loads(path.read_text())
        return path.stat().st_size > 0
    except (OSError, ValueError):
        return False


def _move_aside(path: Path) -> Path:
    target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(target)
    return target


def repair_launchpad_file(file: Path) -> tuple[list[str], bool]:
    """Make the LaunchPad file readable again; (what was done, whether it was started empty)."""
    if file.is_file() and _readable_json(file):
        return [f"LaunchPad file {file}: readable"], False
    lines = []
    if file.exists():
        lines.append(f"LaunchPad file {file} is damaged: moved to {_move_aside(file)}")
    else:
        lines.append(f"LaunchPad file {file} is missing")
    previous = file.with_name(f"{file.name}.prev")
    if previous.is_file() and _readable_json(previous):
        shutil.copyfile(previous, file)
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(previous.stat().st_mtime))
        lines.append(f"restored the previous good state (saved {saved}); later changes are rebuilt below")
        return lines, False
    file.write_text("{}")
    lines.append("no previous good state: started an empty LaunchPad")
    return lines, True


def repair_jobstore(home: Path) -> list[str]:
    """A readable JobStore: the existing one, or a new one with the damaged one moved aside."""
    from qe_factory.workflow.home import create_jobstore

    folder = home / "state" / "jobstore"
    try:
        state.get_jobstore()
        return [f"JobStore {folder}: readable"]
    except state.StateError as exc:
        lines = [f"JobStore {folder}: {exc}".split(". Nothing was changed")[0]]
    if folder.exists():
        lines.append(f"moved it to {_move_aside(folder)}; the results it held are lost (resubmit to recompute)")
    reload_configuration()  # a fresh JobStore object: the old one points at the moved folder
    create_jobstore()
    lines.append("created a new, empty JobStore")
    return lines


def rebuild_from_launch_dirs(home: Path, launchpad, store) -> list[str]:
    """Add back the workflows of structures that left a launch directory but are neither in the LaunchPad nor
    finished in the JobStore, from the inputs Firework's FW.json (its Maker carries the config and policy)."""
    from fireworks import Firework

    present, finished = state.workflow_uids(launchpad), state.labelled_uids(store)
    rebuilt, unreadable = {}, []
    for path in sorted(home.rglob("launcher_*/FW.json")):
        try:
            firework = Firework.from_file(str(path))
        except Exception:  # a launch directory of a damaged run
            unreadable.append(path)
            continue
        if firework.spec.get("stage") != "inputs":
            continue
        job = firework.tasks[0]["job"]
        uid = job.metadata.get("uid")
        if uid in present or uid in finished or uid in rebuilt:
            continue
        rebuilt[uid] = rebuilt_workflow(firework)
    if rebuilt:
        state.add_workflows(launchpad, list(rebuilt.values()))
    lines = [f"rebuilt {len(rebuilt)} unfinished workflow(s) from launch directories: {sorted(rebuilt)}"]
    if rebuilt:
        lines.append("  (their per-structure SLURM resources, if any, are not rebuilt: defaults apply)")
    if unreadable:
        lines.append(f"  {len(unreadable)} launch director(ies) had no readable FW.json: {unreadable[:3]}")
    return lines


def rebuilt_workflow(inputs_firework):
    """A new workflow for the structure of an inputs Firework (its job's Maker carries the config and policy; its
    FireWorks priority is kept)."""
    from jobflow.managers.fireworks import flow_to_workflow

    from qe_factory.workflow.jobs import PRIORITY

    job = inputs_firework.tasks[0]["job"]
    uid, key = job.metadata.get("uid"), job.metadata.get("qe_factory_key")
    structure, _ = job.function_args
    priority = inputs_firework.spec.get("_priority", PRIORITY["inputs"]) - PRIORITY["inputs"]
    flow = job.function.__self__.make(structure.to_atoms(), uid, None, key, priority)
    return flow_to_workflow(flow, allow_external_references=True, metadata={"uid": uid, "qe_factory_key": key})


def restart_without_lost_outputs(launchpad, store) -> list[str]:
    """Rebuild the unfinished workflows whose finished jobs' outputs are not in the JobStore (a JobStore repaired
    between a structure's SCF and its validation): their next job could not resolve its references."""
    lost = state.workflows_missing_outputs(launchpad, store)
    for inputs_fw_id in lost.values():
        firework = launchpad.get_fw_by_id(inputs_fw_id)
        state.archive(launchpad, inputs_fw_id)
        state.add_workflows(launchpad, [rebuilt_workflow(firework)])
    if not lost:
        return []
    return [f"{len(lost)} unfinished workflow(s) had finished jobs whose outputs the JobStore lost: started again "
            f"from their inputs: {sorted(lost)}"]


def repair(home: Path) -> list[str]:
    """Repair the home's state as its coordinator; one line per finding or action."""
    from qe_factory.workflow.coordinator import rerun_orphans

    with coordinate(home, command_line()):
        lines = []
        file = embedded_file(home)
        started_empty = False
        if file is not None:
            found, started_empty = repair_launchpad_file(file)
            lines += found
        lines += repair_jobstore(home)
        launchpad, store = state.get_launchpad(), state.get_jobstore()
        lines += restart_without_lost_outputs(launchpad, store)
        if file is not None:
            lines += rebuild_from_launch_dirs(home, launchpad, store)
            if lost := rerun_orphans(launchpad):
                lines.append(f"{len(lost)} Firework(s) left RUNNING by a dead worker put back to READY")
        finished = state.labelled_uids(store)
        gone = [(fw_id, uid) for fw_id, uid in state.completed_workflows(launchpad) if uid not in finished]
        for fw_id, _ in gone:
            state.archive(launchpad, fw_id)
        if gone:
            lines.append(f"{len(gone)} COMPLETED workflow(s) had no result in the JobStore: removed, so that "
                         f"resubmitting them recomputes them: {sorted(uid for _, uid in gone)}")
        if started_empty:
            lines.append("structures that never started a Firework are not recoverable from anything on disk: "
                         "submit the same file again (what is already here or finished is skipped as a duplicate)")
        state.save_launchpad(launchpad)
        return lines
