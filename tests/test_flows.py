"""The FireWorks/jobflow driver: flow compilation, bulk submission, recovery detours, lost runs, `qe-factory run`.

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

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.io import read

from qe_factory.launchpad import (
    activate,
    config_environment,
    get_jobstore,
    get_launchpad,
    release_launchpad,
    run_worker,
    status_report,
)
from qe_factory.results import load_results

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE"):
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    return activate(tmp_path / "home")


def rattled_si(seed: int, amount: float = 0.05) -> Atoms:
    atoms = bulk("Si")
    atoms.rattle(amount, seed=seed)
    atoms.info["uid"] = f"si-{seed}"
    return atoms


def test_home_is_rendered_and_stock_lpad_sees_the_same_launchpad(home, fast_config):
    from qe_factory.flows import submit
    from qe_factory.launchpad import qlaunch_command

    for path in [*(home / "fw_config").iterdir(), *(home / "templates").iterdir()]:
        assert "${QE_FACTORY" not in path.read_text(), path
    assert "#SBATCH --ntasks=$${ntasks}" in (home / "templates" / "SLURM_template.txt").read_text()  # for FireWorks
    settings = (home / "fw_config" / "FW_config.yaml").read_text()
    assert f"MONGOMOCK_SERVERSTORE_FILE: {home}/state/launchpad.json" in settings
    launchpad = get_launchpad()
    submit([rattled_si(3)], fast_config, launchpad=launchpad)
    release_launchpad(launchpad)
    env = {**os.environ, **config_environment(home)}
    lpad = subprocess.run([str(BIN / "lpad"), "-c", str(home / "fw_config"), "get_wflows", "-d", "count"],
                          env=env, capture_output=True, text=True, check=True)
    assert lpad.stdout.strip() == "1"
    argv, qlaunch_env = qlaunch_command(["rapidfire", "-m", "1"], home)
    assert argv[1:4] == ["-c", str(home / "fw_config"), "rapidfire"]
    snapshot = Path(qlaunch_env["MONGOMOCK_SERVERSTORE_FILE"])
    assert snapshot != home / "state" / "launchpad.json"  # qlaunch's exit-time write lands on a copy
    assert snapshot.read_bytes() == (home / "state" / "launchpad.json").read_bytes()


def test_flow_compiles_to_three_linked_fireworks(fast_config):
    from jobflow.managers.fireworks import flow_to_workflow

    from qe_factory.flows import structure_flow

    flow = structure_flow(rattled_si(0), "si-0", fast_config, resources={"ntasks": 4, "walltime": "02:00:00"})
    workflow = flow_to_workflow(flow)
    by_name = {fw.name: fw for fw in workflow.fws}
    assert set(by_name) == {"inputs si-0", "scf si-0 attempt 1", "validate si-0"}
    inputs, scf, check = by_name["inputs si-0"], by_name["scf si-0 attempt 1"], by_name["validate si-0"]
    assert set(workflow.links[inputs.fw_id]) == {scf.fw_id, check.fw_id}
    assert workflow.links[scf.fw_id] == [check.fw_id]
    assert [fw.spec["_priority"] for fw in (inputs, scf, check)] == [1, 2, 3]
    assert scf.spec["_queueadapter"] == {"ntasks": 4, "walltime": "02:00:00"}
    assert "_queueadapter" not in inputs.spec


def test_bulk_submit_refuses_individually_and_deduplicates(home, fast_config):
    from qe_factory.flows import submit

    good = [rattled_si(seed) for seed in range(1000)]
    bad = [
        Atoms("Si2", positions=[(0, 0, 0), (0.3, 0, 0)], cell=[5, 5, 5], pbc=True, info={"uid": "overlap"}),
        Atoms("Zn", cell=[3, 3, 3], pbc=True, info={"uid": "zinc"}),
        Atoms("Si", positions=[(np.nan, 0, 0)], cell=[5, 5, 5], pbc=True, info={"uid": "nan"}),
        Atoms("Si", cell=[5, 5, 5], pbc=True, info={"uid": "../escape"}),
    ]
    twin = rattled_si(7)
    twin.info["uid"] = "twin-of-7"
    launchpad = get_launchpad()
    started = time.perf_counter()
    report = submit([*good[:500], *bad, twin, *good[500:]], fast_config, launchpad=launchpad)
    elapsed = time.perf_counter() - started
    assert len(report.fw_ids) == 1000 and elapsed < 120
    assert set(report.refused) == {"overlap", "zinc", "nan", "../escape"}
    assert "apart" in report.refused["overlap"] and "Zn" in report.refused["zinc"]
    assert "NaN" in report.refused["nan"] and "uid" in report.refused["../escape"]
    assert report.duplicates == {"twin-of-7": "si-7"}
    assert launchpad.fireworks.count_documents({}) == 3000
    again = submit(good[:10] + [rattled_si(5000)], fast_config, launchpad=launchpad)
    assert len(again.duplicates) == 10 and list(again.fw_ids) == ["si-5000"]
    assert launchpad.fireworks.count_documents({}) == 3003


@pytest.mark.pwx
def test_failed_scf_becomes_a_detour_and_validation_reads_the_recovered_result(home, fast_config):
    from qe_factory.flows import submit

    config = fast_config.model_copy(update={"pw_parameters": {"electrons": {"electron_maxstep": 4}}})
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
    assert detour["spec"]["electrons"]["mixing_beta"] == 0.3 and detour["spec"]["correction"] == "mixing_beta=0.3"
    assert launchpad.workflows.find_one({"metadata.uid": "si-1"})["state"] == "COMPLETED"
    (result,) = load_results(get_jobstore(), ["si-1"])
    assert result.succeeded and result.final_mixing_beta == 0.3
    assert [a.error_type for a in result.attempts] == ["SCF_NOT_CONVERGED", "OK"]


@pytest.mark.pwx
def test_exhausted_recovery_fizzles_with_the_reason(home, fast_config):
    from qe_factory.flows import submit

    config = fast_config.model_copy(update={"max_retries": 2, "pw_parameters": {"electrons": {"electron_maxstep": 1}}})
    launchpad = get_launchpad()
    submit([rattled_si(2)], config, launchpad=launchpad)
    assert run_worker(launchpad, launch_root=home / "launches") == 3  # inputs, scf attempt 1 (replaced), attempt 2
    report = status_report(launchpad)
    (failure,) = report["failures"]
    assert failure["uid"] == "si-2" and failure["stage"] is None or failure["stage"] in ("scf", "scf retry")
    assert failure["error_type"] == "SCF_NOT_CONVERGED" and "gave up" in failure["message"]
    assert report["workflows"] == {"FIZZLED": 1}
    cli = subprocess.run([str(BIN / "qe-factory"), "--home", str(home), "status"], capture_output=True, text=True)
    assert "FAILED si-2" in cli.stdout and "SCF_NOT_CONVERGED" in cli.stdout and "ONE client" in cli.stdout


@pytest.mark.pwx
def test_killed_worker_is_detected_and_rerun_without_duplicates(home, fast_config):
    from qe_factory.flows import submit

    slow = bulk("Si", cubic=True)  # 8 atoms: long enough to be killed mid-SCF
    slow.rattle(0.05, seed=3)
    slow.info["uid"] = "slow"
    launchpad = get_launchpad()
    submit([slow], fast_config.model_copy(update={"kpoint_density": 0.6}), launchpad=launchpad)
    release_launchpad(launchpad)
    qe_factory = [str(BIN / "qe-factory"), "--home", str(home)]
    worker = subprocess.Popen([*qe_factory, "worker"], cwd=home, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(1)
        if get_launchpad(read_only=True).fireworks.find_one({"state": "RUNNING", "spec.stage": "scf"}):
            break
    else:
        pytest.fail("the SCF Firework never reached RUNNING")
    time.sleep(2)
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pw.x, as a node loss would
    worker.wait()
    assert get_launchpad(read_only=True).fireworks.find_one({"spec.stage": "scf"})["state"] == "RUNNING"
    time.sleep(2)
    lost = subprocess.run([*qe_factory, "rerun-lost", "--time", "1"], capture_output=True, text=True, check=True)
    assert "1 lost Firework(s)" in lost.stdout
    subprocess.run([*qe_factory, "worker"], cwd=home, check=True, timeout=600)
    launchpad = get_launchpad(read_only=True)
    assert launchpad.workflows.find_one({"metadata.uid": "slow"})["state"] == "COMPLETED"
    results = load_results(get_jobstore(), ["slow"])
    assert len(results) == 1 and results[0].succeeded


@pytest.mark.pwx
def test_qe_factory_run_on_the_bundled_example(tmp_path):
    config = tmp_path / "fast.yaml"
    config.write_text("kpoint_density: 0.8\necutwfc: 25\necutrho: 200\n")
    env = {k: v for k, v in os.environ.items() if k not in ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE")}
    run = subprocess.run(
        [str(BIN / "qe-factory"), "run", str(REPO / "examples" / "structures.extxyz"), "-c", str(config),
         "-o", "labels.extxyz"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    frames = read(tmp_path / "labels.extxyz", index=":")
    assert sorted(a.info["uid"] for a in frames) == ["ge-rattled", "si-compressed", "si-hot", "si-rattled"]
    assert all(a.arrays["REF_forces"].shape == (2, 3) and a.info["REF_stress"].shape == (9,) for a in frames)
    assert "4 labelled structures" in run.stdout and (tmp_path / "factory" / "state" / "launchpad.json").exists()
