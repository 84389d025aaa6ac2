"""The QC certificate of a label: what was checked, as flat `qc_*` numbers and names that travel with the label in every
export format (extxyz info, ase-db key_value_pairs) and that `qe-factory show` prints.

The keys, their units and meanings: one table, README.md, "Training-set formats" → "QC certificate".
"""

from __future__ import annotations

import numpy as np

from qe_factory.engine.config import SanitizerThresholds
from qe_factory.engine.results import DFTResult
from qe_factory.engine.sanitize import check_of, contact_force_bound
from qe_factory.engine.structure import atom_contacts

Scalar = float | int | str
PREFIX = "qc_"


def certificate(result: DFTResult, limits: SanitizerThresholds | None = None) -> dict[str, Scalar]:
    """The certificate of `result` (keys: README.md's QC certificate table). Only scalars ASE writes and reads back
    unchanged (floats, ints, names that cannot be read as numbers); a value that is not known (a failure's forces, a
    cohesive energy not judged) is left out, never None. `limits`: the sanitizer's thresholds (the force bound)."""
    xml = result.pw_xml or {}
    keys: dict[str, Scalar | None] = {
        "scf_accuracy": xml.get("scf_error"), "scf_iterations": result.scf_iterations,
        "conv_thr": result.parameters.get("electrons", {}).get("conv_thr"),
        **_force_keys(result, limits or SanitizerThresholds()),
        "cohesive_energy": result.cohesive_energy,
        **_magnetic_keys(result),
        "xml_check": _xml_verdict(result), "warnings": len(result.warnings), "problems": len(result.problems),
        **{f"pseudo_md5_{element}": entry.get("md5") for element, entry in sorted(result.pseudopotentials.items())},
        "pw_version": result.pw_version,  # as pw.x's header prints it, "v.6.7MaX": never read back as a number
        "protocol_hash": result.protocol_hash,
    }
    return {PREFIX + key: _plain(value) for key, value in keys.items() if value is not None}


def _plain(value: Scalar) -> Scalar:
    """numpy scalars as Python's (ase db and JSON take those)."""
    return value.item() if isinstance(value, np.generic) else value


def _force_keys(result: DFTResult, limits: SanitizerThresholds) -> dict[str, float]:
    """max |F|, the contact-based bound of the atom that carries it, and the largest |F_i| / bound_i over atoms (the
    sanitizer refuses above 1: sanitize.contact_force_bound)."""
    forces = np.asarray(result.forces if result.forces is not None else [], dtype=float)
    if forces.shape != (len(result.structure.numbers), 3):  # none (a failure), or a malformed one the sanitizer refused
        return {}
    norms = np.linalg.norm(forces, axis=1)
    contacts = atom_contacts(result.structure.to_atoms())
    bounds = np.array([contact_force_bound(contacts.get(i, (None, None, None))[2], limits) for i in range(len(norms))])
    worst = int(norms.argmax())
    return {"max_force": float(norms[worst]), "force_bound": float(bounds[worst]),
            "force_ratio": float((norms / bounds).max())}


def _magnetic_keys(result: DFTResult) -> dict[str, float | int | None]:
    """Spin (nspin), total and absolute magnetization (μB/cell; 0 for a spin-restricted run), the start (Σ|m| of the
    initial moments, μB/cell) and the index of the magnetic branch kept among those tried (README's table)."""
    nspin = int(result.parameters.get("system", {}).get("nspin", 1))
    kept = next((i for i, branch in enumerate(result.magnetic_branches) if branch.kept), 0)
    if nspin == 1:
        return {"nspin": 1, "total_magnetization": 0.0, "absolute_magnetization": 0.0, "magnetic_start": 0.0,
                "branch": kept, "branches": max(1, len(result.magnetic_branches))}
    start = result.magnetic_start
    if start is None and result.magnetic_branches:  # a label stored before magnetic_start was recorded
        start = result.magnetic_branches[kept].start
    absolute = result.absolute_magnetization
    if absolute is None:  # likewise: pw.x's XML has it (checked equal to its stdout)
        absolute = (result.pw_xml or {}).get("absolute_magnetization")
    return {"nspin": 2, "total_magnetization": result.total_magnetization, "absolute_magnetization": absolute,
            "magnetic_start": None if start is None else float(np.abs(start).sum()),
            "branch": kept, "branches": max(1, len(result.magnetic_branches))}


def _xml_verdict(result: DFTResult) -> str:
    """"agrees": pw.x's XML record matches its stdout and the input asked for; "disagrees"; "missing": no record (or
    none readable)."""
    if result.pw_xml is None:
        return "missing"
    return "disagrees" if any(check_of(p) == "xml_cross_check" for p in result.problems) else "agrees"
