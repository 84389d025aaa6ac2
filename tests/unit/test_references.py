"""Isolated-atom references (E0s) without pw.x: the box, the settings key and uid, which E0s a data set needs, and
which E0 goes with which labels."""

from __future__ import annotations

from pathlib import Path

import pytest
from ase import Atoms
from ase.build import bulk, molecule

from qe_factory import DFTConfig, InputGenerator
from qe_factory.engine.export import matching_references
from qe_factory.engine.references import isolated_atom, references_for, settings_key
from qe_factory.engine.results import DFTResult
from qe_factory.engine.structure import StructureDoc, check_uid
from qe_factory.workflow.jobs import PRIORITY, REFERENCE_PRIORITY


@pytest.mark.parametrize("element, moment", [("Fe", 4.0), ("Ni", 2.0), ("Cr", 6.0), ("Cu", 1.0), ("O", 2.0)])
def test_a_lone_atom_runs_at_gamma_with_its_hund_moment_fixed(element, moment):
    pw_input = InputGenerator(DFTConfig()).generate(isolated_atom(element))
    assert pw_input.isolated and pw_input.kpts == (1, 1, 1)
    assert pw_input.parameters["system"]["nspin"] == 2
    assert pw_input.parameters["system"]["tot_magnetization"] == moment  # not the bulk default of 5 μB


def test_the_box_grows_with_the_vacuum_threshold():
    config = DFTConfig(vacuum_threshold=15.0)
    atoms = isolated_atom("H", config)
    assert min(atoms.cell.lengths()) > 15.0
    assert InputGenerator(config).generate(atoms).isolated


def test_unknown_element_is_refused_by_name():
    with pytest.raises(ValueError, match="'Xx'"):
        isolated_atom("Xx")


def test_settings_key_follows_what_changes_the_energy_only():
    base = settings_key("O", DFTConfig())
    assert base == settings_key("O", DFTConfig(ecutwfc=40, ecutrho=320))  # O's own cutoffs, written out
    assert base == settings_key("O", DFTConfig(mixing_beta=0.2, conv_thr_per_atom=1e-9, kpoint_spacing=0.3))
    others = [
        DFTConfig(degauss=0.01), DFTConfig(smearing="gaussian"), DFTConfig(ecutwfc=65, ecutrho=785),
        DFTConfig(pw_parameters={"system": {"input_dft": "pbesol"}}),
    ]
    assert len({base, *(settings_key("O", config) for config in others)}) == 1 + len(others)  # each its own key
    assert check_uid(f"e0-O-{base[:12]}")


def test_each_element_is_referenced_at_the_cutoffs_of_the_structures_holding_it():
    feo = Atoms("FeO", positions=[(0, 0, 0), (1.9, 0, 0)], cell=[4, 4, 4], pbc=True)
    water = molecule("H2O")
    references = references_for([feo, water, molecule("O2")], DFTConfig())
    by_element: dict[str, set] = {}
    for ref in references.values():
        by_element.setdefault(ref.element, set()).add((ref.config.ecutwfc, ref.config.ecutrho))
    assert by_element["Fe"] == {(65.0, 785.0)}
    assert by_element["O"] == {(65.0, 785.0), (50.0, 400.0), (40.0, 320.0)}  # with Fe, with H, alone
    assert by_element["H"] == {(50.0, 400.0)}
    fixed = references_for([feo, water], DFTConfig(ecutwfc=70, ecutrho=800))
    assert len(fixed) == 3  # fixed cutoffs: one E0 per element


def result(uid: str, symbols: str, ecutwfc: float, energy: float = -10.0) -> DFTResult:
    atoms = Atoms(symbols, cell=[10, 10, 10])
    atoms.positions[:, 2] = range(len(atoms))
    return DFTResult(
        uid=uid, energy=energy, succeeded=True, wall_time=1.0, formula=atoms.get_chemical_formula(),
        structure=StructureDoc.from_atoms(atoms), ecutwfc=ecutwfc, ecutrho=8 * ecutwfc,
        parameters={"system": {"smearing": "cold", "degauss": 0.02}},
        pseudopotentials={el: {"filename": f"{el}.UPF", "md5": f"md5-{el}"} for el in atoms.symbols.species()},
    )


def test_labels_get_the_e0_made_with_exactly_their_settings():
    e0s = [result("e0-O-aaaaaaaaaaaa", "O", 40, -1.0), result("e0-O-bbbbbbbbbbbb", "O", 50, -2.0),
           result("e0-H-cccccccccccc", "H", 50, -3.0)]
    found, missing = matching_references([result("w", "H2O", 50)], e0s)
    assert {el: r.energy for el, r in found.items()} == {"O": -2.0, "H": -3.0} and not missing
    found, missing = matching_references([result("w", "H2O", 50), result("o2", "OO", 40)], e0s)
    assert set(found) == {"H"} and "different" in missing["O"]  # O's labels at two cutoffs: no single E0
    found, missing = matching_references([result("fe", "Fe", 65)], e0s)
    assert not found and "no isolated-atom result" in missing["Fe"]


def test_references_are_submitted_once_per_uid_and_run_before_the_structures(home, fast_config):
    from qe_factory.workflow.state import get_jobstore, get_launchpad, reference_energies
    from qe_factory.workflow.submit import submit_data_set, submit_references

    silicon = bulk("Si")
    silicon.info["uid"] = "si"
    launchpad = get_launchpad()
    cubic = bulk("Si", cubic=True)
    cubic.info["uid"] = "cubic"
    submitted = submit_data_set([silicon, cubic], fast_config, launchpad)
    references, (first,) = submitted.references, submitted.reference_reports
    assert [ref.element for ref in references.values()] == ["Si"]  # one E0 for every Si-only structure
    assert list(first.fw_ids) == list(references) and sorted(submitted.report.fw_ids) == ["cubic", "si"]
    (again,) = submit_references(references.values(), launchpad)  # already in the LaunchPad: not added twice
    assert again.fw_ids == {} and list(again.duplicates) == list(references)
    priority = {fw["spec"]["uid"]: fw["spec"]["_priority"] for fw in launchpad.fireworks.find({"spec.stage": "inputs"})}
    assert priority == {"si": PRIORITY["inputs"], "cubic": PRIORITY["inputs"],
                        **dict.fromkeys(references, PRIORITY["inputs"] + REFERENCE_PRIORITY)}
    scf = [fw["spec"]["_priority"] for fw in launchpad.fireworks.find({"spec.stage": "scf"})]
    assert max(scf) > PRIORITY["validate"]  # an E0's SCF goes before any structure's stage
    assert reference_energies(get_jobstore(), fast_config, ["Si"]) == {}  # submitted, not computed yet


def test_a_lone_atom_asks_no_tighter_scf_threshold_than_its_box_allows():
    config = DFTConfig()
    atom = InputGenerator(config).generate(isolated_atom("Cr", config))
    assert atom.parameters["electrons"]["conv_thr"] == 1e-5  # not 2e-10: the big box's noise floor (d shells)
    silicon = InputGenerator(config).generate(isolated_atom("Si", config))
    assert silicon.parameters["electrons"]["conv_thr"] == 1e-8
    hydroxyl = isolated_atom("O", config) + isolated_atom("H", config)
    hydroxyl.positions[1, 0] += 0.97
    pw_input = InputGenerator(config).generate(hydroxyl)
    assert pw_input.parameters["electrons"]["conv_thr"] == pytest.approx(2 * config.conv_thr_per_atom)  # forces count


def test_a_lone_nickel_atom_starts_from_atomic_wavefunctions_without_random_noise():
    config = DFTConfig()
    starts = {element: InputGenerator(config).generate(isolated_atom(element, config)).parameters["electrons"]
              .get("startingwfc") for element in ("Ni", "Cr", "Cu", "Fe", "H", "O", "Si")}
    assert starts == {"Ni": "atomic", "Cr": None, "Cu": None, "Fe": None, "H": None, "O": None, "Si": None}
    nickel = bulk("Ni", cubic=True)
    assert "startingwfc" not in InputGenerator(config).generate(nickel).parameters["electrons"]  # only lone atoms


def test_export_judges_labels_validated_before_their_e0s_and_leaves_out_the_unphysical(tmp_path):
    """Energies from real runs (tests/data): the Si pair 0.6 Å apart in the diamond cell, the Si crystal and the lone
    Si atom at the same settings. Validated before the E0 existed (cohesive energy not judged), the pair is judged at
    export and left out by cause; the crystal is written, and so is the E0."""
    from ase.io import read

    from qe_factory.engine.export import write_labels
    from qe_factory.engine.parsers import parse_pw_output

    data = Path(__file__).resolve().parents[1] / "data"
    energy = {name: parse_pw_output((data / name / "pw.out").read_text()).energy
              for name in ("si_pair_overlap", "si_scf", "si_atom")}
    def label(uid: str, symbols: str, energy: float) -> DFTResult:
        made = result(uid, symbols, 25, energy)
        return made.model_copy(update={"forces": [[0.0] * 3] * len(Atoms(symbols)), "stress": [[0.0] * 3] * 3,
                                       "kpoints": [1, 1, 1]})

    labels = [label("pair", "Si2", energy["si_pair_overlap"]), label("crystal", "Si2", energy["si_scf"])]
    e0 = label("e0-Si-aaaaaaaaaaaa", "Si", energy["si_atom"])
    export = write_labels([*labels, e0], tmp_path / "labels.extxyz")
    assert export.labels == 1 and list(export.unphysical) == ["pair"]
    assert "cohesive energy +88" in export.unphysical["pair"] and "overlapping cores" in export.unphysical["pair"]
    frames = read(tmp_path / "labels.extxyz", index=":")
    assert [a.info.get("config_type") for a in frames] == ["IsolatedAtom", None]
    assert frames[1].info["uid"] == "crystal" and export.e0s == {"Si": energy["si_atom"]}
