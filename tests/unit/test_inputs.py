"""InputGenerator: the physics rules, checked on the generated parameters and pw.in text."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from qe_factory import ConfigError, DFTConfig, InputError, InputGenerator, PseudopotentialError
from qe_factory.engine.inputs import irreducible_kpoint_count, kpoint_mesh, vacuum_axes


@pytest.fixture
def generator() -> InputGenerator:
    return InputGenerator(DFTConfig())


def test_iron_is_spin_polarised_with_normalised_moments(generator):
    fe = bulk("Fe", "bcc", a=2.87, cubic=True)
    fe.set_initial_magnetic_moments(None)  # as read from a file without moments
    pw_input = generator.generate(fe)
    assert pw_input.parameters["system"]["nspin"] == 2
    # 5 μB over the 16 valence electrons of the Debian Fe pseudopotential
    assert pw_input.starting_magnetization == [pytest.approx(5 / 16)] * 2
    text = generator.create_input_string(fe)
    assert "nspin            = 2" in text
    assert "starting_magnetization(1) = 0.3125" in text


def test_initial_moments_on_the_atoms_are_honoured(generator):
    fe = bulk("Fe", "bcc", a=2.87, cubic=True)
    fe.set_initial_magnetic_moments([2.0, -2.0])
    pw_input = generator.generate(fe)
    assert pw_input.starting_magnetization == [0.125, -0.125]
    text = generator.create_input_string(fe)
    assert "starting_magnetization(2) = -0.125" in text  # antiparallel atoms become two species
    fe.set_initial_magnetic_moments([0.0, 0.0])  # explicitly non-magnetic
    assert generator.generate(fe).parameters["system"]["nspin"] == 1


def test_non_magnetic_structure_is_not_spin_polarised(generator):
    text = generator.create_input_string(bulk("Si"))
    assert "nspin            = 1" in text
    assert "starting_magnetization" not in text


def test_kpoints_inversely_proportional_to_cell_length():
    small, large = bulk("Si", a=5.43, cubic=True), bulk("Si", a=10.86, cubic=True)
    n_small, n_large = kpoint_mesh(small, 0.15), kpoint_mesh(large, 0.15)
    assert n_small == (8, 8, 8)  # ceil(2π / 5.43 / 0.15) = ceil(7.71)
    assert n_large == (4, 4, 4)  # ceil(3.86)

    slab = bulk("Si", a=5.43, cubic=True)
    slab.center(vacuum=8.0, axis=2)
    slab.pbc = (True, True, False)
    cells = {
        "cubic": small,
        "doubled cubic": large,
        "hexagonal": bulk("Mg", "hcp", a=3.21, c=5.21),
        "triclinic": Atoms("Si", cell=[[4.1, 0.0, 0.0], [1.3, 5.2, 0.0], [0.7, -0.9, 6.3]], pbc=True),
        "long axis": Atoms("Si", cell=[4.0, 5.0, 60.0], pbc=True),
        "slab": slab,
    }
    for name, atoms in cells.items():
        b_lengths = np.linalg.norm(atoms.cell.reciprocal(), axis=1)  # 1/Å, without the 2π
        for spacing in (0.1, 0.15, 0.25, 0.6):
            mesh = kpoint_mesh(atoms, spacing)
            assert len(mesh) == 3 and all(isinstance(n, int | np.integer) and n >= 1 for n in mesh), (name, mesh)
            for axis, (n, b, periodic) in enumerate(zip(mesh, b_lengths, atoms.pbc)):
                where = (name, spacing, axis, mesh)
                if not periodic:
                    assert n == 1, where
                    continue
                # the mesh the function returned has spacing 2π|b|/n at most the requested one ...
                assert 2 * np.pi * b / n <= spacing * (1 + 1e-9), where
                # ... and is the smallest such: one point fewer would exceed it
                assert n == 1 or 2 * np.pi * b / (n - 1) > spacing, where


def test_molecule_in_a_box_gets_gamma_only(generator):
    water = molecule("H2O", vacuum=5.0)
    assert not water.pbc.any()
    assert generator.generate(water).kpts == (1, 1, 1)


def test_vacuum_gaps_get_one_kpoint_whatever_pbc_says(generator):
    slab = bulk("Si", a=5.43, cubic=True)
    slab.center(vacuum=5.0, axis=2)  # periodic along c, but 10 Å of vacuum between the slab's images
    water = molecule("H2O")
    water.cell, water.pbc = [9.0, 9.0, 9.0], True
    water.center()
    for atoms, axes, kpts in ((bulk("Si"), (False, False, False), (14, 14, 14)), (slab, (False, False, True), None),
                              (water, (True, True, True), (1, 1, 1))):
        assert vacuum_axes(atoms, 6.0) == axes
        pw_input = generator.generate(atoms)
        assert pw_input.vacuum_axes == axes and (kpts is None or pw_input.kpts == kpts)
    assert generator.generate(slab).kpts[2] == 1 and generator.generate(slab).kpts[0] > 1
    assert vacuum_axes(slab, 12.0) == (False, False, False)  # the threshold decides
    text = generator.create_input_string(water)
    assert "K_POINTS gamma" in text and "mixing_beta      = 0.3" in text
    assert "local-TF" in generator.create_input_string(slab)  # a slab's charge sloshing


def test_open_shells_in_vacuum_start_spin_polarised(generator):
    def boxed(atoms):
        atoms.cell, atoms.pbc = [9.0, 9.0, 9.0], True
        atoms.center()
        return atoms

    no = generator.generate(boxed(molecule("NO")))  # 11 valence electrons: a doublet
    assert no.parameters["system"]["nspin"] == 2 and "tot_magnetization" not in no.parameters["system"]
    water = generator.generate(boxed(molecule("H2O")))  # 8: closed shell
    assert water.parameters["system"]["nspin"] == 1
    oxygen = generator.generate(boxed(Atoms("O")))  # a lone atom: Hund's rule, 2 μB, held fixed
    assert oxygen.parameters["system"]["nspin"] == 2 and oxygen.parameters["system"]["tot_magnetization"] == 2.0
    given = boxed(Atoms("O"))
    given.set_initial_magnetic_moments([0.0])  # the user's own (here: none) stands
    assert generator.generate(given).parameters["system"]["nspin"] == 1


def test_slab_gets_one_kpoint_along_its_normal():
    slab = bulk("Si", a=5.43, cubic=True)
    slab.center(vacuum=8.0, axis=2)
    slab.pbc = (True, True, False)
    assert kpoint_mesh(slab, 0.15) == (8, 8, 1)


def test_pseudopotentials_cutoffs_and_fixed_flags(generator):
    text = generator.create_input_string(bulk("Si"))
    assert "Si 28.085 Si.pbe-nl-rrkjus_psl.1.0.0.UPF" in text
    for line in ("calculation      = 'scf'", "nosym            = .true.", "tstress          = .true.",
                 "tprnfor          = .true.", "disk_io          = 'low'", "ecutwfc          = 45.0"):
        assert line in text
    assert "&CELL" not in text and "&RISM" not in text


def test_cutoffs_are_the_maximum_over_elements(generator):
    sio = Atoms("SiO", positions=[(0, 0, 0), (1.6, 0, 0)], cell=[8, 8, 8], pbc=True)
    system = generator.generate(sio).parameters["system"]
    assert (system["ecutwfc"], system["ecutrho"]) == (45.0, 360.0)  # Si 45/360 beats O 40/320


def test_conv_thr_scales_with_atoms(generator):
    one = generator.generate(bulk("Si", cubic=True)).parameters["electrons"]["conv_thr"]
    two = generator.generate(bulk("Si", cubic=True) * (2, 1, 1)).parameters["electrons"]["conv_thr"]
    assert two == pytest.approx(2 * one)


def test_relax_is_refused(generator):
    with pytest.raises(InputError, match="only 'scf'"):
        generator.generate(bulk("Si"), {"control": {"calculation": "relax"}})
    with pytest.raises(ConfigError, match="control.calculation"):
        DFTConfig.create(pw_parameters={"control": {"calculation": "vc-relax"}})


def test_keys_the_factory_owns_are_refused_in_pw_parameters():
    """Another pseudo_dir (pw.x would read other files than the provenance records), another outdir or prefix
    (scratch written outside the run directory, never cleaned), restart keys (the recovery's)."""
    for namelist, key, value in (("control", "pseudo_dir", "altpp"), ("control", "prefix", "../../x"),
                                 ("control", "outdir", "/tmp"), ("electrons", "startingwfc", "file")):
        with pytest.raises(ConfigError, match=f"{namelist}.{key}"):
            DFTConfig.create(pw_parameters={namelist: {key: value}})
    assert DFTConfig.create(pw_parameters={"electrons": {"electron_maxstep": 7}}).pw_parameters


def test_same_input_same_text(generator):
    atoms = bulk("Si")
    atoms.rattle(0.05, seed=3)
    assert generator.create_input_string(atoms) == generator.create_input_string(atoms.copy())


def test_missing_pseudopotentials_are_all_named(generator):
    with pytest.raises(PseudopotentialError) as info:
        generator.generate(Atoms("SiAuZn", positions=[(0, 0, 0), (2, 0, 0), (0, 2, 0)], cell=[6, 6, 6], pbc=True))
    assert "Au" in str(info.value) and "Zn" in str(info.value) and "Si" not in str(info.value).split(":")[1]


def test_irreducible_kpoints_with_time_reversal_only():
    assert irreducible_kpoint_count((1, 1, 1)) == 1
    assert irreducible_kpoint_count((2, 2, 2)) == 8  # every point is its own inverse
    assert irreducible_kpoint_count((3, 3, 3)) == 14
    assert irreducible_kpoint_count((5, 5, 5)) == 63  # pw.x reported 63 points for this mesh
