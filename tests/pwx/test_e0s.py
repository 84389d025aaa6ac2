"""Isolated-atom references (E0s) with real pw.x: the Python call on an iron atom (its Hund moment), and the factory
path — `run` computes the E0s first, exports them as MACE reads them, and never computes them again.

Low cutoffs (25/200 Ry, allow_low_cutoffs; Fe 40/480) keep these runs short; the nominal-cutoff figures are in
benchmarks/e0s.py and the README.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ase.build import molecule
from ase.io import read, write

from qe_factory import DFTConfig
from qe_factory.engine.references import E0, compute_e0s, e0_uid, settings_key
from qe_factory.workflow.home import activate
from qe_factory.workflow.state import get_jobstore, load_results, reference_energies

BIN = Path(sys.executable).parent
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")
FAST = "ecutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\nmpi_ranks: 1\n"


def qe_factory(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE")}
    return subprocess.run([str(BIN / "qe-factory"), *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_compute_e0s_gives_the_iron_atom_its_hund_moment_once(fast_config):
    # 40/480 Ry: at 25/200 the lone Fe atom's SCF bounces between 1e-4 and 4e-4 Ry, above its 1e-5 threshold (Γ
    # only and the spin of other lone atoms: test_isolated.py)
    config = fast_config.with_changes(ecutwfc=40, ecutrho=480, timeout=1800)
    (e0,) = compute_e0s(["Fe", "Fe"], config).values()  # asked twice, computed once
    assert isinstance(e0, E0) and e0.element == "Fe" and e0.atomic_number == 26
    assert e0.uid == e0_uid("Fe", settings_key("Fe", config)) and e0.settings_key.startswith(e0.uid[-12:])
    assert e0.magnetization == pytest.approx(4.0, abs=0.01)  # 3d6 4s2, not the bulk default of 5 μB
    assert -3456 < e0.energy < -3454  # pw.x: -253.9528 Ry at these cutoffs (benchmarks/README, lone atoms)
    assert e0.attempts == 1 and e0.scf_iterations > 0 and e0.spin_states == {}  # a d atom: Hund's only (costly)
    assert e0.pseudo_file == "Fe.pbe-spn-rrkjus_psl.0.2.1.UPF" and len(e0.pseudo_md5) == 32


def test_a_lone_silicon_atom_tries_its_lower_spin_state_and_keeps_the_lower_energy(fast_config):
    (e0,) = compute_e0s(["Si"], fast_config).values()
    assert sorted(e0.spin_states) == ["0", "2"]  # 3p²: Hund's triplet, then the singlet
    assert e0.energy == min(e0.spin_states.values()) == e0.spin_states["2"]  # PBE: the triplet is lower
    assert e0.spin_states["0"] - e0.spin_states["2"] > 0.1  # eV: a real difference, not noise
    assert e0.magnetization == pytest.approx(2.0, abs=0.01) and e0.attempts == 2


def mace_e0s_from_training_file(path: Path) -> dict[int, float]:
    """What MACE's data loader takes from a training file: single-atom frames with config_type=IsolatedAtom."""
    return {int(a.numbers[0]): a.info["REF_energy"] for a in read(path, index=":")
            if len(a) == 1 and a.info.get("config_type") == "IsolatedAtom"}


def test_run_computes_the_e0s_first_exports_them_for_mace_and_never_again(tmp_path, monkeypatch):
    water = molecule("H2O", vacuum=4.0)
    water.pbc = True
    water.info["uid"] = "water"
    write(tmp_path / "in.extxyz", [water])
    (tmp_path / "fast.yaml").write_text(FAST)
    # one worker: the E0s (first by priority) are validated before the water's SCF runs, so its label is judged
    first = qe_factory(tmp_path, "run", "in.extxyz", "-c", "fast.yaml", "-o", "labels.extxyz", "--parallel", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 isolated-atom reference(s) (E0s) submitted ahead of the structures" in first.stdout
    log = (tmp_path / "factory" / "logs" / "worker.log").read_text()
    starts = [m.group(1) for m in re.finditer(r"Starting job - scf (\S+) attempt 1", log)]
    assert sorted(starts[:2]) == sorted(u for u in starts if u.startswith("e0-")) and starts[2] == "water"

    labels = read(tmp_path / "labels.extxyz", index=":")
    assert [a.info["uid"] for a in labels if len(a) > 1] == ["water"]
    from_file = mace_e0s_from_training_file(tmp_path / "labels.extxyz")
    assert sorted(from_file) == [1, 8] and all(e < 0 for e in from_file.values())
    as_json = json.loads((tmp_path / "labels.e0s.json").read_text())  # MACE: --E0s=labels.e0s.json
    assert {int(z): e for z, e in as_json.items()} == from_file
    printed = re.search(r"--E0s='(\{.*\})'", first.stdout).group(1)  # MACE: --E0s='{1: ..., 8: ...}'
    assert ast.literal_eval(printed) == from_file

    status = qe_factory(tmp_path, "status").stdout  # the references are counted apart from the structures
    assert "structures seen: 1: 1 labelled" in status and "isolated-atom references (E0s): 2 computed" in status
    check_certificates_and_card(tmp_path, labels, from_file)

    runs = sorted((tmp_path / "factory" / "runs").glob("run_*/attempt_*/pw.out"))
    again = qe_factory(tmp_path, "run", "in.extxyz", "-c", "fast.yaml", "-o", "labels.extxyz")
    assert again.returncode == 0 and "submitted ahead" not in again.stdout, again.stdout + again.stderr
    table = qe_factory(tmp_path, "e0s", "O", "H", "-c", "fast.yaml")
    assert table.returncode == 0, table.stdout + table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert float(rows["H"][1]) == pytest.approx(from_file[1]) and float(rows["O"][2]) == pytest.approx(2.0, abs=0.01)
    assert sorted((tmp_path / "factory" / "runs").glob("run_*/attempt_*/pw.out")) == runs  # nothing recomputed

    exported = qe_factory(tmp_path, "export", "-o", "again.extxyz")
    assert exported.returncode == 0 and "1 of 1 results written" in exported.stdout, exported.stdout
    assert mace_e0s_from_training_file(tmp_path / "again.extxyz") == from_file

    for key in FACTORY_ENV:  # activate() below sets them: restored after the test
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    activate(tmp_path / "factory")
    config = DFTConfig.from_yaml(tmp_path / "fast.yaml")
    assert reference_energies(get_jobstore(), config, ["O", "H", "Si"]) == {"H": from_file[1], "O": from_file[8]}
    (water_label,) = load_results(get_jobstore(), ["water"])  # judged against the E0s at validation
    assert water_label.cohesive_energy == pytest.approx((water_label.energy - from_file[8] - 2 * from_file[1]) / 3)
    assert -10 < water_label.cohesive_energy < 0 and not water_label.not_judged


def check_certificates_and_card(folder: Path, frames: list, e0s: dict[int, float]) -> None:
    """Every frame, the IsolatedAtom ones too, carries the certificate with one protocol hash, the md5s of the
    files pw.x read and pw.x's version; the card beside the export names them, counts as `status` does (1 labelled)
    and gives a MACE command that fits the stress and takes the E0s from the frames."""
    pw_outs = sorted((folder / "factory" / "runs").glob("run_*/attempt_*/pw.out"))
    version = re.search(r"Program PWSCF (\S+)", pw_outs[0].read_text()).group(1)
    read_md5 = {m.group(1): m.group(2) for out in pw_outs for m in re.finditer(
        r"PseudoPot\. # \d+ for (\w+)\s+read from file:\n.*\n\s+MD5 check sum: (\w+)", out.read_text())}
    assert set(read_md5) == {"H", "O"}
    for frame in frames:
        symbols = set(frame.get_chemical_symbols())
        assert {frame.info[f"qc_pseudo_md5_{el}"] for el in symbols} == {read_md5[el] for el in symbols}
        assert frame.info["qc_pw_version"] == version and frame.info["qc_xml_check"] == "agrees"
        assert frame.info["qc_max_force"] <= frame.info["qc_force_bound"] and frame.info["qc_problems"] == 0
        assert frame.info["qc_scf_iterations"] > 0 and 0 < frame.info["qc_scf_accuracy"] < 1e-4
    assert len({frame.info["qc_protocol_hash"] for frame in frames}) == 1
    (water,) = [frame for frame in frames if len(frame) > 1]
    assert water.info["qc_cohesive_energy"] == pytest.approx((water.info["REF_energy"] - e0s[8] - 2 * e0s[1]) / 3)
    card = json.loads((folder / "labels.card.json").read_text())
    assert {el: [f["md5"] for f in files] for el, files in card["pseudopotentials"].items()} == {
        el: [md5] for el, md5 in read_md5.items()}
    assert card["pw_versions"] == {version: 1} and card["outcomes"]["counts"]["labelled"] == 1
    assert {el: e0["energy"] for el, e0 in card["e0s"].items()} == {"H": e0s[1], "O": e0s[8]}
    (mace,) = card["commands"]["mace"]
    assert "--loss=stress" in mace and "--E0s" not in mace and "--train_file=labels.extxyz" in mace
    markdown = (folder / "labels.card.md").read_text()
    assert version in markdown and all(md5 in markdown for md5 in read_md5.values())
