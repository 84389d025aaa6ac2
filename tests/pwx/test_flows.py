"""The FireWorks/jobflow driver with real pw.x: recovery detours, a custom policy, exhausted recovery, lost runs,
`qe-factory run` on the bundled example.

Every test uses its own factory home with the embedded (file-backed) LaunchPad: one LaunchPad client process at a
time, so a test releases its client before starting rlaunch or a worker in another process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ase.build import bulk
from ase.io import read
from recovery_policies import MoreStepsFirst
from structures import rattled_si

from qe_factory.workflow.coordinator import run_coordinator
from qe_factory.workflow.history import home_history
from qe_factory.workflow.home import config_environment
from qe_factory.workflow.state import get_jobstore, get_launchpad, load_results, release_launchpad, workflow_counts

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def read_text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def wait_for(condition) -> None:
    """Poll until `condition()` holds (conditions here include "the process ended", so none waits forever)."""
    while not condition():
        time.sleep(0.2)


def test_failed_scf_becomes_a_detour_and_validation_reads_the_recovered_result(home, fast_config):
    from qe_factory.workflow.submit import submit

    config = fast_config.with_changes(**{"pw_parameters": {"electrons": {"electron_maxstep": 4}}})
    launchpad = get_launchpad()
    report = submit([rattled_si(1)], config, launchpad=launchpad)
    assert list(report.fw_ids) == ["si-1"]
    release_launchpad(launchpad)  # stock rlaunch below must be the only LaunchPad client
    env = {**os.environ, **config_environment(home)}
    run = subprocess.run(
        [str(BIN / "rlaunch"), "-c", str(home / "fw_config"), "rapidfire", "--nlaunches", "0", "--max_loops", "1"],
        cwd=home, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    launchpad = get_launchpad(read_only=True)
    detour = launchpad.fireworks.find_one({"name": "scf si-1 attempt 2"})
    assert detour is not None and detour["state"] == "COMPLETED"
    # recovery v2: a steadily converging SCF first gets more steps from its own state, else mixing_beta 0.3
    assert detour["spec"]["correction"] in ("more electron steps", "mixing_beta=0.3"), detour["spec"]["correction"]
    assert (detour["spec"]["stage"], detour["spec"]["uid"], detour["spec"]["attempt"]) == ("scf", "si-1", 2)
    assert launchpad.workflows.find_one({"metadata.uid": "si-1"})["state"] == "COMPLETED"
    (result,) = load_results(get_jobstore(), ["si-1"])
    expected_beta = 0.3 if detour["spec"]["correction"] == "mixing_beta=0.3" else config.mixing_beta
    assert result.succeeded and result.final_mixing_beta == expected_beta
    assert [a.error_type for a in result.attempts] == ["SCF_NOT_CONVERGED", "OK"]


def test_a_custom_recovery_handler_runs_under_stock_rlaunch(home, fast_config):
    from qe_factory.workflow.submit import submit

    config = fast_config.with_changes(pw_parameters={"electrons": {"electron_maxstep": 3}})
    launchpad = get_launchpad()
    submit([rattled_si(4)], config, launchpad=launchpad, recovery=MoreStepsFirst(steps=90))
    release_launchpad(launchpad)
    env = {**os.environ, **config_environment(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "QE_FACTORY_MPI_RANKS": "1"}
    run = subprocess.run(
        [str(BIN / "rlaunch"), "-c", str(home / "fw_config"), "rapidfire", "--nlaunches", "0", "--max_loops", "1"],
        cwd=home, env=env, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    detour = get_launchpad(read_only=True).fireworks.find_one({"name": "scf si-4 attempt 2"})
    assert detour["spec"]["correction"] == "more steps" and detour["spec"]["electrons"]["electron_maxstep"] == 90
    (result,) = load_results(get_jobstore(), ["si-4"])
    assert result.succeeded and [a.correction for a in result.attempts] == [None, "more steps"]
    assert result.parameters["electrons"]["electron_maxstep"] == 90
    assert Path(result.attempts[0].directory).is_relative_to(home / "runs")  # the worker's work_dir, in the home


def test_exhausted_recovery_fizzles_with_the_reason(home, fast_config):
    from qe_factory.workflow.submit import submit

    config = fast_config.with_changes(**{"max_retries": 2, "pw_parameters": {"electrons": {"electron_maxstep": 1}}})
    launchpad = get_launchpad()
    submit([rattled_si(2)], config, launchpad=launchpad)
    assert run_coordinator(launchpad, launch_root=home / "launches") == 3  # inputs, scf attempt 1 (replaced), attempt 2
    (failure,) = home_history(home, launchpad, get_jobstore())
    assert (failure.uid, failure.stage, failure.outcome) == ("si-2", "scf", "failed")  # the retry kept its stage
    assert failure.error_type == "SCF_NOT_CONVERGED" and "gave up" in failure.message
    assert workflow_counts(launchpad) == {"FIZZLED": 1}
    cli = subprocess.run([str(BIN / "qe-factory"), "--home", str(home), "status"], capture_output=True, text=True)
    assert "FAILED si-2" in cli.stdout and "SCF_NOT_CONVERGED" in cli.stdout
    assert "coordinator: none running" in cli.stdout


def test_killed_worker_is_detected_and_rerun_without_duplicates(home, fast_config):
    from qe_factory.workflow.submit import submit

    slow = bulk("Si", cubic=True)  # 8 atoms: long enough to be killed mid-SCF
    slow.rattle(0.05, seed=3)
    slow.info["uid"] = "slow"
    launchpad = get_launchpad()
    submit([slow], fast_config.with_changes(**{"kpoint_spacing": 0.6}), launchpad=launchpad)
    release_launchpad(launchpad)
    qe_factory = [str(BIN / "qe-factory"), "--home", str(home)]
    worker = subprocess.Popen([*qe_factory, "worker"], cwd=home, start_new_session=True)
    pw_out = home / "runs" / "run_slow" / "attempt_1" / "pw.out"
    wait_for(lambda: worker.poll() is not None or "iteration #  2" in read_text(pw_out))  # pw.x is mid-SCF
    assert worker.poll() is None, "the worker ended before it could be killed mid-SCF"
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pw.x, as a node loss would
    worker.wait()
    # reserved for the (dead) coordinator's worker process, which ran pw.x offline
    assert get_launchpad(read_only=True).fireworks.find_one({"spec.stage": "scf"})["state"] == "RESERVED"
    lost = subprocess.run([*qe_factory, "rerun-lost", "--time", "0"], capture_output=True, text=True, check=True)
    assert "1 lost Firework(s)" in lost.stdout
    (home / "one-rank.yaml").write_text("mpi_ranks: 1\n")  # this worker's own execution settings
    subprocess.run([*qe_factory, "worker", "-c", str(home / "one-rank.yaml")], cwd=home, check=True, timeout=600)
    launchpad = get_launchpad(read_only=True)
    assert launchpad.workflows.find_one({"metadata.uid": "slow"}) is None  # finished: it left the LaunchPad
    results = load_results(get_jobstore(), ["slow"])
    assert len(results) == 1 and results[0].succeeded
    assert [a.ranks for a in results[0].attempts] == [1]  # the rerun's worker's setting (this machine has more)


def test_qe_factory_run_on_the_bundled_example(tmp_path):
    config = tmp_path / "fast.yaml"
    config.write_text("kpoint_spacing: 0.8\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\n")
    env = {k: v for k, v in os.environ.items() if k not in ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE")}
    run = subprocess.run(
        [str(BIN / "qe-factory"), "run", str(REPO / "examples" / "structures.extxyz"), "-c", str(config),
         "-o", "labels.extxyz", "--no-e0s"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    frames = read(tmp_path / "labels.extxyz", index=":")
    assert sorted(a.info["uid"] for a in frames) == ["ge-rattled", "si-compressed", "si-hot", "si-rattled"]
    assert all(a.arrays["REF_forces"].shape == (2, 3) and a.info["REF_stress"].shape == (9,) for a in frames)
    assert "4 labelled structures" in run.stdout and (tmp_path / "factory" / "state" / "launchpad.json").exists()
