"""One coordinator at scale, with a stand-in pw.x (prints figures; not a timed test).

C1 flat: the coordinator's own CPU time per Firework (goal ≤ 20 ms, flat) with N structures submitted to the home
    and as many labelled before (their outputs written straight into the JobStore, three per structure, as the
    workflows leave them): 2 local worker slots, a stand-in pw.x that prints a converged output at once. Measured
    between the 5th and the last structure finished (start-up left out), in a process of its own (its workers'
    CPU apart), whose peak RSS is printed too.
C2 feed: K slots (local worker processes; hundreds are possible, memory allowing) fed by one coordinator, each
    stand-in pw.x sleeping S seconds: structures per second sustained, the slots' busy fraction, the coordinator's
    CPU per structure, and so the cores one coordinator can feed at 60 s per structure (60 s ÷ its CPU seconds per
    structure, one core per structure; goal ≥ 1,000).
C3 jobs (only with --only c3: needs the SLURM cluster of scripts/slurm_cluster.sh): N structures through pilot jobs
    (`qe-factory qlaunch rapidfire -m J`, one slot each) with the stand-in pw.x: SLURM jobs per 1,000 structures
    (goal ≤ 10), launches and busy fraction per job.

    .venv/bin/python benchmarks/coordinator.py [--only c1,c2,c3] [--sizes 10,10000,100000] [--fireworks 300]
        [--slots 64] [--sleep 60] [--structures 256] [--jobs 2] [--slurm-structures 1000]
    .venv/bin/python benchmarks/coordinator.py --smoke   # tiny sizes (tests/pwx/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ase.build import bulk
from ase.io import write

BIN = Path(sys.executable).parent
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "si_scf" / "pw.out"
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")
# the fixture's settings (4x4x4 k-points, 25/200 Ry): the XML check compares what pw.x says it used with them
CONFIG = "kpoint_spacing: 0.6\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\n"


def stand_in(workdir: Path, sleep: float) -> Path:
    """A pw.x that sleeps, then leaves the fixture's output and XML (in the outdir its pw.in names)."""
    path = workdir / f"pw-standin-{sleep:g}"
    path.write_text(
        "#!/bin/sh\noutdir=$(sed -n \"s/^ *outdir *= *'\\(.*\\)'.*/\\1/p\" pw.in)\n"
        f"sleep {sleep}\n"
        f"mkdir -p \"$outdir/pwscf.save\" && cp {FIXTURE.parent / 'data-file-schema.xml'} \"$outdir/pwscf.save/\"\n"
        f"cat {FIXTURE}\n")
    path.chmod(0o755)
    return path


def new_home(workdir: Path, name: str, structures: int) -> Path:
    """A fresh home with `structures` distinct 2-atom Si cells submitted (most wait in its inbox)."""
    frames = []
    for seed in range(structures):
        atoms = bulk("Si", a=5.43 + 1e-4 * (seed % 100))
        atoms.rattle(0.01, seed=seed)
        atoms.info["uid"] = f"s-{seed}"
        frames.append(atoms)
    write(workdir / f"{name}.extxyz", frames)
    (workdir / "config.yaml").write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}
    home = workdir / name
    subprocess.run([str(BIN / "qe-factory"), "--home", str(home), "submit", f"{name}.extxyz", "-c", "config.yaml",
                    "--no-e0s"], cwd=workdir, env=env, check=True, capture_output=True)
    return home


def add_labelled(home: Path, structures: int) -> None:
    """Outputs of `structures` earlier structures (inputs, SCF, validation each), written into the JobStore."""
    from maggma.stores import MontyStore

    store = MontyStore("outputs", database_path=str(home / "state" / "jobstore"), database_name="qe_factory",
                       storage="sqlite", key="uuid")
    store.connect()
    output = {"energy": -250.0, "forces": [[0.0, 0.0, 0.0]] * 2, "stress": [[0.0] * 3] * 3}
    docs = []
    for n in range(structures):
        for stage in ("inputs", "scf", "validate"):
            job = str(uuid.uuid4())
            docs.append({"_id": f"{job}:1", "uuid": job, "index": 1, "output": output,
                         "metadata": {"stage": stage, "uid": f"old-{n}", "qe_factory_key": f"old-{n}"}})
    if docs:  # at once: montydb reads every key of the collection at each insert_many
        store._collection.insert_many(docs)
    store.close()


def coordinate(home: Path, command: Path, parallel: int, nlaunches: int | None) -> list[tuple[float, float]]:
    """Run the home's coordinator here; (wall, this process's CPU) at each structure finished."""
    from qe_factory.engine.config import ExecutionSettings
    from qe_factory.workflow.coordinator import run_coordinator
    from qe_factory.workflow.home import activate

    activate(home)
    marks: list[tuple[float, float]] = []
    run_coordinator(nlaunches=nlaunches, launch_root=home / "launches", parallel=parallel,
                    execution=ExecutionSettings(command=str(command), mpi_ranks=1), log=home / "logs" / "worker.log",
                    on_finished=lambda uid, state: marks.append((time.perf_counter(), time.process_time())))
    return marks


def coordinate_apart(home: Path, command: Path, parallel: int, nlaunches: int | None
                     ) -> tuple[list[tuple[float, float]], float]:
    """coordinate() in a process of its own, as `qe-factory worker` runs (none of this script's structures and
    documents in its memory); its marks and peak RSS (MB)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_coordinate_child, args=(results, home, command, parallel, nlaunches))
    process.start()
    marks, rss = results.get()
    process.join()
    return marks, rss


def _coordinate_child(results, home: Path, command: Path, parallel: int, nlaunches: int | None) -> None:
    marks = coordinate(home, command, parallel, nlaunches)
    results.put((marks, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def c1(workdir: Path, size: int, fireworks: int) -> None:
    home = new_home(workdir, f"c1-{size}", size)
    add_labelled(home, size)
    marks, rss = coordinate_apart(home, stand_in(workdir, 0), 2, fireworks)
    (w0, c0), (w1, c1_) = marks[min(4, len(marks) - 2)], marks[-1]
    done = 3 * (len(marks) - 1 - min(4, len(marks) - 2))
    print(f"C1 {size} submitted, {size} labelled before: {done} Fireworks measured: coordinator CPU "
          f"{(c1_ - c0) / done * 1e3:.1f} ms per Firework, wall {(w1 - w0) / done * 1e3:.1f} ms (goal ≤ 20 ms CPU); "
          f"peak RSS of the coordinator's process {rss:.0f} MB (goal < 300 MB)")


def c2(workdir: Path, slots: int, sleep: float, structures: int) -> None:
    home = new_home(workdir, f"c2-{slots}", structures)
    start = time.perf_counter()
    marks = coordinate(home, stand_in(workdir, sleep), slots, None)
    wall = time.perf_counter() - start
    first = min(slots, len(marks) - 2)  # from when the first wave of slots has finished (start-up left out)
    (_, c0), (_, c1_) = marks[first], marks[-1]
    cpu_per_structure = (c1_ - c0) / (len(marks) - 1 - first)
    busy = len(marks) * sleep / (slots * wall)
    print(f"C2 {slots} slots, pw.x {sleep:g} s: {len(marks)} structures in {wall:.0f} s ({len(marks) / wall:.2f} "
          f"structures/s; {slots / sleep:.2f} with no start-up and no gaps); slots busy {busy:.0%} of the run, "
          f"start-up included; coordinator CPU "
          f"{cpu_per_structure * 1e3:.0f} ms per structure → one coordinator feeds {60 / cpu_per_structure:.0f} cores "
          "at 60 s per structure (goal ≥ 1,000)")


def c3(workdir: Path, structures: int, max_jobs: int, slots: int) -> None:
    """Pilot jobs on the SLURM cluster this machine runs (scripts/slurm_cluster.sh start), stand-in pw.x at once."""
    import yaml

    from qe_factory.engine.scheduler import queue_job_alive
    from qe_factory.workflow.host import host_records, queue_folder

    home = new_home(workdir, "c3", structures)
    path = home / "fw_config" / "my_qadapter.yaml"
    settings = yaml.safe_load(path.read_text())
    settings.update(ntasks=slots, walltime="00:30:00",
                    pre_rocket=f"{settings['pre_rocket']}; export QE_FACTORY_COMMAND={stand_in(workdir, 0)}")
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}
    start = time.perf_counter()
    out = subprocess.run([str(BIN / "qe-factory"), "--home", str(home), "qlaunch", "rapidfire", "-m", str(max_jobs),
                          "--sleep", "1", "--idle-exit", "10"], cwd=workdir, env=env, check=True,
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    jobs = int(out.split("qlaunch: ")[1].split()[0])
    while not all(h.state == "ENDED" or not (h.job_id and queue_job_alive(h.job_id))
                  for h in host_records(queue_folder(home))):
        time.sleep(0.5)  # each host's last record (it exits after --idle-exit s without work): then its figures
    hosts = host_records(queue_folder(home))
    print(f"C3 {structures} structures through pilot jobs (-m {max_jobs}, {slots} slot(s) each) in {wall:.0f} s: "
          f"{jobs} SLURM job(s), {1000 * jobs / structures:.1f} per 1,000 structures (goal ≤ 10); launches per job "
          f"{[h.done for h in hosts]}, busy {[f'{h.busy_fraction():.0%}' for h in hosts]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="c1,c2")
    parser.add_argument("--sizes", default="10,10000", help="C1: structures submitted (and as many labelled)")
    parser.add_argument("--fireworks", type=int, default=300, help="C1: Fireworks the coordinator runs")
    parser.add_argument("--slots", type=int, default=64, help="C2: local worker slots")
    parser.add_argument("--sleep", type=float, default=60, help="C2: seconds each stand-in pw.x sleeps")
    parser.add_argument("--structures", type=int, default=256, help="C2: structures")
    parser.add_argument("--jobs", type=int, default=2, help="C3: pilot jobs at most (-m)")
    parser.add_argument("--slurm-structures", type=int, default=1000, help="C3: structures")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the suite's check that it runs)")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.fireworks, args.slots, args.sleep, args.structures = "10,30", 30, 3, 1, 9
        args.slurm_structures = 20
    with tempfile.TemporaryDirectory(prefix="qe-factory-coordinator-") as tmp:
        workdir = Path(tmp)
        if "c1" in args.only:
            for size in (int(s) for s in args.sizes.split(",")):
                c1(workdir, size, min(args.fireworks, 3 * size))
        if "c2" in args.only:
            c2(workdir, args.slots, args.sleep, args.structures)
        if "c3" in args.only:
            c3(workdir, args.slurm_structures, args.jobs, 1)


if __name__ == "__main__":
    main()
