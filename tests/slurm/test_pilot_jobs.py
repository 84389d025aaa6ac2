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


def test_twelve_structures_through_at_most_two_pilot_jobs(slurm, tmp_path, monkeypatch):
    home = make_home(tmp_path, walltime="00:10:00")
    config = {"kpoint_spacing": 0.8, "ecutwfc": 25, "ecutrho": 200, "allow_low_cutoffs": True, "timeout": 300}
    structures = {f"si-{n}": rattled_si(n) for n in range(12)}
    submit(home, tmp_path, structures, config)
    argv = [QE_FACTORY, "--home", str(home), "qlaunch", "rapidfire", "-m", "2",
            "--sleep", "1", "--idle-exit", "5"]
    ran = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=base_env(), timeout=1200)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    submitted = int(ran.stdout.split("qlaunch: ")[1].split()[0])
    assert 1 <= submitted <= 2, ran.stdout  # twelve SCF launches (was: twelve jobs)
    results = stored_results(home, monkeypatch)
    assert sorted(r.uid for r in results) == sorted(structures) and all(r.succeeded for r in results)
    outputs = sorted((home / "queue" / "jobs").glob("*/*.out"))
    assert len(outputs) == submitted and sum(text.count("Finished job - scf") for text in
                                             (out.read_text() for out in outputs)) == 12, outputs


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
