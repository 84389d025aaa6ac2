"""The retry loop end to end: the spec's mocked scenarios and crashes real pw.x cannot make cheaply.

pw.x is replaced by tests/fake_pw.py, which replays real pw.x outputs from tests/data/ (made by
tests/data/make_fixtures.py) or dies the way a node does: segfault, SIGKILL by the OOM killer, a hang, garbage.
A replay leaves the fixture's data-file-schema.xml, which the runner checks against the input it asked for: the
runners here ask for the fixtures' settings (bulk Si at kpoint_spacing 0.6 has the fixtures' 4×4×4 mesh).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from ase import Atoms
from ase.build import bulk
from recovery_policies import MoreStepsFirst

from qe_factory import DFTErrorType, DFTFatalError, QERunner, RecoveryHandler
from qe_factory.engine.parsers import parse_pw_output
from qe_factory.engine.process import Interrupted

FAKE_PW = Path(__file__).resolve().parents[1] / "fake_pw.py"
DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def fake_runner(fast_config, monkeypatch, tmp_path):
    def make(plan: str, **changes) -> QERunner:
        monkeypatch.setenv("FAKE_PW_PLAN", plan)
        monkeypatch.setenv("FAKE_PW_COUNTER", str(tmp_path / "calls"))
        command = f"{sys.executable} {FAKE_PW}"
        return QERunner(fast_config.with_changes(**{"command": command, "kpoint_spacing": 0.6, **changes}))

    return make


def calls(tmp_path) -> int:
    return int((tmp_path / "calls").read_text())


def test_scenario_success(fake_runner, tmp_path):
    result = fake_runner("replay:si_scf").run(bulk("Si"), uid="ok")
    expected = parse_pw_output((DATA / "si_scf" / "pw.out").read_text()).energy
    assert result.succeeded and result.energy == pytest.approx(expected, abs=1e-9)
    assert len(result.forces) == 2 and calls(tmp_path) == 1
    assert result.problems == [] and result.pw_xml["energy"] == pytest.approx(expected, abs=1e-6)


def test_a_converged_run_without_its_xml_is_refused(fake_runner):
    """si_verbosity_high is a converged real run whose fixture keeps no data-file-schema.xml: nothing to check."""
    result = fake_runner("replay:si_verbosity_high").run(bulk("Si"), uid="no-xml", raise_on_failure=False)
    assert [a.error_type for a in result.attempts] == ["OK"] and result.energy is not None
    assert not result.succeeded and result.pw_xml is None
    assert result.problems == ["pw.x wrote no data-file-schema.xml: the label cannot be checked"]


def test_scenario_fail_then_succeed(fake_runner, fast_config, tmp_path):
    result = fake_runner("replay:si_unconverged,replay:si_scf").run(bulk("Si"), uid="retry")
    assert result.succeeded
    assert [a.error_type for a in result.attempts] == ["SCF_NOT_CONVERGED", "OK"]
    first = (fast_config.execution.work_dir / "run_retry" / "attempt_1" / "pw.in").read_text()
    second = (fast_config.execution.work_dir / "run_retry" / "attempt_2" / "pw.in").read_text()
    assert "mixing_beta      = 0.7" in first
    assert "mixing_beta      = 0.3" in second
    assert "startingpot      = 'file'" in second and "startingpot" not in first  # from the failed density
    assert result.attempts[1].correction == "mixing_beta=0.3"
    assert [a.restart for a in result.attempts] == ["from_scratch", "from_charge_density"]


def test_scenario_fatal_after_n_tries(fake_runner, tmp_path):
    runner = fake_runner("replay:si_unconverged", max_retries=3)
    with pytest.raises(DFTFatalError) as info:
        runner.run(bulk("Si"), uid="hopeless")
    report = info.value.result
    assert calls(tmp_path) == 3 and len(report.attempts) == 3
    assert [a.correction for a in report.attempts] == [None, "mixing_beta=0.3", "mixing_mode=local-TF"]
    assert "gave up: 3 attempt(s) made" in report.error_message
    assert "hopeless" in str(info.value)


def test_segfault_is_rerun_once_then_reported(fake_runner, tmp_path):
    result = fake_runner("segfault").run(bulk("Si"), uid="segv", raise_on_failure=False)
    assert [a.error_type for a in result.attempts] == ["SIGNAL", "SIGNAL"]
    assert "SIGSEGV" in result.error_message and calls(tmp_path) == 2


def test_segfault_then_success(fake_runner):
    result = fake_runner("segfault,replay:si_scf").run(bulk("Si"), uid="segv-ok")
    assert result.succeeded and result.attempts[1].correction == "rerun unchanged"


def test_oom_kill_tries_one_pool_then_gives_up(fake_runner):
    result = fake_runner("oom", mpi_ranks=2, command=f"{sys.executable} {FAKE_PW}").run(
        bulk("Si"), uid="oom", raise_on_failure=False
    )
    assert [a.error_type for a in result.attempts] == ["OUT_OF_MEMORY", "OUT_OF_MEMORY"]
    assert result.attempts[1].pools == 1 and result.attempts[1].correction == "pools=1"


def test_an_unexplained_sigkill_is_killed_not_out_of_memory(fake_runner, tmp_path):
    """Three SIGKILLs, three error types: our timeout (TIMEOUT, above), the OOM killer (OUT_OF_MEMORY: one pool),
    an unknown killer (KILLED: one unchanged rerun, never the memory correction)."""
    result = fake_runner("sigkill,replay:si_scf").run(bulk("Si"), uid="killed")  # one rank: one fake process
    assert [a.error_type for a in result.attempts] == ["KILLED", "OK"]
    assert result.attempts[1].correction == "rerun unchanged"  # (OOM on one rank: no correction left)


def test_hang_is_killed_at_the_timeout_and_not_retried(fake_runner):
    result = fake_runner("hang", timeout=2).run(bulk("Si"), uid="hang", raise_on_failure=False)
    assert [a.error_type for a in result.attempts] == ["TIMEOUT"]
    assert result.attempts[0].wall_time >= 2


def test_garbage_output_is_incomplete(fake_runner):
    result = fake_runner("garbage").run(bulk("Si"), uid="junk", raise_on_failure=False)
    assert result.attempts[0].error_type == "OUTPUT_INCOMPLETE"
    assert not result.succeeded and result.energy is None


def test_result_kept_but_marked_when_the_nominal_settings_run_fails(fake_runner):
    from qe_factory.engine.recovery import MORE_SMEARING

    runner = fake_runner("replay:si_unconverged,replay:si_smeared,replay:si_unconverged")
    runner.recovery = RecoveryHandler(ladders={DFTErrorType.SCF_NOT_CONVERGED: [MORE_SMEARING]})
    result = runner.run(bulk("Si"), uid="marked")
    assert [a.correction for a in result.attempts] == [None, "degauss=0.05", "nominal settings"]
    assert result.succeeded and not result.nominal_settings
    assert result.label_deviations == {"system.degauss": (0.05, 0.02)}
    assert result.parameters["system"]["degauss"] == 0.05  # the settings the label was really made with
    assert result.to_atoms().info["nominal_settings"] is False


def test_pools_one_is_not_spent_when_already_in_effect(fake_runner):
    """On one rank pw.x already runs with one pool: the OOM correction "pools=1" would rerun the same job."""
    result = fake_runner("oom", mpi_ranks=1).run(bulk("Si"), uid="oom1", raise_on_failure=False)
    assert [a.error_type for a in result.attempts] == ["OUT_OF_MEMORY"] and result.attempts[0].pools == 1
    assert "no correction left" in result.error_message


def test_restart_applies_to_the_next_attempt_only(fake_runner, fast_config):
    """pw.x stopped at max_seconds → restart_mode='restart' for attempt 2; attempt 2 then fails to converge →
    attempt 3 lowers mixing_beta and starts from the density, no longer with restart_mode='restart'."""
    result = fake_runner("replay:si_walltime,replay:si_unconverged,replay:si_scf").run(bulk("Si"), uid="restarts")
    run_dir = fast_config.execution.work_dir / "run_restarts"
    inputs = [(run_dir / f"attempt_{n}" / "pw.in").read_text() for n in (1, 2, 3)]
    assert ["restart_mode     = 'restart'" in text for text in inputs] == [False, True, False]
    assert [a.correction for a in result.attempts] == [None, "restart_mode=restart", "mixing_beta=0.3"]
    assert [a.restart for a in result.attempts] == ["from_scratch", "full", "from_charge_density"]
    assert result.succeeded and result.final_mixing_beta == 0.3


def close_pair(fraction: float) -> Atoms:
    """Two Si atoms `fraction` of their covalent radii sum (2 × 1.11 Å) apart in a 6 Å box."""
    return Atoms("Si2", positions=[(0, 0, 0), (fraction * 2.22, 0, 0)], cell=[6, 6, 6], pbc=True)


def test_diagonalization_failure_between_close_atoms_is_blamed_on_the_geometry(fake_runner, tmp_path):
    result = fake_runner("cholesky").run(close_pair(0.6), uid="close", raise_on_failure=False)
    assert [a.error_type for a in result.attempts] == ["GEOMETRY"] and calls(tmp_path) == 1
    assert "atoms 0 and 1 are 1.332 Å apart (0.60 of their covalent radii sum)" in result.error_message


def test_the_geometry_blame_follows_the_configured_distance_factor(fake_runner):
    """min_distance_factor 0.3 refuses below 0.3 and blames the geometry below 0.45: 0.6 is the eigensolver's."""
    runner = fake_runner("cholesky,replay:si_scf", min_distance_factor=0.3)
    result = runner.run(close_pair(0.6), uid="cg", raise_on_failure=False)
    assert [a.error_type for a in result.attempts] == ["DIAGONALIZATION", "OK"]
    # the replayed si_scf is another structure's run: its XML's 4×4×4 mesh is not this box's, and the label is refused
    assert result.problems == ["pw.x used k-points [4, 4, 4, 0, 0, 0] (its XML), not the [2, 2, 2, 0, 0, 0] asked for"]
    assert result.attempts[1].correction == "diagonalization=cg"


def test_a_custom_recovery_handler_drives_the_runner(fake_runner):
    runner = fake_runner("replay:si_unconverged,replay:si_scf")
    runner.recovery = MoreStepsFirst(steps=321)
    result = runner.run(bulk("Si"), uid="custom")
    assert [a.correction for a in result.attempts] == [None, "more steps"]
    assert result.parameters["electrons"]["electron_maxstep"] == 321


def test_a_finished_run_of_the_same_calculation_is_taken_in_not_run_again(fake_runner, tmp_path):
    """What a finished pw.x run left on disk (its worker killed before recording it, or the same calculation asked
    for again) is read back; a run killed by our timeout, or another structure under the same uid, is not."""
    runner = fake_runner("replay:si_unconverged,replay:si_scf")
    first = runner.run(bulk("Si"), uid="again")
    again = runner.run(bulk("Si"), uid="again")
    assert calls(tmp_path) == 2  # pw.x ran twice, for the first run's two attempts; none for the second
    assert again.energy == first.energy and [a.correction for a in again.attempts] == [None, "mixing_beta=0.3"]
    moved = bulk("Si")
    moved.positions[1, 0] += 0.05
    fake_runner("replay:si_scf").run(moved, uid="again")
    assert calls(tmp_path) == 3  # another structure: run


def test_a_run_killed_by_the_timeout_is_not_taken_in(fake_runner, tmp_path):
    failed = fake_runner("hang", timeout=1).run(bulk("Si"), uid="slow", raise_on_failure=False)
    assert [a.error_type for a in failed.attempts] == ["TIMEOUT"]
    result = fake_runner("replay:si_scf", timeout=60).run(bulk("Si"), uid="slow")
    assert result.succeeded and calls(tmp_path) == 2


@pytest.mark.parametrize("plan, atoms, expected", [
    ("cholesky", close_pair(0.6), "GEOMETRY"),  # the eigensolver failed between atoms 0.6 of their radii apart
    ("replay:si_missing_pseudo", bulk("Si"), "MISSING_PSEUDO"),  # real pw.x runs (tests/data)
    ("replay:si_bad_input", bulk("Si"), "BAD_INPUT"),
])
def test_a_failure_no_correction_can_fix_costs_one_pw_run(fake_runner, tmp_path, plan, atoms, expected):
    """Bad geometry, an unreadable file, an input pw.x refuses: whatever the retries allowed, one pw.x run, and the
    report says why."""
    result = fake_runner(plan, max_retries=5).run(atoms, uid="hopeless", raise_on_failure=False)
    assert [a.error_type for a in result.attempts] == [expected] and calls(tmp_path) == 1
    assert result.error_type == expected and "gave up: no correction left" in result.error_message


@pytest.fixture
def stop_when_running(tmp_path, monkeypatch):
    """Sets process.STOP (as a SIGTERM handler does) once the fake pw.x runs; cleared afterwards."""
    from qe_factory.engine.process import STOP

    pidfile = tmp_path / "pw.pid"
    monkeypatch.setenv("FAKE_PW_PIDFILE", str(pidfile))

    def stop() -> None:
        while not pidfile.exists():
            time.sleep(0.05)
        STOP.set()

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    yield
    thread.join(timeout=60)
    STOP.clear()


def test_a_stop_request_is_an_outcome_only_when_slurm_ends_the_job(fake_runner, scontrol, monkeypatch,
                                                                    stop_when_running):
    """(scontrol is a stand-in, see conftest.py; the real cluster: tests/slurm/test_slurm_kills.py.) SLURM's time
    limit ends the job: the attempt is recorded as SLURM_WALLTIME with what SLURM said."""
    monkeypatch.setenv("SLURM_JOB_ID", "74")
    scontrol("JobId=74 JobName=scf JobState=COMPLETING Reason=TimeLimit Dependency=(null)\n")
    runner = fake_runner("hang", max_retries=1)  # (a next attempt in this process would stop at once: STOP is set)
    result = runner.run(bulk("Si"), uid="limit", raise_on_failure=False)
    assert [a.error_type for a in result.attempts] == ["SLURM_WALLTIME"]
    assert "SLURM job 74: JobState=COMPLETING Reason=TimeLimit" in result.attempts[0].message


def test_a_stop_request_while_the_job_runs_on_is_no_outcome(fake_runner, scontrol, monkeypatch, stop_when_running):
    """A SIGTERM that is not SLURM's (the job runs on): Interrupted, nothing recorded, as outside SLURM."""
    monkeypatch.setenv("SLURM_JOB_ID", "74")
    scontrol("JobId=74 JobName=scf JobState=RUNNING Reason=None Dependency=(null)\n")
    with pytest.raises(Interrupted):
        fake_runner("hang").run(bulk("Si"), uid="stopped")


def test_a_hopeless_case_stops_early_with_its_trace(fake_runner, tmp_path):
    """The same unconverged run again and again: after two rungs that did not improve on the best SCF accuracy the
    runner gives up (max_retries would allow 6 attempts), naming the accuracy trace."""
    result = fake_runner("replay:si_unconverged", max_retries=6).run(bulk("Si"), uid="stuck", raise_on_failure=False)
    assert calls(tmp_path) == 3 and not result.succeeded
    assert [a.correction for a in result.attempts] == [None, "mixing_beta=0.3", "mixing_mode=local-TF"]
    assert "none of the last 2 attempts improved on the best SCF accuracy" in result.error_message
    assert "SCF accuracy at the end of each attempt: 6.5e-05, 6.5e-05, 6.5e-05 Ry" in result.error_message
    patient = fake_runner("replay:si_unconverged", max_retries=4)
    patient.recovery = RecoveryHandler(give_up_after=0)
    assert len(patient.run(bulk("Si"), uid="patient", raise_on_failure=False).attempts) == 4
