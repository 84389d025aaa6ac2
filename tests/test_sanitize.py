"""Sanitizer thresholds, tested at their edges on synthetic parsed outputs."""

from __future__ import annotations

import math

import pytest
from ase.units import GPa

from qe_factory import SanitizerThresholds
from qe_factory.parsers import PwOutput
from qe_factory.sanitize import sanitize


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
