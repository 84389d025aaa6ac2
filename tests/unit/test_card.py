"""The data-set card beside an export (engine/card.py, workflow/cards.py): written by `label` (what `qe-factory run`
does) and by `qe-factory export`, its counts those `qe-factory status` prints for the same home, its md5s those of
the files, its pw.x version pw.x's own, its MACE command one that fits the stress. pw.x is tests/fake_pw.py replaying
recorded real runs: two labels, one result the sanitizer refuses (si_wrong_pseudo: carbon's file under Si's name),
one structure refused at submission."""

from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from ase import Atoms
from ase.build import bulk

from qe_factory import DFTConfig
from qe_factory.cli import main
from qe_factory.engine.card import DatasetCard, card_paths, mace_lines, nequip_lines
from qe_factory.engine.pseudos import load_family
from qe_factory.workflow import pipelines

TESTS = Path(__file__).resolve().parents[1]
FAKE_PW = TESTS / "fake_pw.py"


@pytest.fixture
def labelled(home, tmp_path, monkeypatch):
    """A home where `label` ran four structures (one worker, so the replays go in submission order)."""
    monkeypatch.setenv("FAKE_PW_PLAN", "replay:si_scf,replay:si_scf,replay:si_wrong_pseudo")
    monkeypatch.setenv("FAKE_PW_COUNTER", str(tmp_path / "calls"))
    config = DFTConfig(kpoint_spacing=0.6, ecutwfc=25, ecutrho=200, allow_low_cutoffs=True, max_retries=1,
                       mpi_ranks=1, command=f"{sys.executable} {FAKE_PW}")
    frames = []
    for uid in ("si-a", "si-b", "si-c"):
        atoms = bulk("Si")
        atoms.rattle(0.01, seed=sum(map(ord, uid)))
        atoms.info["uid"] = uid
        frames.append(atoms)
    overlapping = Atoms("Si2", positions=[[0, 0, 0], [0.3, 0, 0]], cell=[5, 5, 5], pbc=True)
    overlapping.info["uid"] = "too-close"
    report = pipelines.label([*frames, overlapping], config, home, tmp_path / "labels.extxyz", parallel=1, e0s=False)
    assert len(report.labelled) == 2 and len(report.failed) == 1 and list(report.refused) == ["too-close"], report
    return config, report


def status_counts(capsys) -> dict[str, int]:
    """What `qe-factory status` prints: "structures seen: N: a labelled (...), b failed, c refused, ..."."""
    capsys.readouterr()
    assert main(["status"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("structures seen"))
    return {name: int(n) for n, name in re.findall(r"(\d+) (labelled|failed|refused|waiting|running)", line)}


def read_card(training_file: Path) -> tuple[DatasetCard, str]:
    json_path, md_path = card_paths(training_file)
    return DatasetCard.model_validate_json(json_path.read_text()), md_path.read_text()


def test_the_card_beside_a_run_s_export_counts_as_status_and_names_what_made_the_labels(labelled, tmp_path, capsys):
    config, report = labelled
    card, markdown = read_card(tmp_path / "labels.extxyz")
    counts = status_counts(capsys)
    assert counts == {"labelled": 2, "failed": 1, "refused": 1, "waiting": 0, "running": 0}
    assert {k: v for k, v in card.outcomes.counts.items() if k != "marked"} == counts
    assert card.labels == report.written == 2 and card.outcomes.scope == "the structures of this run (4)"
    (failed,) = report.failed
    assert card.outcomes.causes == {"UNPHYSICAL at validate": 1, "REFUSED at submit": 1}
    assert card.outcomes.refused_by_check["pseudopotential_provenance"] == 1  # carbon's file read for Si
    family = load_family(config.pseudo_family, config.pseudo_dir)
    md5 = hashlib.md5((family.directory / family.entries["Si"].filename).read_bytes()).hexdigest()
    assert card.pseudopotentials == {"Si": [{"filename": family.entries["Si"].filename, "md5": md5}]}
    version = re.search(r"Program PWSCF (\S+)", (TESTS / "data" / "si_scf" / "pw.out").read_text()).group(1)
    assert card.pw_versions == {version: 2} and md5 in markdown and version in markdown
    assert list(card.protocol_hashes) == [card.protocol.hash] and card.protocol.elements == ["Si"]  # pinned by run
    assert f"hash `{card.protocol.hash}`" in markdown and "| ecutwfc | 25.0 |" in markdown
    assert card.e0s == {} and "Si" in card.e0s_missing  # e0s=False: named, with why
    assert card.versions["ase"] and card.versions["qe_factory"]
    (train,) = card.commands["mace"]
    assert "--loss=stress" in train and "--train_file=labels.extxyz" in train and "--E0s=average" in train
    assert "--batch_size=1" in train  # 2 labels: one to train on, one to validate
    assert "```bash\n" + train in markdown


def test_the_mace_command_fits_the_stress_as_mace_s_own_parser_reads_it(tmp_path):
    """mace_run_train's arguments (the keys MACE reads, --loss=stress, batches no larger than the frames): checked
    with MACE's parser when mace-torch is installed here, else with the flags MACE 0.3.16 defines."""
    (line,) = mace_lines(tmp_path / "set.extxyz", 25, True, None)
    argv = shlex.split(line)
    assert argv[0] == "mace_run_train"
    try:
        from mace.tools import build_default_arg_parser
        parser = build_default_arg_parser()
    except ImportError:
        parser = argparse.ArgumentParser()
        for flag in ("name", "train_file", "valid_fraction", "energy_key", "forces_key", "stress_key", "loss",
                     "stress_weight", "model", "r_max", "batch_size", "valid_batch_size", "device"):
            parser.add_argument(f"--{flag}")
    args = parser.parse_args(argv[1:])
    assert (args.energy_key, args.forces_key, args.stress_key, args.loss) == ("REF_energy", "REF_forces",
                                                                              "REF_stress", "stress")
    assert float(args.stress_weight) > 0 and args.train_file == "set.extxyz"
    assert (int(args.batch_size), int(args.valid_batch_size)) == (10, 2)  # 25 labels: 2 to validate, 23 to train


def test_the_nequip_command_points_the_example_config_at_the_export(tmp_path):
    """The sed line makes examples/nequip.yaml read this export and its <name>.nequip.yaml (the E0s); the split is
    counts (fractions leave val or test empty below 10 frames)."""
    import subprocess

    import yaml

    _, edit, train = nequip_lines(tmp_path / "set.extxyz", 4, None)
    (tmp_path / "examples").mkdir()
    shutil.copy(TESTS.parent / "examples" / "nequip.yaml", tmp_path / "examples")
    done = subprocess.run(edit, shell=True, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load((tmp_path / "set.nequip-train.yaml").read_text())
    assert config["defaults"][0] == "set.nequip" and config["data"]["split_dataset"]["file_path"] == "set.extxyz"
    assert "-cn set.nequip-train.yaml" in train and "data.split_dataset.train=2 data.split_dataset.val=1" in train


def test_qe_factory_export_writes_the_card_of_the_whole_home(labelled, tmp_path, capsys):
    assert main(["export", "-o", str(tmp_path / "again.db"), "--format", "ase-db"]) == 0
    assert "data-set card:" in capsys.readouterr().out
    card, markdown = read_card(tmp_path / "again.db")
    assert card.outcomes.scope == "every structure in the home" and card.format == "ase-db"
    assert {k: v for k, v in card.outcomes.counts.items() if k != "marked"} == status_counts(capsys)
    assert card.commands["mace"][0].startswith("qe-factory export -o again-mace.extxyz --format mace-extxyz "
                                               "--dataset default")  # the same data set's labels
    assert card.commands["nequip"][0].startswith("qe-factory export -o again-nequip.extxyz --format nequip-extxyz")
    assert "# Data-set card: again.db" in markdown
