"""Throughput of the FireWorks driver (prints ratios; not a timed test).

P1: wall time of `qe-factory run` on 16 small structures ÷ wall time of bare pw.x runs on the very same pw.in files
    in the same layout (as many at once as the factory ran, 1 rank each) (goal ≤ 1.05).
P2: throughput of `qe-factory run`'s default on those 16 cells ÷ a bare loop of 1-rank pw.x runs one after another
    (goal ≥ 1.75); and on two 32-atom cells, the default ÷ one structure at a time with every core (the old default,
    `--parallel 1`) (goal ≥ 1.0). A/B runs interleaved, medians.
P4: seconds to `submit` 10,000 structures to a fresh LaunchPad (goal < 60 s). Here the LaunchPad is the embedded
    file-backed one (no MongoDB server can run on these machines).
P5: the coordinator's overhead per Firework (goal ≤ 20 ms) with 10 and with 10,000 structures submitted: a worker
    runs --nlaunches Fireworks with a stand-in pw.x that prints a real converged output at once
    (tests/data/si_scf), one worker process; the stand-in's own time is measured apart and taken off.
P6: peak RSS of `qe-factory submit`, `worker` and `export` at 10,000 structures (goal < 300 MB each), from the
    P5 home (the worker: the coordinator process; its worker processes are separate).

Each phase works in its own fresh home, and every command it runs gets an environment without the variables that
point FireWorks, jobflow and qe_factory at a home (FACTORY_ENV): P4 activates its home in this process, and FireWorks
then sets MONGOMOCK_SERVERSTORE_FILE here to P4's LaunchPad file, which P5's commands inherited (all of P5's
structures were refused as "already in the LaunchPad for another structure").

    .venv/bin/python benchmarks/factory.py [--only p1,p4,p5] [--repeats 2] [--structures 10000] [--fireworks 300]
    .venv/bin/python benchmarks/factory.py --smoke   # tiny sizes (tests/pwx/test_benchmarks.py): figures, not goals
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import statistics
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
# what points FireWorks, jobflow and qe_factory at a home: never passed on to a phase's commands
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")


def clean_env() -> dict[str, str]:
    """This process's environment, as it is now, without FACTORY_ENV (each phase's commands use their own home)."""
    return {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}


# Debian PBE Si at its table cutoffs (45/360 Ry): a 2-atom cell (5x5x5 k-points) takes ~8 s of 1-rank pw.x
SMALL = "kpoint_spacing: 0.45\n"
# 32-atom cells at Γ; at the table cutoffs one takes ~15 min of 1-rank pw.x, so lower ones for the benchmark
LARGE = "kpoint_spacing: 0.6\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\n"
# --smoke: 2-atom cells at 2x2x2 k-points and low cutoffs (about a second of 1-rank pw.x each)
SMOKE = "kpoint_spacing: 1.2\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\n"


def cells(count: int, repeat: int, seed0: int = 0) -> list:
    """`count` rattled Si cells: the 2-atom primitive one (repeat 1), or the 8-atom cubic one × repeat × repeat × 1
    (repeat 2: 32 atoms)."""
    frames = []
    for seed in range(seed0, seed0 + count):
        atoms = bulk("Si", a=5.43 * (0.98 + 0.005 * (seed % 8)), cubic=repeat > 1) * (repeat, repeat, 1)
        atoms.rattle(0.05, seed=seed)
        atoms.info["uid"] = f"si{len(atoms)}-{seed}"
        frames.append(atoms)
    return frames


def factory_run(workdir: Path, frames: list, config: str, *extra: str) -> float:
    """Wall seconds of `qe-factory run` on `frames` in a fresh directory. Without the isolated-atom references
    (--no-e0s, as when the README's figures were measured): the bare runs it is compared with run the structures'
    pw.in files only."""
    workdir.mkdir(parents=True)
    write(workdir / "structures.extxyz", frames)
    (workdir / "config.yaml").write_text(config)
    start = time.perf_counter()
    subprocess.run([str(BIN / "qe-factory"), "run", "structures.extxyz", "-c", "config.yaml", "-o", "labels.extxyz",
                    "--no-e0s", *extra], cwd=workdir, env=clean_env(), check=True, capture_output=True)
    return time.perf_counter() - start


def bare_runs(inputs: list[Path], workdir: Path, width: int, ranks: int) -> float:
    """Wall seconds of running pw.x on the same pw.in files, `width` at a time, each with `ranks` ranks (pools as
    the factory chooses them): the bare layout a factory run is compared with."""
    def argv(pw_in: Path) -> list[str]:
        mesh = pw_in.read_text().split("K_POINTS")[1].split("\n")[1].split()[:3]
        kpoints = irreducible_kpoint_count(tuple(int(x) for x in mesh)) if mesh else 1
        return pw_command("pw.x", "mpirun", ranks, choose_pools(ranks, kpoints))

    environment = pw_environment(1, {**os.environ, "OMPI_MCA_hwloc_base_binding_policy": "none"})
    start = time.perf_counter()
    waiting, running = list(inputs), []
    while waiting or running:
        while waiting and len(running) < width:
            pw_in = waiting.pop(0)
            run_dir = workdir / pw_in.parent.parent.name
            run_dir.mkdir(parents=True)
            (run_dir / "pw.in").write_text(pw_in.read_text())
            out = open(run_dir / "pw.out", "w")  # noqa: SIM115 - closed when the run ends
            running.append((subprocess.Popen(argv(pw_in), cwd=run_dir, stdout=out, stderr=subprocess.DEVNULL,
                                             env=environment), out))
        proc, out = running.pop(0)
        proc.wait()
        out.close()
    return time.perf_counter() - start


def throughput(workdir: Path, repeats: int, large_repeats: int, smoke: bool = False) -> None:
    """P1 and P2, A/B runs interleaved `repeats` times; medians. `smoke`: 4 small cells and two more of them in
    place of the 32-atom ones, all at SMOKE's settings."""
    ranks = available_ranks()
    small = cells(4 if smoke else 16, 1)
    timings: dict[str, list[float]] = {}
    for r in range(repeats):
        timings.setdefault("run", []).append(factory_run(workdir / f"small-{r}", small, SMOKE if smoke else SMALL))
        inputs = sorted((workdir / f"small-{r}" / "factory" / "runs").glob("run_*/attempt_1/pw.in"))
        assert len(inputs) == len(small), inputs
        timings.setdefault("bare same layout", []).append(bare_runs(inputs, workdir / f"bare-{r}", ranks, 1))
        timings.setdefault("bare 1-rank loop", []).append(bare_runs(inputs, workdir / f"loop-{r}", 1, 1))
    med = {name: statistics.median(values) for name, values in timings.items()}
    print(f"{len(small)} two-atom Si cells, {ranks} cores, {repeats} interleaved repeats (medians; all: {timings})")
    print(f"P1  qe-factory run {med['run']:.1f} s ÷ bare pw.x, {ranks} at a time x 1 rank, same pw.in "
          f"{med['bare same layout']:.1f} s = {med['run'] / med['bare same layout']:.3f} (goal ≤ 1.05)")
    print(f"P2  structures per hour, qe-factory run ÷ a bare 1-rank loop one after another: "
          f"{med['bare 1-rank loop'] / med['run']:.2f} (goal ≥ 1.75; the machine's own ceiling, bare loop ÷ bare "
          f"{ranks}-wide pool: {med['bare 1-rank loop'] / med['bare same layout']:.2f})")
    if not large_repeats:
        return
    large, config = (cells(2, 1, seed0=100), SMOKE) if smoke else (cells(2, 2, seed0=100), LARGE)
    timings = {}
    for r in range(large_repeats):
        timings.setdefault("default", []).append(factory_run(workdir / f"large-{r}", large, config))
        timings.setdefault("one at a time", []).append(
            factory_run(workdir / f"large1-{r}", large, config, "--parallel", "1"))
    med = {name: statistics.median(values) for name, values in timings.items()}
    print(f"P2' two {len(large[0])}-atom Si cells: default {med['default']:.1f} s, one at a time with {ranks} ranks "
          f"(the old default) {med['one at a time']:.1f} s: throughput ratio "
          f"{med['one at a time'] / med['default']:.2f} (goal ≥ 1.0; all: {timings})")


def p4(workdir: Path, count: int) -> None:
    """In this process: a home given by an inherited FACTORY_ENV variable would be used instead of workdir/home
    (FireWorks reads MONGOMOCK_SERVERSTORE_FILE before FW_config.yaml), so they go for the phase, and come back after
    it (activate() sets them)."""
    saved = dict(os.environ)
    for key in FACTORY_ENV:
        os.environ.pop(key, None)
    try:
        _p4(workdir, count)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _p4(workdir: Path, count: int) -> None:
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.state import get_launchpad, release_launchpad

    activate(workdir / "home")
    from qe_factory import DFTConfig
    from qe_factory.workflow.submit import submit

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
    standin.write_text(  # what pw.x leaves: its output, and its XML in the outdir named in pw.in
        "#!/bin/sh\noutdir=$(sed -n \"s/^ *outdir *= *'\\(.*\\)'.*/\\1/p\" pw.in)\n"
        f"mkdir -p \"$outdir/pwscf.save\" && cp {FIXTURE.parent / 'data-file-schema.xml'} \"$outdir/pwscf.save/\"\n"
        f"cat {FIXTURE}\n")
    standin.chmod(0o755)
    frames = []
    for seed in range(submitted):
        atoms = bulk("Si", a=5.43 + 1e-4 * (seed % 100))  # the fixture's cell, near enough; distinct keys
        atoms.rattle(0.01, seed=seed)
        atoms.info["uid"] = f"s-{seed}"
        frames.append(atoms)
    write(workdir / "structures.extxyz", frames)
    # the fixture's settings (4x4x4 k-points, 25/200 Ry): the XML check compares what pw.x says it used with them
    (workdir / "config.yaml").write_text("kpoint_spacing: 0.6\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\n")
    (workdir / "exec.yaml").write_text(f"command: {standin}\nmpi_ranks: 1\n")
    env = clean_env()  # not P4's home (activated in this process), not an inherited one
    for home in ("home", "home2"):  # two like homes (a copied home would point at the first one's files)
        wall, rss, out = measured([str(BIN / "qe-factory"), "--home", home, "submit", "structures.extxyz", "-c",
                                   "config.yaml"], workdir, env)
        summary = next((line for line in out.splitlines() if re.search(r"\d+ added", line)), "no summary line")
        print(f"P4' submit {submitted} to {home}: {wall:.1f} s, peak RSS {rss:.0f} MB ({summary})")
    (workdir / "pw.in").write_text("   outdir = './standin-out'\n")
    start = time.perf_counter()
    for _ in range(20):
        subprocess.run([str(standin)], cwd=workdir, stdout=subprocess.DEVNULL, check=True)
    standin_s = (time.perf_counter() - start) / 20
    # the marginal cost: a worker that runs `few` Fireworks against one that runs `few + n`, from the same home
    few, n = 15, min(fireworks, 3 * submitted) - 15
    walls, rss = [], 0.0
    for home, count in ((workdir / "home2", few), (workdir / "home", few + n)):
        wall, rss, out = measured([str(BIN / "qe-factory"), "--home", str(home), "worker", "-c", "exec.yaml",
                                   "--nlaunches", str(count), "--parallel", "1"], workdir, env)
        assert f"worker ran {count} Firework" in out, out
        walls.append(wall)
    per_fw = (walls[1] - walls[0] - n / 3 * standin_s) / n
    print(f"P5  {submitted} submitted: {few} Fireworks in {walls[0]:.1f} s, {few + n} in {walls[1]:.1f} s (stand-in "
          f"pw.x {standin_s * 1e3:.0f} ms a run): {per_fw * 1e3:.0f} ms per Firework (goal ≤ 20 ms); worker peak RSS "
          f"{rss:.0f} MB")
    wall, rss, out = measured([str(BIN / "qe-factory"), "--home", "home", "export", "-o", "labels.extxyz"], workdir,
                              env)
    print(f"P6  export: {wall:.1f} s, peak RSS so far {rss:.0f} MB ({out.strip()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="p1,p4,p5", help="which of p1 (with p2),p4,p5 to run")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of P1/P2 (small cells)")
    parser.add_argument("--large-repeats", type=int, default=1, help="repeats of P2 on 32-atom cells (0: none)")
    parser.add_argument("--structures", type=int, default=10_000, help="structures for P4 and P5")
    parser.add_argument("--fireworks", type=int, default=300, help="Fireworks the P5 worker runs")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, every phase (tests/pwx/test_benchmarks.py): P1/P2 on 4 + 2 two-atom cells at "
                        "low cutoffs, 1 repeat; P4/P5 with 20 structures, 30 Fireworks; the figures are not the goals")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.large_repeats, args.structures, args.fireworks = 1, 1, 20, 30
    only = args.only.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "p1" in only:
            throughput(Path(tmp) / "p1", args.repeats, args.large_repeats, args.smoke)
        if "p4" in only:
            (Path(tmp) / "p4").mkdir()
            p4(Path(tmp) / "p4", args.structures)
        if "p5" in only:
            for submitted in dict.fromkeys((10, args.structures)):
                (Path(tmp) / f"p5-{submitted}").mkdir()
                p5(Path(tmp) / f"p5-{submitted}", submitted, args.fireworks)


if __name__ == "__main__":
    main()
