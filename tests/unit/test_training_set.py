"""Training-set export formats, from labels of recorded real pw.x runs (tests/fake_pw.py replays them): each file is
read back the way its MLIP tool reads it (ASE's extxyz reader, whose calculator results NequIP takes; ase db)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.build import bulk
from ase.db import connect
from ase.io import read
from ase.stress import full_3x3_to_voigt_6_stress

from qe_factory import QERunner
from qe_factory.engine.export import write_labels, write_nequip_shifts, write_training_set
from qe_factory.engine.results import DFTResult
from qe_factory.engine.structure import StructureDoc

FAKE_PW = Path(__file__).resolve().parents[1] / "fake_pw.py"
BIN = Path(sys.executable).parent


@pytest.fixture
def results(fast_config, monkeypatch, tmp_path):
    """Two labels (one from a structure with its own config_type), one marked label, one failure."""
    monkeypatch.setenv("FAKE_PW_COUNTER", str(tmp_path / "calls"))
    runner = QERunner(fast_config.with_changes(command=f"{sys.executable} {FAKE_PW}", kpoint_spacing=0.6))
    monkeypatch.setenv("FAKE_PW_PLAN", "replay:si_scf")
    bulk_si = bulk("Si")
    bulk_si.info["config_type"] = "bulk"
    labels = [runner.run(bulk_si, uid="si-bulk"), runner.run(bulk("Si"), uid="si-plain")]
    marked = runner.run(bulk("Si"), uid="si-marked").model_copy(update={"label_deviations": {"degauss": [0.02, 0.05]}})
    monkeypatch.setenv("FAKE_PW_PLAN", "replay:si_unconverged")
    failed = runner.run(bulk("Si"), uid="si-failed", raise_on_failure=False)
    assert all(r.succeeded for r in labels) and not failed.succeeded
    return [*labels, marked, failed]


def test_mace_extxyz_has_ref_keys_and_config_types(results, tmp_path):
    assert write_training_set(results, tmp_path / "mace.extxyz", config_type="md") == 2
    frames = {a.info["uid"]: a for a in read(tmp_path / "mace.extxyz", index=":")}
    assert set(frames) == {"si-bulk", "si-plain"}  # no marked label, no failure
    assert frames["si-bulk"].info["config_type"] == "bulk" and frames["si-plain"].info["config_type"] == "md"
    label = frames["si-bulk"]
    assert label.info["REF_energy"] == pytest.approx(results[0].energy, abs=1e-9)
    np.testing.assert_allclose(label.arrays["REF_forces"], results[0].forces, atol=1e-9)
    np.testing.assert_allclose(label.info["REF_stress"], np.ravel(results[0].stress), atol=1e-12)
    assert label.calc is None  # MACE reads the REF_ keys; no calculator results to confuse it


def test_nequip_extxyz_has_ase_keys(results, tmp_path):
    assert write_training_set(results, tmp_path / "nequip.extxyz", True, "nequip-extxyz") == 3  # marked included
    frames = {a.info["uid"]: a for a in read(tmp_path / "nequip.extxyz", index=":")}
    label, reference = frames["si-bulk"], results[0]
    # NequIP's ASEDataset takes energy (→ total_energy), forces and stress from the calculator ASE's reader makes
    assert set(label.calc.results) == {"energy", "forces", "stress"}
    assert label.get_potential_energy() == pytest.approx(reference.energy, abs=1e-9)
    np.testing.assert_allclose(label.get_forces(), reference.forces, atol=1e-9)
    np.testing.assert_allclose(label.get_stress(), full_3x3_to_voigt_6_stress(np.array(reference.stress)), atol=1e-12)
    assert not [key for key in (*label.info, *label.arrays) if key.startswith("REF_")]
    assert "config_type" not in frames["si-plain"].info and frames["si-bulk"].info["config_type"] == "bulk"


def test_ase_db_rows_carry_uid_flags_and_settings(results, tmp_path):
    path = tmp_path / "labels.db"
    assert write_training_set(results, path, True, "ase-db", config_type="md") == 3
    rows = {row.uid: row for row in connect(path).select()}
    assert set(rows) == {"si-bulk", "si-plain", "si-marked"}
    row, reference = rows["si-bulk"], results[0]
    assert row.formula == "Si2" and row.config_type == "bulk" and rows["si-plain"].config_type == "md"
    assert row.energy == pytest.approx(reference.energy, abs=1e-9)
    np.testing.assert_allclose(row.forces, reference.forces, atol=1e-9)
    assert row.succeeded and row.nominal_settings and row.attempts == 1 and not row.recovered
    assert not rows["si-marked"].nominal_settings and rows["si-marked"].deviations == "degauss"
    assert (row.ecutwfc, row.ecutrho, row.smearing, row.kpoints) == (25, 200, reference.parameters["system"][
        "smearing"], "x".join(map(str, reference.kpoints)))
    assert row.pseudo_Si == reference.pseudopotentials["Si"]["filename"]
    assert row.data["parameters"]["system"]["degauss"] == reference.parameters["system"]["degauss"]
    browse = subprocess.run([str(BIN / "ase"), "db", str(path), "nominal_settings=False", "-c", "uid,deviations"],
                            capture_output=True, text=True, check=True)
    assert "si-marked" in browse.stdout and "si-bulk" not in browse.stdout, browse.stdout


def test_an_unknown_format_is_named(results, tmp_path):
    with pytest.raises(ValueError, match="'xyz'.*mace-extxyz, nequip-extxyz, ase-db"):
        write_training_set(results, tmp_path / "x", format="xyz")


def made(uid: str, symbols: str, energy: float) -> DFTResult:
    """A label (or, with an e0- uid and one atom, an isolated-atom reference) at one set of settings."""
    atoms = Atoms(symbols, cell=[10, 10, 10], pbc=True)
    atoms.positions[:, 2] = np.arange(len(atoms)) * 1.2
    return DFTResult(
        uid=uid, energy=energy, succeeded=True, wall_time=1.0, formula=atoms.get_chemical_formula(),
        structure=StructureDoc.from_atoms(atoms), ecutwfc=50, ecutrho=400, kpoints=[1, 1, 1],
        parameters={"system": {"smearing": "cold", "degauss": 0.02}}, forces=[[0.1, 0.0, 0.0]] * len(atoms),
        stress=[[0.01, 0.0, 0.0], [0.0, 0.01, 0.0], [0.0, 0.0, 0.01]],
        pseudopotentials={el: {"filename": f"{el}.UPF", "md5": f"md5-{el}"} for el in atoms.symbols.species()})


def test_nequip_export_keeps_the_e0s_out_of_its_frames_and_gives_them_by_element_name(tmp_path):
    """NequIP trains on every frame of its file (its ASEDataset has no filter) and takes E0s only as the model's
    per_type_energy_shifts, a dict by type name: the nequip-extxyz export has no IsolatedAtom frames and writes
    labels.nequip.yaml (model_type_names, per_type_energy_shifts) instead; MACE's export keeps the frames."""
    results = [made("no", "NO", -703.0), made("e0-O-aaaaaaaaaaaa", "O", -430.0),
               made("e0-N-bbbbbbbbbbbb", "N", -270.0)]
    nequip = write_labels(results, tmp_path / "labels.extxyz", format="nequip-extxyz")
    frames = read(tmp_path / "labels.extxyz", index=":")
    assert nequip.labels == 1 and [a.info["uid"] for a in frames] == ["no"] and not nequip.isolated_frames
    assert nequip.nequip_file == tmp_path / "labels.nequip.yaml" and nequip.e0s_file == tmp_path / "labels.e0s.json"
    assert yaml.safe_load(nequip.nequip_file.read_text()) == {
        "model_type_names": ["N", "O"], "per_type_energy_shifts": {"N": -270.0, "O": -430.0}}

    mace = write_labels(results, tmp_path / "labels.extxyz")  # the same name, MACE's form: no stale NequIP file
    frames = read(tmp_path / "labels.extxyz", index=":")
    assert [a.info.get("config_type") for a in frames] == ["IsolatedAtom", "IsolatedAtom", None]
    assert mace.isolated_frames and mace.nequip_file is None and not (tmp_path / "labels.nequip.yaml").exists()


def test_nequip_shifts_quote_element_names_that_yaml_reads_as_booleans(tmp_path):
    path = write_nequip_shifts(tmp_path / "labels.extxyz", {"No": -1.5, "N": -270.25, "H": -13.604606})
    assert path.name == "labels.nequip.yaml" and path.read_text().startswith("# ")
    assert yaml.safe_load(path.read_text()) == {"model_type_names": ["H", "N", "No"],
                                                 "per_type_energy_shifts": {"H": -13.604606, "N": -270.25, "No": -1.5}}
