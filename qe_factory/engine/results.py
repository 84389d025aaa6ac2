"""DFTResult: the label of one structure with its provenance, and its extxyz form for MLIP training."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from ase import Atoms

from qe_factory.engine.document import Document
from qe_factory.engine.outcomes import Outcome, outcome_details
from qe_factory.engine.structure import StructureDoc

UNPHYSICAL = "UNPHYSICAL"  # DFTResult.error_type of a converged result the sanitizer refused


class Attempt(Document):
    """One pw.x run of a structure."""

    number: int
    correction: str | None = None  # what was changed before this attempt
    restart: str = "from_scratch"  # how it started from the attempt before (recovery.RestartType)
    directory: str
    parameters: dict[str, dict[str, Any]]
    ranks: int
    pools: int
    error_type: str
    error_code: int
    message: str
    scf_iterations: int
    final_scf_accuracy: float | None = None
    returncode: int | None
    wall_time: float
    cpu_time: float | None = None  # as pw.x reports it (rank 0)


class MagneticBranch(Document):
    """One start of the magnetic branch check (`DFTConfig.magnetic_start='hint'`) and where it converged."""

    start: list[float]  # initial moments, μB per atom
    attempts: list[int]  # numbers of its attempts
    energy: float | None = None  # eV
    total_magnetization: float | None = None  # μB per cell
    absolute_magnetization: float | None = None
    failure: str | None = None  # why it gave no energy
    kept: bool = False  # its output is the label


class DFTResult(Document):
    """Energy (eV), forces (eV/Å, N×3) and stress (eV/Å³, 3×3, ASE sign) of one structure, or why not."""

    uid: str
    energy: float | None = None
    forces: list[list[float]] | None = None
    stress: list[list[float]] | None = None
    succeeded: bool
    error_message: str | None = None
    error_type: str | None = None
    wall_time: float
    parameters: dict[str, dict[str, Any]] = {}
    final_mixing_beta: float | None = None
    # provenance
    formula: str
    structure: StructureDoc
    kpoints: list[int] | None = None
    vacuum_axes: list[str] = []  # cell axes ('a', 'b', 'c') treated as vacuum: 1 k-point (all three: Γ)
    ecutwfc: float | None = None
    ecutrho: float | None = None
    pseudopotentials: dict[str, dict[str, str]] = {}
    pw_version: str | None = None
    scf_iterations: int | None = None
    total_magnetization: float | None = None
    pw_xml: dict[str, Any] | None = None  # pw.x's own record (data-file-schema.xml, pwxml.PwXml.summary), checked
    problems: list[str] = []
    cohesive_energy: float | None = None  # eV/atom: (energy − Σ isolated-atom energies E0) / N; None: not judged
    not_judged: list[str] = []  # checks the sanitizer could not make, and why (e.g. no E0 for an element)
    warnings: list[str] = []  # pw.x's non-fatal messages (those that mean trouble are in problems)
    label_deviations: dict[str, tuple[Any, Any]] = {}
    magnetic_branches: list[MagneticBranch] = []  # the starts tried when a magnetic branch was checked
    attempts: list[Attempt] = []

    @property
    def nominal_settings(self) -> bool:
        """True when the label was computed with the data set's nominal smearing and cutoffs."""
        return not self.label_deviations

    def to_atoms(self) -> Atoms:
        """The structure with REF_energy/REF_forces/REF_stress (extxyz keys for MLIP training) and provenance."""
        atoms = self.structure.to_atoms()
        atoms.info.update(uid=self.uid, succeeded=self.succeeded, nominal_settings=self.nominal_settings)
        if self.error_message:
            atoms.info["error"] = self.error_message
        if self.succeeded:
            atoms.info["REF_energy"] = self.energy
            atoms.info["REF_stress"] = np.asarray(self.stress).reshape(9)
            atoms.arrays["REF_forces"] = np.asarray(self.forces)
            atoms.info.update(
                ecutwfc=self.ecutwfc, ecutrho=self.ecutrho, kpoints=np.asarray(self.kpoints),
                degauss=self.parameters.get("system", {}).get("degauss"),
                smearing=self.parameters.get("system", {}).get("smearing"),
            )
        return atoms


class DFTFatalError(RuntimeError):
    """Recovery is exhausted or impossible; `.result` holds the full report of every attempt."""

    def __init__(self, result: DFTResult):
        super().__init__(f"{result.uid}: {result.error_message}")
        self.result = result

    @property
    def outcome(self) -> Outcome:
        return Outcome.UNPHYSICAL if self.result.error_type == UNPHYSICAL else Outcome.FAILED

    def to_dict(self) -> dict[str, Any]:
        """The report as FireWorks stores it with a FIZZLED launch (`_exception._details`): the DFTResult's fields
        and its outcome (outcomes.outcome_details)."""
        report = self.result.model_dump(mode="json")
        error_type, message = report.pop("error_type") or "UNKNOWN", report.pop("error_message") or ""
        return outcome_details(self.outcome, error_type, message, **report)


EXPORT_FORMATS = ("mace-extxyz", "nequip-extxyz", "ase-db")


def training_atoms(result: DFTResult, ase_keys: bool = False, config_type: str | None = None) -> Atoms:
    """A label as an MLIP trainer reads it. Default: REF_energy, REF_forces, REF_stress (MACE's keys); `ase_keys`:
    ASE's own energy, forces, stress in a SinglePointCalculator (what NequIP/Allegro read by default and `ase db`
    shows). Stress in eV/Å³, ASE's sign (NequIP's too). `config_type` for a structure that brought none."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.stress import full_3x3_to_voigt_6_stress

    atoms = result.to_atoms()
    if config_type is not None:
        atoms.info.setdefault("config_type", config_type)
    if ase_keys:
        energy, stress = atoms.info.pop("REF_energy"), atoms.info.pop("REF_stress").reshape(3, 3)
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=atoms.arrays.pop("REF_forces"),
                                           stress=full_3x3_to_voigt_6_stress(stress))
    return atoms


def db_key_value_pairs(result: DFTResult, config_type: str | None = None) -> dict[str, Any]:
    """`ase db` columns of a label: uid, config_type, outcome flags, settings, pseudopotential files, effort."""
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
    }
    return {key: value for key, value in pairs.items() if value is not None}


def write_training_set(
    results: Iterable[DFTResult], path, include_marked: bool = False, format: str = "mace-extxyz",
    config_type: str | None = None, references: Iterable[DFTResult] = (),
) -> int:
    """Write the labelled structures as a training set (the file is made anew); returns how many.

    Formats (EXPORT_FORMATS): "mace-extxyz" (REF_energy, REF_forces, REF_stress), "nequip-extxyz" (energy, forces,
    stress), "ase-db" (an ASE database: ASE's keys, db_key_value_pairs as columns, every pw.x parameter in its data).
    Only sanitized results; those made with settings other than the nominal ones (label_deviations) are left out
    unless `include_marked`. Failures have no label and are not written. `config_type` for structures without one.
    `references` (isolated-atom results, the E0s, whose structures carry no config_type) go first as
    `config_type=IsolatedAtom` frames (MACE's convention: it takes them as its E0s and does not train on them); they
    are not counted.
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
                db.write(training_atoms(result, True, kind), key_value_pairs=db_key_value_pairs(result, kind),
                         data={"parameters": result.parameters})
                count += kind != "IsolatedAtom"
        return count
    with open(path, "w") as handle:
        for result, kind in [*isolated, *((r, config_type) for r in keep)]:
            write(handle, training_atoms(result, format == "nequip-extxyz", kind), format="extxyz")
            count += kind != "IsolatedAtom"
    return count
