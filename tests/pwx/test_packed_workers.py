"""Packed local workers with real pw.x: `qe-factory run --parallel 2` runs two pw.x at once, each SCF attempt once,
recovery detours included, and exports every label."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from ase.build import bulk
from ase.io import read, write
from structures import rattled_si

BIN = Path(sys.executable).parent
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")
# tiny and quick. electron_maxstep 10 (pw.x 6.7): the 2-atom cells converge in 7 iterations; the strongly rattled
# 8-atom chain needs 16 with an erratic trace, so its attempt 1 fails and the recovery detour (mixing_beta 0.3) runs
CONFIG = (
    "kpoint_spacing: 0.8\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\n"
    "pw_parameters:\n  electrons:\n    electron_maxstep: 10\n"
)


def running_pw(under: Path) -> int:
    """pw.x processes alive now whose working directory is below `under`."""
    count = 0
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "comm").read_text().strip() == "pw.x" and under in Path(os.readlink(proc / "cwd")).parents:
                count += 1
        except OSError:
            continue
    return count


def test_run_parallel_two_packs_structures_and_keeps_recovery(tmp_path):
    frames = [rattled_si(seed, 0.02) for seed in range(1, 6)]
    hot = bulk("Si") * (1, 1, 4)
    hot.rattle(0.2, seed=0)
    hot.info["uid"] = "si-hot"
    write(tmp_path / "six.extxyz", [*frames, hot])
    (tmp_path / "config.yaml").write_text(CONFIG)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}
    run = subprocess.Popen(
        [str(BIN / "qe-factory"), "--home", str(home), "run", "six.extxyz", "-c", "config.yaml", "-o", "labels.extxyz",
         "--parallel", "2", "--no-e0s"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    most = 0
    while run.poll() is None:  # watch the process table for as long as the run lasts
        most = max(most, running_pw(home / "runs"))
        time.sleep(0.05)
    stdout, stderr = run.communicate()
    assert run.returncode == 0, stdout + stderr
    assert most == 2, f"at most {most} pw.x at once"
    assert "6 labelled structures" in stdout, stdout
    labels = read(tmp_path / "labels.extxyz", ":")
    assert sorted(a.info["uid"] for a in labels) == sorted([f"si-{s}" for s in range(1, 6)] + ["si-hot"])

    # every SCF attempt ran once: one offline launch per SCF Firework, one attempt directory per launch
    launched = Counter(json.loads((d / "FW.json").read_text())["name"] for d in (home / "launches").glob("*_scf_*"))
    assert launched and set(launched.values()) == {1}, launched
    attempts = {run_dir.name[4:]: len(list(run_dir.glob("attempt_*"))) for run_dir in (home / "runs").glob("run_*")}
    assert sum(attempts.values()) == len(launched)
    assert attempts["si-hot"] == 2 and "scf si-hot attempt 2" in launched  # the recovery detour ran
    assert all(attempts[f"si-{s}"] == 1 for s in range(1, 6)), attempts
