"""The data-set card: what an export holds and how it was made, written beside it as `<name>.card.json` (machines)
and `<name>.card.md` (people): the protocol and its hash, pseudopotentials with md5s, code versions, what became of
the structures, the sanitizer's thresholds and what each check refused, the E0s, and the command lines that train
MACE and NequIP on exactly this export.

Pure: the workflow layer tells what became of the structures (`Outcomes`, from the read model `qe-factory status`
uses) and which protocol the home pinned; `dataset_card` puts it together with the export (export.Export).
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from ase.data import atomic_numbers
from pydantic import BaseModel

from qe_factory.engine.config import SanitizerThresholds
from qe_factory.engine.export import Export
from qe_factory.engine.protocol import Protocol
from qe_factory.engine.references import REFERENCE_UID
from qe_factory.engine.results import DFTResult

# packages whose versions change what a trainer gets (the MLIP ones when installed beside the factory)
PACKAGES = ("qe_factory", "ase", "numpy", "mace-torch", "nequip", "torch")
MACE_BATCH = 10  # mace_run_train's default --batch_size; fewer training frames than the batch: it stops
NEQUIP_BATCH = 5
LABEL_SETTINGS = ("ecutwfc", "ecutrho", "occupations", "smearing", "degauss", "nspin", "input_dft")  # pw.x `system`
NEQUIP_CONFIG = "examples/nequip.yaml"  # in the qe_factory repository: NequIP's training config for an export


class Outcomes(BaseModel):
    """What became of the structures an export was made from, as `qe-factory status` counts them."""

    scope: str  # which structures these are
    counts: dict[str, int]  # structures per outcome (labelled, running, waiting, failed, refused) and `marked`
    causes: dict[str, int] = {}  # "<error type> at <stage>" → failed or refused structures
    refused_by_check: dict[str, int] = {}  # sanitizer check (sanitize.CHECKS) → labels it refused at validation
    references: dict[str, int] = {}  # isolated-atom references (E0s) per outcome


class DatasetCard(BaseModel):
    """A data set as exported: see the module's docstring."""

    training_file: str
    format: str
    created: str
    labels: int  # frames trained on
    isolated_atom_frames: int  # E0s as config_type=IsolatedAtom frames in the file (MACE's E0s)
    protocol: Protocol | None  # the home's pinned protocol (None: a home made before protocols, or none pinned)
    protocol_hashes: dict[str, int]  # protocol hash on the labels written → how many ("none": labels without one)
    label_settings: dict[str, dict[str, int]]  # setting (LABEL_SETTINGS) → its values on the labels → how many
    pseudopotentials: dict[str, list[dict[str, str]]]  # element → the files (name, md5) its labels were made with
    versions: dict[str, str]  # code → version (qe_factory, ase, ... and the MLIP codes when installed here)
    pw_versions: dict[str, int]  # pw.x version → labels made with it
    outcomes: Outcomes
    left_out_at_export: dict[str, str]  # uid → why (cohesive energy outside the window against the E0s found now)
    sanitizer: SanitizerThresholds
    e0s: dict[str, dict[str, Any]]  # element → energy (eV), uid, settings_key (E0 settings key, 12 hex), moment, md5
    e0s_missing: dict[str, str]  # element → why it has no E0
    files: dict[str, str]  # what else the export wrote beside it (E0 file, NequIP's shifts, the card)
    commands: dict[str, list[str]]  # trainer → its shell lines, run in the export's directory
    advice: list[str]


def card_paths(training_file: str | Path) -> tuple[Path, Path]:
    """Where a training file's card goes: labels.extxyz → labels.card.json, labels.card.md."""
    path = Path(training_file)
    return path.with_name(f"{path.stem}.card.json"), path.with_name(f"{path.stem}.card.md")


def code_versions() -> dict[str, str]:
    """Installed versions of PACKAGES (those not installed are left out)."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _count(values: list[str | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value or "none"] = counts.get(value or "none", 0) + 1
    return dict(sorted(counts.items()))


def _label_settings(results: list[DFTResult]) -> dict[str, dict[str, int]]:
    """The values each of LABEL_SETTINGS takes on the labels (pw.x's `system` namelist as run), counted."""
    settings = {key: _count([None if (v := r.parameters.get("system", {}).get(key)) is None else str(v)
                             for r in results]) for key in LABEL_SETTINGS}
    return {key: values for key, values in settings.items() if values != {"none": len(results)}}


def _pseudopotentials(results: list[DFTResult]) -> dict[str, list[dict[str, str]]]:
    files: dict[str, list[dict[str, str]]] = {}
    for result in results:
        for element, entry in result.pseudopotentials.items():
            item = {"filename": entry.get("filename", ""), "md5": entry.get("md5", "")}
            if item not in files.setdefault(element, []):
                files[element].append(item)
    return dict(sorted(files.items(), key=lambda pair: atomic_numbers.get(pair[0], 0)))


def _e0s(references: dict[str, DFTResult]) -> dict[str, dict[str, Any]]:
    table = {}
    for element, result in sorted(references.items(), key=lambda pair: atomic_numbers[pair[0]]):
        match = REFERENCE_UID.match(result.uid)
        table[element] = {"energy": result.energy, "uid": result.uid, "settings_key": result.uid.rsplit("-", 1)[-1]
                          if match else None, "magnetization": result.total_magnetization,
                          "md5": result.pseudopotentials.get(element, {}).get("md5")}
    return table


def mace_lines(training_file: Path, labels: int, frames: bool, reexport: str | None) -> list[str]:
    """mace_run_train on a MACE export (`reexport`: the export command that makes one from the same labels):
    energy, forces and stress (--loss=stress; MACE's default loss fits no stress), batches sized to the labels
    (MACE keeps at least one for validation), and the E0s from the IsolatedAtom frames (`frames`), else fitted."""
    valid = max(1, labels // 10)
    train = max(1, labels - valid)
    lines = [reexport] if reexport else []
    lines.append(f"mace_run_train --name={training_file.stem} --train_file={training_file.name} --valid_fraction=0.1 "
                 "--energy_key=REF_energy --forces_key=REF_forces --stress_key=REF_stress --loss=stress "
                 f"--stress_weight=1.0 --model=MACE --r_max=5.0 --batch_size={min(MACE_BATCH, train)} "
                 f"--valid_batch_size={min(MACE_BATCH, valid)} --device=cpu" + ("" if frames else " --E0s=average"))
    return lines


def nequip_lines(training_file: Path, labels: int, reexport: str | None) -> list[str]:
    """nequip-train with NEQUIP_CONFIG pointed at a NequIP export and its `<name>.nequip.yaml` (model_type_names and
    per_type_energy_shifts, the E0s by element), the split given as counts (fractions leave val or test empty
    below 10 frames)."""
    val = test = max(1, labels // 10)
    train = max(1, labels - val - test)
    config = f"{training_file.stem}.nequip-train.yaml"
    source = f"# {NEQUIP_CONFIG}: the training config in the qe_factory repository"
    edit = (f"sed -e 's/- labels\\.nequip$/- {training_file.stem}.nequip/' -e 's/file_path: labels\\.extxyz/"
            f"file_path: {training_file.name}/' {NEQUIP_CONFIG} > {config}")
    return [*([reexport] if reexport else []), source, edit,
            f'nequip-train -cp "$PWD" -cn {config} data.split_dataset.train={train} data.split_dataset.val={val} '
            f"data.split_dataset.test={test} dataloader.batch_size={min(NEQUIP_BATCH, train)}"]


def training_commands(training_file: Path, format: str, labels: int, e0s: bool,
                      dataset: str | None = None) -> dict[str, list[str]]:
    """The shell lines that train MACE and NequIP on this export (run in its directory); a trainer that reads
    another format starts with the export command that writes it from the same home (and data set, `dataset`).
    `e0s`: the export has E0s (MACE's extxyz holds them as IsolatedAtom frames; without any, MACE fits them:
    --E0s=average)."""
    stem, suffix = training_file.stem, training_file.suffix if format != "ase-db" else ".extxyz"
    mace_file = training_file if format == "mace-extxyz" else training_file.with_name(f"{stem}-mace{suffix}")
    nequip_file = training_file if format == "nequip-extxyz" else training_file.with_name(f"{stem}-nequip{suffix}")
    again = ("qe-factory export -o {} --format {}" + (f" --dataset {dataset}" if dataset else "")
             + "  # add this export's --home/--include-marked/--config-type, if given")
    return {
        "mace": mace_lines(mace_file, labels, e0s,
                           None if mace_file == training_file else again.format(mace_file.name, "mace-extxyz")),
        "nequip": nequip_lines(nequip_file, labels,
                               None if nequip_file == training_file else again.format(nequip_file.name,
                                                                                       "nequip-extxyz")),
    }


def advice(card: DatasetCard) -> list[str]:
    """What to know before training on it: too few labels, elements without an E0, settings mixed in it."""
    notes = []
    if card.labels < 3:
        notes.append(f"{card.labels} label(s): MACE needs 2 (one for validation), NequIP's split 3 (train, val, test)")
    elif card.labels < 50:
        notes.append(f"{card.labels} labels: enough to try the commands, not to train a useful potential (hundreds "
                     "to thousands of diverse structures)")
    for element, why in card.e0s_missing.items():
        notes.append(f"{element} has no E0: {why}. MACE stops for a missing element's E0 (or fits one with "
                     "--E0s=average: not physical); NequIP's per_type_energy_shifts lack it")
    if len(card.protocol_hashes) > 1:
        notes.append(f"the labels carry {len(card.protocol_hashes)} protocol hashes: settings are mixed in this "
                     "training set (one energy surface needs one protocol)")
    if len(card.pw_versions) > 1:
        notes.append(f"the labels were made with {len(card.pw_versions)} pw.x versions")
    return notes


def dataset_card(
    training_file: str | Path, format: str, export: Export, outcomes: Outcomes, protocol: Protocol | None = None,
    limits: SanitizerThresholds | None = None,
) -> DatasetCard:
    """The card of an export (`export`: what export.write_labels wrote to `training_file` in `format`)."""
    path = Path(training_file)
    results = [*export.exported, *export.references.values()]
    json_path, md_path = card_paths(path)
    files = {"e0s": export.e0s_file, "nequip_shifts": export.nequip_file, "card_json": json_path, "card_md": md_path}
    card = DatasetCard(
        training_file=path.name, format=format, created=time.strftime("%Y-%m-%d %H:%M:%S %z"),
        labels=export.labels, isolated_atom_frames=len(export.references) if export.isolated_frames else 0,
        protocol=protocol, protocol_hashes=_count([r.protocol_hash for r in export.exported]),
        label_settings=_label_settings(export.exported),
        pseudopotentials=_pseudopotentials(results), versions=code_versions(),
        pw_versions=_count([r.pw_version for r in export.exported]), outcomes=outcomes,
        left_out_at_export=dict(export.unphysical), sanitizer=limits or SanitizerThresholds(),
        e0s=_e0s(export.references), e0s_missing=dict(export.missing),
        files={name: Path(file).name for name, file in files.items() if file is not None},
        commands=training_commands(path, format, export.labels, bool(export.e0s), protocol and protocol.name),
        advice=[],
    )
    return card.model_copy(update={"advice": advice(card)})


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _protocol_lines(card: DatasetCard) -> list[str]:
    protocol = card.protocol
    if protocol is None:
        return ["No protocol is pinned in this home (a home made before protocols, or none pinned for this data set): "
                "the labels' own protocol hashes are below."]
    rows = [(key, f"md5 of the {len(value)} files its table names (JSON card)" if key == "family_md5" else
             json.dumps(value, sort_keys=True, default=str) if isinstance(value, dict) else value)
            for key, value in protocol.settings.items()]
    return [f"Protocol `{protocol.name}`, hash `{protocol.hash}`; elements {', '.join(protocol.elements)} "
            f"({protocol.elements_from}).", "", *_table(("protocol setting", "value"), rows)]


def card_markdown(card: DatasetCard) -> str:
    """The card for people."""
    o = card.outcomes
    settings = [(key, ", ".join(f"{value} ({n})" for value, n in values.items()))
                for key, values in card.label_settings.items()]
    lines = [f"# Data-set card: {card.training_file}", "",
             f"{card.labels} labels ({card.format}), {card.isolated_atom_frames} IsolatedAtom frames; written "
             f"{card.created}.", "", "## Protocol", "", *_protocol_lines(card), "",
             *_table(("protocol hash on the labels", "labels"), list(card.protocol_hashes.items())), "",
             *_table(("setting of the labels (pw.x)", "values (labels)"), settings), "",
             "## Pseudopotentials", "",
             *_table(("element", "file", "md5"), [(el, f["filename"], f["md5"]) for el, items in
                                                 card.pseudopotentials.items() for f in items]), "",
             "## Code versions", "",
             *_table(("code", "version"), [*card.versions.items(),
                                           *((f"pw.x ({n} labels)", v) for v, n in card.pw_versions.items())]), "",
             f"## Outcomes ({o.scope})", "", *_table(("outcome", "structures"), list(o.counts.items())), ""]
    if o.causes:
        lines += [*_table(("cause (failed or refused)", "structures"), list(o.causes.items())), ""]
    if o.references:
        lines += [*_table(("isolated-atom references (E0s)", "count"), list(o.references.items())), ""]
    lines += ["## Sanitizer", "", *_table(("threshold", "value"), list(card.sanitizer.model_dump().items())), "",
              *_table(("check", "labels it refused"), [*o.refused_by_check.items(), *(
                  [("cohesive_energy, at export (E0s found then)", len(card.left_out_at_export))]
                  if card.left_out_at_export else [])] or [("none", 0)]), ""]
    if card.left_out_at_export:
        lines += [*_table(("left out at export", "why"), list(card.left_out_at_export.items())), ""]
    lines += ["## E0s (isolated-atom energies)", "",
              *_table(("element", "E0 (eV)", "uid", "E0 settings key", "moment (μB)", "md5"),
                      [(el, e["energy"], e["uid"], e["settings_key"], e["magnetization"], e["md5"])
                       for el, e in card.e0s.items()] or [("none", "", "", "", "", "")]), ""]
    lines += [f"- {el}: no E0: {why}" for el, why in card.e0s_missing.items()]
    lines += ["", "## Training (in the export's directory)", ""]
    for trainer, commands in card.commands.items():
        lines += [f"{'MACE' if trainer == 'mace' else 'NequIP'}:", "", "```bash", *commands, "```", ""]
    lines += [f"- {note}" for note in card.advice]
    lines += ["", "Every frame carries its QC certificate (`qc_*` keys: README.md, Training-set formats)."]
    return "\n".join(lines) + "\n"


def write_card(training_file: str | Path, card: DatasetCard) -> tuple[Path, Path]:
    """Write the card beside the training file; returns (its JSON, its Markdown)."""
    json_path, md_path = card_paths(training_file)
    json_path.write_text(card.model_dump_json(indent=1) + "\n")
    md_path.write_text(card_markdown(card))
    return json_path, md_path
