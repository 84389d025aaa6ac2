"""SLURM's kills on the real single-node cluster (scripts/slurm_cluster.sh, as in test_slurm.py): a job running
`qe-factory launch-offline` is cancelled with scancel while its pw.x iterates; another one reaches its time limit.

What SLURM 22.05 does then (KillWait=30, SLURM's default; at 5 s a worker on a loaded machine was SIGKILLed before
it recorded the attempt): slurmstepd writes "*** JOB N ON host CANCELLED AT <time> ***" to the job's stderr, then
sends SIGCONT and SIGTERM to every process of the job — the batch shell, the worker and pw.x, which runs in its own
session — and SIGKILL to what is left 30 s later; scontrol meanwhile says JobState=COMPLETING Reason=None,
and CANCELLED once all are gone. The worker, stopped by its SIGTERM, asks SLURM why (scheduler.slurm_job_ending),
records the attempt as SLURM_CANCELLED and gives up on it (no correction: a cancel is a person's order).
At the time limit the same happens with "... DUE TO TIME LIMIT ***" (scontrol: COMPLETING Reason=TimeLimit): the
attempt is SLURM_WALLTIME and is rerun in a new job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_slurm import (
    QE_FACTORY,
    base_env,
    diagnostics,
    factory,
    fireworks_named,
    make_home,
    rattled_si,
    stored_results,
    submit,
)


def wait_for(what: str, check, limit: float, diagnostics=lambda: ""):
    """Poll `check` until it returns something true (that is returned); fail after `limit` seconds."""
    start = time.monotonic()
    while not (found := check()):
        if time.monotonic() - start > limit:
            pytest.fail(f"{what}: not seen within {limit:.0f} s\n{diagnostics()}")
        time.sleep(0.2)
    return found


def iterating_pw_out(home: Path) -> Path | None:
    """The pw.out of a pw.x run that has printed its second SCF iteration."""
    for out in home.rglob("attempt_*/pw.out"):
        if "iteration #  2" in out.read_text(errors="replace"):
            return out
    return None


def running_job() -> str | None:
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True,
                         timeout=30).stdout.split()
    return out[0] if len(out) == 1 else None


def run_until_done(home: Path, tmp_path: Path, on_iterating, limit: float = 600) -> str:
    """`qe-factory qlaunch rapidfire -m 1 --single` until it ends by itself; `on_iterating(job id)` once pw.x
    iterates in a job. Returns its output."""
    log = tmp_path / "qlaunch.log"
    argv = [QE_FACTORY, "--home", str(home), "qlaunch", "rapidfire", "-m", "1", "--single", "--sleep", "1"]
    with log.open("w") as out:
        qlaunch = subprocess.Popen(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=base_env(),
                                   start_new_session=True)
    try:
        wait_for("pw.x iterating in the SLURM job", lambda: iterating_pw_out(home), 180, log.read_text)
        on_iterating(wait_for("the running SLURM job", running_job, 30))
        try:
            qlaunch.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            pytest.fail(f"qlaunch not finished {limit:.0f} s after the cut\n" + diagnostics(home, log))
    finally:
        if qlaunch.poll() is None:  # a failure: stop the coordinator and the jobs it left
            os.killpg(qlaunch.pid, signal.SIGTERM)
            qlaunch.wait(timeout=30)
            if left := subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split():
                subprocess.run(["scancel", *left], timeout=30)
    assert qlaunch.returncode == 0, log.read_text()
    return log.read_text()


def test_scancel_while_pw_runs_is_slurm_cancelled_and_not_rerun(slurm, tmp_path):
    home = make_home(tmp_path, walltime="00:10:00")
    endless = {"kpoint_spacing": 0.5, "ecutwfc": 25, "ecutrho": 200, "allow_low_cutoffs": True, "timeout": 600,
               "max_retries": 3, "pw_parameters": {"electrons": {"conv_thr": 0.0, "electron_maxstep": 100000}}}
    submit(home, tmp_path, {"si-cancel": rattled_si(5)}, endless)
    cancelled = []
    output = run_until_done(home, tmp_path, lambda job_id: cancelled.append(job_id) or subprocess.run(
        ["scancel", job_id], check=True, timeout=30))
    assert "qlaunch: 1 SLURM job(s) submitted" in output, output  # no rerun: not by SLURM, not by the coordinator
    job_id = cancelled[0]

    said = [path.read_text() for path in home.glob(f"launches/*/*-{job_id}.error")]
    assert len(said) == 1 and f"*** JOB {job_id} ON " in said[0] and "DUE TO" not in said[0], said

    (attempt_dir,) = [out.parent for out in home.rglob("attempt_*/pw.out")]  # one pw.x run
    ended = json.loads((attempt_dir / "ended.json").read_text())
    assert f"*** JOB {job_id} ON " in ended["ended_by"] and not ended["timed_out"], ended
    assert ended["returncode"] != 0, ended  # pw.x died on SLURM's SIGTERM (or the worker's kill after it)

    (scf,) = fireworks_named(home, "scf si-cancel attempt 1")
    assert scf["state"] == "FIZZLED", scf["state"]
    report = scf["launches"][-1]["action"]["stored_data"]["_exception"]["_details"]  # DFTFatalError's DFTResult
    assert [a["error_type"] for a in report["attempts"]] == ["SLURM_CANCELLED"], report["attempts"]
    assert report["error_type"] == "SLURM_CANCELLED" and "gave up: no correction left" in report["error_message"]
    assert "SLURM_CANCELLED" in factory(home, "status")


def test_slurms_time_limit_is_slurm_walltime_and_reruns_in_a_new_job(slurm, tmp_path, monkeypatch):
    """pw.x's max_seconds comes from the 10-minute allocation; once it iterates, the job's limit is cut to one minute
    (scontrol update TimeLimit=1), so SLURM kills it (within ~30 s of the minute) before pw.x would stop itself. The
    workflow's policy (tests/recovery_policies.py) reruns it in a new job with a reachable conv_thr."""
    home = make_home(tmp_path, walltime="00:10:00")
    endless = {"kpoint_spacing": 0.5, "ecutwfc": 25, "ecutrho": 200, "allow_low_cutoffs": True, "timeout": 900,
               "max_retries": 3, "pw_parameters": {"electrons": {"conv_thr": 0.0, "electron_maxstep": 100000}}}
    submit(home, tmp_path, {"si-limit": rattled_si(6)}, endless, recovery="RestartToConverge(conv_thr=1e-8)")
    cut = []
    output = run_until_done(home, tmp_path, lambda job_id: cut.append(job_id) or subprocess.run(
        ["scontrol", "update", f"JobId={job_id}", "TimeLimit=1"], check=True, timeout=30))
    assert "qlaunch: 2 SLURM job(s) submitted" in output, output

    said = [path.read_text() for path in home.glob(f"launches/*/*-{cut[0]}.error")]
    assert len(said) == 1 and f"*** JOB {cut[0]} ON " in said[0] and "DUE TO TIME LIMIT ***" in said[0], said
    (result,) = stored_results(home, monkeypatch)
    assert [a.error_type for a in result.attempts] == ["SLURM_WALLTIME", "OK"], result.attempts
    first, second = result.attempts
    assert second.correction == "rerun in a new allocation" and second.parameters["electrons"]["conv_thr"] == 1e-8
    assert first.parameters["control"]["max_seconds"] > first.wall_time  # SLURM killed it before max_seconds
    assert result.succeeded and -300 < result.energy < -250
