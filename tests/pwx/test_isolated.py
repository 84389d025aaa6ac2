"""Isolated atoms (the E0 references of MLIP training) and a molecule in a periodic box, with real pw.x: Γ only,
spin-polarised where the ground state is, converged at the factory's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from ase import Atoms
from ase.build import molecule

from qe_factory import QERunner


def in_box(atoms: Atoms, edge: float = 8.0) -> Atoms:
    atoms.cell, atoms.pbc = [edge, edge, edge], True  # periodic, as users give them
    atoms.center()
    return atoms


@pytest.mark.parametrize(
    "name, atoms, moment",
    [("H", Atoms("H"), 1.0), ("O", Atoms("O"), 2.0), ("Si", Atoms("Si"), 2.0), ("NO", molecule("NO"), 1.0)],
)
def test_isolated_atoms_and_an_odd_electron_molecule(fast_config, name, atoms, moment):
    config = fast_config.with_changes(ecutwfc=30, ecutrho=240)
    result = QERunner(config).run(in_box(atoms), uid=f"isolated-{name}")
    assert result.succeeded and result.kpoints == [1, 1, 1] and result.vacuum_axes == ["a", "b", "c"]
    assert "K_POINTS gamma" in (Path(result.attempts[0].directory) / "pw.in").read_text()
    assert result.parameters["system"]["nspin"] == 2
    assert result.total_magnetization == pytest.approx(moment, abs=0.05)
    assert result.attempts[0].error_type == "OK"  # Hund's moment converged at the first attempt
    if len(atoms) == 1 and name in ("O", "Si"):  # an sp atom's lower spin state ran too (its own branch); Hund's kept
        assert [(b.start, b.kept) for b in result.magnetic_branches] == [([moment], True), ([moment - 2], False)]
        assert result.magnetic_branches[1].energy > result.energy
    else:
        assert [a.error_type for a in result.attempts] == ["OK"] and not result.magnetic_branches
