"""Physical checks: nothing unphysical reaches the data set."""

from __future__ import annotations

import numpy as np
from ase.units import GPa

from qe_factory.engine.config import SanitizerThresholds
from qe_factory.engine.parsers import PwOutput


def sanitize(output: PwOutput, natoms: int, limits: SanitizerThresholds | None = None) -> list[str]:
    """Every reason this output must not become a training label; empty when it may."""
    limits = limits or SanitizerThresholds()
    problems = [f"no {name} in the output" for name in output.missing_results()]
    if not output.converged or output.convergence_failed:
        problems.append("SCF not converged")
    if output.forces is not None:
        forces = np.asarray(output.forces, dtype=float)
        if forces.shape != (natoms, 3):
            problems.append(f"forces have shape {forces.shape}, expected ({natoms}, 3)")
        elif not np.all(np.isfinite(forces)):
            problems.append("forces contain NaN/inf")
        elif (fmax := float(np.linalg.norm(forces, axis=1).max())) > limits.max_force:
            problems.append(f"max |force| {fmax:.1f} eV/Å exceeds {limits.max_force} eV/Å")
    if output.energy is not None:
        if not np.isfinite(output.energy):
            problems.append("energy is NaN/inf")
        elif not limits.min_energy_per_atom <= output.energy / natoms <= limits.max_energy_per_atom:
            problems.append(
                f"energy {output.energy / natoms:.3f} eV/atom outside "
                f"[{limits.min_energy_per_atom}, {limits.max_energy_per_atom}]"
            )
    if output.stress is not None:
        stress = np.asarray(output.stress, dtype=float) / GPa
        if not np.all(np.isfinite(stress)):
            problems.append("stress contains NaN/inf")
        else:
            if (smax := float(np.abs(stress).max())) > limits.max_stress:
                problems.append(f"max |stress| {smax:.1f} GPa exceeds {limits.max_stress} GPa")
            if (asym := float(np.abs(stress - stress.T).max())) > limits.max_stress_asymmetry:
                problems.append(f"stress asymmetric by {asym:.2f} GPa (limit {limits.max_stress_asymmetry})")
    if output.negative_rho is not None and output.negative_rho > limits.max_negative_rho:
        problems.append(
            f"{output.negative_rho:.3g} electrons of negative density (limit {limits.max_negative_rho}): "
            "overlapping cores or too low a cutoff"
        )
    return problems


def provenance_problems(output: PwOutput, expected_md5: dict[str, str], expected_names: dict[str, str]) -> list[str]:
    """Where the pseudopotential files pw.x says it read are not the data set's (another file, another md5, or pw.x's
    own fallback directory): the label would be recorded with provenance it does not have."""
    problems = []
    for element, md5 in expected_md5.items():
        read = output.pseudos_read.get(element)
        if read is None:
            if output.pseudos_read:
                problems.append(f"pw.x reports no pseudopotential read for {element}")
            continue
        name = read["path"].rsplit("/", 1)[-1]
        if read["md5"] != md5 or name != expected_names[element]:
            problems.append(
                f"pw.x read {read['path']} (md5 {read['md5']}) for {element}, not the data set's "
                f"{expected_names[element]} (md5 {md5})"
            )
    return problems
