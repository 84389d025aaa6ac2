"""Flows for one structure, and bulk submission to the LaunchPad with refusal and de-duplication."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ase import Atoms
from pydantic import BaseModel

from qe_factory.engine.config import DFTConfig
from qe_factory.engine.inputs import InputGenerator
from qe_factory.engine.preflight import nominal_input
from qe_factory.engine.recovery import RecoveryHandler
from qe_factory.engine.runner import REFUSALS
from qe_factory.engine.structure import StructureDoc, StructureError, check_structure, check_uid, read_structures
from qe_factory.workflow.jobs import LabelMaker


def structure_key(atoms: Atoms, generator: InputGenerator) -> str:
    """Identity of a calculation: the structure (to 1e-6 Å) and the pw.x settings it would run with (raises one of
    REFUSALS for input refused before pw.x runs)."""
    nominal = nominal_input(atoms, generator)
    data = StructureDoc.from_atoms(atoms).model_dump()
    data["positions"] = [[round(x, 6) for x in row] for row in data["positions"]]
    data["cell"] = [[round(x, 6) for x in row] for row in data["cell"]]
    payload = json.dumps([data, nominal.model_dump(mode="json")], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class SubmitReport(BaseModel):
    """What `submit` did with each structure."""

    fw_ids: dict[str, list[int]] = {}  # uid → Firework ids of its workflow
    duplicates: dict[str, str] = {}  # uid → uid already in the LaunchPad with the same structure and settings
    refused: dict[str, str] = {}  # uid → why
    queued: list[str] = []  # uids left in the inbox for the home's running coordinator to add
    inbox_file: str | None = None

    def summary(self) -> str:
        added = f"{len(self.fw_ids)} added" if not self.queued else (
            f"{len(self.queued)} queued in {self.inbox_file} for the running coordinator to add"
        )
        return f"{added}, {len(self.duplicates)} duplicates skipped, {len(self.refused)} refused"


def submit(
    structures: str | Path | Atoms | Iterable,
    config: DFTConfig,
    launchpad=None,
    resources: dict[str, Any] | None = None,
    uid_prefix: str = "s",
    store=None,
    recovery: RecoveryHandler | None = None,
) -> SubmitReport:
    """Add one workflow per structure to the LaunchPad in bulk; bad structures are refused one by one.

    A structure with the same geometry and settings as one already in the LaunchPad (or with a result in `store`,
    a JobStore) is reported, not added. `config` (its physics; execution settings stay with the workers) and
    `recovery` (default RecoveryHandler(), or your subclass) travel with every workflow.

    Without a `launchpad` (the documented entry point), the embedded LaunchPad of the active home is written only as
    its coordinator: when another process coordinates the home, the workflows go to the home's inbox instead and
    that process adds them (`report.queued`).
    """
    from qe_factory.workflow.coordinator import coordinate, holder, post, take_in
    from qe_factory.workflow.home import embedded_file, factory_home
    from qe_factory.workflow.launchpad import get_jobstore, get_launchpad, save_launchpad

    store = store if store is not None else get_jobstore()
    if launchpad is not None:
        report, workflows = build_workflows(structures, config, launchpad, store, resources, uid_prefix, recovery)
        add_workflows(launchpad, report, workflows)
        return report
    home = factory_home()
    if embedded_file(home) is not None and holder(home) is not None:  # another process coordinates the home
        report, workflows = build_workflows(
            structures, config, get_launchpad(read_only=True), store, resources, uid_prefix, recovery
        )
        if workflows:
            report.inbox_file = str(post(home, [wf for _, wf in workflows]))
            report.queued = [uid for uid, _ in workflows]
        return report
    with coordinate(home, "submit"):
        launchpad = get_launchpad()
        take_in(home, launchpad, save_launchpad)  # what earlier submissions left for a coordinator
        report, workflows = build_workflows(structures, config, launchpad, store, resources, uid_prefix, recovery)
        add_workflows(launchpad, report, workflows)
    return report


def add_workflows(launchpad, report: SubmitReport, workflows: list) -> None:
    from qe_factory.workflow.launchpad import save_launchpad

    if workflows:
        launchpad.bulk_add_wfs([wf for _, wf in workflows])
        save_launchpad(launchpad)
    report.fw_ids = {uid: sorted(fw.fw_id for fw in wf) for uid, wf in workflows}


def build_workflows(
    structures, config: DFTConfig, launchpad, store, resources=None, uid_prefix: str = "s",
    recovery: RecoveryHandler | None = None,
) -> tuple[SubmitReport, list]:
    """The report (refusals, duplicates against the batch, the LaunchPad and the JobStore) and the (uid, Workflow)
    pairs to add."""
    from jobflow.managers.fireworks import flow_to_workflow

    maker = LabelMaker(config=config, recovery=recovery or RecoveryHandler())
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
    archived = {"metadata.stage": "validate", "$or": [
        {"metadata.qe_factory_key": {"$in": list(keyed)}}, {"metadata.uid": {"$in": sorted(uids)}},
    ]}
    labelled: dict[str, str] = {}  # uid → key of its label
    for doc in store.query(archived, properties=["metadata"]):
        existing.setdefault(doc["metadata"]["qe_factory_key"], doc["metadata"]["uid"])
        labelled[doc["metadata"]["uid"]] = doc["metadata"]["qe_factory_key"]
    taken_uids = {doc["metadata"]["uid"] for doc in known}
    workflows = []
    for key, (uid, atoms) in keyed.items():
        if key in existing:
            report.duplicates[uid] = existing[key]
            continue
        if uid in taken_uids:
            report.refused[uid] = f"uid {uid!r} is already in the LaunchPad for another structure or settings"
            continue
        if uid in labelled:  # one uid, one label: a data set never holds two for the same name
            report.refused[uid] = (f"uid {uid!r} already has a label made with another structure or other settings; "
                                   "give this calculation another uid")
            continue
        flow = maker.make(atoms, uid, resources, key)
        workflows.append((uid, flow_to_workflow(flow, metadata={"uid": uid, "qe_factory_key": key})))
    return report, workflows
