"""What the qe-factory command prints: one line per structure, progress bars, export notes."""

from __future__ import annotations

import sys

import numpy as np
from ase.units import GPa
from tqdm import tqdm

from qe_factory.engine.results import DFTResult


def summary_line(result: DFTResult) -> str:
    """One line per structure: outcome, energy, largest force, pressure, attempts, wall time."""
    head = f"{result.uid:<24} {result.formula:<10}"
    tries = f"{len(result.attempts)} attempt(s) {result.wall_time:7.1f} s"
    if not result.succeeded:
        return f"{head} FAILED  {tries}  {result.error_message}"
    fmax = float(np.linalg.norm(result.forces, axis=1).max())
    pressure = -np.trace(result.stress) / 3 / GPa
    marks = "" if result.nominal_settings else f"  [settings differ: {result.label_deviations}]"
    return f"{head} OK  E={result.energy:.6f} eV  Fmax={fmax:.4f} eV/Å  P={pressure:.3f} GPa  {tries}{marks}"


def failure_line(story) -> str:
    """One line for a structure that failed or was refused (a history.Story)."""
    from qe_factory.workflow.history import cause

    return f"{story.uid:<24} {story.outcome.upper()} {cause(story)}"


def refusal_lines(reports: list) -> list[str]:
    """A line for each structure the submissions (submit.SubmitReport) refused."""
    return [f"{uid:<24} REFUSED {why}" for report in reports for uid, why in report.refused.items()]


def protocol_line(protocol) -> str:
    """One line naming a data set's protocol: hash, elements and where they came from, the cutoff pair."""
    ecutwfc, ecutrho = protocol.cutoffs
    return (f"data set {protocol.name!r}: protocol {protocol.hash[:12]}, elements {', '.join(protocol.elements)} "
            f"({protocol.elements_from}), {ecutwfc:g}/{ecutrho:g} Ry for every label "
            f"(<home>/state/protocols/{protocol.name}.json)")


def reference_lines(reports: list) -> list[str]:
    """Lines saying which isolated-atom references (E0s) were refused and how many were submitted."""
    lines = refusal_lines(reports)
    added = sum(len(report.fw_ids) + len(report.queued) for report in reports)
    return lines + ([f"{added} isolated-atom reference(s) (E0s) submitted ahead of the structures"] if added else [])


def export_lines(export, output) -> None:
    """Say where the E0s went and what was left out of an export."""
    from qe_factory.engine.card import card_paths
    from qe_factory.engine.export import mace_e0s

    for uid, why in export.unphysical.items():
        print(f"{uid:<24} LEFT OUT: {why}")
    elements = ", ".join(export.e0s)
    if export.isolated_frames:
        print(f"E0s of {elements} as IsolatedAtom frames in {output} (MACE takes them, whatever --E0s says) and in "
              f"{export.e0s_file}; for a training file without them: --E0s='{mace_e0s(export.e0s)}'")
    elif export.nequip_file is not None:
        print(f"E0s of {elements} in {export.nequip_file} (NequIP's per_type_energy_shifts; no IsolatedAtom frames in "
              f"{output}: NequIP trains on every frame) and in {export.e0s_file}")
    for element, why in export.missing.items():
        print(f"no E0 for {element}: {why}")
    json_card, md_card = card_paths(output)
    if md_card.exists():
        print(f"data-set card: {md_card} (people), {json_card} (machines): protocol, pseudopotentials, versions, "
              "outcomes, E0s, and the MACE and NequIP training commands")


PROGRESS_FROM = 100  # structures from which a step (checking, making workflows, export) shows a progress bar


def progress_bar(items, description: str):
    """`items` with a progress bar on stderr that goes away when done (none for fewer than PROGRESS_FROM)."""
    items = list(items)
    return tqdm(items, desc=description, unit="structure", file=sys.stderr, leave=False,
                disable=len(items) < PROGRESS_FROM)
