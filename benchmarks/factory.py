"""Throughput of the FireWorks driver (prints ratios; not a timed test).

P1: wall time of `qe-factory run` on 8 small structures ÷ wall time of a bare loop running pw.x on the very same
    pw.in files with the same command line (goal ≤ 1.03).
P4: seconds to `submit` 10,000 structures to a fresh LaunchPad (goal < 60 s). Here the LaunchPad is the embedded
    file-backed one (no MongoDB server can run on these machines).
P5: the coordinator's overhead per Firework (goal ≤ 20 ms) with 10 and with 10,000 structures submitted: a worker
    runs --nlaunches Fireworks with a stand-in pw.x that prints a real converged output at once
    (tests/data/si_scf), one worker process; the stand-in's own time is measured apart and taken off.
P6: peak RSS of `qe-factory submit`, `worker` and `export` at 10,000 structures (goal < 300 MB each), from the
    P5 home (the worker: the coordinator process; its worker processes are separate).

    .venv/bin/python benchmarks/factory.py [--only p1,p4,p5] [--structures 10000] [--fireworks 300]
"""

from __future__ import annotations

import argparse
import os
import resource
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


FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "si_scf" / "pw.out"


def measured(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{shlex.join(argv)} failed:\n{stdout}\n{stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
    return wall, peak, stdout


def p5(workdir: Path, submitted: int, fireworks: int) -> None:
    """Coordinator overhead per Firework with `submitted` structures in the home (stand-in pw.x), and peak RSS."""
    standin = workdir / "pw-standin"
    standin.write_text(f"#!/bin/sh\ncat {FIXTURE}\n")
    standin.chmod(0o755)
    frames = []
    for seed in range(submitted):
        atoms = bulk("Si", a=5.43 + 1e-4 * (seed % 100))  # the fixture's cell, near enough; distinct keys
        atoms.rattle(0.01, seed=seed)
        atoms.info["uid"] = f"s-{seed}"
        frames.append(atoms)
    write(workdir / "structures.extxyz", frames)
    (workdir / "config.yaml").write_text("kpoint_density: 0.3\necutwfc: 30\necutrho: 240\nallow_low_cutoffs: true\n")
    (workdir / "exec.yaml").write_text(f"command: {standin}\nmpi_ranks: 1\n")
    env = {k: v for k, v in os.environ.items() if k not in ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE")}
    qef = [str(BIN / "qe-factory"), "--home", str(workdir / "home")]
    wall, rss, out = measured([*qef, "submit", "structures.extxyz", "-c", "config.yaml"], workdir, env)
    print(f"P4' submit {submitted}: {wall:.1f} s, peak RSS {rss:.0f} MB ({out.strip().splitlines()[-1]})")
    start = time.perf_counter()
    for _ in range(20):
        subprocess.run([str(standin)], stdout=subprocess.DEVNULL, check=True)
    standin_s = (time.perf_counter() - start) / 20
    n = min(fireworks, 3 * submitted)
    wall, rss, out = measured([*qef, "worker", "-c", "exec.yaml", "--nlaunches", str(n), "--parallel", "1"],
                              workdir, env)
    ran = int(out.split("worker ran ")[1].split()[0])
    scf = ran // 3
    per_fw = (wall - scf * standin_s) / ran
    print(f"P5  {submitted} submitted: {ran} Fireworks in {wall:.1f} s (stand-in pw.x {standin_s * 1e3:.0f} ms "
          f"a run): {per_fw * 1e3:.0f} ms per Firework, process start included (goal ≤ 20 ms); "
          f"worker peak RSS {rss:.0f} MB")
    wall, rss, out = measured([*qef, "export", "-o", "labels.extxyz"], workdir, env)
    print(f"P6  export: {wall:.1f} s, peak RSS so far {rss:.0f} MB ({out.strip()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="p1,p4,p5", help="which of p1,p4,p5 to run")
    parser.add_argument("--structures", type=int, default=10_000, help="structures for P4 and P5")
    parser.add_argument("--fireworks", type=int, default=300, help="Fireworks the P5 worker runs")
    args = parser.parse_args()
    only = args.only.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "p1" in only:
            (Path(tmp) / "p1").mkdir()
            p1(Path(tmp) / "p1")
        if "p4" in only:
            (Path(tmp) / "p4").mkdir()
            p4(Path(tmp) / "p4", args.structures)
        if "p5" in only:
            for submitted in (10, args.structures):
                (Path(tmp) / f"p5-{submitted}").mkdir()
                p5(Path(tmp) / f"p5-{submitted}", submitted, args.fireworks)


if __name__ == "__main__":
    main()
