"""Pilot jobs (the default) on the real single-node SLURM cluster: `qe-factory qlaunch rapidfire -m 2` keeps at most
two SLURM jobs, each a `qe-factory host` that runs launch after launch from the home's queue directory (real pw.x on
tiny cells), instead of one job per launch."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from test_slurm import QE_FACTORY, base_env, make_home, rattled_si, stored_results, submit


def running_pw_x(home: Path) -> str | None:
    """The pilot host (slurm-<job id>) whose claimed launch has pw.x writing its output, if any."""
    for ticket in (home / "queue" / "claimed").glob("slurm-*/*.json"):
        if any(path.stat().st_size for path in (home / "runs").glob("run_*/attempt_*/pw.out")):
            return ticket.parent.name
    return None


def test_a_cancelled_pilot_job_gives_its_launch_back_and_another_job_finishes_it(slurm, tmp_path, monkeypatch):
    """`scancel` of a pilot job ends the host, not the structure it was running (a single-launch job's cancel stays
    a person's order, SLURM_CANCELLED): the launch goes back to READY and a later pilot job labels it."""
    home = make_home(tmp_path, walltime="00:10:00")
    config = {"kpoint_spacing": 0.6, "ecutwfc": 25, "ecutrho": 200, "allow_low_cutoffs": True, "timeout": 600}
    structures = {"si16": rattled_si(0, 0.05, (2, 2, 2))}  # long enough (tens of seconds) to be cancelled
    submit(home, tmp_path, structures, config)
    argv = [QE_FACTORY, "--home", str(home), "qlaunch", "rapidfire", "-m", "1",
            "--sleep", "1", "--idle-exit", "5"]
    qlaunch = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=base_env())
    deadline = time.monotonic() + 600  # only keeps a broken build from hanging the suite
    while (host := running_pw_x(home)) is None:  # this test's pw.x, in this test's pilot job (other tests run too)
        assert qlaunch.poll() is None and time.monotonic() < deadline, "no pw.x ever started"
        time.sleep(0.2)
    subprocess.run(["scancel", host.removeprefix("slurm-")], check=True)
    output, _ = qlaunch.communicate(timeout=900)
    assert qlaunch.returncode == 0, output
    assert int(output.split("qlaunch: ")[1].split()[0]) >= 2, output  # the cancelled host was replaced
    results = stored_results(home, monkeypatch)
    assert sorted(r.uid for r in results) == sorted(structures), output
    assert all(r.succeeded and [a.error_type for a in r.attempts] == ["OK"] for r in results), output


def test_the_pilot_jobs_benchmark_smoke_prints_its_figures(slurm, tmp_path):
    """benchmarks/coordinator.py C3 (20 structures, stand-in pw.x) on the test cluster: it completes and prints."""
    import re
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "coordinator.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--only", "c3"], cwd=tmp_path, env=base_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^C3 20 structures through pilot jobs .*: [12] SLURM job\(s\), [\d.]+ per 1,000", proc.stdout,
                     re.MULTILINE), proc.stdout
