"""Physical checks: nothing unphysical reaches the data set."""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import numpy as np
from ase import Atoms
from ase.units import GPa

from qe_factory.engine.config import SanitizerThresholds
from qe_factory.engine.inputs import PwInput
from qe_factory.engine.parsers import PwOutput
from qe_factory.engine.pwxml import SMEARING_NAMES, PwXml, XmlInput, species_element
from qe_factory.engine.structure import atom_contacts


def sanitize(output: PwOutput, atoms: Atoms, limits: SanitizerThresholds | None = None) -> list[str]:
    """Every reason this output of `atoms` must not become a training label; empty when it may."""
    limits = limits or SanitizerThresholds()
    natoms = len(atoms)
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
        else:
            problems += contact_force_problems(forces, atoms, limits)
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
    return problems + warning_problems(output, limits)


def contact_force_bound(ratio: float | None, limits: SanitizerThresholds) -> float:
    """Largest |F| (eV/Å) an atom may carry when its closest contact is `ratio` × the sum of the covalent radii (None:
    no neighbour within that sum).

    `contact_force` at (or beyond) the covalent radii sum, growing as exp(contact_force_growth × (1 − ratio)) as the
    contact shortens, and no further below `min_contact_ratio`: 15, 25, 41, 67 eV/Å at 1, 0.9, 0.8, ≤ 0.7 by default.
    Measured with pw.x (Si pair compressed along its bond in the diamond cell, 25/200 Ry; H2 in a 6 Å box, 30/240 Ry),
    a compressed bond gives Si 7.6, 16.8, 36.7 eV/Å at 0.9, 0.8, 0.7 of the sum: what a rattled or hot structure
    reaches passes with a factor ≥ 1.8. Shorter contacts are not physics an MLIP data set needs: their forces grow
    without bound (Si 68.8, 126, 229 eV/Å at 0.6, 0.5, 0.4; H2 0.3 Å apart, 0.48 of the sum: 118 eV/Å) and the
    pseudopotential cores overlap, so they are held to the bound at `min_contact_ratio`.
    """
    shortest = min(1.0, max(limits.min_contact_ratio, 1.0 if ratio is None else ratio))
    return limits.contact_force * math.exp(limits.contact_force_growth * (1.0 - shortest))


def contact_force_problems(forces: np.ndarray, atoms: Atoms, limits: SanitizerThresholds) -> list[str]:
    """Atoms whose force exceeds the bound for their closest contact (contact_force_bound), each named with that
    contact."""
    contacts = atom_contacts(atoms)
    symbols = atoms.get_chemical_symbols()
    problems = []
    for i, force in enumerate(np.linalg.norm(forces, axis=1)):
        j, distance, ratio = contacts.get(i, (None, None, None))
        if force <= (bound := contact_force_bound(ratio, limits)):
            continue
        where = (
            f"its closest contact, atom {j} ({symbols[j]}), is {distance:.3f} Å away: {ratio:.2f} of their covalent "
            "radii sum" if j is not None else "it has no neighbour within the sum of covalent radii"
        )
        problems.append(f"atom {i} ({symbols[i]}): |F| {force:.1f} eV/Å exceeds {bound:.1f} eV/Å, its bound: {where}")
    return problems


# pw.x 6.7 messages that mean trouble when printed in (or after) the final SCF iteration, whose density gives the
# label; printed only in earlier iterations they are notes. Any other message (infomsg's "Message from routine",
# "Check: negative starting/core charge", "SCF correction compared to forces is large", which with the factory's
# conv_thr only appears when all forces are below ~3e-3 eV/Å) is kept as a note. Fatal errors (errore: "S matrix not
# positive definite", "too many bands are not converged", "charge is wrong", "problems computing cholesky") stop
# pw.x: those runs fail (errors.PATTERNS) and never reach the sanitizer.
TROUBLE = {
    "eigenvalues not converged": "Davidson left eigenvectors unconverged (c_bands.f90; pw.x's user guide: harmless "
    "only when absent from the last steps of self-consistency)",
    "integrated charge": "the density does not hold the expected number of electrons (electrons.f90; pw.x stops "
    "only beyond 1e-3 relative)",
    "too many iterations in bisection": "the Fermi energy was not found: the occupations are wrong (efermig/efermit)",
    "above the highest band": "the Fermi energy lies above the highest band: too few bands (efermit)",
}


def warning_problems(output: PwOutput, limits: SanitizerThresholds | None = None) -> list[str]:
    """The pw.x messages printed in or after the final SCF iteration that refuse the label (TROUBLE), each with why.
    Davidson's message is a note when that iteration's threshold was pw.x's floor (`davidson_noise`: missed by
    noise after a restart) or when its unconverged eigenvalues are a small part of all (`davidson_fraction`; pw.x's
    user guide: trouble when "a significant part of the total")."""
    limits = limits or SanitizerThresholds()
    noise = output.final_ethr is not None and output.final_ethr <= limits.davidson_noise
    few = bool(output.eigenvalues) and output.final_unconverged <= limits.davidson_fraction * output.eigenvalues
    return [
        f"pw.x printed '{warning}' in the final SCF iteration: {why}"
        for warning in output.final_warnings
        for text, why in TROUBLE.items()
        if text in warning.lower() and not ((noise or few) and text == "eigenvalues not converged")
    ]


class CohesiveCheck(NamedTuple):
    """The cohesive energy (eV/atom, None when not judged), why it is refused, and why it could not be judged."""

    cohesive_energy: float | None
    problems: list[str]
    not_judged: list[str]


def cohesive_check(
    energy: float | None, symbols: list[str], e0s: dict[str, float] | None, limits: SanitizerThresholds | None = None,
) -> CohesiveCheck:
    """(E − Σ E0) / N against [min_cohesive_energy, max_cohesive_energy], E0 the isolated-atom energy of each element
    (eV) computed with the label's settings.

    Lower bound −10 eV/atom: the largest cohesive energy of any element is tungsten's, 8.90 eV/atom (Kittel,
    Introduction to Solid State Physics, 8th ed., Table 3.1; then Os 8.17, Ta 8.10, diamond 7.37), strongly bound
    compounds lie in the same range per atom (Al2O3 6.4 eV/atom from its heat of formation and the elements' cohesive
    and O2 binding energies), and PBE overbinds by a few tenths of an eV. Upper bound +2 eV/atom: ground states are
    bound (< 0), a free atom or a dilute gas sits at 0, and a hot, rattled or compressed structure lies within a few
    eV/atom of its ground state. Measured with pw.x (tests/data fixtures and a scan at their settings): Si crystal
    −4.41, the 2-atom Si cell with its pair compressed to 0.7 / 0.6 of the covalent radii sum +0.32 / +6.0, H2 at 0.7
    / 0.6 −0.24 / +1.31 eV/atom; overlapping cores land outside: H2 0.3 Å apart +4.47, the Si pair 0.6 Å apart in the
    diamond cell +88.3; a carbon pseudopotential read for Si −15.4 eV/atom. Data sets that want short dimers raise it.
    """
    limits = limits or SanitizerThresholds()
    if energy is None or not np.isfinite(energy):
        return CohesiveCheck(None, [], ["cohesive energy: no finite energy"])
    missing = sorted({s for s in symbols if s not in (e0s or {})})
    if missing:
        return CohesiveCheck(None, [], [f"cohesive energy: no isolated-atom energy (E0) for {', '.join(missing)}"])
    cohesive = (energy - sum(e0s[s] for s in symbols)) / len(symbols)
    low, high = limits.min_cohesive_energy, limits.max_cohesive_energy
    problems = [] if low <= cohesive <= high else [
        f"cohesive energy {cohesive:+.3f} eV/atom (E − ΣE0 per atom) outside [{low:g}, {high:g}]: "
        + ("more bound than any known solid" if cohesive < low else "far above the free atoms (overlapping cores?)")
    ]
    return CohesiveCheck(cohesive, problems, [])


def provenance_problems(output: PwOutput, expected_md5: dict[str, str], expected_names: dict[str, str]) -> list[str]:
    """Where the pseudopotential files pw.x says it read are not the data set's (another file, another md5, pw.x's
    own fallback directory, or a file for another element under the data set's name: pw.x names each file's element as
    its header says): the label would be recorded with provenance it does not have."""
    problems = [
        f"pw.x read {read['path']} (md5 {read['md5']}) as a pseudopotential for {element}, an element the structure "
        "does not hold: a file of another element under the data set's name"
        for element, read in output.pseudos_read.items() if element not in expected_md5
    ]
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


# Each sanitizer check and the words its refusals start with (or hold), in the order a problem is matched: what a
# data-set card counts refusals by (check_of). Named after the threshold they use where they have one.
CHECKS = {
    "xml_cross_check": r"XML|data-file-schema\.xml",
    "pseudopotential_provenance": r"^pw\.x (read|reports no pseudopotential)",
    "pw_warnings": r"^pw\.x printed '",
    "scf_converged": r"^SCF not converged",
    "missing_results": r"^no \w+ in the output",
    "finite_values": r"(NaN/inf|have shape)",
    "max_force": r"^max \|force\|",
    "contact_force": r"^atom \d+ \(\w+\): \|F\|",
    "energy_per_atom": r"^energy .* eV/atom outside",
    "max_stress": r"^max \|stress\|",
    "max_stress_asymmetry": r"^stress asymmetric",
    "max_negative_rho": r"electrons of negative density",
    "cohesive_energy": r"^cohesive energy",
}


def check_of(problem: str) -> str:
    """The sanitizer check (CHECKS) a problem comes from; "other" for one no check words so."""
    return next((name for name, pattern in CHECKS.items() if re.search(pattern, problem)), "other")


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
