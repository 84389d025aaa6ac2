"""Sanitizer thresholds, tested at their edges on synthetic parsed outputs, and the sanitizer on the real fixtures."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from ase.units import Bohr, GPa, Ry

from qe_factory import SanitizerThresholds
from qe_factory.engine.parsers import PwOutput, parse_pw_output
from qe_factory.engine.sanitize import sanitize

DATA = Path(__file__).resolve().parents[1] / "data"


def output(**changes) -> PwOutput:
    good = dict(
        energy=-200.0, forces=[[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], stress=[[0.01, 0, 0], [0, 0.01, 0], [0, 0, 0.01]],
        converged=True, job_done=True,
    )
    return PwOutput(**{**good, **changes})


def test_good_output_passes():
    assert sanitize(output(), 2) == []


def test_force_threshold_edge():
    limits = SanitizerThresholds(max_force=1000.0)
    assert sanitize(output(forces=[[1000.0, 0, 0], [-1000.0, 0, 0]]), 2, limits) == []
    problems = sanitize(output(forces=[[1000.1, 0, 0], [-1000.1, 0, 0]]), 2, limits)
    assert problems == ["max |force| 1000.1 eV/Å exceeds 1000.0 eV/Å"]


def test_nan_anywhere():
    assert "forces contain NaN/inf" in sanitize(output(forces=[[math.nan, 0, 0], [0, 0, 0]]), 2)
    assert "energy is NaN/inf" in sanitize(output(energy=math.inf), 2)
    assert "stress contains NaN/inf" in sanitize(output(stress=[[math.nan, 0, 0], [0, 0, 0], [0, 0, 0]]), 2)


def test_unconverged_and_missing_results():
    problems = sanitize(output(converged=False, convergence_failed=True, forces=None, stress=None), 2)
    assert problems == ["no forces in the output", "no stress in the output", "SCF not converged"]


def test_wrong_force_shape():
    assert sanitize(output(forces=[[0, 0, 0]]), 2) == ["forces have shape (1, 3), expected (2, 3)"]


def test_energy_window_edges():
    limits = SanitizerThresholds(min_energy_per_atom=-1000, max_energy_per_atom=0)
    assert sanitize(output(energy=-2000.0), 2, limits) == []
    assert "outside" in sanitize(output(energy=-2000.2), 2, limits)[0]
    assert "outside" in sanitize(output(energy=0.1), 2, limits)[0]


def test_stress_magnitude_and_symmetry_edges():
    limits = SanitizerThresholds(max_stress=100.0, max_stress_asymmetry=0.5)
    s = 100.0 * GPa
    assert sanitize(output(stress=[[s, 0, 0], [0, 0, 0], [0, 0, 0]]), 2, limits) == []
    big = 100.1 * GPa
    assert "max |stress| 100.1 GPa" in sanitize(output(stress=[[big, 0, 0], [0, 0, 0], [0, 0, 0]]), 2, limits)[0]
    skew = 0.6 * GPa
    assert "asymmetric" in sanitize(output(stress=[[0, skew, 0], [0, 0, 0], [0, 0, 0]]), 2, limits)[0]


def test_negative_density_edge():
    limits = SanitizerThresholds(max_negative_rho=0.1)
    assert sanitize(output(negative_rho=0.1), 2, limits) == []
    assert "negative density" in sanitize(output(negative_rho=0.2), 2, limits)[0]


@pytest.mark.parametrize("field", ["max_force", "max_stress", "max_negative_rho"])
def test_thresholds_must_be_positive(field):
    with pytest.raises(ValueError):
        SanitizerThresholds(**{field: 0})


# -- the real pw.x fixtures (tests/data, made by tests/data/make_fixtures.py) ----------------------------------------
def fixture_text(name: str, filename: str = "pw.out") -> str:
    return (DATA / name / filename).read_text()


def fixture_natoms(name: str) -> int:
    """The atom count of the structure, from the input (not from the output under test)."""
    return int(re.search(r"^\s*nat\s*=\s*(\d+)", fixture_text(name, "pw.in"), re.MULTILINE).group(1))


def sanitize_fixture(name: str, limits: SanitizerThresholds | None = None) -> list[str]:
    return sanitize(parse_pw_output(fixture_text(name)), fixture_natoms(name), limits)


def printed_max_force(name: str) -> float:
    """Largest |F| (eV/Å) of the printed total-force block, read with whitespace splitting only."""
    lines = fixture_text(name).splitlines()
    start = max(i for i, line in enumerate(lines) if "Forces acting on atoms" in line)
    rows = [line.split("=")[1].split() for line in lines[start + 2 : start + 2 + fixture_natoms(name)]]
    return float(np.linalg.norm(np.array(rows, dtype=float), axis=1).max()) * Ry / Bohr


@pytest.mark.parametrize("name", ["si_scf", "fe_magnetic", "si_verbosity_high"])
def test_converged_fixtures_pass_the_defaults(name):
    assert sanitize_fixture(name) == []


def test_unconverged_fixture_is_refused_as_unconverged():
    problems = sanitize_fixture("si_unconverged")
    assert "SCF not converged" in problems
    assert {"no energy in the output", "no forces in the output", "no stress in the output"} <= set(problems)


def test_truncated_fixture_is_refused_for_its_missing_results():
    # cut inside the forces block after the '!' line: the SCF converged, forces and stress are lost
    assert sanitize_fixture("si_truncated") == ["no forces in the output", "no stress in the output"]


def test_h2_overlap_passes_the_default_thresholds():
    """KNOWN GAP, not a desired behaviour: two H atoms 0.3 Å apart converge to forces above 100 eV/Å, and the default
    max_force (1000 eV/Å) lets this unphysical frame through. This test documents today's behaviour; when the
    defaults (or a geometry check) start refusing it, change this test to expect the refusal."""
    assert printed_max_force("h2_overlap") > 100
    assert sanitize_fixture("h2_overlap") == []


def test_h2_overlap_is_refused_by_a_tight_force_limit():
    fmax = printed_max_force("h2_overlap")
    problems = sanitize_fixture("h2_overlap", SanitizerThresholds(max_force=50))
    assert problems == [f"max |force| {fmax:.1f} eV/Å exceeds 50.0 eV/Å"]
    assert sanitize_fixture("h2_overlap", SanitizerThresholds(max_force=fmax * 1.001)) == []


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
