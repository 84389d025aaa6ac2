"""The recovery tree: corrections as data, never repeated, never looping."""

from __future__ import annotations

import pytest

from qe_factory import DFTErrorType, RecoveryHandler
from qe_factory.engine.parsers import PwOutput
from qe_factory.engine.recovery import LADDERS, label_deviations, scf_still_converging

NOMINAL = {"electrons": {"mixing_beta": 0.7, "mixing_mode": "plain", "conv_thr": 1e-9, "electron_maxstep": 100},
           "system": {"degauss": 0.02, "smearing": "cold", "ecutwfc": 30, "ecutrho": 240}}


def test_spec_scf_ladder():
    handler = RecoveryHandler()
    params, tried, names = NOMINAL, [], []
    while (correction := handler.next_correction(DFTErrorType.SCF_NOT_CONVERGED, params, tried)) is not None:
        tried.append(correction.name)
        names.append(correction.name)
        params = handler.get_strategy(DFTErrorType.SCF_NOT_CONVERGED, params, tried[:-1])
    assert names == ["mixing_beta=0.3", "mixing_mode=local-TF", "degauss=0.05", "diagonalization=cg"]
    assert params["electrons"] == {**NOMINAL["electrons"], "mixing_beta": 0.3, "mixing_mode": "local-TF",
                                   "diagonalization": "cg"}
    assert params["system"]["degauss"] == 0.05


def test_get_strategy_spec_examples():
    handler = RecoveryHandler()
    assert handler.get_strategy(DFTErrorType.SCF_NOT_CONVERGED, NOMINAL)["electrons"]["mixing_beta"] == 0.3
    assert handler.get_strategy(DFTErrorType.DIAGONALIZATION, NOMINAL)["electrons"]["diagonalization"] == "cg"
    assert handler.get_strategy(DFTErrorType.PW_WALLTIME, NOMINAL)["control"]["restart_mode"] == "restart"
    assert handler.get_strategy(DFTErrorType.TOO_MANY_POOLS, NOMINAL)["run"]["pools"] == 1


@pytest.mark.parametrize(
    "error", [DFTErrorType.BAD_INPUT, DFTErrorType.MISSING_PSEUDO, DFTErrorType.GEOMETRY, DFTErrorType.TIMEOUT,
              DFTErrorType.UNKNOWN, DFTErrorType.OK],
)
def test_unrecoverable_errors_give_up_at_once(error):
    assert RecoveryHandler().get_strategy(error, NOMINAL) is None


def test_correction_already_in_effect_is_skipped():
    params = {"electrons": {**NOMINAL["electrons"], "mixing_beta": 0.3}}
    correction = RecoveryHandler().next_correction(DFTErrorType.SCF_NOT_CONVERGED, params)
    assert correction.name == "mixing_mode=local-TF"


@pytest.mark.parametrize("error", list(LADDERS))
def test_every_ladder_ends(error):
    handler, tried = RecoveryHandler(), []
    for _ in range(20):
        correction = handler.next_correction(error, NOMINAL, tried)
        if correction is None:
            break
        if correction.repeatable:
            assert correction.name in [c.name for c in LADDERS[error]]
            break  # restarts repeat by design; the runner's max_retries bounds them
        assert correction.name not in tried
        tried.append(correction.name)
    else:
        pytest.fail(f"{error} never gives up")


def test_steadily_falling_trace_asks_for_more_steps():
    falling = [10.0 ** (-1 - 0.1 * i) for i in range(100)]  # 1e-1 → 1e-11 would need ~20 more steps
    assert scf_still_converging(falling, conv_thr=1e-11, maxstep=100)
    out = PwOutput(scf_accuracy=falling, scf_iterations=100, convergence_failed=True)
    assert RecoveryHandler().next_correction(DFTErrorType.SCF_NOT_CONVERGED, NOMINAL, (), out).name == (
        "mixing_beta=0.3"  # trend reading is opt-in
    )
    correction = RecoveryHandler(read_trend=True).next_correction(DFTErrorType.SCF_NOT_CONVERGED, NOMINAL, (), out)
    assert correction.name == "more electron steps"
    assert correction.changes == {"electrons": {"electron_maxstep": 200}}
    # asked once only
    again = RecoveryHandler(read_trend=True).next_correction(
        DFTErrorType.SCF_NOT_CONVERGED, NOMINAL, [correction.name], out
    )
    assert again.name == "mixing_beta=0.3"


def test_oscillating_or_stuck_trace_changes_mixing():
    oscillating = [1e-3 if i % 2 else 1e-5 for i in range(100)]
    stuck = [1e-4] * 100
    assert not scf_still_converging(oscillating, 1e-9, 100)
    assert not scf_still_converging(stuck, 1e-9, 100)
    slow = [10.0 ** (-1 - 0.01 * i) for i in range(100)]  # falling but 900 more steps away
    assert not scf_still_converging(slow, 1e-10, 100)


def test_label_deviations():
    final = {"system": {**NOMINAL["system"], "degauss": 0.05}, "electrons": {"mixing_beta": 0.3}}
    assert label_deviations(final, NOMINAL) == {"system.degauss": (0.05, 0.02)}
    assert label_deviations(NOMINAL, NOMINAL) == {}


def test_analyze_names_the_failure():
    assert RecoveryHandler.analyze("  convergence NOT achieved after 100 iterations: stopping") is (
        DFTErrorType.SCF_NOT_CONVERGED
    )
    assert RecoveryHandler.analyze("", "Error in routine cdiaghg (7):\n S matrix not positive definite") is (
        DFTErrorType.DIAGONALIZATION
    )
