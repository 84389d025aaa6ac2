"""The magnetic branch check (DFTConfig.magnetic_start): when a second, high-spin start is due, and how the retry loop
runs it and keeps one branch.

The loop tests replace pw.x by tests/fake_pw.py replaying the real fixture fe_magnetic (1-atom bcc Fe, 30/240 Ry,
4×4×4 k-points, |M| 2.0 μB): its energy and moment do not depend on the start, so the branches tie (the first is
kept); `garbage` stands for a high-spin run that fails. The real collapse is tests/pwx/test_magnetic_start_pwx.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from ase import Atoms
from ase.build import bulk

from qe_factory import QERunner
from qe_factory.engine.inputs import COLLAPSED_MOMENT, MAGNETIC_MOMENTS, high_spin_start

FAKE_PW = Path(__file__).resolve().parents[1] / "fake_pw.py"


def fe2(moments: list[float] | None) -> Atoms:
    atoms = bulk("Fe", "bcc", a=2.83, cubic=True)
    atoms.set_initial_magnetic_moments(moments)
    return atoms


def test_a_weak_start_gets_a_high_spin_check_whatever_it_converged_to():
    assert high_spin_start(fe2([0.6, 0.6]), absolute_magnetization=0.0) == [5.0, 5.0]
    assert high_spin_start(fe2([0.6, 0.6]), absolute_magnetization=4.3) == [5.0, 5.0]
    assert high_spin_start(fe2([5.0, 0.0]), absolute_magnetization=4.3) == [5.0, 5.0]  # one weak atom is enough


def test_ase_bulk_starts_are_not_weak():
    """ase.build.bulk's own moments (Fe 2.3, Co 1.2, Ni 0.6 μB) hold their branch: no second run when they converge
    magnetic; they still get one when the moment collapsed."""
    for element in ("Fe", "Co", "Ni"):
        atoms = bulk(element)
        assert atoms.has("initial_magmoms"), element
        assert high_spin_start(atoms, absolute_magnetization=atoms.get_initial_magnetic_moments().sum()) is None
        assert high_spin_start(atoms, absolute_magnetization=0.0) == [5.0] * len(atoms)


def test_a_collapsed_moment_gets_a_check_a_strong_start_that_held_none():
    strong = fe2([6.0, 6.0])
    assert high_spin_start(strong, absolute_magnetization=2 * COLLAPSED_MOMENT - 0.01) == [5.0, 5.0]
    assert high_spin_start(strong, absolute_magnetization=None) == [5.0, 5.0]  # spin-restricted: no moment at all
    assert high_spin_start(strong, absolute_magnetization=4.3) is None


def test_a_start_that_was_already_high_spin_gets_none():
    assert high_spin_start(fe2(None), absolute_magnetization=0.0) is None  # no moments given: the defaults ran
    assert high_spin_start(fe2([5.0, -5.0]), absolute_magnetization=0.0) is None  # nothing else to try


def test_an_antiferromagnet_keeps_its_sign_pattern_and_other_atoms_their_moments():
    assert high_spin_start(fe2([0.6, -0.6]), absolute_magnetization=0.0) == [5.0, -5.0]
    feo = Atoms("FeOFeO", positions=[(0, 0, 0), (2.1, 0, 0), (2.1, 2.1, 0), (0, 2.1, 0)], cell=[4.2, 4.2, 4.2],
                pbc=True, magmoms=[-1.0, 0.2, 1.0, 0.0])
    assert high_spin_start(feo, absolute_magnetization=1.0) == [-MAGNETIC_MOMENTS["Fe"], 0.2, 5.0, 0.0]


def test_structures_without_magnetic_elements_get_none():
    si = bulk("Si")
    si.set_initial_magnetic_moments([0.5, 0.5])
    assert high_spin_start(si, absolute_magnetization=0.0) is None


@pytest.fixture
def fe_runner(fast_config, monkeypatch, tmp_path):
    """A runner asking for fe_magnetic's settings, pw.x replaced by fake_pw.py with `plan`."""
    def make(plan: str, **changes) -> QERunner:
        monkeypatch.setenv("FAKE_PW_PLAN", plan)
        monkeypatch.setenv("FAKE_PW_COUNTER", str(tmp_path / "calls"))
        settings = {"command": f"{sys.executable} {FAKE_PW}", "ecutwfc": 30, "ecutrho": 240, **changes}
        return QERunner(fast_config.with_changes(**settings))
    return make


def weak_fe() -> Atoms:
    atoms = bulk("Fe", "bcc", a=2.83)
    atoms.set_initial_magnetic_moments([0.6])
    return atoms


def test_the_high_spin_branch_runs_from_scratch_and_both_are_recorded(fe_runner, fast_config):
    result = fe_runner("replay:fe_magnetic").run(weak_fe(), uid="tie")
    assert result.succeeded and len(result.attempts) == 2
    first, second = result.magnetic_branches
    assert (first.start, first.attempts, second.start, second.attempts) == ([0.6], [1], [5.0], [2])
    assert first.energy == second.energy == result.energy and first.absolute_magnetization > 2
    assert first.kept and not second.kept  # a tie keeps the first
    assert (result.attempts[1].correction, result.attempts[1].restart) == ("high-spin start", "from_scratch")
    run_dir = fast_config.execution.work_dir / "run_tie"
    assert "starting_magnetization(1) = 0.0375" in (run_dir / "attempt_1" / "pw.in").read_text()  # 0.6 of 16 e
    assert "starting_magnetization(1) = 0.3125" in (run_dir / "attempt_2" / "pw.in").read_text()  # 5 μB


def test_a_failed_high_spin_run_keeps_the_first_result(fe_runner):
    result = fe_runner("replay:fe_magnetic,garbage", recoverable=False).run(weak_fe(), uid="fails")
    assert result.succeeded and [a.error_type for a in result.attempts] == ["OK", "OUTPUT_INCOMPLETE"]
    first, second = result.magnetic_branches
    assert first.kept and result.energy == first.energy
    assert second.energy is None and "gave up" in second.failure


def test_a_failing_high_spin_run_gets_its_own_recovery(fe_runner):
    result = fe_runner("replay:fe_magnetic,garbage,replay:fe_magnetic").run(weak_fe(), uid="recovers")
    assert [a.error_type for a in result.attempts] == ["OK", "OUTPUT_INCOMPLETE", "OK"]
    assert result.attempts[2].correction == "rerun unchanged"
    assert [b.attempts for b in result.magnetic_branches] == [[1], [2, 3]]
    assert result.magnetic_branches[1].failure is None


@pytest.mark.parametrize("moments, magnetic_start", [([0.6], "given"), (None, "hint")])
def test_no_check_when_moments_are_given_or_started_high_spin(fe_runner, tmp_path, moments, magnetic_start):
    atoms = bulk("Fe", "bcc", a=2.83)
    atoms.set_initial_magnetic_moments(moments)
    result = fe_runner("replay:fe_magnetic", magnetic_start=magnetic_start).run(atoms, uid="once")
    assert result.succeeded and len(result.attempts) == 1 and result.magnetic_branches == []
    assert (tmp_path / "calls").read_text() == "1"


def test_the_high_spin_branch_runs_as_a_detour_firework(home, fast_config, monkeypatch, tmp_path):
    """Through the workflow, FireWorks in-process: the high-spin run is attempt 2's detour, the result keeps both."""
    from fireworks import FWorker
    from fireworks.core.rocket_launcher import rapidfire

    from qe_factory.workflow.state import get_jobstore, get_launchpad, load_results
    from qe_factory.workflow.submit import submit

    monkeypatch.setenv("QE_FACTORY_COMMAND", f"{sys.executable} {FAKE_PW}")  # the worker's execution settings
    monkeypatch.setenv("QE_FACTORY_MPI_RANKS", "1")
    monkeypatch.setenv("FAKE_PW_PLAN", "replay:fe_magnetic")
    monkeypatch.setenv("FAKE_PW_COUNTER", str(tmp_path / "calls"))
    atoms = weak_fe()
    atoms.info["uid"] = "fe"
    launchpad = get_launchpad()
    submit([atoms], fast_config.with_changes(ecutwfc=30, ecutrho=240), launchpad=launchpad)
    rapidfire(launchpad, FWorker(), nlaunches=0, strm_lvl="ERROR")
    detour = launchpad.fireworks.find_one({"name": "scf fe attempt 2"})
    assert detour["state"] == "COMPLETED" and detour["spec"]["correction"] == "high-spin start"
    assert detour["spec"]["run"] == {"magmoms": [5.0]}
    (result,) = load_results(get_jobstore(), ["fe"])
    assert result.succeeded and [b.start for b in result.magnetic_branches] == [[0.6], [5.0]]
    assert (tmp_path / "calls").read_text() == "2"
