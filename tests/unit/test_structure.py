"""Refusal of bad input before pw.x runs."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from qe_factory import StructureError
from qe_factory.engine.structure import check_structure, check_uid, closest_contact


@pytest.mark.parametrize("uid", ["../x", "a/b", "..", ".hidden", "", "a b", "x" * 201, "a\\b"])
def test_bad_uids_are_refused(uid):
    with pytest.raises(StructureError, match="uid"):
        check_uid(uid)


def test_good_uid():
    assert check_uid("si-0_frame.12") == "si-0_frame.12"


def test_empty_structure():
    with pytest.raises(StructureError, match="no atoms"):
        check_structure(Atoms())


def test_no_cell():
    with pytest.raises(StructureError, match="box"):
        check_structure(molecule("H2O"))


def test_degenerate_and_left_handed_cells():
    atoms = Atoms("Si2", positions=[(0, 0, 0), (1.5, 1.5, 0)], cell=[[4, 0, 0], [0, 4, 0], [4, 4, 0]], pbc=True)
    with pytest.raises(StructureError, match="volume"):
        check_structure(atoms)
    atoms.cell = [[4, 0, 0], [0, 4, 0], [0, 0, -4]]
    with pytest.raises(StructureError, match="volume"):
        check_structure(atoms)


def test_nan_positions():
    atoms = bulk("Si")
    atoms.positions[1, 2] = np.nan
    with pytest.raises(StructureError, match=r"NaN/inf.*\[1\]"):
        check_structure(atoms)


def test_unknown_element():
    atoms = Atoms("X2", positions=[(0, 0, 0), (2, 0, 0)], cell=[5, 5, 5], pbc=True)
    with pytest.raises(StructureError, match="unknown element"):
        check_structure(atoms)


def test_overlapping_atoms_name_the_pair():
    atoms = Atoms("Si2", positions=[(0, 0, 0), (0.5, 0, 0)], cell=[6, 6, 6], pbc=True)
    with pytest.raises(StructureError, match=r"atoms 0 \(Si\) and 1 \(Si\) are 0.500 Å apart"):
        check_structure(atoms)


def test_overlap_through_periodic_images():
    atoms = Atoms("Si2", positions=[(0.1, 0, 0), (2.6, 0, 0)], cell=[3.0, 8, 8], pbc=True)  # image at 0.5 Å
    assert closest_contact(atoms)[2] == pytest.approx(0.5)
    with pytest.raises(StructureError, match="0.500 Å"):
        check_structure(atoms)


def test_threshold_is_configurable():
    atoms = Atoms("H2", positions=[(0, 0, 0), (0.5, 0, 0)], cell=[6, 6, 6])  # 0.5 / 0.62 = 0.81
    check_structure(atoms, min_distance_factor=0.5)
    with pytest.raises(StructureError):
        check_structure(atoms, min_distance_factor=0.9)


def test_sane_structures_pass():
    check_structure(bulk("Si"))
    check_structure(molecule("H2O", vacuum=4.0))


def test_an_unreadable_frame_is_refused_alone_naming_the_symbol(tmp_path):
    from ase.build import bulk
    from ase.io import write

    from qe_factory.engine.structure import read_structures

    frames = []
    for uid in ("first", "bad", "last"):
        atoms = bulk("Si")
        atoms.info["uid"] = uid
        frames.append(atoms)
    write(tmp_path / "in.extxyz", frames)
    text = (tmp_path / "in.extxyz").read_text().split("\n")
    bad_line = next(i for i, line in enumerate(text) if "uid=bad" in line) + 1
    text[bad_line] = text[bad_line].replace("Si", "Xx", 1)
    (tmp_path / "in.extxyz").write_text("\n".join(text))
    read = read_structures(tmp_path / "in.extxyz")
    assert [uid for uid, _ in read] == ["first", "in-00001", "last"]
    check_structure(read[0][1])
    check_structure(read[2][1])
    with pytest.raises(StructureError, match="frame 1 of in.extxyz cannot be read: unknown chemical symbol 'Xx'"):
        check_structure(read[1][1])


def test_the_quick_screen_never_clears_a_contact_ase_finds():
    """clearly_apart (brute force over periodic images, small cells) only ever skips ASE's neighbour list when ASE
    would find no pair below the factor: random small cells, skewed or partly periodic, some with a close pair."""
    from qe_factory.engine.structure import clearly_apart

    rng = np.random.default_rng(0)
    cleared = 0
    for _ in range(300):
        cell = np.diag(rng.uniform(1.5, 7.0, 3)) + rng.normal(0, 1.0, (3, 3))
        if np.linalg.det(cell) < 1.0 or (1 / np.linalg.norm(np.linalg.inv(cell), axis=0)).min() < 1.0:
            continue
        n = int(rng.integers(1, 5))
        atoms = Atoms(numbers=rng.choice([1, 8, 14, 26, 79], n), scaled_positions=rng.uniform(-0.2, 1.2, (n, 3)),
                      cell=cell, pbc=rng.random(3) < 0.8)
        if rng.random() < 0.3:
            atoms.positions[-1] = atoms.positions[0] + rng.normal(0, 0.3, 3)
        factor = float(rng.choice([0.3, 0.5, 0.8, 1.2]))
        if clearly_apart(atoms, factor):
            cleared += 1
            contact = closest_contact(atoms)
            assert contact is None or contact[3] >= factor, (atoms.cell, atoms.positions, factor, contact)
    assert cleared > 50  # the screen does clear most sane cells
    assert clearly_apart(bulk("Si"), 0.5)
    assert not clearly_apart(Atoms("Si2", positions=[(0.1, 0, 0), (2.6, 0, 0)], cell=[3.0, 8, 8], pbc=True), 0.5)
