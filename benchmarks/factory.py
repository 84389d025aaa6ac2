"""Throughput of the FireWorks driver (prints ratios; not a timed test).

P1: wall time of `qe-factory run` on 8 small structures ÷ wall time of a bare loop running pw.x on the very same
    pw.in files with the same command line (goal ≤ 1.03).
P4: seconds to `submit` 10,000 structures to a fresh LaunchPad (goal < 60 s). Here the LaunchPad is the embedded
    file-backed one (no MongoDB server can run on these machines).

    .venv/bin/python benchmarks/factory.py [--p1-only | --p4-only] [--structures 10000]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ase.build import bulk
from ase.io import write

from qe_factory.engine.inputs import irreducible_kpoint_count
from qe_factory.engine.parallel import available_ranks, choose_pools, pw_command, pw_environment

BIN = Path(sys.executable).parent
CONFIG = "kpoint_density: 0.25\n"  # Debian PBE Si 45/360 Ry, 8×8×8 mesh: a few seconds of pw.x per structure


def p1(workdir: Path) -> None:
    frames = []
    for seed in range(8):
        atoms = bulk("Si", a=5.43 * (0.97 + 0.01 * seed))
        atoms.rattle(0.05, seed=seed)
        atoms.info["uid"] = f"si-{seed}"
        frames.append(atoms)
    write(workdir / "structures.extxyz", frames)
    (workdir / "config.yaml").write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if k not in ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE")}
    start = time.perf_counter()
    subprocess.run(
        [str(BIN / "qe-factory"), "run", "structures.extxyz", "-c", "config.yaml", "-o", "labels.extxyz"],
        cwd=workdir, env=env, check=True, capture_output=True,
    )
    factory = time.perf_counter() - start

    inputs = sorted((workdir / "factory" / "runs").glob("run_*/attempt_1/pw.in"))
    assert len(inputs) == 8, inputs
    argv = _argv_of_first_run(workdir)
    bare_dir = workdir / "bare"
    start = time.perf_counter()
    for pw_in in inputs:
        run_dir = bare_dir / pw_in.parent.parent.name
        run_dir.mkdir(parents=True)
        (run_dir / "pw.in").write_text(pw_in.read_text())
        with open(run_dir / "pw.out", "w") as out:
            subprocess.run(argv, cwd=run_dir, stdout=out, stderr=subprocess.DEVNULL, env=pw_environment(1), check=True)
    bare = time.perf_counter() - start
    print(f"P1  qe-factory run {factory:.1f} s, bare pw.x loop {bare:.1f} s: ratio {factory / bare:.3f} (goal ≤ 1.03)")
    print(f"    overhead per structure {(factory - bare) / 8:.2f} s (Python start-up, 3 Fireworks, parsing, store)")


def _argv_of_first_run(workdir: Path) -> list[str]:
    """The command line the factory used (ranks and pools), rebuilt the same way."""
    ranks = available_ranks()
    text = next((workdir / "factory" / "runs").glob("run_*/attempt_1/pw.in")).read_text()
    mesh = [int(x) for x in text.split("K_POINTS automatic")[1].split()[:3]]
    argv = pw_command("pw.x", "mpirun", ranks, choose_pools(ranks, irreducible_kpoint_count(tuple(mesh))))
    print(f"    pw.x command line: {shlex.join(argv)}")
    return argv


def p4(workdir: Path, count: int) -> None:
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.launchpad import get_launchpad, release_launchpad

    activate(workdir / "home")
    from qe_factory import DFTConfig
    from qe_factory.workflow.flows import submit

    frames = []
    for seed in range(count):
        atoms = bulk("Si", cubic=True)
        atoms.rattle(0.05, seed=seed)
        atoms.info["uid"] = f"s-{seed}"
        frames.append(atoms)
    launchpad = get_launchpad()
    start = time.perf_counter()
    report = submit(frames, DFTConfig(), launchpad=launchpad)
    elapsed = time.perf_counter() - start
    release_launchpad(launchpad)  # written now, not at exit (the temporary directory is gone by then)
    size = (workdir / "home" / "state" / "launchpad.json").stat().st_size / 1e6
    print(f"P4  submit {count} structures: {elapsed:.1f} s ({report.summary()}; goal < 60 s for 10,000); "
          f"LaunchPad file {size:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p1-only", action="store_true")
    parser.add_argument("--p4-only", action="store_true")
    parser.add_argument("--structures", type=int, default=10_000, help="structures for P4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.p4_only:
            (Path(tmp) / "p1").mkdir()
            p1(Path(tmp) / "p1")
        if not args.p1_only:
            (Path(tmp) / "p4").mkdir()
            p4(Path(tmp) / "p4", args.structures)


if __name__ == "__main__":
    main()
