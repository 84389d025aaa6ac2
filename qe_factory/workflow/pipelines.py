"""The factory's pipelines as Python calls: `label` (what `qe-factory run` does) and `home_e0s` (`qe-factory e0s`).

Each activates its home, becomes its coordinator, submits, runs the work with local worker processes, and returns a
report; a `Listener` hears of each step as it happens (the CLI draws its progress bar and lines from it).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ase import Atoms
from pydantic import BaseModel

from qe_factory.engine.config import DFTConfig
from qe_factory.engine.export import EXPORT_FORMATS, Export, write_labels
from qe_factory.engine.protocol import Protocol
from qe_factory.engine.references import E0, element_references, isolated_atom
from qe_factory.engine.results import DFTResult
from qe_factory.engine.structure import read_structures
from qe_factory.workflow import state
from qe_factory.workflow.cards import export_card
from qe_factory.workflow.coordinator import local_workers, run_coordinator
from qe_factory.workflow.history import Story, home_history
from qe_factory.workflow.home import activate, embedded_file
from qe_factory.workflow.lock import command_line, coordinate
from qe_factory.workflow.protocols import DEFAULT_DATASET, settle_submission
from qe_factory.workflow.submit import SubmitReport, submit_data_set, submit_references


class Listener:
    """What a pipeline tells as it goes; every method does nothing here (override what you want to hear)."""

    def started(self, home: Path, launchpad: str, structures: int) -> None: ...

    def settled(self, protocol: Protocol | None) -> None:
        """The structures joined their data set, whose protocol this is (None: no element to serve)."""

    def references_submitted(self, reports: list[SubmitReport]) -> None: ...

    def submitted(self, report: SubmitReport, labelled_before: dict[str, DFTResult]) -> None: ...

    def finished(self, story: Story) -> None:
        """A structure (or an isolated-atom reference) finished in this run: labelled, failed or refused."""

    def exported(self, export: Export) -> None: ...


class LabelReport(BaseModel):
    """What `label` did with each structure it was given."""

    home: str
    structures: int
    labelled: list[str] = []  # uids with a label (this run's or an earlier one's)
    failed: dict[str, str] = {}  # uid → cause
    refused: dict[str, str] = {}  # uid → why (at submission or at the inputs stage)
    duplicates: dict[str, str] = {}  # uid → the uid with the same structure and settings
    output: str | None = None
    written: int = 0  # labels written to `output`
    e0s: dict[str, float] = {}  # element → E0 (eV) written beside them

    @property
    def neither(self) -> int:
        """Structures neither labelled, failed nor refused: duplicates of another uid, or still waiting."""
        return self.structures - len(self.labelled) - len(self.failed) - len(self.refused)

    def summary(self) -> str:
        return (f"{self.written} labelled structures in {self.output}; {len(self.failed)} failed; "
                f"{len(self.refused)} refused; {self.neither} neither (duplicates of another uid, or waiting)")


def label(
    structures: str | Path | Atoms | Iterable,
    config: DFTConfig | None = None,
    home: str | Path | None = None,
    output: str | Path | None = "results.extxyz",
    *,
    parallel: int | None = None,
    export_format: str = EXPORT_FORMATS[0],
    config_type: str | None = None,
    include_marked: bool = False,
    e0s: bool = True,
    live_logs: bool = False,
    listener: Listener | None = None,
    dataset: str = DEFAULT_DATASET,
) -> LabelReport:
    """Label structures (a file ASE reads, Atoms, or an iterable of them) in a factory home — the whole pipeline of
    `qe-factory run`: the structures settled against the protocol of data set `dataset` of the home (pinned by its
    first submission: raises protocol.ProtocolError for structures or a config that would mix settings in it), the
    isolated-atom references (E0s) of every element it covers first (unless `e0s` is False), then one workflow per
    structure, run by `parallel` local pw.x processes (default: chosen from the cores), and the
    labels with their E0s exported to `output` (None: no export). Runs as the home's coordinator (raises
    lock.HomeBusy if another process is). FireWorks' and jobflow's lines go to the home's logs/worker.log
    (`live_logs`: to the terminal)."""
    listener = listener or Listener()
    config = config or DFTConfig()
    home = activate(home)
    log = None if live_logs else home / "logs" / "worker.log"
    with coordinate(home, command_line()):  # the home's one writer from the first submit to the last save
        given = read_structures(structures)
        workers = local_workers(config.execution, parallel, len(given), log)  # they start up while we submit
        try:
            launchpad, store = state.get_launchpad(), state.get_jobstore()
            listener.started(home, str(embedded_file(home) or "MongoDB"), len(given))
            for index, (uid, atoms) in enumerate(given):
                atoms.info["uid"] = uid or f"s-{index:06d}"  # as submit names a structure that brought none
            data_set = submit_data_set([atoms for _, atoms in given], config, launchpad, store, dataset=dataset,
                                       e0s=e0s)
            references, submitted = data_set.references, data_set.report  # uid → Reference (E0): every element's
            listener.settled(data_set.protocol)
            if e0s:
                listener.references_submitted(data_set.reference_reports)
            before = {result.uid: result for result in state.load_results(store, list(submitted.duplicates))}
            listener.submitted(submitted, before)
        except BaseException:
            workers.close()  # the coordinator, which closes them, never started
            raise

        def finished(uid: str, fw_state: str) -> None:
            for story in home_history(home, launchpad, store, uids=[uid], load=True, submissions=False):
                listener.finished(story)

        run_coordinator(launchpad, launch_root=home / "launches", on_finished=finished, execution=config.execution,
                        log=log, workers=workers)
        uids = [atoms.info["uid"] for _, atoms in given]
        report = outcome_report(home, launchpad, store, uids, submitted)
    if output is not None:
        results = state.load_results(store, [uid for uid in uids if uid not in submitted.refused])
        export = write_labels(results + state.load_results(store, list(references)), output, include_marked,
                              export_format, config_type, config.sanitizer)
        export_card(home, launchpad, store, output, export_format, export, [*uids, *references], config.sanitizer,
                    dataset)
        listener.exported(export)
        report.output, report.written, report.e0s = str(output), export.labels, export.e0s
    return report


def outcome_report(home: Path, launchpad, store, uids: list[str], submitted: SubmitReport) -> LabelReport:
    """The outcome of each of `uids`, from the home's one read model (history.home_history)."""
    report = LabelReport(home=str(home), structures=len(uids), refused=dict(submitted.refused),
                         duplicates=dict(submitted.duplicates))
    for story in home_history(home, launchpad, store, uids=uids):
        if story.outcome == "labelled" and story.uid not in submitted.refused:
            report.labelled.append(story.uid)
        elif story.outcome == "failed":
            report.failed[story.uid] = story.message or ""
        elif story.outcome == "refused":
            report.refused.setdefault(story.uid, story.message or "")
    return report


def home_e0s(
    elements: Iterable[str], config: DFTConfig | None = None, home: str | Path | None = None, *,
    parallel: int | None = None, live_logs: bool = False, listener: Listener | None = None,
    dataset: str = DEFAULT_DATASET,
) -> dict[str, E0 | str]:
    """The isolated-atom energies (E0s) of `elements` with the settings of data set `dataset` of the home (its
    protocol, settled with these elements as a submission is), computed once per element and settings through the
    home's workflows (recovery, parallel workers); element → E0, or why it has none. Raises ValueError for an
    unknown element, protocol.ProtocolError for one the data set cannot take, and what
    engine.references.element_references raises for one the factory cannot compute."""
    listener = listener or Listener()
    config = config or DFTConfig()
    home = activate(home)
    log = None if live_logs else home / "logs" / "worker.log"
    with coordinate(home, command_line()):
        atoms = [isolated_atom(element, config) for element in elements]  # (a ValueError for an unknown one)
        protocol = settle_submission(home, config, atoms, dataset)
        references = element_references(list(elements), protocol.config(config) if protocol else config)
        launchpad, store = state.get_launchpad(), state.get_jobstore()
        pending = len(references) - len(state.stored_e0s(store, references))
        listener.references_submitted(submit_references(references, launchpad, store, dataset=dataset))
        if pending:  # references first (REFERENCE_PRIORITY); no new work once they are done
            workers = local_workers(config.execution, parallel, pending, log)
            run_coordinator(launchpad, max_structures=pending, launch_root=home / "launches",
                            execution=config.execution, log=log, workers=workers)
        stories = {s.uid: s for s in home_history(home, launchpad, store, uids=[ref.uid for ref in references])}
    done = state.stored_e0s(store, references)
    out: dict[str, Any] = {}
    for ref in references:
        story = stories.get(ref.uid)
        out[ref.element] = done.get(ref.uid) or (story.message if story and story.message else
                                                 "not computed (see qe-factory status)")
    return out

