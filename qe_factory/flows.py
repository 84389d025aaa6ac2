"""Flows for one structure, and bulk submission to the LaunchPad with refusal and de-duplication."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ase import Atoms
from jobflow import Flow
from pydantic import BaseModel

from qe_factory.config import DFTConfig
from qe_factory.inputs import InputError, InputGenerator
from qe_factory.jobs import PRIORITY, make_inputs, run_scf, validate
from qe_factory.pseudos import PseudopotentialError
from qe_factory.structure import StructureError, atoms_to_dict, check_structure, check_uid, read_structures

REFUSALS = (StructureError, PseudopotentialError, InputError)


def structure_flow(
    atoms: Atoms, uid: str, config: DFTConfig, resources: dict[str, Any] | None = None, key: str | None = None
) -> Flow:
    """inputs → scf (recovers by replacing itself) → validate, for one structure.

    `resources` (e.g. {"ntasks": 4, "walltime": "02:00:00"}) go to the SCF job's `_queueadapter` (qlaunch -r).
    """
    data = config.model_dump(mode="json")
    inputs = make_inputs(atoms_to_dict(atoms), uid, data)
    scf = run_scf(inputs.output)
    check = validate(inputs.output, scf.output)
    for stage, job in (("inputs", inputs), ("scf", scf), ("validate", check)):
        job.name = f"{stage} {uid}" if stage != "scf" else f"scf {uid} attempt 1"
        job.metadata = {"uid": uid, "stage": stage, "qe_factory_key": key}
        manager_config = {"_priority": PRIORITY[stage]}
        if resources and stage == "scf":
            manager_config["_queueadapter"] = dict(resources)
        job.update_config({"manager_config": manager_config})
    return Flow([inputs, scf, check], name=f"qe_factory {uid}")


def structure_key(atoms: Atoms, generator: InputGenerator) -> str:
    """Identity of a calculation: the structure (to 1e-6 Å) and the pw.x settings it would run with."""
    nominal = generator.generate(atoms)
    data = atoms_to_dict(atoms)
    data["positions"] = [[round(x, 6) for x in row] for row in data["positions"]]
    data["cell"] = [[round(x, 6) for x in row] for row in data["cell"]]
    payload = json.dumps([data, nominal.model_dump(mode="json")], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class SubmitReport(BaseModel):
    """What `submit` did with each structure."""

    fw_ids: dict[str, list[int]] = {}  # uid → Firework ids of its workflow
    duplicates: dict[str, str] = {}  # uid → uid already in the LaunchPad with the same structure and settings
    refused: dict[str, str] = {}  # uid → why

    def summary(self) -> str:
        return f"{len(self.fw_ids)} added, {len(self.duplicates)} duplicates skipped, {len(self.refused)} refused"


def submit(
    structures: str | Path | Atoms | Iterable,
    config: DFTConfig,
    launchpad=None,
    resources: dict[str, Any] | None = None,
    uid_prefix: str = "s",
    store=None,
) -> SubmitReport:
    """Add one workflow per structure to the LaunchPad in bulk; bad structures are refused one by one.

    A structure with the same geometry and settings as one already in the LaunchPad (or with a result in `store`,
    a JobStore) is reported, not added.
    """
    from jobflow.managers.fireworks import flow_to_workflow

    from qe_factory.launchpad import get_jobstore, get_launchpad, save_launchpad

    launchpad = launchpad or get_launchpad()
    store = store if store is not None else get_jobstore()
    config = config.model_copy(update={"work_dir": Path(config.work_dir).resolve()})
    generator = InputGenerator(config)
    report, keyed, uids = SubmitReport(), {}, set()
    for index, (uid, atoms) in enumerate(read_structures(structures)):
        uid = str(uid) if uid else f"{uid_prefix}-{index:06d}"
        try:
            check_uid(uid)
            if uid in uids:
                raise StructureError(f"uid {uid!r} is used twice in this submission")
            uids.add(uid)
            check_structure(atoms, config.min_distance_factor)
            key = structure_key(atoms, generator)
        except REFUSALS as exc:
            report.refused[uid] = str(exc)
            continue
        if key in keyed:
            report.duplicates[uid] = keyed[key][0]
            continue
        keyed[key] = (uid, atoms)
    known = list(launchpad.workflows.find(
        {"$or": [{"metadata.qe_factory_key": {"$in": list(keyed)}}, {"metadata.uid": {"$in": sorted(uids)}}]},
        {"metadata.qe_factory_key": 1, "metadata.uid": 1},
    ))
    existing = {doc["metadata"]["qe_factory_key"]: doc["metadata"]["uid"] for doc in known}
    # finished and archived from the LaunchPad: their results are in the JobStore
    archived = {"metadata.stage": "validate", "metadata.qe_factory_key": {"$in": list(keyed)}}
    for doc in store.query(archived, properties=["metadata"]):
        existing.setdefault(doc["metadata"]["qe_factory_key"], doc["metadata"]["uid"])
    taken_uids = {doc["metadata"]["uid"] for doc in known}
    workflows = []
    for key, (uid, atoms) in keyed.items():
        if key in existing:
            report.duplicates[uid] = existing[key]
            continue
        if uid in taken_uids:
            report.refused[uid] = f"uid {uid!r} is already in the LaunchPad for another structure or settings"
            continue
        flow = structure_flow(atoms, uid, config, resources, key)
        workflows.append((uid, flow_to_workflow(flow, metadata={"uid": uid, "qe_factory_key": key})))
    if workflows:
        launchpad.bulk_add_wfs([wf for _, wf in workflows])
        save_launchpad(launchpad)
    report.fw_ids = {uid: sorted(fw.fw_id for fw in wf) for uid, wf in workflows}
    return report
