"""Known traps refused before pw.x runs, and recovery steps that could change nothing are never spent."""

from __future__ import annotations

import pytest
from ase import Atoms
from ase.build import bulk, molecule

from qe_factory import DFTConfig, DFTErrorType, InputError, InputGenerator, RecoveryHandler
from qe_factory.engine.preflight import nominal_input
from qe_factory.engine.pseudos import load_family, resolve_pseudos


def refusal(atoms: Atoms, **settings) -> str | None:
    try:
        nominal_input(atoms, InputGenerator(DFTConfig(**settings)))
    except InputError as exc:
        return str(exc)
    return None


def test_cutoffs_below_the_family_values_are_refused_with_the_numbers():
    fe = bulk("Fe", "bcc", a=2.87, cubic=True)  # the case: 25/200 Ry against the family's 65/785
    message = refusal(fe, ecutwfc=25, ecutrho=200, kpoint_spacing=0.8)
    assert "ecutwfc=25 < 65 for Fe" in message and "ecutrho=200 < 785 for Fe" in message
    assert "allow_low_cutoffs" in message
    assert refusal(fe, ecutwfc=25, ecutrho=200, kpoint_spacing=0.8, allow_low_cutoffs=True) is None
    assert refusal(fe, kpoint_spacing=0.8) is None  # the family's own values
    sio = Atoms("SiO", positions=[(0, 0, 0), (1.6, 0, 0)], cell=[8, 8, 8], pbc=True)
    message = refusal(sio, ecutwfc=42, ecutrho=360)  # enough for O (40/320), not for Si (45/360)
    assert "ecutwfc=42 < 45 for Si" in message and "for O" not in message


def test_fixed_occupations_are_refused_for_a_likely_metal():
    fixed = {"pw_parameters": {"system": {"occupations": "fixed"}}, "kpoint_spacing": 0.8}
    message = refusal(bulk("Cu", "fcc", a=3.6), **fixed)  # 11 valence electrons
    assert "occupations='fixed' refused for Cu" in message and "odd" in message
    fe = bulk("Fe", "bcc", a=2.87, cubic=True)
    fe.set_initial_magnetic_moments([0.0, 0.0])  # 32 electrons: only the element rule catches it
    assert "metals in their elemental form" in refusal(fe, **fixed)
    assert refusal(bulk("Si"), **fixed) is None
    cuprite = Atoms("O2Cu4", cell=[4.27] * 3, pbc=True, scaled_positions=[
        (0, 0, 0), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (0.75, 0.75, 0.25), (0.75, 0.25, 0.75), (0.25, 0.75, 0.75)])
    assert refusal(cuprite, **fixed) is None  # a metal with a non-metal, 56 electrons: may be an insulator (it is)
    water = molecule("H2O", vacuum=4.0, pbc=True)
    assert refusal(water, **fixed) is None
    assert refusal(bulk("Cu", "fcc", a=3.6), kpoint_spacing=0.8) is None  # smeared: the default


def test_odd_electrons_with_a_fixed_moment_may_keep_fixed_occupations():
    """A molecule with its moment fixed (tot_magnetization) is a legitimate fixed-occupation run."""
    no = molecule("NO", vacuum=4.0, pbc=True)
    settings = {"system": {"occupations": "fixed"}}
    assert "odd" in refusal(no, pw_parameters=settings)
    assert refusal(no, pw_parameters={"system": {**settings["system"], "tot_magnetization": 1}}) is None


def test_smearing_corrections_are_not_spent_while_occupations_are_fixed():
    fixed = {"system": {"occupations": "fixed", "degauss": 0.02},
             "electrons": {"mixing_beta": 0.3, "mixing_mode": "local-TF"}}
    handler = RecoveryHandler()
    tried = ["mixing_beta=0.3", "mixing_mode=local-TF", "mixing_beta=0.1, mixing_ndim=16"]
    assert handler.next_correction(DFTErrorType.SCF_NOT_CONVERGED, fixed, tried).name == "diagonalization=cg"
    assert handler.next_correction(DFTErrorType.WRONG_CHARGE, fixed) is None
    smeared = {**fixed, "system": {"occupations": "smearing", "degauss": 0.02}}
    assert handler.next_correction(DFTErrorType.SCF_NOT_CONVERGED, smeared, tried).name == "degauss=0.05"


def test_upf_headers_give_the_type_and_projectors():
    pseudos = resolve_pseudos(load_family("debian-pbe"), ["Si", "Fe", "Rh"])
    assert pseudos["Si"].header.beta_l == (0, 0, 1, 1) and pseudos["Si"].header.projectors == 8  # pw.x: nkb/atom
    assert pseudos["Fe"].header.projectors == 18 and pseudos["Fe"].header.ultrasoft
    assert pseudos["Rh"].header.beta_l == (1, 2, 2) and pseudos["Rh"].header.ultrasoft  # a UPF v1 file


@pytest.mark.parametrize("budget", [16.0, 0.001])
def test_memory_budget_is_a_config_field(budget):
    config = DFTConfig.create(memory_budget_gb=budget)
    assert config.memory_budget_gb == budget and DFTConfig().memory_budget_gb == 16.0
    assert ("small" if refusal(bulk("Si"), memory_budget_gb=budget, kpoint_spacing=0.8) is None else "big") == (
        "small" if budget == 16.0 else "big"
    )
