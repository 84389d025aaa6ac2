"""Physical checks: nothing unphysical reaches the data set."""

from __future__ import annotations

from typing import Any

import numpy as np
from ase.units import GPa

from qe_factory.engine.config import SanitizerThresholds
from qe_factory.engine.inputs import PwInput
from qe_factory.engine.parsers import PwOutput
from qe_factory.engine.pwxml import SMEARING_NAMES, PwXml, XmlInput, species_element


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


# How far pw.x's XML may be from its stdout: the stdout's rounding (8 decimals in Ry units: ≤ 7e-8 eV, 1.3e-7 eV/Å,
# 4.6e-7 eV/Å³; magnetization with 2 decimals) with room to spare, far below any physical difference.
XML_TOLERANCE = {"energy": 1e-6, "forces": 1e-6, "stress": 1e-6, "magnetization": 0.006}


def _disagreement(name: str, xml_value: Any, stdout_value: Any) -> str | None:
    if xml_value is None and stdout_value is None:
        return None
    if xml_value is None or stdout_value is None:
        where = "XML" if xml_value is None else "stdout"
        return f"pw.x's XML and stdout disagree: no {name} in its {where}"
    a, b = np.asarray(xml_value, dtype=float), np.asarray(stdout_value, dtype=float)
    if a.shape != b.shape:
        return f"pw.x's XML and stdout disagree: {name} of shape {a.shape} vs {b.shape}"
    limit = XML_TOLERANCE[name.split()[-1]]  # "total magnetization" → "magnetization"
    if (difference := float(np.abs(a - b).max())) > limit:
        return f"pw.x's XML and stdout disagree: {name} differs by {difference:.3g} (limit {limit})"
    return None


def _used_differently(xml_input: XmlInput, pw_input: PwInput) -> list[str]:
    """Where the input pw.x says it used differs from what the factory asked for."""
    system = pw_input.parameters.get("system", {})
    asked: dict[str, Any] = {
        "ecutwfc": system.get("ecutwfc"), "ecutrho": system.get("ecutrho"), "degauss": system.get("degauss"),
        "smearing": SMEARING_NAMES.get(str(system.get("smearing")).lower(), system.get("smearing")),
        "lsda": system.get("nspin") == 2,
        "k-points": "gamma" if pw_input.isolated else [*pw_input.kpts, 0, 0, 0],
        "pseudopotentials": pw_input.pseudopotentials,
    }
    used = {
        **{key: getattr(xml_input, key) for key in ("ecutwfc", "ecutrho", "degauss", "smearing", "lsda")},
        "k-points": "gamma" if xml_input.gamma_only else [*(xml_input.kpoints or []), *(xml_input.kpoint_shift or [])],
        "pseudopotentials": {species_element(s): name for s, name in xml_input.pseudopotentials.items()},
    }
    problems = []
    for key, value in asked.items():
        same = (
            value is not None and used[key] is not None and np.isclose(value, used[key], rtol=1e-9, atol=0)
            if key in ("ecutwfc", "ecutrho", "degauss") else value == used[key]
        )
        if not same:
            problems.append(f"pw.x used {key} {used[key]!r} (its XML), not the {value!r} asked for")
    return problems


def xml_problems(xml: PwXml, output: PwOutput, pw_input: PwInput) -> list[str]:
    """Where pw.x's XML record of a run disagrees with its stdout (results, magnetization, convergence) or with the
    input the factory asked for (cutoffs, smearing, spin, k-points, pseudopotential files)."""
    problems = [] if xml.converged == output.converged else [
        f"pw.x's XML and stdout disagree: converged {xml.converged} vs {output.converged}"
    ]
    pairs = [  # an unconverged run's XML has its last iteration's energy: no result, as pw.out prints none
        ("energy", xml.energy if xml.converged else None, output.energy), ("forces", xml.forces, output.forces),
        ("stress", xml.stress, output.stress),
        ("total magnetization", xml.total_magnetization, output.total_magnetization),
        ("absolute magnetization", xml.absolute_magnetization, output.absolute_magnetization),
    ]
    problems += [problem for pair in pairs if (problem := _disagreement(*pair))]
    return problems + _used_differently(xml.input, pw_input)
