"""Bulk submission: structures (and the isolated-atom references their E0s need) to the LaunchPad or the home's
inbox, one workflow each (jobs.LabelMaker), with refusal and de-duplication."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ase import Atoms
from pydantic import BaseModel

from qe_factory.engine.config import DFTConfig
from qe_factory.engine.inputs import InputGenerator
from qe_factory.engine.preflight import nominal_input
from qe_factory.engine.protocol import Protocol
from qe_factory.engine.recovery import RecoveryHandler
from qe_factory.engine.references import Reference, element_references, isolated_atom
from qe_factory.engine.runner import REFUSALS
from qe_factory.engine.structure import StructureDoc, StructureError, check_structure, check_uid, read_structures
from qe_factory.workflow import state
from qe_factory.workflow.jobs import REFERENCE_PRIORITY, LabelMaker
from qe_factory.workflow.protocols import DEFAULT_DATASET, settle_submission


def structure_key(atoms: Atoms, generator: InputGenerator) -> str:
    """Identity of a calculation: the structure (to 1e-6 Å) and the pw.x settings it would run with (raises one of
    REFUSALS for input refused before pw.x runs)."""
    nominal = nominal_input(atoms, generator)
    data = StructureDoc.from_atoms(atoms).model_dump(exclude={"config_type"})  # a label, not the calculation
    data["positions"] = [[round(x, 6) for x in row] for row in data["positions"]]
    data["cell"] = [[round(x, 6) for x in row] for row in data["cell"]]
    # starting_moments: derived from what is hashed already (left out: the keys of labels made before it existed)
    payload = json.dumps([data, nominal.model_dump(mode="json", exclude={"starting_moments"})], sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


Progress = Callable[[Iterable, str], Iterable]  # wraps items with a description: e.g. a tqdm progress bar


def no_progress(items: Iterable, description: str) -> Iterable:
    return items


class SubmitReport(BaseModel):
    """What `submit` did with each structure."""

    fw_ids: dict[str, list[int]] = {}  # uid → Firework ids of its workflow
    duplicates: dict[str, str] = {}  # uid → uid already in the LaunchPad with the same structure and settings
    refused: dict[str, str] = {}  # uid → why
    formulas: dict[str, str] = {}  # uid → chemical formula, of the refused structures
    queued: list[str] = []  # uids left in the inbox for the home's running coordinator to add
    inbox_files: list[str] = []  # where they were left, in order

    def summary(self) -> str:
        queued = (f", {len(self.queued)} queued in {len(self.inbox_files)} inbox file(s) (the coordinator takes "
                  "them in as the LaunchPad empties)") if self.queued else ""
        skipped = f"{len(self.duplicates)} duplicates skipped, {len(self.refused)} refused"
        return f"{len(self.fw_ids)} added{queued}, {skipped}"


def submit(
    structures: str | Path | Atoms | Iterable,
    config: DFTConfig,
    launchpad=None,
    resources: dict[str, Any] | None = None,
    uid_prefix: str = "s",
    store=None,
    recovery: RecoveryHandler | None = None,
    progress: Progress | None = None,
    priority: int = 0,
    dataset: str = DEFAULT_DATASET,
) -> SubmitReport:
    """Add one workflow per structure to the LaunchPad in bulk; bad structures are refused one by one.

    The structures join data set `dataset` of the home and run with its protocol (workflow.protocols: pinned at its
    first submission; its one cutoff pair replaces `config`'s None); a submission that would mix settings in it
    raises protocol.ProtocolError before anything is added.

    A structure with the same geometry and settings as one already in the LaunchPad (or with a result in `store`,
    a JobStore) is reported, not added. `config` (its physics; execution settings stay with the workers) and
    `recovery` (default RecoveryHandler(), or your subclass) travel with every workflow; `priority` is added to
    their Fireworks' `_priority` (jobs.REFERENCE_PRIORITY for isolated-atom references).

    With the embedded LaunchPad (no MongoDB), the workflows go through the home's inbox (files of POST_FILE_SIZE):
    this process, as the home's coordinator, takes in as many as keep the LaunchPad at LAUNCHPAD_WORKFLOWS
    unfinished ones (`report.fw_ids`); the rest (`report.queued`) are taken in by the coordinator as workflows
    finish. When another process coordinates the home, all go to the inbox for it (never beside it into the file).
    `progress(items, description)` wraps the structures as they are checked and the workflows as they are made
    (e.g. a tqdm progress bar).
    """
    from qe_factory.workflow.history import record_refusals
    from qe_factory.workflow.home import factory_home

    progress = progress or no_progress
    store = store if store is not None else state.get_jobstore()
    home = factory_home()
    structures = read_structures(structures)
    protocol = settle_submission(home, config, [atoms for _, atoms in structures], dataset)
    config = protocol.config(config) if protocol else config
    report = _submit(structures, config, launchpad, resources, uid_prefix, store, recovery, home, progress, priority)
    record_refusals(home, report.refused, report.formulas)  # status, show and report tell them later
    return report


def _submit(
    structures, config, launchpad, resources, uid_prefix, store, recovery, home, progress, priority
) -> SubmitReport:
    from qe_factory.workflow.fireworks_adapter import embedded_store
    from qe_factory.workflow.home import embedded_file
    from qe_factory.workflow.inbox import LAUNCHPAD_WORKFLOWS, take_in
    from qe_factory.workflow.lock import HomeBusy, coordinate
    from qe_factory.workflow.state import get_launchpad, save_launchpad

    if launchpad is None and embedded_file(home) is None:
        launchpad = get_launchpad()
    if launchpad is not None and embedded_store(launchpad) is None:  # MongoDB: straight in, in bulk
        report, workflows = build_workflows(structures, config, launchpad, store, resources, uid_prefix, recovery,
                                            progress, priority)
        add_workflows(launchpad, report, workflows)
        return report
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(coordinate(home, "submit"))
        except HomeBusy:
            if launchpad is not None:  # a client of the caller's: writing through it needs the lock
                raise
            # another process coordinates the home (also one that took the lock a moment ago): all to its inbox
            report, planned = plan_workflows(structures, config, get_launchpad(read_only=True), store, uid_prefix,
                                             progress)
            post_planned(home, report, progress(planned, "workflows"), config, resources, recovery, priority)
            return report
        launchpad = launchpad or get_launchpad()
        report, planned = plan_workflows(structures, config, launchpad, store, uid_prefix, progress)
        post_planned(home, report, progress(planned, "workflows"), config, resources, recovery, priority)
        intakes = take_in(home, launchpad, save_launchpad, store, LAUNCHPAD_WORKFLOWS)
    added = {uid: ids for intake in intakes for uid, ids in intake.added.items()}
    report.fw_ids = {uid: added[uid] for uid in report.queued if uid in added}
    report.queued = [uid for uid in report.queued if uid not in added]
    report.inbox_files = [path for path in report.inbox_files if Path(path).exists()]
    return report


def post_planned(home: Path, report: SubmitReport, planned: Iterable[Planned], config, resources, recovery,
                 priority: int = 0) -> None:
    """Make the planned workflows and write them to the inbox one at a time (never all in memory)."""
    from qe_factory.workflow.inbox import post

    def workflows() -> Iterator:
        for uid, workflow in make_workflows(planned, config, resources, recovery, priority):
            report.queued.append(uid)
            yield workflow

    report.inbox_files = [str(path) for path in post(home, workflows())]


def add_workflows(launchpad, report: SubmitReport, workflows: list) -> None:
    if workflows:
        state.add_workflows(launchpad, [wf for _, wf in workflows])
        state.save_launchpad(launchpad)
    report.fw_ids = {uid: sorted(fw.fw_id for fw in wf) for uid, wf in workflows}


class Planned(NamedTuple):
    """A structure to make a workflow for: its uid, the structure, the calculation key."""

    uid: str
    atoms: Atoms
    key: str


def build_workflows(
    structures, config: DFTConfig, launchpad, store, resources=None, uid_prefix: str = "s",
    recovery: RecoveryHandler | None = None, progress: Progress | None = None, priority: int = 0,
) -> tuple[SubmitReport, list]:
    """The report (refusals, duplicates against the batch, the LaunchPad and the JobStore) and the (uid, Workflow)
    pairs to add, all made at once (`plan_workflows` then `make_workflows` makes them one at a time)."""
    progress = progress or no_progress
    report, planned = plan_workflows(structures, config, launchpad, store, uid_prefix, progress)
    return report, list(make_workflows(progress(planned, "workflows"), config, resources, recovery, priority))


def plan_workflows(
    structures, config: DFTConfig, launchpad, store, uid_prefix: str = "s", progress: Progress | None = None,
) -> tuple[SubmitReport, list[Planned]]:
    """The report (refusals, duplicates against the batch, the LaunchPad and the JobStore) and the structures to
    make workflows for, in order."""
    generator = InputGenerator(config)
    report, keyed, uids = SubmitReport(), {}, set()
    for index, (uid, atoms) in enumerate((progress or no_progress)(read_structures(structures), "checking")):
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
            report.formulas[uid] = atoms.get_chemical_formula()
            continue
        if key in keyed:
            report.duplicates[uid] = keyed[key][0]
            continue
        keyed[key] = (uid, atoms)
    known = state.workflows_with(launchpad, keyed, uids)
    existing = {meta["qe_factory_key"]: meta["uid"] for meta in known}
    labelled: dict[str, str] = {}  # uid → key of its label (finished; its workflow has left the LaunchPad)
    for meta in state.labels_with(store, keyed, uids):
        existing.setdefault(meta["qe_factory_key"], meta["uid"])
        labelled[meta["uid"]] = meta["qe_factory_key"]
    taken_uids = {meta["uid"] for meta in known}
    planned = []
    for key, (uid, atoms) in keyed.items():
        if key in existing:
            report.duplicates[uid] = existing[key]
            continue
        if uid in taken_uids:
            report.refused[uid] = f"uid {uid!r} is already in the LaunchPad for another structure or settings"
        elif uid in labelled:  # one uid, one label: a data set never holds two for the same name
            report.refused[uid] = (f"uid {uid!r} already has a label made with another structure or other settings; "
                                   "give this calculation another uid")
        if uid in report.refused:
            report.formulas[uid] = atoms.get_chemical_formula()
            continue
        planned.append(Planned(uid, atoms, key))
    return report, planned


def make_workflows(
    planned: Iterable[Planned], config: DFTConfig, resources=None, recovery: RecoveryHandler | None = None,
    priority: int = 0,
) -> Iterator[tuple[str, Any]]:
    """(uid, Workflow) of each planned structure, made as they are asked for: a bulk submission streamed to the
    inbox (`coordinator.post`) never holds them all."""
    from jobflow.managers.fireworks import flow_to_workflow

    maker = LabelMaker(config=config, recovery=recovery or RecoveryHandler())
    for uid, atoms, key in planned:
        flow = maker.make(atoms, uid, resources, key, priority)
        # the Flow's references are all its own (LabelMaker.make): no need for jobflow to serialise it to check
        yield uid, flow_to_workflow(flow, allow_external_references=True, metadata={"uid": uid, "qe_factory_key": key})


def submit_references(
    references: Iterable[Reference], launchpad=None, store=None, resources=None,
    recovery: RecoveryHandler | None = None, dataset: str = DEFAULT_DATASET,
) -> list[SubmitReport]:
    """Submit the isolated-atom workflows of `references` that have no result yet (one per uid: element and
    settings), ahead of the structures (REFERENCE_PRIORITY); one `submit` per distinct config."""
    store = store if store is not None else state.get_jobstore()
    references = list(references)
    done = state.stored_e0s(store, references)
    groups: dict[str, tuple[DFTConfig, list[Atoms]]] = {}
    for ref in references:
        if ref.uid in done:
            continue
        atoms = isolated_atom(ref.element, ref.config)
        atoms.info["uid"] = ref.uid
        groups.setdefault(ref.config.model_dump_json(), (ref.config, []))[1].append(atoms)
    return [submit(atoms, config, launchpad=launchpad, store=store, resources=resources, recovery=recovery,
                   priority=REFERENCE_PRIORITY, dataset=dataset) for config, atoms in groups.values()]


class DataSetSubmission(NamedTuple):
    """What `submit_data_set` did: the data set's protocol, the E0 submissions, the structures' submission."""

    protocol: Protocol | None
    references: dict[str, Reference]  # uid → the E0 of each element the protocol covers
    reference_reports: list[SubmitReport]
    report: SubmitReport


def submit_data_set(
    structures: str | Path | Atoms | Iterable, config: DFTConfig, launchpad=None, store=None, resources=None,
    dataset: str = DEFAULT_DATASET, e0s: bool = True, progress: Progress | None = None,
) -> DataSetSubmission:
    """Submit structures to data set `dataset` of the factory home: settle them against its protocol (raises
    protocol.ProtocolError for a submission that would mix settings), then the E0s of every element the protocol
    covers that have none yet (unless `e0s` is False), then the structures — all with the protocol's settings."""
    from qe_factory.workflow.home import factory_home

    given = read_structures(structures)
    protocol = settle_submission(factory_home(), config, [atoms for _, atoms in given], dataset)
    config = protocol.config(config) if protocol else config
    references = {ref.uid: ref for ref in element_references(protocol.elements, config)} if protocol else {}
    reference_reports = submit_references(references.values(), launchpad, store, resources,
                                          dataset=dataset) if e0s else []
    report = submit(given, config, launchpad=launchpad, store=store, resources=resources, progress=progress,
                    dataset=dataset)
    return DataSetSubmission(protocol, references, reference_reports, report)
