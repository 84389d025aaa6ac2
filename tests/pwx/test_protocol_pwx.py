"""One data set, one protocol, with real pw.x: Si2, Ge2 and SiGe in boxes through `qe-factory run` come out at one
cutoff pair (Si's, the larger), with E0s for Si and Ge at that pair and one protocol hash on every label; a later
submission with an element that needs higher cutoffs is refused with its reason, and nothing is added.

The family is debian-pbe's files under a table with low cutoffs (Si 25/200, Ge 20/160, O 30/240 Ry), so that the
runs are short and the data set's pair is still the largest of its elements'.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ase import Atoms
from ase.io import read, write

from qe_factory.engine.pseudos import load_family

BIN = Path(sys.executable).parent
LOW_CUTOFFS = {"Si": (25.0, 200.0), "Ge": (20.0, 160.0), "O": (30.0, 240.0)}


def qe_factory(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE",
                                                             "MONGOMOCK_SERVERSTORE_FILE")}
    return subprocess.run([str(BIN / "qe-factory"), *args], cwd=cwd, env=env, capture_output=True, text=True)


def low_cutoff_family(path: Path) -> Path:
    debian = load_family("debian-pbe")
    rows = {el: {"filename": debian.entries[el].filename, "md5": debian.entries[el].md5, "cutoff_wfc": wfc,
                 "cutoff_rho": rho} for el, (wfc, rho) in LOW_CUTOFFS.items()}
    path.write_text(json.dumps({"name": "low-test", "functional": "PBE", "pseudopotentials": rows}))
    return debian.directory


def dimer(first: str, second: str, uid: str) -> Atoms:
    atoms = Atoms(first + second, positions=[[0, 0, 0], [0, 0, 2.3]], cell=[9.0, 9.5, 11.0], pbc=True)
    atoms.translate([4.5, 4.75, 4.35])
    atoms.info["uid"] = uid
    return atoms


def test_a_multi_element_data_set_is_labelled_at_one_cutoff_pair_with_e0s_at_that_pair(tmp_path):
    directory = low_cutoff_family(tmp_path / "family.json")
    (tmp_path / "config.yaml").write_text(f"pseudo_family: {tmp_path / 'family.json'}\npseudo_dir: {directory}\n"
                                          "mpi_ranks: 1\n")
    write(tmp_path / "in.extxyz", [dimer("Si", "Si", "si2"), dimer("Ge", "Ge", "ge2"), dimer("Si", "Ge", "sige")])
    run = qe_factory(tmp_path, "run", "in.extxyz", "-c", "config.yaml", "-o", "labels.extxyz", "--parallel", "2")
    assert run.returncode == 0, run.stdout + run.stderr

    frames = read(tmp_path / "labels.extxyz", index=":")
    labels = [a for a in frames if a.info.get("config_type") != "IsolatedAtom"]
    assert sorted(a.info["uid"] for a in labels) == ["ge2", "si2", "sige"]
    assert {(a.info["ecutwfc"], a.info["ecutrho"]) for a in labels} == {LOW_CUTOFFS["Si"]}  # Ge2 too: one pair
    e0s = json.loads((tmp_path / "labels.e0s.json").read_text())
    assert sorted(e0s) == ["14", "32"]  # Si and Ge: their labels agree, so each has its E0

    protocol = json.loads((tmp_path / "factory" / "state" / "protocols" / "default.json").read_text())
    assert protocol["elements"] == ["Ge", "Si"] and protocol["settings"]["ecutwfc"] == 25.0
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.state import get_jobstore, load_results

    activate(tmp_path / "factory")
    results = load_results(get_jobstore())
    assert len(results) == 5 and {r.protocol_hash for r in results} == {protocol["hash"]}  # 3 labels, 2 E0s
    assert {a.info["qc_protocol_hash"] for a in frames} == {protocol["hash"]}  # the E0 frames' too
    assert all(a.info["qc_scf_iterations"] > 0 and a.info["qc_xml_check"] == "agrees" for a in frames)
    md5 = {el: hashlib.md5((Path(directory) / protocol["pseudopotentials"][el]["filename"]).read_bytes()).hexdigest()
           for el in ("Si", "Ge")}
    assert frames[-1].info["qc_pseudo_md5_Si"] == md5["Si"] and frames[-1].info["qc_pseudo_md5_Ge"] == md5["Ge"]

    card = json.loads((tmp_path / "labels.card.json").read_text())  # beside the export
    assert card["protocol"]["hash"] == protocol["hash"] and card["protocol_hashes"] == {protocol["hash"]: 3}
    assert {el: entry[0]["md5"] for el, entry in card["pseudopotentials"].items()} == md5
    pw_out = (tmp_path / "factory" / "runs" / "run_si2" / "attempt_1" / "pw.out").read_text()
    pw_version = re.search(r"Program PWSCF (\S+)", pw_out).group(1)
    assert card["pw_versions"] == {pw_version: 3}
    status = qe_factory(tmp_path, "status").stdout
    assert f"structures seen: 3: {card['outcomes']['counts']['labelled']} labelled" in status, status
    said = f"data set 'default': protocol {protocol['hash'][:12]}, elements Ge, Si (the first submission), 25/200 Ry"
    assert said in run.stdout and said in status, run.stdout + status

    write(tmp_path / "more.extxyz", [dimer("Si", "O", "sio")])  # O asks for 30/240 Ry
    lp_before = (tmp_path / "factory" / "state" / "launchpad.json").read_bytes()
    refused = qe_factory(tmp_path, "submit", "more.extxyz", "-c", "config.yaml")
    assert refused.returncode != 0
    assert "O asks for ecutwfc/ecutrho 30/240 Ry, above the data set's 25/200 Ry" in refused.stderr, refused.stderr
    assert "--dataset NAME" in refused.stderr
    assert (tmp_path / "factory" / "state" / "launchpad.json").read_bytes() == lp_before  # nothing added
    assert json.loads((tmp_path / "factory" / "state" / "protocols" / "default.json").read_text()) == protocol
