"""Structures in, labels out: submit, run (the whole pipeline), export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from qe_factory.cli.format import (
    export_lines,
    failure_line,
    progress_bar,
    protocol_line,
    reference_lines,
    summary_line,
)
from qe_factory.cli.options import config_from, resources_from
from qe_factory.engine.results import DFTResult
from qe_factory.engine.structure import read_structures
from qe_factory.workflow.pipelines import Listener, label


def submit_cmd(args: argparse.Namespace) -> int:
    """Add one workflow per structure to the LaunchPad."""
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.state import get_jobstore
    from qe_factory.workflow.submit import submit_data_set

    activate(args.home)

    config = config_from(args)
    if config.execution.model_fields_set:
        print(f"note: {', '.join(sorted(config.execution.model_fields_set))} are execution settings: they stay with "
              "the workers (qe-factory worker -c FILE, or QE_FACTORY_<KEY>), not with the workflows")
    submitted = submit_data_set(args.structures, config, store=get_jobstore(), resources=resources_from(args),
                                dataset=args.dataset, e0s=not args.no_e0s, progress=progress_bar)
    if submitted.protocol is not None:
        print(protocol_line(submitted.protocol))
    for line in reference_lines(submitted.reference_reports):
        print(line)
    report = submitted.report
    for uid, why in report.refused.items():
        print(f"{uid:<24} REFUSED {why}")
    for uid, other in report.duplicates.items():
        print(f"{uid:<24} DUPLICATE of {other} (same structure and settings)")
    print(report.summary())
    if report.queued:
        print("queued structures wait in the home's inbox; the coordinator (qe-factory run/worker/qlaunch) takes them "
              "in as workflows finish; `qe-factory status` shows the inbox")
    return 0


class RunLines(Listener):
    """`qe-factory run` on the terminal: a progress bar over the structures and a line per structure."""

    def __init__(self, uids: set[str], output):
        self.uids, self.output, self.progress = uids, output, None
        self.counted: set[str] = set()  # structures the bar has counted: each once, also after a restart

    def count(self, uid: str) -> None:
        if uid in self.uids and uid not in self.counted:
            self.counted.add(uid)
            self.progress.update(1)

    def started(self, home: Path, launchpad: str, structures: int) -> None:
        print(f"factory home {home}; LaunchPad {launchpad}; {structures} structures")

    def settled(self, protocol) -> None:
        if protocol is not None:
            print(protocol_line(protocol))

    def references_submitted(self, reports: list) -> None:
        for line in reference_lines(reports):
            print(line)

    def submitted(self, report, labelled_before: dict[str, DFTResult]) -> None:
        self.progress = tqdm(total=len(self.uids), desc="structures", unit="structure", file=sys.stderr)
        for uid, why in report.refused.items():
            tqdm.write(f"{uid:<24} REFUSED {why}")
            self.count(uid)
        for uid, other in report.duplicates.items():
            if other == uid and uid not in labelled_before:  # submitted before and not finished: it runs now
                continue
            tqdm.write(f"{summary_line(labelled_before[uid])}  (labelled before)" if other == uid else
                       f"{uid:<24} DUPLICATE of {other} (same structure and settings)")
            self.count(uid)

    def finished(self, story) -> None:
        self.count(story.uid)
        if story.uid in self.uids or (story.is_reference and story.outcome == "labelled"):
            tqdm.write(summary_line(story.result) if story.outcome == "labelled" else failure_line(story))

    def exported(self, export) -> None:
        if self.progress is not None:
            self.progress.close()
        export_lines(export, self.output)


def run(args: argparse.Namespace) -> int:
    """Submit, run locally in this process, and export: the whole pipeline with no server
    (workflow.pipelines.label)."""
    structures = read_structures(args.structures)  # once: a big file takes seconds to read
    for uid, atoms in structures:
        atoms.info["uid"] = uid
    uids = [uid for uid, _ in structures]
    report = label([atoms for _, atoms in structures], config_from(args), args.home, args.output,
                   parallel=args.parallel, export_format=args.format, config_type=args.config_type,
                   include_marked=args.include_marked, e0s=not args.no_e0s, live_logs=args.verbose,
                   listener=RunLines(set(uids), args.output), dataset=args.dataset)
    print(report.summary())
    return 0 if report.written == len(uids) else 1


def export(args: argparse.Namespace) -> int:
    """Write the validated results as a training set, with the E0s made with exactly their settings."""
    from qe_factory.engine.export import write_labels
    from qe_factory.engine.references import is_reference
    from qe_factory.workflow.cards import export_card
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.protocols import home_protocols, in_data_set, pinned_protocol
    from qe_factory.workflow.state import get_jobstore, get_launchpad, load_results

    home = activate(args.home)
    protocol = pinned_protocol(home, args.dataset)
    if protocol is None and (others := [p.name for p in home_protocols(home)]):
        print(f"qe-factory: no data set {args.dataset!r} in this home; its data sets: {', '.join(others)} "
              "(--dataset NAME)", file=sys.stderr)
        return 2
    results, others = in_data_set(progress_bar(load_results(get_jobstore()), "export"), protocol)
    if others:
        print(f"{others} result(s) of other data sets (another protocol than {args.dataset!r}'s "
              f"{protocol.hash[:12]}) left out")
    written = write_labels(results, args.output, args.include_marked, args.format, args.config_type)
    export_card(home, get_launchpad(read_only=True), get_jobstore(), args.output, args.format, written,
                dataset=args.dataset)
    export_lines(written, args.output)
    print(f"{written.labels} of {sum(not is_reference(r) for r in results)} results written to {args.output} "
          f"({args.format})")
    return 0
