"""DFTResult: the label of one structure with its provenance, and its extxyz form for MLIP training."""

from __future__ import annotations

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
    protocol_hash: str | None = None  # the settings it was made with (engine/protocol.py): one per data set
    scf_iterations: int | None = None
    total_magnetization: float | None = None  # μB per cell; None: spin-restricted (nspin 1)
    absolute_magnetization: float | None = None
    magnetic_start: list[float] | None = None  # μB per atom the label's run started from; None: spin-restricted
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
