"""The data-set card of an export (engine/card.py), told from the home: what became of the structures (the read
model `qe-factory status` uses: history.home_history) and the protocol the home pinned (protocols.pinned_protocol)."""

from __future__ import annotations

from pathlib import Path

from qe_factory.engine.card import Outcomes, dataset_card, write_card
from qe_factory.engine.config import SanitizerThresholds
from qe_factory.engine.export import Export
from qe_factory.engine.results import UNPHYSICAL
from qe_factory.engine.sanitize import check_of
from qe_factory.workflow.history import home_history, outcome_counts, split_references
from qe_factory.workflow.protocols import DEFAULT_DATASET, pinned_protocol


def home_outcomes(home: Path, launchpad, store, uids: list[str] | None = None) -> Outcomes:
    """What became of the home's structures (or of `uids`, structures and references alike), counted as `status`
    counts them, with the cause of each failure or refusal and the sanitizer check behind each refused label."""
    structures, references = split_references(home_history(home, launchpad, store, uids=uids))
    causes: dict[str, int] = {}
    for story in structures:
        if story.outcome in ("failed", "refused"):
            cause = f"{story.error_type or 'UNKNOWN'} at {story.stage or 'unknown stage'}"
            causes[cause] = causes.get(cause, 0) + 1
    unphysical = [story.uid for story in structures if story.error_type == UNPHYSICAL]
    reports = home_history(home, launchpad, store, uids=unphysical, load=True, submissions=False) if unphysical else []
    checks: dict[str, int] = {}
    for story in reports:
        for check in sorted({check_of(problem) for problem in (story.result.problems if story.result else [])}):
            checks[check] = checks.get(check, 0) + 1
    scope = "every structure in the home" if uids is None else f"the structures of this run ({len(structures)})"
    return Outcomes(scope=scope, counts=outcome_counts(structures), causes=dict(sorted(causes.items())),
                    refused_by_check=dict(sorted(checks.items())),
                    references={k: v for k, v in outcome_counts(references).items() if v and k != "marked"})


def export_card(
    home: Path, launchpad, store, training_file: str | Path, format: str, export: Export,
    uids: list[str] | None = None, limits: SanitizerThresholds | None = None, dataset: str = DEFAULT_DATASET,
) -> tuple[Path, Path]:
    """Write the card of `export` (written to `training_file` in `format`) beside it; `uids`: the structures (and
    references) it was made from, None for the whole home. Returns (its JSON, its Markdown)."""
    outcomes = home_outcomes(home, launchpad, store, uids)
    card = dataset_card(training_file, format, export, outcomes, pinned_protocol(home, dataset), limits)
    return write_card(training_file, card)
