"""Parallel flags: ranks from the allocation, pools from k-points, argv, SLURM time left."""

from __future__ import annotations

import os

import pytest

from qe_factory.engine.parallel import available_ranks, choose_pools, pw_command, pw_environment
from qe_factory.engine.runner import time_budget
from qe_factory.engine.scheduler import parse_slurm_time, slurm_job_end, slurm_job_ending


def test_ranks_from_slurm_else_cores():
    cores = len(os.sched_getaffinity(0))  # the cores this process may run on (Linux)
    assert available_ranks({"SLURM_NTASKS": "8"}) == 8
    assert available_ranks({}) == cores
    assert available_ranks({"SLURM_NPROCS": "6"}) == 6  # older SLURM name, used when SLURM_NTASKS is absent
    assert available_ranks({"SLURM_NTASKS": "3", "SLURM_NPROCS": "6"}) == 3  # SLURM_NTASKS first
    assert available_ranks({"PATH": "/usr/bin"}) == cores  # unrelated variables change nothing


@pytest.mark.parametrize("bad", ["0", "", "abc", "-4", "2(x3)"])
def test_unusable_slurm_ntasks_falls_back(bad):
    cores = len(os.sched_getaffinity(0))
    assert available_ranks({"SLURM_NTASKS": bad}) == cores
    assert available_ranks({"SLURM_NTASKS": bad, "SLURM_NPROCS": "5"}) == 5
    assert available_ranks({"SLURM_NPROCS": bad}) == cores


def test_ranks_default_to_the_process_environment(monkeypatch):
    for key in ("SLURM_NTASKS", "SLURM_NPROCS"):
        monkeypatch.delenv(key, raising=False)
    assert available_ranks() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_NTASKS", "7")
    assert available_ranks() == 7


@pytest.mark.parametrize("ranks, kpoints, pools", [(1, 10, 1), (4, 10, 4), (4, 3, 2), (6, 4, 3), (8, 1, 1), (2, 2, 2)])
def test_pools_divide_ranks_and_never_exceed_kpoints(ranks, kpoints, pools):
    assert choose_pools(ranks, kpoints) == pools


def test_command_is_an_argument_list():
    assert pw_command("pw.x", "mpirun", 1, 1) == ["pw.x", "-in", "pw.in"]
    assert pw_command("pw.x", "mpirun", 4, 2) == ["mpirun", "-np", "4", "pw.x", "-nk", "2", "-in", "pw.in"]
    # a command that already names its launcher is used as given
    assert pw_command("srun --mpi=pmix pw.x", "mpirun", 4, 1) == ["srun", "--mpi=pmix", "pw.x", "-in", "pw.in"]


def test_environment(monkeypatch):
    env = pw_environment(2, base={"PATH": "/usr/bin", "OMP_NUM_THREADS": "16"})
    assert env["OMP_NUM_THREADS"] == "2" and env["GFORTRAN_UNBUFFERED_ALL"] == "y" and env["PATH"] == "/usr/bin"


@pytest.mark.parametrize(
    "text, seconds",
    [("59:30", 3570), ("1:00:00", 3600), ("2-03:04:05", 183845), ("10", 600), ("0:45", 45), ("1-00", 86400),
     ("UNLIMITED", None), ("", None)],
)
def test_slurm_times(text, seconds):
    assert parse_slurm_time(text) == seconds


def test_time_budget_respects_the_allocation():
    assert time_budget(3600, None) == 3600
    assert time_budget(3600, 600) == 570
    assert time_budget(100, 600) == 100
    assert time_budget(3600, 5) == 10  # never below 10 s


# -- why SLURM ends a job (scontrol is a stand-in: see conftest.py; the real cluster: tests/slurm/test_slurm_kills.py)
STEPD = "slurmstepd-vm: error: *** JOB 73 ON vm CANCELLED AT 2026-12-02T07:08:39 DUE TO TIME LIMIT ***\n"


def test_slurmstepd_line_in_the_jobs_stderr_says_why(tmp_path, scontrol):
    stderr = tmp_path / "scf-73.error"
    stderr.write_text("INFO a line of the worker\n" + STEPD)
    assert slurm_job_end("73", stderr) == STEPD.split(": ", 2)[-1].strip()
    assert slurm_job_end("7", stderr) is None  # another job's line; and SLURM does not know job 7


def test_without_slurmstepds_line_scontrol_says_what_it_knows(tmp_path, scontrol):
    scontrol("JobId=73 JobName=scf JobState=RUNNING Reason=None Dependency=(null) Requeue=0\n")
    assert slurm_job_end("73", tmp_path / "missing.error") is None  # still running: a kill by hand, not SLURM's
    scontrol("JobId=73 JobName=scf JobState=COMPLETING Reason=TimeLimit Dependency=(null) Requeue=0\n")
    assert slurm_job_end("73") == "SLURM job 73: JobState=COMPLETING Reason=TimeLimit"
    scontrol("")
    assert slurm_job_end("73") is None  # SLURM forgot the job (MinJobAge) and nothing else says


def test_the_job_ending_is_asked_only_inside_slurm(scontrol):
    scontrol("JobId=73 JobName=scf JobState=COMPLETING Reason=None Dependency=(null) Requeue=0\n")
    assert slurm_job_ending({}) is None
    assert slurm_job_ending({"SLURM_JOB_ID": "73"}) == "SLURM job 73: JobState=COMPLETING Reason=None"
