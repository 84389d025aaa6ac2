"""qe_factory.engine.errors: the classification table line by line, the real fixtures end to end, and exit codes.

Lines marked with a fixture name are copied from that fixture (a test checks they are really there); the others
are pw.x's message texts as the QE sources print them; those raised by an errore call are wrapped, under that call's
routine name, in the error-block layout pw.x 6.7 prints (the layout seen in the fixtures).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qe_factory.engine.errors import PATTERNS, SLURM_END, DFTErrorType, classify, scheduler_error
from qe_factory.engine.parsers import PwOutput, parse_pw_output, read_pw_run
from qe_factory.engine.recovery import RecoveryHandler

DATA = Path(__file__).resolve().parents[1] / "data"
T = DFTErrorType


def fixture_texts(name: str) -> dict[str, str]:
    return {
        filename: (DATA / name / filename).read_text() if (DATA / name / filename).exists() else ""
        for filename in ("pw.out", "pw.err", "CRASH")
    }


def meta(name: str) -> dict:
    return json.loads((DATA / name / "meta.json").read_text())


def classify_fixture(name: str, **overrides):
    texts = fixture_texts(name)
    info = meta(name)
    arguments = dict(returncode=info["returncode"], timed_out=info["timed_out"]) | overrides
    return classify(read_pw_run(DATA / name), texts["pw.out"], texts["pw.err"], **arguments)


def block(routine: str, message: str, number: int = 1) -> str:
    """The %%%% block pw.x 6.7 prints to stdout for errore(routine, message, number)."""
    bar = " " + "%" * 78
    return f"\n{bar}\n     Error in routine {routine} ({number}):\n     {message}\n{bar}\n\n     stopping ...\n"


# (expected type, text, where it comes from: a fixture name or "qe-sources", a message text of the QE sources)
TABLE = [
    (T.DISK_FULL, "     error writing file ./out/pwscf.save/charge-density", "si_disk_full"),
    (T.DISK_FULL, "write_rhog: No space left on device", "qe-sources"),
    (T.TOO_MANY_POOLS, "     invalid number of pools, out of range", "si_pools_out_of_range"),
    (T.OUT_OF_MEMORY,
     "In file 'addusdens.f90', around line 116: Error allocating 7448256 bytes: Cannot allocate memory",
     "si_out_of_memory"),
    (T.OUT_OF_MEMORY, "Could not print backtrace: mmap: Cannot allocate memory", "si_out_of_memory"),
    (T.SIGNAL, "Program received signal SIGSEGV: Segmentation fault - invalid memory reference.",
     "si_killed_sigsegv"),
    (T.SIGNAL, "mpirun noticed that process rank 0 with PID 0 on node vm exited on signal 11 (Segmentation fault).",
     "si_killed_sigsegv"),
    (T.MISSING_PSEUDO, "     Error in routine readpp (1):", "si_missing_pseudo"),
    (T.BAD_INPUT, "     Error in routine  read_namelists (1):", "si_bad_input"),
    (T.DIAGONALIZATION, block("cdiaghg", "S matrix not positive definite", 12), "qe-sources"),
    (T.DIAGONALIZATION, block("pcdiaghg", "problems computing cholesky", 3), "qe-sources"),
    (T.DIAGONALIZATION, block("c_bands", "too many bands are not converged"), "qe-sources"),
    (T.DIAGONALIZATION, block("cdiaghg", "eigenvectors failed to converge", 5), "qe-sources"),
    (T.DIAGONALIZATION, "zhegvd failed", "qe-sources"),
    (T.DIAGONALIZATION, "[Q, R] = qr(X, 0) failed", "qe-sources"),
    (T.BROYDEN_MIXING, block("broyden", "factor"), "qe-sources"),
    (T.WRONG_CHARGE, "charge is wrong", "qe-sources"),
    (T.PW_WALLTIME, "     Maximum CPU time exceeded", "si_walltime"),
    (T.SCF_NOT_CONVERGED, "     convergence NOT achieved after   3 iterations: stopping", "si_unconverged"),
]


@pytest.mark.parametrize("error_type, line, source", TABLE, ids=[f"{t.name}-{i}" for i, (t, _, _) in enumerate(TABLE)])
def test_table_line(error_type, line, source):
    diagnosis = classify(parse_pw_output(line), stdout=line, returncode=1)
    assert diagnosis.error_type is error_type
    assert diagnosis.lines  # the message shows what matched


@pytest.mark.parametrize("error_type, line, source", [row for row in TABLE if row[2] != "qe-sources"])
def test_table_line_is_really_in_its_fixture(error_type, line, source):
    assert line.strip() in "\n".join(fixture_texts(source).values())


@pytest.mark.parametrize("error_type, line, source", TABLE, ids=[f"{t.name}-{i}" for i, (t, _, _) in enumerate(TABLE)])
def test_table_line_found_in_stderr_too(error_type, line, source):
    assert classify(PwOutput(), stderr=line, returncode=1).error_type is error_type


def test_every_pattern_has_a_line():
    for error_type, pattern in PATTERNS:
        assert any(t is error_type and pattern.search(line) for t, line, _ in TABLE), error_type


def test_every_failure_type_has_a_distinct_code():
    codes = [t.code for t in DFTErrorType]
    assert len(codes) == len(set(codes))
    assert T.OK.code == 0 and all(t.code > 0 for t in DFTErrorType if t is not T.OK)


# -- the real fixtures end to end -----------------------------------------------------------------------------------
END_TO_END = [
    ("si_scf", T.OK),
    ("fe_magnetic", T.OK),
    ("h2_overlap", T.OK),  # pw.x is happy; so are the sanitizer's default thresholds (a known gap, test_sanitize.py)
    ("si_unconverged", T.SCF_NOT_CONVERGED),
    ("si_walltime", T.PW_WALLTIME),
    ("si_missing_pseudo", T.MISSING_PSEUDO),
    ("si_bad_input", T.BAD_INPUT),
    ("si_pools_out_of_range", T.TOO_MANY_POOLS),
    ("si_out_of_memory", T.OUT_OF_MEMORY),
    ("si_killed_sigkill", T.KILLED),  # SIGKILL with no sign of the OOM killer: cause unknown
    ("si_killed_sigsegv", T.SIGNAL),
    ("si_truncated", T.OUTPUT_INCOMPLETE),
    ("si_too_many_pools", T.OK),
    ("si_disk_full", T.DISK_FULL),  # converged, then could not write its charge density
    ("si_verbosity_high", T.OK),  # the per-contribution force blocks are not a truncated forces block
]


@pytest.mark.parametrize("name, expected", END_TO_END)
def test_fixture_end_to_end(name, expected):
    diagnosis = classify_fixture(name)
    assert diagnosis.error_type is expected
    assert diagnosis.message.startswith(f"{expected.name} ({expected.code})")


def test_too_many_pools_run_really_succeeded():
    """What pw.x 6.7 does with more pools than k-points: it warns, runs, converges and exits 0."""
    texts = fixture_texts("si_too_many_pools")
    assert meta("si_too_many_pools")["returncode"] == 0
    assert "Message from routine divide_et_impera:" in texts["pw.out"]
    assert "suboptimal parallelization: some nodes have no k-points" in texts["pw.out"]
    assert texts["CRASH"] == "" and "Error in routine" not in texts["pw.out"]
    out = read_pw_run(DATA / "si_too_many_pools")
    assert out.converged and not out.missing_results()


@pytest.mark.parametrize("name, expected", [("si_unconverged", T.SCF_NOT_CONVERGED), ("si_walltime", T.PW_WALLTIME)])
def test_exit_code_2_is_told_apart_by_text(name, expected):
    assert meta(name)["returncode"] == 2
    texts = fixture_texts(name)
    assert texts["pw.err"].strip() == "STOP 2"  # nothing else distinguishes them outside stdout
    assert "JOB DONE" in texts["pw.out"]
    assert classify_fixture(name).error_type is expected
    assert classify(PwOutput(), "", texts["pw.err"], 2).error_type not in (T.SCF_NOT_CONVERGED, T.PW_WALLTIME)


def test_error_details_reach_the_message():
    assert "Si.does-not-exist.UPF not found" in classify_fixture("si_missing_pseudo").message
    assert "not_a_variable" in classify_fixture("si_bad_input").message
    printed = re.search(r"convergence NOT achieved after\s+\d+ iterations", fixture_texts("si_unconverged")["pw.out"])
    assert printed.group(0) in classify_fixture("si_unconverged").message
    assert "exited on signal 9" in classify_fixture("si_killed_sigkill").message


def test_allocation_failure_detail_reaches_the_message():
    printed = re.search(r"Error allocating \d+ bytes", fixture_texts("si_out_of_memory")["pw.err"])
    assert printed.group(0) in classify_fixture("si_out_of_memory").message


# -- CRASH file only (stdout can lose its error block when pw.x's output is buffered) ------------------------------
def _crash_only(name: str):
    texts = fixture_texts(name)
    stdout = texts["pw.out"][: texts["pw.out"].index(" %%%%")]  # the output as it was before the block
    assert "Error in routine" not in stdout and texts["CRASH"]
    return classify(parse_pw_output(stdout, texts["CRASH"]), stdout, texts["pw.err"], meta(name)["returncode"])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("si_pools_out_of_range", T.TOO_MANY_POOLS),
        ("si_missing_pseudo", T.MISSING_PSEUDO),
        ("si_bad_input", T.BAD_INPUT),
    ],
)
def test_crash_file_alone_is_enough(name, expected):
    assert _crash_only(name).error_type is expected


def test_crash_file_alone_is_at_least_a_failure():
    for name in ("si_missing_pseudo", "si_bad_input"):
        diagnosis = _crash_only(name)
        assert diagnosis.error_type is not T.OK
        assert any("error #" in line for line in diagnosis.lines)


# -- exit codes and our own timeout ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "returncode, expected, signal_name",
    [(-9, T.KILLED, "SIGKILL"), (137, T.KILLED, "SIGKILL"), (-11, T.SIGNAL, "SIGSEGV"),
     (139, T.SIGNAL, "SIGSEGV"), (-15, T.SIGNAL, "SIGTERM"), (134, T.SIGNAL, "SIGABRT")],
)
def test_exit_code_alone(returncode, expected, signal_name):
    diagnosis = classify(PwOutput(), "", "", returncode)
    assert diagnosis.error_type is expected
    assert signal_name in diagnosis.message


def test_sigkill_is_out_of_memory_only_with_evidence():
    """mpirun says "exited on signal 9 (Killed)" for any SIGKILL: OOM needs the kernel's word (its message, or its
    cgroup counter rising during the run); our own timeout is TIMEOUT; anything else is KILLED."""
    mpirun = "mpirun noticed that process rank 0 with PID 0 on node vm exited on signal 9 (Killed)."
    assert classify(PwOutput(), "", mpirun, 137).error_type is T.KILLED
    assert classify(PwOutput(), "", mpirun, 137, oom_killed=True).error_type is T.OUT_OF_MEMORY
    assert classify(PwOutput(), "", "Out of memory: Killed process 4242 (pw.x)", 137).error_type is T.OUT_OF_MEMORY
    assert classify(PwOutput(), "", mpirun, -9, timed_out=True).error_type is T.TIMEOUT


@pytest.mark.parametrize("name, expected", [("si_killed_sigkill", T.KILLED), ("si_killed_sigsegv", T.SIGNAL)])
def test_killed_fixture_without_stderr(name, expected):
    """Under a launcher that reports nothing (stderr lost), mpirun's real exit code (137 / 139) still tells."""
    assert meta(name)["returncode"] in (137, 139)
    texts = fixture_texts(name)
    diagnosis = classify(read_pw_run(DATA / name), texts["pw.out"], "", meta(name)["returncode"])
    assert diagnosis.error_type is expected


def test_no_exit_code_no_text_is_incomplete():
    assert classify(read_pw_run(DATA / "si_killed_sigkill"), returncode=None).error_type is T.OUTPUT_INCOMPLETE


@pytest.mark.parametrize("name", ["si_scf", "si_killed_sigkill", "si_unconverged"])
def test_timeout_wins(name):
    diagnosis = classify_fixture(name, timed_out=True, returncode=-9)
    assert diagnosis.error_type is T.TIMEOUT
    assert re.search(r"\d+ SCF iterations", diagnosis.message)


def test_complete_run_with_nonzero_exit_is_not_ok():
    texts = fixture_texts("si_scf")
    assert classify(read_pw_run(DATA / "si_scf"), texts["pw.out"], "", 1).error_type is T.UNKNOWN


def test_unknown_error_block_is_unknown():
    text = block("some_routine", "something nobody listed")
    diagnosis = classify(parse_pw_output(text), text, "", 1)
    assert diagnosis.error_type is T.UNKNOWN
    assert "something nobody listed" in diagnosis.message


# -- RecoveryHandler.analyze, the spec's entry point on raw texts ----------------------------------------------------
def test_analyze_unconverged():
    texts = fixture_texts("si_unconverged")
    assert RecoveryHandler.analyze(texts["pw.out"], texts["pw.err"]) is T.SCF_NOT_CONVERGED
    assert RecoveryHandler.analyze(texts["pw.out"]) is T.SCF_NOT_CONVERGED


@pytest.mark.parametrize(
    "name, expected",
    [("si_scf", T.OK), ("si_walltime", T.PW_WALLTIME), ("si_missing_pseudo", T.MISSING_PSEUDO),
     ("si_killed_sigsegv", T.SIGNAL), ("si_out_of_memory", T.OUT_OF_MEMORY)],
)
def test_analyze_other_fixtures(name, expected):
    texts = fixture_texts(name)
    crash = texts["CRASH"] or None
    assert RecoveryHandler.analyze(texts["pw.out"], texts["pw.err"], crash, meta(name)["returncode"]) is expected


# -- SLURM ending the job pw.x runs in -------------------------------------------------------------------------------
# What SLURM 22.05 said on the single-node cluster (scripts/slurm_cluster.sh): slurmstepd's lines in the jobs' stderr
# (scancel; --time=1; scontrol update State=DOWN with --no-requeue) and scontrol's fields while the jobs were ended.
# The preemption line is the same format with the cause SLURM's sources print for it.
SLURM_SAID = [
    ("slurmstepd-vm: error: *** JOB 73 ON vm CANCELLED AT 2026-12-02T07:08:39 ***", T.SLURM_CANCELLED),
    ("slurmstepd-vm: error: *** JOB 74 ON vm CANCELLED AT 2026-12-02T07:10:02 DUE TO TIME LIMIT ***",
     T.SLURM_WALLTIME),
    ("slurmstepd-vm: error: *** JOB 76 ON vm CANCELLED AT 2026-12-02T07:10:32 DUE TO NODE FAILURE, SEE SLURMCTLD "
     "LOG FOR DETAILS ***", T.SLURM_NODE_FAIL),
    ("slurmstepd-vm: error: *** JOB 77 ON vm CANCELLED AT 2026-12-02T07:10:32 DUE TO PREEMPTION ***", T.KILLED),
    ("SLURM job 74: JobState=COMPLETING Reason=TimeLimit", T.SLURM_WALLTIME),
    ("SLURM job 76: JobState=NODE_FAIL Reason=NodeDown", T.SLURM_NODE_FAIL),
    ("SLURM job 73: JobState=CANCELLED Reason=None", T.SLURM_CANCELLED),
    ("SLURM job 73: JobState=COMPLETING Reason=None", T.KILLED),  # being ended, for no stated cause
]


@pytest.mark.parametrize("said, expected", SLURM_SAID)
def test_what_slurm_said_names_the_kill(said, expected):
    assert scheduler_error(said) is expected
    if "slurmstepd" in said:
        assert SLURM_END.findall(said) == [said.split(": ", 2)[-1]]
    diagnosis = classify(PwOutput(), "", "", -15, ended_by=said)  # pw.x died on SLURM's SIGTERM
    assert diagnosis.error_type is expected and said in diagnosis.message


def test_a_run_that_finished_as_slurm_ended_the_job_is_judged_by_itself():
    said = SLURM_SAID[0][0]
    assert classify_fixture("si_scf", ended_by=said).error_type is T.OK
    assert classify_fixture("si_unconverged", ended_by=said).error_type is T.SCF_NOT_CONVERGED
    assert classify_fixture("si_scf", ended_by=said, timed_out=True, returncode=-9).error_type is T.TIMEOUT
