"""Building and posting a bulk submission (prints figures; not a timed test).

`plan_workflows` (refusals, de-duplication) for N small distinct structures (rattled 2-atom Si and Ge cells) against
a fresh embedded home, then `make_workflows` (one Flow and Workflow per structure) streamed into `post`, which writes
them to the home's inbox; with --held, `build_workflows` makes them all before `post` writes them.
Prints the seconds of each phase, the peak RSS and the size of the inbox (goal for 10,000: well under 60 s,
peak RSS < 300 MB).

    .venv/bin/python benchmarks/submit.py [--structures 10000] [--held] [--profile out.prof]
    .venv/bin/python benchmarks/submit.py --smoke [--held]   # 20 structures (tests/pwx/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import cProfile
import os
import resource
import tempfile
import time
from pathlib import Path

from ase import Atoms
from ase.build import bulk

# what points FireWorks, jobflow and qe_factory at a home: an inherited one would be used instead of the fresh home
# (FireWorks reads MONGOMOCK_SERVERSTORE_FILE before the home's FW_config.yaml)
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")
SMOKE_STRUCTURES = 20


def structures(count: int) -> list[Atoms]:
    """`count` distinct rattled 2-atom cells, Si and Ge alternating."""
    frames = []
    for seed in range(count):
        atoms = bulk("Si" if seed % 2 else "Ge", "diamond", a=5.43 if seed % 2 else 5.66)
        atoms.rattle(0.03, seed=seed)
        atoms.info["uid"] = f"s-{seed:06d}"
        frames.append(atoms)
    return frames


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run(workdir: Path, count: int, held: bool, profile: Path | None) -> None:
    from qe_factory.engine.config import DFTConfig
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.inbox import inbox_folder as inbox
    from qe_factory.workflow.inbox import post
    from qe_factory.workflow.state import get_jobstore, get_launchpad
    from qe_factory.workflow.submit import build_workflows, make_workflows, plan_workflows

    for key in FACTORY_ENV:
        os.environ.pop(key, None)
    home = activate(workdir / "home")
    launchpad, store, config = get_launchpad(), get_jobstore(), DFTConfig(kpoint_spacing=0.3)
    frames = structures(count)
    print(f"setup: {count} structures, peak RSS {peak_rss_mb():.0f} MB")
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    start, cpu_start = time.perf_counter(), time.process_time()
    if held:  # every Workflow made before the first is written
        report, workflows = build_workflows(frames, config, launchpad, store)
        phases = "build_workflows", "post"
    else:  # made as post writes them
        report, planned = plan_workflows(frames, config, launchpad, store)
        workflows = make_workflows(planned, config)
        phases = "plan_workflows", "make_workflows + post"
    built, cpu_built = time.perf_counter(), time.process_time()
    rss_built = peak_rss_mb()
    post(home, (wf for _, wf in workflows))
    posted, cpu_posted = time.perf_counter(), time.process_time()
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    files = list(inbox(home).glob("*.json"))
    size = sum(f.stat().st_size for f in files) / 1e6
    print(f"{phases[0]} {built - start:.1f} s (CPU {cpu_built - cpu_start:.1f} s; {len(report.duplicates)} duplicates, "
          f"{len(report.refused)} refused), peak RSS {rss_built:.0f} MB")
    print(f"{phases[1]} {posted - built:.1f} s (CPU {cpu_posted - cpu_built:.1f} s), peak RSS {peak_rss_mb():.0f} MB; "
          f"inbox {size:.1f} MB in {len(files)} file(s)")
    print(f"total {posted - start:.1f} s (CPU {cpu_posted - cpu_start:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structures", type=int, default=10_000)
    parser.add_argument("--held", action="store_true", help="build_workflows (all at once), then post")
    parser.add_argument("--profile", type=Path, help="write cProfile stats of build + post to this file")
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE_STRUCTURES} structures (tests/pwx/test_benchmarks.py): figures, not the goal")
    args = parser.parse_args()
    if args.smoke:
        args.structures = SMOKE_STRUCTURES
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args.structures, args.held, args.profile)


if __name__ == "__main__":
    main()
