"""Small structures the tests share."""

from __future__ import annotations

from ase import Atoms
from ase.build import bulk


def rattled_si(seed: int, amount: float = 0.05) -> Atoms:
    """Diamond Si (2 atoms) rattled by `amount` Å with `seed`, uid si-<seed>."""
    atoms = bulk("Si")
    atoms.rattle(amount, seed=seed)
    atoms.info["uid"] = f"si-{seed}"
    return atoms
