"""One coordinator keeps 64 slots busy: `qe-factory worker --parallel 64` on 128 structures, with a stand-in pw.x
that waits at a barrier until every slot of its wave runs one (64 at once, then the next 64). Were a slot left
empty, its wave would never pass the barrier and the run would not end: the test waits on that state, not on a
clock (how busy the slots are over time is benchmarks/coordinator.py's C2 figure)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ase.build import bulk
from ase.io import write

BIN = Path(sys.executable).parent
DATA = Path(__file__).resolve().parents[1] / "data" / "si_scf"
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")
SLOTS, STRUCTURES = 64, 128

# takes the next free rank atomically (mkdir), waits until its wave's last rank is taken, then leaves a real run's
# output and XML (tests/data/si_scf) as pw.x would
STAND_IN = r"""#!/bin/sh
i=1; while ! mkdir "$BARRIER/$i" 2>/dev/null; do i=$((i+1)); done
wave_end=$(( (i + SLOTS - 1) / SLOTS * SLOTS ))
while [ "$(ls "$BARRIER" | wc -l)" -lt "$wave_end" ]; do sleep 0.1; done
outdir=$(sed -n "s/^ *outdir *= *'\(.*\)'.*/\1/p" pw.in)
mkdir -p "$outdir/pwscf.save" && cp "$DATA/data-file-schema.xml" "$outdir/pwscf.save/"
cat "$DATA/pw.out"
"""


def test_one_coordinator_runs_64_structures_at_once_wave_after_wave(tmp_path):
    frames = []
    for seed in range(STRUCTURES):
        atoms = bulk("Si", a=5.43 + 1e-4 * seed)
        atoms.rattle(0.01, seed=seed)
        atoms.info["uid"] = f"s-{seed}"
        frames.append(atoms)
    write(tmp_path / "cells.extxyz", frames)
    stand_in = tmp_path / "pw-at-a-barrier"
    stand_in.write_text(STAND_IN.replace("SLOTS", str(SLOTS)).replace("$DATA", str(DATA)))
    stand_in.chmod(0o755)
    (tmp_path / "config.yaml").write_text("kpoint_spacing: 0.6\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\n")
    (tmp_path / "exec.yaml").write_text(f"command: {stand_in}\nmpi_ranks: 1\n")
    (tmp_path / "barrier").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}
    env["BARRIER"] = str(tmp_path / "barrier")
    factory = [str(BIN / "qe-factory"), "--home", str(tmp_path / "home")]
    submitted = subprocess.run([*factory, "submit", "cells.extxyz", "-c", "config.yaml", "--no-e0s"], cwd=tmp_path,
                               env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr

    worker = subprocess.run([*factory, "worker", "-c", "exec.yaml", "--parallel", str(SLOTS)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)  # a slot left empty: the barrier holds

    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert len(list((tmp_path / "barrier").iterdir())) == STRUCTURES  # each SCF once, 64 at a time
    status = subprocess.run([*factory, "status"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert f"{STRUCTURES} labelled" in status.stdout, status.stdout
