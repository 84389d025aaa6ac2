"""A data set's protocol (engine/protocol.py): one cutoff pair for all its elements, pinned settings, refusals."""

from __future__ import annotations

import pytest

from qe_factory import DFTConfig
from qe_factory.engine.protocol import ProtocolError, protocol_for, protocol_hash, settle


def test_one_cutoff_pair_is_the_largest_of_every_element_and_the_hash_ignores_the_elements():
    silicon, germanium, both = (protocol_for(DFTConfig(), elements) for elements in (["Si"], ["Ge"], ["Si", "Ge"]))
    assert silicon.cutoffs == (45.0, 360.0) and germanium.cutoffs == (35.0, 280.0)  # debian-pbe's table
    assert both.cutoffs == silicon.cutoffs and both.elements == ["Ge", "Si"]
    assert both.hash == silicon.hash != germanium.hash  # the same settings, whatever the elements
    assert protocol_hash(both.config(DFTConfig())) == both.hash  # what the runner stamps on each label


def test_declared_elements_set_the_pair_before_any_structure_holds_them():
    declared = protocol_for(DFTConfig(elements=["Si", "Ge"]), ["Ge"])
    assert declared.cutoffs == (45.0, 360.0) and declared.elements_from == "declared"


def test_a_later_element_that_fits_joins_and_keeps_the_hash():
    pinned = protocol_for(DFTConfig(), ["Si"])
    grown = settle(pinned, DFTConfig(), ["Ge", "Si"])
    assert grown.elements == ["Ge", "Si"] and grown.hash == pinned.hash and grown.cutoffs == pinned.cutoffs
    assert "Ge added by a later submission" in grown.elements_from
    assert settle(grown, DFTConfig(), ["Si"]) is grown  # nothing new: the pinned one as it is


def test_an_element_needing_higher_cutoffs_is_refused_with_the_reason_and_the_ways_out():
    pinned = protocol_for(DFTConfig(), ["Ge"])
    with pytest.raises(ProtocolError, match=r"Si asks for ecutwfc/ecutrho 45/360 Ry, above the data set's 35/280"
                       r".*--dataset NAME"):
        settle(pinned, DFTConfig(), ["Si"])
    assert settle(pinned, DFTConfig(allow_low_cutoffs=True), ["Si"]).cutoffs == (35.0, 280.0)  # asked for


@pytest.mark.parametrize("change, said", [
    ({"degauss": 0.01}, "degauss is 0.01, the data set's is 0.02"),
    ({"ecutwfc": 50.0}, "ecutwfc is 50.0, the data set's is 45.0"),
    ({"kpoint_spacing": 0.3}, "kpoint_spacing is 0.3"),
    ({"pw_parameters": {"system": {"input_dft": "PBEsol"}}}, "pw_parameters is"),
])
def test_a_changed_physics_setting_is_refused(change, said):
    pinned = protocol_for(DFTConfig(), ["Si"])
    with pytest.raises(ProtocolError, match=said):
        settle(pinned, DFTConfig(**change), ["Si"])


def test_convergence_settings_are_not_physics():
    pinned = protocol_for(DFTConfig(), ["Si"])
    easier = DFTConfig(mixing_beta=0.3, max_retries=2, pw_parameters={"electrons": {"electron_maxstep": 300}})
    assert settle(pinned, easier, ["Si"]) is pinned


def test_a_home_pins_one_protocol_per_data_set_and_submit_runs_with_its_pair(home, fast_config):
    from ase.build import bulk

    from qe_factory.workflow.protocols import home_protocols, pinned_protocol
    from qe_factory.workflow.state import get_launchpad
    from qe_factory.workflow.submit import submit

    config = fast_config.with_changes(ecutwfc=None, ecutrho=None, allow_low_cutoffs=False)
    germanium = bulk("Ge")
    germanium.info["uid"] = "ge"
    submit([germanium], config, launchpad=get_launchpad())
    pinned = pinned_protocol(home)
    assert pinned.elements == ["Ge"] and pinned.cutoffs == (35.0, 280.0)
    (spec,) = [fw["spec"] for fw in get_launchpad().fireworks.find({"spec.stage": "inputs"})]
    assert '"ecutwfc": 35.0' in str(spec).replace("'", '"')  # the workflow carries the protocol's pair

    silicon = bulk("Si")
    silicon.info["uid"] = "si"
    with pytest.raises(ProtocolError, match="Si asks for"):
        submit([silicon], config, launchpad=get_launchpad())
    assert get_launchpad().workflows.count_documents({}) == 1 and pinned_protocol(home) == pinned  # nothing added
    submit([silicon], config, launchpad=get_launchpad(), dataset="silicon")  # another data set of the home
    assert [p.name for p in home_protocols(home)] == ["default", "silicon"]
    assert pinned_protocol(home, "silicon").cutoffs == (45.0, 360.0)
    with pytest.raises(ValueError, match="data set name"):
        pinned_protocol(home, "../elsewhere")


def test_export_keeps_the_labels_of_the_data_set_its_e0s_and_older_labels_made_alike():
    from ase import Atoms
    from ase.build import bulk

    from qe_factory.engine.protocol import protocol_for
    from qe_factory.engine.results import DFTResult
    from qe_factory.engine.structure import StructureDoc
    from qe_factory.workflow.protocols import in_data_set

    protocol = protocol_for(DFTConfig(), ["Si"])
    md5 = protocol.pseudopotentials["Si"]["md5"]

    def label(uid, protocol_hash, ecutwfc=45.0, atoms=None):
        atoms = atoms or bulk("Si")
        return DFTResult(uid=uid, succeeded=True, wall_time=1.0, formula=atoms.get_chemical_formula(),
                         structure=StructureDoc.from_atoms(atoms), ecutwfc=ecutwfc, ecutrho=360.0,
                         parameters={"system": {"smearing": "cold", "degauss": 0.02}}, protocol_hash=protocol_hash,
                         pseudopotentials={"Si": {"filename": "Si.UPF", "md5": md5}})

    ours, theirs = label("ours", protocol.hash), label("theirs", "another")
    older_alike, older_other = label("older", None), label("older-25", None, ecutwfc=25.0)
    e0 = label("e0-Si-0123456789ab", "another", atoms=Atoms("Si", cell=[10, 10, 10], pbc=True))  # shared E0
    kept, left_out = in_data_set([ours, theirs, older_alike, older_other, e0], protocol)
    assert [r.uid for r in kept] == ["ours", "older", "e0-Si-0123456789ab"] and left_out == 2
    assert in_data_set([ours, theirs], None) == ([ours, theirs], 0)  # a home from before protocols: all of them


def test_a_named_preset_lies_under_what_the_config_file_says(tmp_path):
    import argparse

    from qe_factory.cli.options import config_from
    from qe_factory.engine.config import ConfigError

    fast = DFTConfig.create(protocol="fast-test")
    assert (fast.ecutwfc, fast.ecutrho, fast.kpoint_spacing, fast.allow_low_cutoffs) == (25.0, 200.0, 0.5, True)
    (tmp_path / "c.yaml").write_text("protocol: fast-test\nkpoint_spacing: 0.3\n")
    from_file = DFTConfig.from_yaml(tmp_path / "c.yaml")
    assert (from_file.ecutwfc, from_file.kpoint_spacing) == (25.0, 0.3)  # the file's own value wins
    args = argparse.Namespace(config=str(tmp_path / "c.yaml"), protocol="sssp-efficiency")
    assert config_from(args).pseudo_family == "sssp-efficiency-1.3" and config_from(args).kpoint_spacing == 0.3
    with pytest.raises(ConfigError, match="unknown protocol preset 'fastest': choose one of fast-test"):
        DFTConfig.create(protocol="fastest")


def test_a_first_pair_below_what_an_element_asks_for_is_refused_before_it_is_pinned():
    with pytest.raises(ProtocolError, match=r"ecutwfc/ecutrho 30/240 Ry is below what the family asks for \(Si 45/360"):
        settle(None, DFTConfig(ecutwfc=30, ecutrho=240), ["Si"])
    assert settle(None, DFTConfig(ecutwfc=30, ecutrho=240, allow_low_cutoffs=True), ["Si"]).cutoffs == (30, 240)


def test_an_element_whose_file_fails_its_checks_does_not_join_the_data_set(tmp_path):
    import json

    from ase import Atoms

    from qe_factory.engine.pseudos import load_family
    from qe_factory.workflow.protocols import servable_elements

    debian = load_family("debian-pbe")
    rows = {el: {"filename": debian.entries[el].filename, "md5": debian.entries[el].md5, "cutoff_wfc": 30.0,
                 "cutoff_rho": 240.0} for el in ("Si", "Ge")}
    rows["Si"]["md5"] = "0" * 32  # the table names another file than the one in place
    (tmp_path / "family.json").write_text(json.dumps({"name": "t", "functional": "PBE", "pseudopotentials": rows}))
    config = DFTConfig(pseudo_family=str(tmp_path / "family.json"), pseudo_dir=debian.directory)
    assert servable_elements(config, [Atoms("Si2"), Atoms("Ge2"), Atoms("Xe")]) == {"Ge"}  # each refused alone
