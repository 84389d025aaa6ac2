"""The recovery tree: corrections as data, never repeated, never looping."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from ase.build import bulk

from qe_factory import DFTConfig, DFTErrorType, RecoveryHandler
from qe_factory.engine.inputs import InputGenerator
from qe_factory.engine.parsers import PwOutput
from qe_factory.engine.recovery import (
    LADDERS,
    STEPS,
    RestartType,
    attempt_parameters,
    density_usable,
    label_deviations,
    restart_from,
    scf_converging,
    stalled,
    still_progressing,
    without_restart,
    worse,
)
from qe_factory.engine.results import Attempt
from qe_factory.engine.runner import available_restart

DATA = Path(__file__).resolve().parents[1] / "data"

NOMINAL = {"electrons": {"mixing_beta": 0.7, "mixing_mode": "plain", "conv_thr": 1e-9, "electron_maxstep": 100},
           "system": {"degauss": 0.02, "smearing": "cold", "ecutwfc": 30, "ecutrho": 240}}


def test_spec_scf_ladder():
    handler = RecoveryHandler()
    params, tried, names = NOMINAL, [], []
    while (correction := handler.next_correction(DFTErrorType.SCF_NOT_CONVERGED, params, tried)) is not None:
        tried.append(correction.name)
        names.append(correction.name)
        params = handler.get_strategy(DFTErrorType.SCF_NOT_CONVERGED, params, tried[:-1])
    assert names == ["mixing_beta=0.3", "mixing_mode=local-TF", "mixing_beta=0.1, mixing_ndim=16", "degauss=0.05",
                     "diagonalization=cg"]
    assert without_restart(params)["electrons"] == {**NOMINAL["electrons"], "mixing_beta": 0.1,
                                                    "mixing_mode": "local-TF", "mixing_ndim": 16,
                                                    "diagonalization": "cg"}
    assert params["system"]["degauss"] == 0.05
    # every SCF rung, cg included, starts from the last density and wavefunctions (where they fit and are usable)
    assert {c.restart for c in LADDERS[DFTErrorType.SCF_NOT_CONVERGED]} == {RestartType.FROM_WAVE_FUNCTIONS}
    assert LADDERS[DFTErrorType.DIAGONALIZATION][0].restart is RestartType.FROM_SCRATCH  # after a crash in it


def test_get_strategy_spec_examples():
    handler = RecoveryHandler()
    assert handler.get_strategy(DFTErrorType.SCF_NOT_CONVERGED, NOMINAL)["electrons"]["mixing_beta"] == 0.3
    assert handler.get_strategy(DFTErrorType.DIAGONALIZATION, NOMINAL)["electrons"]["diagonalization"] == "cg"
    assert "startingpot" not in handler.get_strategy(DFTErrorType.DIAGONALIZATION, NOMINAL)["electrons"]
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


def test_the_ladder_never_climbs_back_to_a_rung_skipped_as_in_effect():
    """A slab starts at mixing_beta 0.3 with local-TF: those rungs are skipped; after mixing_beta 0.1 the ladder goes
    on down (degauss), not back up to mixing_beta 0.3."""
    slab = {**NOMINAL, "electrons": {**NOMINAL["electrons"], "mixing_beta": 0.3, "mixing_mode": "local-TF"}}
    handler = RecoveryHandler(read_trend=False)
    first = handler.next_correction(DFTErrorType.SCF_NOT_CONVERGED, slab)
    assert first.name == "mixing_beta=0.1, mixing_ndim=16"
    damped = handler.get_strategy(DFTErrorType.SCF_NOT_CONVERGED, slab)
    assert handler.next_correction(DFTErrorType.SCF_NOT_CONVERGED, damped, [first.name]).name == "degauss=0.05"


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


# Synthetic accuracy traces (Ry), shaped like those of pw.x runs stopped at electron_maxstep=15 in the benchmark
BOUNCE = [2.1e-1, 9.8e-2, 3.3e-2, 8.1e-3, 2.2e-3, 6.5e-4, 2.9e-4, 7.7e-5, 3.1e-5, 9.4e-6, 4.0e-6, 1.2e-5,
          3.5e-5, 8.8e-6, 2.7e-5]  # fell, then bounced between 1e-5 and 4e-5 to the end
STEADY = [1.3e-1, 4.4e-2, 1.6e-2, 7.0e-3, 2.5e-3, 1.1e-3, 4.2e-4, 1.8e-4, 6.9e-5, 2.8e-5, 1.1e-5, 4.3e-6,
          1.7e-6, 6.8e-7, 2.6e-7]  # a clear fall of ~0.4 decades per step: ~5 more to conv_thr
NEAR_DONE = [1.0e-1, 3e-3, 2e-5, 4e-7, 9e-8, 3e-8, 5e-8, 2e-8, 4e-8, 1e-8, 3e-8, 2e-8, 1e-8, 3e-8, 1.5e-8]


def test_a_steady_fall_gets_more_steps_and_a_bounce_does_not():
    assert scf_converging(STEADY, conv_thr=2e-10, maxstep=15)
    assert not scf_converging(BOUNCE, conv_thr=2e-10, maxstep=15)  # a bounce is not convergence
    assert scf_converging(NEAR_DONE, conv_thr=2e-10, maxstep=15)  # within 100 × conv_thr: finish it
    assert not scf_converging([10.0 ** (-1 - 0.01 * i) for i in range(100)], 1e-10, 100)  # 900 steps away
    assert not scf_converging([1e-4] * 100, 1e-9, 100) and not scf_converging([1e-3, 1e-5] * 50, 1e-9, 100)

# Real traces of benchmarks/recovery.py (2 Dec 2026, pw.x 6.7, electron_maxstep 15): the Cu(111) slab's attempt at
# mixing_beta 0.1 / mixing_ndim 16 (conv_thr 1e-9: a steady fall of ~0.27 decades per step with two small rises among
# its last six), and the Fe atom's at degauss 0.05 (conv_thr 2e-10: down to 4.9e-7, then a bounce to 2e-5).
CU_SLAB_DAMPED = [2.63138e-3, 5.5051e-4, 1.9242e-4, 1.8532e-4, 1.534e-5, 5.997e-5, 6.12e-6, 3.55e-6, 6.70e-6,
                  2.33e-6, 1.40e-6, 1.53e-6, 6.95e-6, 1.54e-6, 4.5e-7]
FE_ATOM_SMEARED = [4.03926e-3, 3.50294e-3, 1.8119e-4, 1.6728e-4, 3.943e-5, 2.344e-5, 2.328e-5, 4.39e-6, 3.97e-6,
                   3.16e-6, 7.05e-6, 2.61e-6, 4.9e-7, 1.276e-5, 2.039e-5]


def test_a_fall_with_small_rises_ending_at_its_minimum_gets_more_steps():
    assert scf_converging(CU_SLAB_DAMPED, conv_thr=1e-9, maxstep=15)  # its last 6 alone read as a bounce
    assert not scf_converging(CU_SLAB_DAMPED, conv_thr=1e-9, maxstep=5)  # ~11 steps away: not within 5
    assert not scf_converging(CU_SLAB_DAMPED[:-1], conv_thr=1e-9, maxstep=15)  # ended above its minimum
    assert not scf_converging(FE_ATOM_SMEARED, conv_thr=2e-10, maxstep=15)  # a real bounce


def test_more_steps_come_first_at_most_twice_and_from_the_runs_own_state():
    out = PwOutput(scf_accuracy=STEADY, scf_iterations=15, convergence_failed=True)
    params = {**NOMINAL, "electrons": {**NOMINAL["electrons"], "conv_thr": 2e-10, "electron_maxstep": 15}}
    handler, tried = RecoveryHandler(), []
    for _ in range(2):
        correction = handler.next_correction(DFTErrorType.SCF_NOT_CONVERGED, params, tried, out)
        assert correction.name == STEPS and correction.changes == {"electrons": {"electron_maxstep": 30}}
        assert correction.restart is RestartType.FROM_WAVE_FUNCTIONS and not correction.lasting
        tried.append(correction.name)
    assert handler.next_correction(DFTErrorType.SCF_NOT_CONVERGED, params, tried, out).name == "mixing_beta=0.3"
    bounced = PwOutput(scf_accuracy=BOUNCE, scf_iterations=15, convergence_failed=True)
    assert handler.next_correction(DFTErrorType.SCF_NOT_CONVERGED, params, [], bounced).name == "mixing_beta=0.3"
    off = RecoveryHandler(read_trend=False)
    assert off.next_correction(DFTErrorType.SCF_NOT_CONVERGED, params, [], out).name == "mixing_beta=0.3"


def test_more_steps_do_not_last_beyond_their_attempt():
    lasting = {"electrons": {"mixing_beta": 0.3}}
    steps = RecoveryHandler().next_correction(
        DFTErrorType.SCF_NOT_CONVERGED, NOMINAL, [], PwOutput(scf_accuracy=STEADY, scf_iterations=15)
    )
    assert attempt_parameters(lasting, steps) == {"electrons": {"mixing_beta": 0.3, "electron_maxstep": 200}}
    assert lasting == {"electrons": {"mixing_beta": 0.3}}  # the next rung starts from these
    assert attempt_parameters(lasting, LADDERS[DFTErrorType.SCF_NOT_CONVERGED][1]) == lasting  # lasting: in params


def test_a_density_that_ended_worse_than_it_started_is_not_reused():
    diverged = [2e-3, 5e-3, 4e-2, 0.3, 1.7, 4.2]  # from a good density to worse
    assert not density_usable(diverged) and not density_usable([3.0, 2.5, 0.9])  # above the sane bound
    assert not density_usable([])
    assert density_usable(STEADY) and density_usable(BOUNCE)
    assert restart_from(RestartType.FROM_WAVE_FUNCTIONS, diverged) is RestartType.FROM_SCRATCH
    assert restart_from(RestartType.FROM_CHARGE_DENSITY, STEADY) is RestartType.FROM_CHARGE_DENSITY
    assert restart_from(RestartType.FULL, diverged) is RestartType.FULL  # a walltime restart is not a density one


def test_a_rung_after_which_the_scf_ended_worse_is_dropped():
    assert worse(3e-3, 2e-5) and not worse(1e-6, 2e-5) and not worse(None, 2e-5) and not worse(1e-3, None)


def test_walltime_restarts_only_while_progressing():
    from_scratch = [0.2, 5e-2, 1e-2, 2e-3, 4e-4, 1e-4]  # attempt 1, stopped at max_seconds: fell 3 decades
    assert still_progressing(from_scratch)
    assert still_progressing([1.1e-4, 4e-5, 8e-6, 1e-6])  # the restart fell another 2 decades
    assert not still_progressing([1.1e-4, 8e-5, 1.3e-4, 9e-5, 1.2e-4])  # stalled
    assert still_progressing([0.3])  # too short to judge: restart
    # the handler: a restart while progressing, the SCF ladder once stalled (a policy may override either)
    handler, walltime = RecoveryHandler(), DFTErrorType.PW_WALLTIME
    progressing = handler.next_correction(walltime, NOMINAL, output=PwOutput(scf_accuracy=from_scratch))
    assert progressing.name == "restart_mode=restart"
    stuck = PwOutput(scf_accuracy=[1.1e-4, 8e-5, 1.3e-4, 9e-5, 1.2e-4])
    assert handler.next_correction(walltime, NOMINAL, ["restart_mode=restart"], stuck).name == "mixing_beta=0.3"


def test_a_hopeless_case_is_recognised_by_its_trace():
    assert stalled([2e-3, 4e-3, 5e-3], rungs=2)  # two rungs, neither beat 2e-3
    assert not stalled([2e-3, 4e-3, 1e-3], rungs=2)
    assert not stalled([2e-3, 4e-3], rungs=2)  # not enough attempts to say
    assert not stalled([2e-3, 4e-3, 5e-3], rungs=0)  # off


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


def scratch_of_si_scf(tmp_path):
    """A scratch directory as pw.x leaves it after a run of tests/data/si_scf (25/200 Ry, 4×4×4, nspin 1): its
    real XML; the density and per-rank wavefunction files are empty stand-ins (only their presence is read)."""
    scratch = tmp_path / "out"
    (scratch / "pwscf.save").mkdir(parents=True)
    shutil.copy(DATA / "si_scf" / "data-file-schema.xml", scratch / "pwscf.save")
    (scratch / "pwscf.save" / "charge-density.dat").touch()
    (scratch / "pwscf.wfc1").touch()
    return scratch


def test_wavefunctions_are_reused_only_when_they_fit(tmp_path):
    scratch = scratch_of_si_scf(tmp_path)
    config = DFTConfig(kpoint_spacing=0.6, ecutwfc=25, ecutrho=200, allow_low_cutoffs=True)
    si = InputGenerator(config).generate(bulk("Si"))
    assert si.kpts == (4, 4, 4)
    previous = Attempt(number=1, directory="", parameters=si.parameters, ranks=1, pools=1, error_type="OK",
                       error_code=0, message="", scf_iterations=9, returncode=0, wall_time=1.0)
    wfc, rho, scratch_start = (RestartType.FROM_WAVE_FUNCTIONS, RestartType.FROM_CHARGE_DENSITY,
                               RestartType.FROM_SCRATCH)
    assert available_restart(wfc, scratch, si, 1, 1, previous) is wfc
    assert available_restart(wfc, scratch, si, 2, 1, previous) is rho  # other ranks: pw.x's files are per rank
    assert available_restart(wfc, scratch, si, 1, 1, None) is rho  # who left them is unknown
    other_mesh = InputGenerator(config.with_changes(kpoint_spacing=0.9)).generate(bulk("Si"))
    assert available_restart(wfc, scratch, other_mesh, 1, 1, previous) is rho
    spin = InputGenerator(config).generate(bulk("Si"), {"system": {"nspin": 2, "starting_magnetization(1)": 0.5}})
    assert available_restart(wfc, scratch, spin, 1, 1, previous) is scratch_start  # another spin: not even rho
    cutoff = InputGenerator(config.with_changes(ecutrho=240)).generate(bulk("Si"))
    assert available_restart(rho, scratch, cutoff, 1, 1, previous) is scratch_start
    (scratch / "pwscf.wfc1").unlink()
    assert available_restart(wfc, scratch, si, 1, 1, previous) is rho  # none left
    shutil.rmtree(scratch / "pwscf.save")
    assert available_restart(rho, scratch, si, 1, 1, previous) is scratch_start


def test_a_default_recovery_policy_travels_without_its_ladders_and_comes_back_whole():
    """Every Firework carries its policy: the default ladders were half of each Firework's document."""
    from qe_factory.engine.recovery import RecoveryHandler

    default, custom = RecoveryHandler(more_steps=3), RecoveryHandler(ladders={"SCF_NOT_CONVERGED": []})
    assert "ladders" not in default.as_dict() and RecoveryHandler.from_dict(default.as_dict()) == default
    assert RecoveryHandler.from_dict(default.as_dict()).ladders == RecoveryHandler().ladders
    assert custom.as_dict()["ladders"] == {"SCF_NOT_CONVERGED": []}
    assert RecoveryHandler.from_dict(custom.as_dict()) == custom
