"""Export: labels as the training sets MLIP codes read (MACE's and NequIP's extxyz, an ASE database), with the
isolated-atom energies (E0s) made with exactly their settings beside them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from ase import Atoms
from ase.data import atomic_numbers

from qe_factory.engine.certificate import certificate
from qe_factory.engine.config import SanitizerThresholds
from qe_factory.engine.references import E0, is_reference
from qe_factory.engine.results import DFTResult
from qe_factory.engine.sanitize import cohesive_check

EXPORT_FORMATS = ("mace-extxyz", "nequip-extxyz", "ase-db")


def training_atoms(result: DFTResult, ase_keys: bool = False, config_type: str | None = None,
                   limits: SanitizerThresholds | None = None) -> Atoms:
    """A label as an MLIP trainer reads it, with its QC certificate (certificate.certificate, `limits`: the sanitizer's
    thresholds) in its info. Default: REF_energy, REF_forces, REF_stress (MACE's keys); `ase_keys`: ASE's own energy,
    forces, stress in a SinglePointCalculator (what NequIP/Allegro read by default and `ase db` shows). Stress in
    eV/Å³, ASE's sign (NequIP's too). `config_type` for a structure that brought none."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.stress import full_3x3_to_voigt_6_stress

    atoms = result.to_atoms()
    atoms.info.update(certificate(result, limits))
    if config_type is not None:
        atoms.info.setdefault("config_type", config_type)
    if ase_keys:
        energy, stress = atoms.info.pop("REF_energy"), atoms.info.pop("REF_stress").reshape(3, 3)
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=atoms.arrays.pop("REF_forces"),
                                           stress=full_3x3_to_voigt_6_stress(stress))
    return atoms


def db_key_value_pairs(
    result: DFTResult, config_type: str | None = None, limits: SanitizerThresholds | None = None,
) -> dict[str, Any]:
    """`ase db` columns of a label: uid, config_type, outcome flags, settings, pseudopotential files, effort, and its
    QC certificate (certificate.certificate)."""
    system = result.parameters.get("system", {})
    pairs = {
        "uid": result.uid, "config_type": result.structure.config_type or config_type,
        "succeeded": result.succeeded, "nominal_settings": result.nominal_settings, "error_type": result.error_type,
        "deviations": ",".join(sorted(result.label_deviations)) or None, "problems": len(result.problems),
        "attempts": len(result.attempts), "recovered": len(result.attempts) > 1,
        "ecutwfc": result.ecutwfc, "ecutrho": result.ecutrho, "smearing": system.get("smearing"),
        "degauss": system.get("degauss"), "kpoints": "x".join(map(str, result.kpoints or [])) or None,
        "pw_version": result.pw_version, "scf_iterations": result.scf_iterations, "wall_time": result.wall_time,
        "total_magnetization": result.total_magnetization,
        **{f"pseudo_{element}": entry.get("filename") for element, entry in result.pseudopotentials.items()},
        **certificate(result, limits),
    }
    return {key: value for key, value in pairs.items() if value is not None}


def write_training_set(
    results: Iterable[DFTResult], path, include_marked: bool = False, format: str = "mace-extxyz",
    config_type: str | None = None, references: Iterable[DFTResult] = (), limits: SanitizerThresholds | None = None,
) -> int:
    """Write the labelled structures as a training set (the file is made anew); returns how many.

    Formats (EXPORT_FORMATS): "mace-extxyz" (REF_energy, REF_forces, REF_stress), "nequip-extxyz" (energy, forces,
    stress), "ase-db" (an ASE database: ASE's keys, db_key_value_pairs as columns, every pw.x parameter in its data).
    Only sanitized results; those made with settings other than the nominal ones (label_deviations) are left out
    unless `include_marked`. Failures have no label and are not written. `config_type` for structures without one.
    `references` (isolated-atom results, the E0s, whose structures carry no config_type) go first as
    `config_type=IsolatedAtom` frames (MACE's convention: it takes them as its E0s and does not train on them); they
    are not counted. Every frame carries its QC certificate (`limits`: the sanitizer's thresholds, for the force bound).
    """
    from pathlib import Path

    from ase.io import write

    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown training-set format {format!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    keep = (r for r in results if r.succeeded and (include_marked or r.nominal_settings))
    isolated = [(reference, "IsolatedAtom") for reference in references]
    Path(path).unlink(missing_ok=True)
    count = 0
    if format == "ase-db":
        from ase.db import connect

        with connect(path, type="db", append=False) as db:  # one transaction
            for result, kind in [*isolated, *((r, config_type) for r in keep)]:
                db.write(training_atoms(result, True, kind, limits), data={"parameters": result.parameters},
                         key_value_pairs=db_key_value_pairs(result, kind, limits))
                count += kind != "IsolatedAtom"
        return count
    with open(path, "w") as handle:
        for result, kind in [*isolated, *((r, config_type) for r in keep)]:
            write(handle, training_atoms(result, format == "nequip-extxyz", kind, limits), format="extxyz")
            count += kind != "IsolatedAtom"
    return count


def label_settings(result: DFTResult, element: str) -> tuple:
    """What an element's E0 must share with a label: (pseudopotential md5, ecutwfc, ecutrho, smearing, degauss)."""
    system = result.parameters.get("system", {})
    md5 = result.pseudopotentials.get(element, {}).get("md5")
    return md5, result.ecutwfc, result.ecutrho, system.get("smearing"), system.get("degauss")


def matching_references(labels: list[DFTResult], e0s: list[DFTResult]) -> tuple[dict[str, DFTResult], dict[str, str]]:
    """The E0 result of each element of `labels` computed with exactly their settings (pseudopotential md5,
    cutoffs, smearing, degauss), and for each element without one, why. An element whose labels were made with
    different settings has no single E0 (MACE takes one per element)."""
    needed: dict[str, set[tuple]] = {}
    for label in labels:
        for element in set(label.structure.to_atoms().get_chemical_symbols()):
            needed.setdefault(element, set()).add(label_settings(label, element))
    found: dict[str, DFTResult] = {}
    missing: dict[str, str] = {}
    for element, settings in sorted(needed.items()):
        if len(settings) > 1:
            missing[element] = (f"its labels were made with {len(settings)} different cutoff/smearing settings (fix "
                                "ecutwfc and ecutrho in the config for one E0 per element)")
            continue
        (wanted,) = settings
        match = [e0 for e0 in e0s if e0.succeeded and e0.formula == element and label_settings(e0, element) == wanted]
        if match:
            found[element] = match[0]
        else:
            missing[element] = "no isolated-atom result with its labels' settings (qe-factory e0s, or run/submit)"
    return found, missing


def mace_e0s(e0s: dict[str, E0] | dict[str, float]) -> dict[int, float]:
    """{atomic number: E0 in eV}, MACE's `--E0s` form (MACE reads a dict string with ast.literal_eval, or a .json
    file of the same mapping with the numbers as string keys)."""
    energies = {el: e.energy if isinstance(e, E0) else float(e) for el, e in e0s.items()}
    return {atomic_numbers[el]: energy for el, energy in sorted(energies.items(), key=lambda i: atomic_numbers[i[0]])}


def e0s_path(training_file: str | Path) -> Path:
    """Where the E0s of a training file go: labels.extxyz → labels.e0s.json (MACE wants the .json suffix)."""
    path = Path(training_file)
    return path.with_name(f"{path.stem}.e0s.json")


def write_e0s(training_file: str | Path, energies: dict[str, float]) -> Path:
    """Write `{"<Z>": E0 eV}` beside the training file (MACE's `--E0s=<file>.json`); returns its path."""
    path = e0s_path(training_file)
    path.write_text(json.dumps({str(z): e for z, e in mace_e0s(energies).items()}, indent=1) + "\n")
    return path


def nequip_path(training_file: str | Path) -> Path:
    """Where NequIP's E0s go: labels.extxyz → labels.nequip.yaml (the config `labels.nequip` of a NequIP training
    config's defaults list, in the same directory)."""
    path = Path(training_file)
    return path.with_name(f"{path.stem}.nequip.yaml")


def write_nequip_shifts(training_file: str | Path, energies: dict[str, float]) -> Path:
    """Write NequIP's model settings for these E0s beside the training file: `model_type_names` (the elements, by
    atomic number) and `per_type_energy_shifts` (element name → E0 in eV: NequIP's PerTypeScaleShift takes a dict
    keyed by the model's type names, nothing by atomic number and no JSON file). Names are quoted: YAML 1.1, which
    NequIP's config reader (OmegaConf) speaks, reads a bare No (nobelium) as a boolean. Returns its path."""
    path = nequip_path(training_file)
    elements = sorted(energies, key=atomic_numbers.get)
    shifts = ", ".join(f"{json.dumps(element)}: {float(energies[element])!r}" for element in elements)
    path.write_text(f"# The isolated-atom energies (E0s, eV) of {Path(training_file).name} for NequIP's model "
                    "(qe-factory export; examples/nequip.yaml lists this file in its defaults)\n"
                    f"model_type_names: {json.dumps(elements)}\nper_type_energy_shifts: {{{shifts}}}\n")
    return path


class Export(NamedTuple):
    """What `write_labels` wrote: labels, the E0s beside them (element → eV), elements left without one (why), the
    E0 file (None when there is no E0), the labels left out because their cohesive energy, judged here against
    those E0s, is outside the sanitizer's window (uid → why), NequIP's E0 file (nequip-extxyz with E0s, else None),
    whether the E0s are also IsolatedAtom frames in the training set, the labels written (as written: cohesive
    energies judged here included) and the E0 result of each element."""

    labels: int
    e0s: dict[str, float]
    missing: dict[str, str]
    e0s_file: Path | None
    unphysical: dict[str, str] = {}
    nequip_file: Path | None = None
    isolated_frames: bool = False
    exported: list[DFTResult] = []
    references: dict[str, DFTResult] = {}


def judge_cohesive(
    labels: list[DFTResult], e0s: dict[str, float], limits: SanitizerThresholds | None = None,
) -> tuple[list[DFTResult], dict[str, str]]:
    """The labels whose cohesive energy was not judged at validation (their E0s came later) judged now against
    `e0s`: (those that pass, with the cohesive energy found here, or still cannot be judged; uid → why for those
    outside the window)."""
    kept, unphysical = [], {}
    for label in labels:
        if label.cohesive_energy is not None:
            kept.append(label)
            continue
        check = cohesive_check(label.energy, label.structure.to_atoms().get_chemical_symbols(), e0s, limits)
        if check.problems:
            unphysical[label.uid] = "; ".join(check.problems)
        elif check.cohesive_energy is None:
            kept.append(label)
        else:
            judged = [why for why in label.not_judged if not why.startswith("cohesive energy")]
            kept.append(label.model_copy(update={"cohesive_energy": check.cohesive_energy, "not_judged": judged}))
    return kept, unphysical


def write_labels(
    results: list[DFTResult], path: str | Path, include_marked: bool = False, format: str = "mace-extxyz",
    config_type: str | None = None, limits: SanitizerThresholds | None = None,
) -> Export:
    """Write the labelled structures as a training set (results.write_training_set's rules and formats) and the E0s
    made with exactly their settings: as `<name>.e0s.json` beside it (MACE's `--E0s=<file>`); for MACE's extxyz and
    the database, first in the file as `config_type=IsolatedAtom` frames (MACE takes them as its E0s and does not
    train on them); for NequIP's extxyz, not in the file (NequIP trains on every frame of it) but as
    `<name>.nequip.yaml` beside it (its per_type_energy_shifts). Labels validated before their E0s existed are
    judged against them here (judge_cohesive, `limits`: the sanitizer's thresholds) and left out when outside the
    window."""
    labels = [r for r in results if not is_reference(r) and r.succeeded and (include_marked or r.nominal_settings)]
    found, missing = matching_references(labels, [r for r in results if is_reference(r)])
    energies = {element: float(result.energy) for element, result in found.items()}
    labels, unphysical = judge_cohesive(labels, energies, limits)
    framed = format != "nequip-extxyz"
    references = [found[element] for element in sorted(found, key=atomic_numbers.get)] if framed else []
    written = write_training_set(labels, path, include_marked, format, config_type, references, limits)
    e0s_file = write_e0s(path, energies) if energies else None
    nequip_file = write_nequip_shifts(path, energies) if energies and not framed else None
    for made, old in ((e0s_file, e0s_path(path)), (nequip_file, nequip_path(path))):
        if made is None:
            old.unlink(missing_ok=True)  # never leave an older data set's E0s beside this one
    return Export(written, energies, missing, e0s_file, unphysical, nequip_file, bool(references), labels, found)
