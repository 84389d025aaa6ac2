"""Sanitizer thresholds, tested at their edges on synthetic parsed outputs, and the sanitizer on the real fixtures:
every unphysical one flagged by its cause, every sensible one passed by the defaults."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.io import read
from ase.units import Bohr, GPa, Ry

from qe_factory import SanitizerThresholds
from qe_factory.engine.parsers import PwOutput, parse_pw_output
from qe_factory.engine.sanitize import cohesive_check, contact_force_bound, sanitize, warning_problems

DATA = Path(__file__).resolve().parents[1] / "data"
# two Si atoms 3 Å apart in a box: no contact within their covalent radii sum (2.22 Å), so the force bound is
# contact_force; `pair(ratio)` puts them at `ratio` × that sum
APART = Atoms("Si2", positions=[[2.0, 5.0, 5.0], [5.0, 5.0, 5.0]], cell=[10.0, 10.0, 10.0], pbc=True)
SI_SUM = 2 * 1.11  # ase.data.covalent_radii of Si, twice
NO_CONTACT_BOUND = SanitizerThresholds(contact_force=1e4)  # the absolute cap alone


def pair(ratio: float) -> Atoms:
    atoms = APART.copy()
    atoms.positions[1, 0] = 2.0 + ratio * SI_SUM
    return atoms


def output(**changes) -> PwOutput:
    good = dict(
        energy=-200.0, forces=[[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], stress=[[0.01, 0, 0], [0, 0.01, 0], [0, 0, 0.01]],
        converged=True, job_done=True,
    )
    return PwOutput(**{**good, **changes})


def test_good_output_passes():
    assert sanitize(output(), APART) == []


def test_force_threshold_edge():
    limits = NO_CONTACT_BOUND.model_copy(update={"max_force": 1000.0})
    assert sanitize(output(forces=[[1000.0, 0, 0], [-1000.0, 0, 0]]), APART, limits) == []
    problems = sanitize(output(forces=[[1000.1, 0, 0], [-1000.1, 0, 0]]), APART, limits)
    assert problems == ["max |force| 1000.1 eV/Å exceeds 1000.0 eV/Å"]


def test_nan_anywhere():
    assert "forces contain NaN/inf" in sanitize(output(forces=[[math.nan, 0, 0], [0, 0, 0]]), APART)
    assert "energy is NaN/inf" in sanitize(output(energy=math.inf), APART)
    assert "stress contains NaN/inf" in sanitize(output(stress=[[math.nan, 0, 0], [0, 0, 0], [0, 0, 0]]), APART)


def test_unconverged_and_missing_results():
    problems = sanitize(output(converged=False, convergence_failed=True, forces=None, stress=None), APART)
    assert problems == ["no forces in the output", "no stress in the output", "SCF not converged"]


def test_wrong_force_shape():
    assert sanitize(output(forces=[[0, 0, 0]]), APART) == ["forces have shape (1, 3), expected (2, 3)"]


def test_energy_window_edges():
    limits = SanitizerThresholds(min_energy_per_atom=-1000, max_energy_per_atom=0)
    assert sanitize(output(energy=-2000.0), APART, limits) == []
    assert "outside" in sanitize(output(energy=-2000.2), APART, limits)[0]
    assert "outside" in sanitize(output(energy=0.1), APART, limits)[0]


def test_stress_magnitude_and_symmetry_edges():
    limits = SanitizerThresholds(max_stress=100.0, max_stress_asymmetry=0.5)
    s = 100.0 * GPa
    assert sanitize(output(stress=[[s, 0, 0], [0, 0, 0], [0, 0, 0]]), APART, limits) == []
    big = 100.1 * GPa
    assert "max |stress| 100.1 GPa" in sanitize(output(stress=[[big, 0, 0], [0, 0, 0], [0, 0, 0]]), APART, limits)[0]
    skew = 0.6 * GPa
    assert "asymmetric" in sanitize(output(stress=[[0, skew, 0], [0, 0, 0], [0, 0, 0]]), APART, limits)[0]


def test_negative_density_edge():
    limits = SanitizerThresholds(max_negative_rho=0.1)
    assert sanitize(output(negative_rho=0.1), APART, limits) == []
    assert "negative density" in sanitize(output(negative_rho=0.2), APART, limits)[0]


# -- the force bound from each atom's closest contact ------------------------------------------------------------------
@pytest.mark.parametrize("ratio, bound", [(None, 15.0), (1.2, 15.0), (1.0, 15.0), (0.8, 15.0 * math.e),
                                          (0.7, 15.0 * math.exp(1.5)), (0.3, 15.0 * math.exp(1.5))])
def test_default_contact_force_bound(ratio, bound):
    assert contact_force_bound(ratio, SanitizerThresholds()) == pytest.approx(bound)


def test_contact_force_bound_edge_names_the_contact():
    atoms = pair(0.8)
    bound = contact_force_bound(0.8, SanitizerThresholds())
    assert sanitize(output(forces=[[bound, 0, 0], [-bound * 0.999, 0, 0]]), atoms) == []
    problems = sanitize(output(forces=[[bound * 1.001, 0, 0], [-bound * 0.999, 0, 0]]), atoms)
    assert problems == [
        f"atom 0 (Si): |F| {bound * 1.001:.1f} eV/Å exceeds {bound:.1f} eV/Å, its bound: its closest contact, atom 1 "
        f"(Si), is {0.8 * SI_SUM:.3f} Å away: 0.80 of their covalent radii sum"
    ]


def test_a_large_force_without_a_close_neighbour_is_flagged():
    problems = sanitize(output(forces=[[16.0, 0, 0], [-1.0, 0, 0]]), APART)
    assert problems == ["atom 0 (Si): |F| 16.0 eV/Å exceeds 15.0 eV/Å, its bound: it has no neighbour within the sum "
                        "of covalent radii"]


def test_contact_force_settings_are_used():
    limits = SanitizerThresholds(contact_force=20.0, contact_force_growth=0.0)
    assert sanitize(output(forces=[[19.9, 0, 0], [-19.9, 0, 0]]), pair(0.5), limits) == []
    assert len(sanitize(output(forces=[[20.1, 0, 0], [-20.1, 0, 0]]), pair(0.5), limits)) == 2


# -- pw.x's messages ---------------------------------------------------------------------------------------------------
def test_trouble_in_the_final_scf_iteration_refuses_the_label():
    warning = "c_bands:  2 eigenvalues not converged"
    (problem,) = sanitize(output(warnings=[warning], final_warnings=[warning]), APART)
    assert problem.startswith(f"pw.x printed '{warning}' in the final SCF iteration: Davidson")


def test_trouble_in_earlier_iterations_and_other_messages_are_notes():
    notes = ["c_bands:  2 eigenvalues not converged", "Check: negative core charge=   -0.000355",
             "SCF correction compared to forces is large: reduce conv_thr to get better values"]
    assert sanitize(output(warnings=notes, final_warnings=notes[1:]), APART) == []


@pytest.mark.parametrize("warning", [
    "WARNING: integrated charge=     7.99000000, expected=     8.00000000",
    "Warning: too many iterations in bisection",
    "Warning: ef =    6.000000 is above the highest band at k-point   1",
])
def test_each_trouble_message_is_fatal_in_the_final_iteration(warning):
    assert len(sanitize(output(final_warnings=[warning]), APART)) == 1


def test_the_parser_tells_the_final_iteration_apart():
    """si_scf's real pw.out with Davidson's message inserted (real pw.x prints it only on inputs that are not cheap to
    make): in the first iteration it is a warning only; in the last, a final warning too."""
    text = fixture_text("si_scf")
    starts = [m.start() for m in re.finditer(r"^ *iteration #", text, re.MULTILINE)]
    line = "     c_bands:  1 eigenvalues not converged\n"
    first_end, last_end = text.index("\n", starts[0]) + 1, text.index("\n", starts[-1]) + 1
    early = parse_pw_output(text[:first_end] + line + text[first_end:])
    late = parse_pw_output(text[:last_end] + line + text[last_end:])
    assert early.warnings == late.warnings == ["c_bands:  1 eigenvalues not converged"]
    assert early.final_warnings == [] and late.final_warnings == late.warnings


# -- the cohesive-energy window ----------------------------------------------------------------------------------------
def test_cohesive_energy_window_edges():
    e0s = {"Si": -100.0, "O": -400.0}
    symbols = ["Si", "O", "O"]
    base = -900.0
    assert cohesive_check(base - 30.0, symbols, e0s) == (-10.0, [], [])
    assert cohesive_check(base + 6.0, symbols, e0s) == (2.0, [], [])
    (low,) = cohesive_check(base - 30.3, symbols, e0s).problems
    assert low.startswith("cohesive energy -10.100 eV/atom") and "more bound than any known solid" in low
    (high,) = cohesive_check(base + 6.3, symbols, e0s).problems
    assert high.startswith("cohesive energy +2.100 eV/atom") and "far above the free atoms" in high
    wide = SanitizerThresholds(min_cohesive_energy=-11, max_cohesive_energy=3)
    assert cohesive_check(base - 30.3, symbols, e0s, wide).problems == []


@pytest.mark.parametrize("e0s, missing", [(None, "O, Si"), ({}, "O, Si"), ({"Si": -100.0}, "O")])
def test_without_an_e0_the_cohesive_energy_is_not_judged(e0s, missing):
    check = cohesive_check(-900.0, ["Si", "O", "O"], e0s)
    assert check == (None, [], [f"cohesive energy: no isolated-atom energy (E0) for {missing}"])


@pytest.mark.parametrize("field", ["max_force", "max_stress", "max_negative_rho", "contact_force"])
def test_thresholds_must_be_positive(field):
    with pytest.raises(ValueError):
        SanitizerThresholds(**{field: 0})


# -- the real pw.x fixtures (tests/data, made by tests/data/make_fixtures.py) ----------------------------------------
def fixture_text(name: str, filename: str = "pw.out") -> str:
    return (DATA / name / filename).read_text()


def fixture_atoms(name: str) -> Atoms:
    """The structure, from the input (not from the output under test)."""
    return read(DATA / name / "pw.in", format="espresso-in")


def fixture_output(name: str) -> PwOutput:
    return parse_pw_output(fixture_text(name))


def sanitize_fixture(name: str, limits: SanitizerThresholds | None = None) -> list[str]:
    return sanitize(fixture_output(name), fixture_atoms(name), limits)


def printed_max_force(name: str) -> float:
    """Largest |F| (eV/Å) of the printed total-force block, read with whitespace splitting only."""
    lines = fixture_text(name).splitlines()
    start = max(i for i, line in enumerate(lines) if "Forces acting on atoms" in line)
    rows = [line.split("=")[1].split() for line in lines[start + 2 : start + 2 + len(fixture_atoms(name))]]
    return float(np.linalg.norm(np.array(rows, dtype=float), axis=1).max()) * Ry / Bohr


# the isolated-atom energies of the lone-atom fixtures, each computed at its neighbours' settings
E0S = {"Si": parse_pw_output(fixture_text("si_atom")).energy, "H": parse_pw_output(fixture_text("h_atom")).energy}
SENSIBLE = ["si_scf", "si_smeared", "si_verbosity_high", "si_too_many_pools", "fe_magnetic", "si_atom", "h_atom"]


@pytest.mark.parametrize("name", SENSIBLE)
def test_sensible_fixtures_pass_the_defaults(name):
    assert sanitize_fixture(name) == []
    check = cohesive_check(fixture_output(name).energy, fixture_atoms(name).get_chemical_symbols(), E0S)
    assert check.problems == []
    if name == "fe_magnetic":  # no Fe atom among the fixtures
        assert check.not_judged == ["cohesive energy: no isolated-atom energy (E0) for Fe"]
    else:
        assert check.not_judged == [] and -5.0 < check.cohesive_energy <= 0.0


def test_the_sensible_fixtures_stay_far_from_the_force_bound():
    for name in SENSIBLE:
        assert printed_max_force(name) < 0.15 * contact_force_bound(None, SanitizerThresholds())


def test_unconverged_fixture_is_refused_as_unconverged():
    problems = sanitize_fixture("si_unconverged")
    assert "SCF not converged" in problems
    assert {"no energy in the output", "no forces in the output", "no stress in the output"} <= set(problems)


def test_truncated_fixture_is_refused_for_its_missing_results():
    # cut inside the forces block after the '!' line: the SCF converged, forces and stress are lost
    assert sanitize_fixture("si_truncated") == ["no forces in the output", "no stress in the output"]


def test_h2_overlap_is_refused_for_its_forces_at_a_short_contact():
    """Two H atoms 0.3 Å apart (0.48 of their covalent radii sum) converge to 118 eV/Å: above the bound that holds
    below 0.7 of the sum (67 eV/Å); the cohesive energy (+4.5 eV/atom over two free H atoms) is flagged too."""
    fmax = printed_max_force("h2_overlap")
    assert fmax > 100
    problems = sanitize_fixture("h2_overlap")
    assert problems == [
        f"atom {i} (H): |F| {fmax:.1f} eV/Å exceeds 67.2 eV/Å, its bound: its closest contact, atom {1 - i} (H), is "
        "0.300 Å away: 0.48 of their covalent radii sum" for i in (0, 1)
    ]
    (problem,) = cohesive_check(fixture_output("h2_overlap").energy, ["H", "H"], E0S).problems
    assert problem.startswith("cohesive energy +4.4")


def test_h2_overlap_is_refused_by_a_tight_force_limit():
    fmax = printed_max_force("h2_overlap")
    problems = sanitize_fixture("h2_overlap", SanitizerThresholds(max_force=50))
    assert problems == [f"max |force| {fmax:.1f} eV/Å exceeds 50.0 eV/Å"]
    flat = SanitizerThresholds(max_force=fmax * 1.001, contact_force=fmax * 1.001, contact_force_growth=0)
    assert sanitize_fixture("h2_overlap", flat) == []


def test_si_pair_overlap_is_refused_for_its_forces_and_its_cohesive_energy():
    """The Si pair 0.6 Å apart in the diamond cell (the distance pre-check off) converges: 556 eV/Å, under the absolute
    cap of 1000 eV/Å, and 88 eV/atom above two free Si atoms."""
    problems = sanitize_fixture("si_pair_overlap")
    assert len(problems) == 2 and all("0.600 Å away: 0.27 of their covalent radii sum" in p for p in problems)
    check = cohesive_check(fixture_output("si_pair_overlap").energy, ["Si", "Si"], E0S)
    assert check.cohesive_energy == pytest.approx(88.3, abs=0.1)
    assert check.problems and "far above the free atoms" in check.problems[0]


def test_si_wrong_pseudo_is_refused_for_its_pseudopotential_and_its_cohesive_energy():
    """pw.x read carbon's UPF under the Si file name: the forces and stress look sane, the provenance check names the
    element the file holds and the cohesive energy against the real Si atom is below any solid's."""
    from qe_factory.engine.sanitize import provenance_problems

    out = fixture_output("si_wrong_pseudo")
    assert sanitize_fixture("si_wrong_pseudo") == []
    name = "Si.pbe-nl-rrkjus_psl.1.0.0.UPF"
    right = fixture_output("si_scf").pseudos_read["Si"]["md5"]
    problems = provenance_problems(out, {"Si": right}, {"Si": name})
    read_as_c = out.pseudos_read["C"]
    assert read_as_c["path"].endswith(name)
    assert problems == [
        f"pw.x read {read_as_c['path']} (md5 {read_as_c['md5']}) as a pseudopotential for C, an element the structure "
        "does not hold: a file of another element under the data set's name",
        "pw.x reports no pseudopotential read for Si",
    ]
    (problem,) = cohesive_check(out.energy, ["Si", "Si"], E0S).problems
    assert "more bound than any known solid" in problem


def test_the_wrong_pseudo_is_refused_before_pw_x_runs(tmp_path):
    """What the factory does with the pseudo_dir of si_wrong_pseudo: pseudos.py reads the UPF header (element C) and
    refuses it, with the md5 the family table expects."""
    from qe_factory import DFTConfig, PseudopotentialError, QERunner
    from qe_factory.engine.pseudos import load_family

    name = "Si.pbe-nl-rrkjus_psl.1.0.0.UPF"
    (tmp_path / name).write_bytes((load_family("debian-pbe").directory / "C.pbe-rrkjus.UPF").read_bytes())
    runner = QERunner(DFTConfig(pseudo_dir=tmp_path, allow_low_cutoffs=True, work_dir=tmp_path / "runs"))
    with pytest.raises(PseudopotentialError, match=rf"Si: .*{name} is a pseudopotential for C"):
        runner.prepare(fixture_atoms("si_scf"), "wrong-pseudo")


def test_the_pseudopotentials_pw_read_are_checked_against_the_data_set():
    """pw.x prints the path and md5 of every file it read: a different file (pw.x's own fallback directory, an LDA
    file under a PBE name) makes the label's recorded provenance untrue and is flagged."""
    from qe_factory.engine.sanitize import provenance_problems

    out = parse_pw_output((DATA / "si_scf" / "pw.out").read_text())
    printed = re.search(r"MD5 check sum:\s*(\S+)", (DATA / "si_scf" / "pw.out").read_text()).group(1)
    name = "Si.pbe-nl-rrkjus_psl.1.0.0.UPF"
    assert out.pseudos_read["Si"]["md5"] == printed
    assert provenance_problems(out, {"Si": printed}, {"Si": name}) == []
    (problem,) = provenance_problems(out, {"Si": "0" * 32}, {"Si": name})
    assert f"md5 {printed}" in problem and "not the data set's" in problem
    assert provenance_problems(out, {"Si": printed}, {"Si": "Si.other.UPF"})


# -- QERunner.build_result: the judgement in the result ----------------------------------------------------------------
def built(name: str, e0s: dict[str, float] | None = None, output: PwOutput | None = None, **settings):
    """The DFTResult build_result makes of a fixture's real output, with the fixture's settings as nominal input."""
    from qe_factory import DFTConfig, QERunner
    from qe_factory.engine.runner import ScfOutcome

    fixture_settings = {"ecutwfc": 25.0, "ecutrho": 200.0, "kpoint_spacing": 0.6, "allow_low_cutoffs": True}
    config = DFTConfig(**{**fixture_settings, **settings})
    runner, atoms = QERunner(config), fixture_atoms(name)
    pw_input = runner.generator.generate(atoms)
    outcome = ScfOutcome(attempts=[], output=output or fixture_output(name), pw_input=pw_input)
    return runner.build_result(name, atoms, outcome, pw_input, e0s=e0s)


def test_a_result_with_e0s_carries_its_cohesive_energy():
    result = built("si_scf", E0S)
    assert result.succeeded and result.not_judged == [] and result.warnings == []
    assert result.cohesive_energy == pytest.approx((result.energy - 2 * E0S["Si"]) / 2) and result.cohesive_energy < -4


def test_a_result_without_e0s_says_it_was_not_judged():
    result = built("si_scf")
    assert result.succeeded and result.cohesive_energy is None
    assert result.not_judged == ["cohesive energy: no isolated-atom energy (E0) for Si"]


def test_the_overlapping_pair_is_refused_with_every_cause():
    result = built("si_pair_overlap", E0S, min_distance_factor=0.0)
    assert not result.succeeded and result.error_type == "UNPHYSICAL"
    assert result.cohesive_energy == pytest.approx(88.3, abs=0.1)
    assert any("cohesive energy +88.28" in p for p in result.problems)
    assert any("0.27 of their covalent radii sum" in p for p in result.problems)


def test_the_wrong_element_pseudo_is_refused_by_name():
    result = built("si_wrong_pseudo", E0S)
    assert not result.succeeded
    assert any("as a pseudopotential for C" in p for p in result.problems)
    assert any("more bound than any known solid" in p for p in result.problems)


def test_davidson_noise_at_pw_xs_threshold_floor_is_a_note():
    """A real restart at ethr 1e-13 (pw.x's floor: tests/data/si_restart_noise) prints Davidson's message in its final
    iteration: noise, kept as a note. Above the floor (si_scf ends at ethr 1.4e-11) the same message refuses."""
    noisy = fixture_output("si_restart_noise")
    assert noisy.converged and noisy.final_ethr == 1e-13
    assert any("eigenvalues not converged" in w for w in noisy.final_warnings)
    kept = built("si_restart_noise", E0S, output=noisy)
    assert kept.succeeded, kept.error_message
    assert any("eigenvalues not converged" in w for w in kept.warnings)
    assert noisy.final_unconverged == 7 and noisy.eigenvalues  # over its five "c_bands" lines
    assert warning_problems(noisy, SanitizerThresholds(davidson_noise=1e-14, davidson_fraction=0.0))  # configurable


def test_davidson_leaving_a_few_eigenvalues_is_a_note_many_refuse():
    """The README's example made it real: rattled Si, 8 states × 172 k-points, one eigenvalue unconverged at ethr
    2e-10 in the last iteration of a converged SCF. A note; a significant part of the total refuses (user guide)."""
    scf = fixture_output("si_scf")
    assert scf.eigenvalues and scf.final_ethr == pytest.approx(1.39e-11) and scf.final_unconverged == 0
    one = "c_bands:  1 eigenvalues not converged"
    few = scf.model_copy(update={"final_warnings": [one], "final_unconverged": 1, "eigenvalues": 1376})
    many = scf.model_copy(update={"final_warnings": [one], "final_unconverged": 200, "eigenvalues": 1376})
    unknown = scf.model_copy(update={"final_warnings": [one], "final_unconverged": 1, "eigenvalues": None})
    assert warning_problems(few) == [] and len(warning_problems(many)) == len(warning_problems(unknown)) == 1


def test_warnings_are_kept_and_the_fatal_ones_refuse_the_label():
    kept = built("si_too_many_pools", E0S, kpoint_spacing=10.0)
    assert kept.succeeded and any("divide_et_impera" in w for w in kept.warnings)
    # Mocked: no cheap real pw.x input prints Davidson's message in its last SCF iteration; si_scf's real output with
    # the message added as the parser would record it.
    warning = "c_bands:  1 eigenvalues not converged"
    output = fixture_output("si_scf").model_copy(
        update={"warnings": [warning], "final_warnings": [warning], "final_unconverged": 1, "eigenvalues": 8})
    refused = built("si_scf", E0S, output=output)
    assert not refused.succeeded and refused.warnings == [warning]
    assert f"pw.x printed '{warning}' in the final SCF iteration" in refused.error_message
