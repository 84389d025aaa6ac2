"""QERunner with real pw.x on tiny cells: happy path, provenance, cleanup, parallel flags, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from qe_factory import DFTFatalError, PseudopotentialError, QERunner, StructureError
from qe_factory.engine.process import ExecutableNotFoundError


def rattled_si(seed: int = 0) -> Atoms:
    atoms = bulk("Si")
    atoms.rattle(0.05, seed=seed)
    return atoms


def files_left(run_dir) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")}


def test_si_energy_forces_stress_and_provenance(fast_config):
    result = QERunner(fast_config).run(rattled_si(), uid="si-0")
    assert result.succeeded and result.error_message is None
    forces, stress = np.array(result.forces), np.array(result.stress)
    assert forces.shape == (2, 3) and np.abs(forces).max() > 0.1  # rattled: real forces
    assert np.allclose(forces.sum(axis=0), 0, atol=1e-4)
    assert stress.shape == (3, 3) and np.allclose(stress, stress.T, atol=1e-8)
    assert -300 < result.energy < -250  # two Si atoms, about -139 eV each with this pseudopotential
    assert result.pw_version.startswith("v.6")
    assert result.pseudopotentials == {
        "Si": {"filename": "Si.pbe-nl-rrkjus_psl.1.0.0.UPF", "md5": "78279d3766ecb5dbdc0623f3e93c9a23"}
    }
    assert result.kpoints == [3, 3, 3] and (result.ecutwfc, result.ecutrho) == (25, 200)
    assert result.scf_iterations > 3 and result.final_mixing_beta == 0.7
    assert [a.error_type for a in result.attempts] == ["OK"]
    assert result.parameters["control"]["calculation"] == "scf"


def test_cleanup_leaves_only_inputs_and_outputs(fast_config):
    QERunner(fast_config).run(rattled_si(), uid="clean")
    assert files_left(fast_config.execution.work_dir / "run_clean") == {
        "attempt_1", "attempt_1/pw.in", "attempt_1/pw.out", "attempt_1/pw.err", "attempt_1/ended.json",
        "attempt_1/data-file-schema.xml",  # pw.x's XML record of the converged run, copied out of the scratch
    }


def test_the_result_carries_pw_xs_own_record_of_the_run(fast_config):
    """The XML pw.x wrote agrees with its stdout and says it used the settings asked for: no problem, and its
    summary travels with the label."""
    result = QERunner(fast_config).run(rattled_si(), uid="xml")
    assert result.succeeded and result.problems == []
    xml = result.pw_xml
    assert xml["converged"] and xml["scf_steps"] == result.scf_iterations and 0 < xml["scf_error"] < 4e-10
    assert abs(xml["energy"] - result.energy) < 1e-6 and xml["pw_version"] in result.pw_version
    assert xml["input"] == {
        "ecutwfc": 25.0, "ecutrho": 200.0, "smearing": "mv", "degauss": 0.02,  # 'cold' is 'mv' to pw.x
        "pseudopotentials": {"Si": "Si.pbe-nl-rrkjus_psl.1.0.0.UPF"}, "kpoints": [3, 3, 3], "kpoint_shift": [0, 0, 0],
        "gamma_only": False, "lsda": False, "functional": "PBE",
    }
    assert xml["total_magnetization"] is None and "forces" not in xml


def test_keep_files_keeps_the_scratch(fast_config):
    config = fast_config.with_changes(**{"keep_files": True})
    QERunner(config).run(rattled_si(), uid="kept")
    left = files_left(config.execution.work_dir / "run_kept")
    assert "out/pwscf.save/charge-density.dat" in left


def test_energy_is_reproducible(fast_config):
    runner = QERunner(fast_config)
    first = runner.run(rattled_si(1), uid="a").energy
    second = runner.run(rattled_si(1), uid="b").energy
    assert abs(first - second) < 1e-6


def test_two_ranks_with_pools_give_the_same_answer(fast_config):
    one = QERunner(fast_config).run(rattled_si(2), uid="one")
    two = QERunner(fast_config.with_changes(**{"mpi_ranks": 2})).run(rattled_si(2), uid="two")
    assert (two.attempts[0].ranks, two.attempts[0].pools) == (2, 2)
    assert abs(one.energy - two.energy) < 1e-5
    assert np.allclose(one.forces, two.forces, atol=1e-4)


def test_bcc_iron_ends_magnetic(fast_config):
    fe = bulk("Fe", "bcc", a=2.83)  # one atom; ASE's default initial moment 2.3 μB
    result = QERunner(fast_config.with_changes(**{"ecutwfc": 30, "ecutrho": 240})).run(fe, uid="fe")
    assert result.parameters["system"]["nspin"] == 2
    assert result.total_magnetization > 1.5


def test_bad_input_is_refused_before_pw_runs(fast_config):
    runner = QERunner(fast_config)
    with pytest.raises(StructureError, match="uid"):
        runner.run(rattled_si(), uid="../escape")
    with pytest.raises(StructureError, match="apart"):
        runner.run(Atoms("Si2", positions=[(0, 0, 0), (0.4, 0, 0)], cell=[5, 5, 5], pbc=True), uid="overlap")
    with pytest.raises(PseudopotentialError, match="Zn"):
        runner.run(Atoms("Zn", cell=[3, 3, 3], pbc=True), uid="zinc")
    assert not fast_config.execution.work_dir.exists() or not any(fast_config.execution.work_dir.iterdir())


def test_missing_executable_is_a_clear_error(fast_config):
    runner = QERunner(fast_config.with_changes(**{"command": "/nonexistent/pw.x"}))
    with pytest.raises(ExecutableNotFoundError, match="apt-get install quantum-espresso"):
        runner.run(rattled_si(), uid="nopw")


def test_recovery_rescues_a_non_converging_scf(fast_config):
    """The ladder's first rung (trend reading off: with it, this steadily falling SCF first gets more steps)."""
    from qe_factory import RecoveryHandler

    config = fast_config.with_changes(**{"pw_parameters": {"electrons": {"electron_maxstep": 4}}})
    result = QERunner(config, recovery=RecoveryHandler(read_trend=False)).run(rattled_si(), uid="rescue")
    assert result.succeeded
    assert [a.error_type for a in result.attempts] == ["SCF_NOT_CONVERGED", "OK"]
    second_input = (config.execution.work_dir / "run_rescue" / "attempt_2" / "pw.in").read_text()
    assert "mixing_beta      = 0.3" in second_input
    assert "startingpot      = 'file'" in second_input  # restarted from the failed attempt's density
    assert "startingwfc      = 'file'" in second_input  # and its wavefunctions
    assert result.final_mixing_beta == 0.3


def test_a_steadily_converging_scf_gets_more_steps_for_one_attempt(fast_config):
    config = fast_config.with_changes(**{"pw_parameters": {"electrons": {"electron_maxstep": 4}}})
    result = QERunner(config).run(rattled_si(), uid="steps")
    assert result.succeeded and [a.correction for a in result.attempts] == [None, "more electron steps"]
    assert result.attempts[1].parameters["electrons"]["electron_maxstep"] == 8
    assert result.attempts[1].restart == "from_wave_functions" and result.final_mixing_beta == 0.7


def test_no_recovery_means_one_attempt_and_a_full_report(fast_config):
    config = fast_config.with_changes(recoverable=False, pw_parameters={"electrons": {"electron_maxstep": 2}})
    with pytest.raises(DFTFatalError) as info:
        QERunner(config).run(rattled_si(), uid="once")
    report = info.value.result
    assert not report.succeeded and report.energy is None
    assert len(report.attempts) == 1 and report.error_type == "SCF_NOT_CONVERGED"
    assert "convergence NOT achieved" in report.error_message
    quiet = QERunner(config).run(rattled_si(), uid="once", raise_on_failure=False)
    assert not quiet.succeeded and quiet.attempts[0].scf_iterations == 2


def test_walltime_stop_restarts_from_saved_state_and_matches_a_direct_run(fast_config):
    """pw.x stops itself at max_seconds (here a tiny one: it stops at its first check, whatever the machine's speed)
    and the restart (restart_mode='restart', with the usual limit) continues to the same label as a direct run."""
    from qe_factory import RecoveryHandler
    from qe_factory.engine.recovery import RESTART

    atoms = rattled_si(4)
    config = fast_config.with_changes(pw_parameters={"control": {"max_seconds": 0.01}})
    restart = RESTART.model_copy(update={"changes": {"control": {"max_seconds": 3600.0}}})
    stopped = QERunner(config, recovery=RecoveryHandler(ladders={"PW_WALLTIME": [restart]})).run(atoms, uid="stopped")
    assert [a.error_type for a in stopped.attempts] == ["PW_WALLTIME", "OK"]
    assert (stopped.attempts[1].correction, stopped.attempts[1].restart) == ("restart_mode=restart", "full")
    assert stopped.attempts[1].parameters["control"]["restart_mode"] == "restart"
    direct = QERunner(fast_config).run(atoms, uid="direct")
    assert abs(stopped.energy - direct.energy) < 1e-5
    assert np.allclose(stopped.forces, direct.forces, atol=1e-3)


def test_recovered_label_equals_a_direct_run_at_nominal_settings(fast_config):
    """Label consistency: a metal rescued by more smearing is finished at the nominal smearing."""
    from qe_factory import DFTErrorType, RecoveryHandler
    from qe_factory.engine.recovery import MORE_SMEARING

    copper = bulk("Cu", "fcc", a=3.5) * (2, 1, 1)
    copper.rattle(0.08, seed=1)
    config = fast_config.with_changes(**{"ecutwfc": 25, "ecutrho": 200, "kpoint_spacing": 0.9, "mpi_ranks": 2})
    direct = QERunner(config).run(copper, uid="direct")
    hard = config.with_changes(**{"pw_parameters": {"electrons": {"electron_maxstep": 6}}})
    smearing_only = RecoveryHandler(ladders={DFTErrorType.SCF_NOT_CONVERGED: [MORE_SMEARING]}, read_trend=True)
    recovered = QERunner(hard, recovery=smearing_only).run(copper, uid="recovered")
    corrections = [a.correction for a in recovered.attempts]
    assert "degauss=0.05" in corrections and "nominal settings" in corrections
    # after it, only more electron steps (for one attempt each) while the nominal run was still converging
    assert set(corrections[corrections.index("nominal settings") + 1 :]) <= {"more electron steps"}
    assert recovered.nominal_settings and recovered.parameters["system"]["degauss"] == 0.02
    assert abs(recovered.energy - direct.energy) / len(copper) < 1e-3  # 1 meV/atom
    assert np.abs(np.array(recovered.forces) - direct.forces).max() < 0.01  # 10 meV/Å



def test_a_density_restart_reuses_the_wavefunctions(fast_config):
    """pw.x stops at electron_maxstep=4; the next attempt (mixing_beta 0.3, steps enough) starts from the density and
    the wavefunctions it left — same rank, pools, cutoffs, k-points and spin — and ends at a direct run's label."""
    from pathlib import Path

    from qe_factory import RecoveryHandler
    from qe_factory.engine.recovery import LOWER_BETA

    atoms = rattled_si(2)
    config = fast_config.with_changes(pw_parameters={"electrons": {"electron_maxstep": 4}})
    rung = LOWER_BETA.model_copy(update={"changes": {"electrons": {"mixing_beta": 0.3, "electron_maxstep": 100}}})
    handler = RecoveryHandler(ladders={"SCF_NOT_CONVERGED": [rung]}, read_trend=False)
    result = QERunner(config, recovery=handler).run(atoms, uid="reuse")
    assert [a.error_type for a in result.attempts] == ["SCF_NOT_CONVERGED", "OK"]
    assert [a.restart for a in result.attempts] == ["from_scratch", "from_wave_functions"]
    second = Path(result.attempts[1].directory, "pw.out").read_text()
    assert "Starting wfcs from file" in second and "The initial density is read from file" in second
    direct = QERunner(fast_config).run(atoms, uid="direct")
    assert abs(result.energy - direct.energy) < 1e-5
