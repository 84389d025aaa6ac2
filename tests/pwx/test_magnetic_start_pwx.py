"""The magnetic branch check with real pw.x: a rattled 2-atom bcc Fe cell started with a weak moment (0.6 μB per
atom) converges to a state with antiparallel moments (total magnetization 0, |M| 1.4 μB); the high-spin start (5 μB)
from the same geometry converges ferromagnetic (M 3.6 μB), 0.09 eV/atom lower (30/240 Ry, 3×3×3 k-points, pw.x 6.7).
The smallest settings found where the weak start really lands on the wrong branch: at 25/200 Ry or with other
rattles of the same size it converged ferromagnetic by itself."""

from __future__ import annotations

import pytest
from ase import Atoms
from ase.build import bulk

from qe_factory import QERunner


def weak_iron() -> Atoms:
    atoms = bulk("Fe", "bcc", a=2.83, cubic=True)
    atoms.rattle(0.2, seed=2)  # closest contact 1.87 Å
    atoms.set_initial_magnetic_moments([0.6, 0.6])
    return atoms


def test_a_weak_start_of_rattled_bcc_iron_ends_on_the_ferromagnetic_branch(fast_config):
    config = fast_config.with_changes(ecutwfc=30, ecutrho=240, timeout=1200)  # kpoint_spacing 0.8: 3×3×3
    given = QERunner(config.with_changes(magnetic_start="given")).run(weak_iron(), uid="fe2")
    assert len(given.attempts) == 1 and given.magnetic_branches == []
    assert abs(given.total_magnetization) < 0.1 and given.pw_xml["absolute_magnetization"] > 1  # antiparallel

    hint = QERunner(config).run(weak_iron(), uid="fe2")  # the same first run, taken in from its directory
    first, second = hint.magnetic_branches
    assert (first.start, second.start) == ([0.6, 0.6], [5.0, 5.0])
    assert first.energy == pytest.approx(given.energy, abs=1e-9) and not first.kept
    assert second.kept and hint.energy == second.energy < first.energy - 0.1
    assert hint.total_magnetization == second.total_magnetization > 3
    assert [a.correction for a in hint.attempts] == [None, "high-spin start"] and hint.succeeded
