"""The `qe-factory` command as a user types it, with real pw.x: compute, run, run again, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.io import read, write

BIN = Path(sys.executable).parent
FAST = "kpoint_spacing: 0.8\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\nmpi_ranks: 1\n"


def qe_factory(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE")}
    return subprocess.run([str(BIN / "qe-factory"), *args], cwd=cwd, env=env, capture_output=True, text=True)


def frames(*seeds: int) -> list[Atoms]:
    out = []
    for seed in seeds:
        atoms = bulk("Si")
        atoms.rattle(0.05, seed=seed)
        atoms.info["uid"] = f"si-{seed}"
        out.append(atoms)
    return out


def test_compute_labels_good_structures_and_reports_every_one(tmp_path):
    overlap = Atoms("Si2", positions=[(0, 0, 0), (0.4, 0, 0)], cell=[5, 5, 5], pbc=True, info={"uid": "overlap"})
    write(tmp_path / "in.extxyz", [*frames(1), overlap])
    (tmp_path / "fast.yaml").write_text(FAST + "work_dir: runs\n")
    run = qe_factory(tmp_path, "compute", "in.extxyz", "-c", "fast.yaml", "-o", "labels.extxyz")
    assert run.returncode == 1, run.stdout + run.stderr  # not every structure was labelled
    assert "1 labelled, 0 failed, 1 refused of 2" in run.stdout
    (label,) = read(tmp_path / "labels.extxyz", index=":")
    assert label.info["uid"] == "si-1" and label.arrays["REF_forces"].shape == (2, 3)
    report = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert [r["uid"] for r in report] == ["si-1", "overlap"]
    assert report[0]["succeeded"] and report[0]["energy"] == pytest.approx(label.info["REF_energy"])
    assert "apart" in report[1]["refused"] and not report[1]["succeeded"]
    assert (tmp_path / "runs" / "run_si-1" / "attempt_1" / "pw.out").exists()


def test_run_again_recomputes_nothing_and_export_gives_the_same_labels(tmp_path):
    write(tmp_path / "in.extxyz", frames(1, 2))
    (tmp_path / "fast.yaml").write_text(FAST)
    first = qe_factory(tmp_path, "run", "in.extxyz", "-c", "fast.yaml", "-o", "labels.extxyz", "--no-e0s")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Starting job" not in first.stdout + first.stderr  # FireWorks' and jobflow's lines go to the log
    assert "Starting job - scf si-1 attempt 1" in (tmp_path / "factory" / "logs" / "worker.log").read_text()
    outputs = sorted((tmp_path / "factory" / "runs").glob("run_*/attempt_*/pw.out"))
    assert [p.parent.parent.name for p in outputs] == ["run_si-1", "run_si-2"]  # in the home, one attempt each
    stamps = [p.stat().st_mtime_ns for p in outputs]
    # the -c file's execution settings (mpi_ranks: 1) are the in-process worker's, on a machine with more cores
    assert all("running on     1 processors" in p.read_text() for p in outputs)

    again = qe_factory(tmp_path, "run", "in.extxyz", "-c", "fast.yaml", "-o", "again.extxyz", "--no-e0s")
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted((tmp_path / "factory" / "runs").glob("run_*/attempt_*/pw.out")) == outputs
    assert [p.stat().st_mtime_ns for p in outputs] == stamps  # no pw.x ran the second time
    assert "2 labelled structures in again.extxyz" in again.stdout

    status = qe_factory(tmp_path, "status")  # finished workflows left the LaunchPad; the JobStore still counts
    assert "structures seen: 2: 2 labelled" in status.stdout, status.stdout
    export = qe_factory(tmp_path, "export", "-o", "exported.extxyz")
    assert export.returncode == 0 and "2 of 2 results written" in export.stdout
    by_uid = {a.info["uid"]: a for a in read(tmp_path / "labels.extxyz", index=":")}
    for atoms in read(tmp_path / "exported.extxyz", index=":"):
        reference = by_uid[atoms.info["uid"]]
        assert atoms.info["REF_energy"] == reference.info["REF_energy"]
        np.testing.assert_array_equal(atoms.arrays["REF_forces"], reference.arrays["REF_forces"])
        np.testing.assert_array_equal(atoms.info["REF_stress"], reference.info["REF_stress"])
    # another smearing in the same data set: refused as a whole, with the reason and the ways out
    (tmp_path / "other.yaml").write_text(FAST + "degauss: 0.03\n")
    mixed = qe_factory(tmp_path, "run", "in.extxyz", "-c", "other.yaml", "-o", "other.extxyz", "--no-e0s")
    assert mixed.returncode == 2 and "degauss is 0.03, the data set's is 0.02" in mixed.stderr, mixed.stderr
    # as another data set of the home: the same uids, one uid, one label — refused by name, nothing computed
    other = qe_factory(tmp_path, "run", "in.extxyz", "-c", "other.yaml", "-o", "other.extxyz", "--no-e0s",
                       "--dataset", "smeared")
    assert other.returncode == 1 and other.stdout.count("already has a label") == 2, other.stdout
    assert sorted((tmp_path / "factory" / "runs").glob("run_*/attempt_*/pw.out")) == outputs
    assert "2 of 2 results written" in qe_factory(tmp_path, "export", "-o", "again.extxyz").stdout
