"""The FireWorks/jobflow driver: flow compilation, bulk submission, recovery detours, lost runs, `qe-factory run`.

Every test uses its own factory home with the embedded (file-backed) LaunchPad: one LaunchPad client process at a
time, so a test releases its client before starting rlaunch or a worker in another process.
"""

from __future__ import annotations

import json
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
from recovery_policies import MoreStepsFirst

from qe_factory.workflow.home import activate, config_environment
from qe_factory.workflow.launchpad import get_jobstore, get_launchpad, load_results, release_launchpad, status_report
from qe_factory.workflow.worker import run_worker

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE"):
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    return activate(tmp_path / "home")


def read_text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def wait_for(condition) -> None:
    """Poll until `condition()` holds (conditions here include "the process ended", so none waits forever)."""
    while not condition():
        time.sleep(0.2)


def rattled_si(seed: int, amount: float = 0.05) -> Atoms:
    atoms = bulk("Si")
    atoms.rattle(amount, seed=seed)
    atoms.info["uid"] = f"si-{seed}"
    return atoms


def test_home_is_rendered_and_stock_lpad_sees_the_same_launchpad(home, fast_config):
    from qe_factory.workflow.flows import submit
    from qe_factory.workflow.launchpad import qlaunch_command

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

    from qe_factory.workflow.jobs import LabelMaker

    flow = LabelMaker(config=fast_config).make(rattled_si(0), "si-0", resources={"ntasks": 4, "walltime": "02:00:00"})
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
    from qe_factory.workflow.flows import submit

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
    report = submit([*good[:500], *bad, twin, *good[500:]], fast_config, launchpad=launchpad)
    assert len(report.fw_ids) == 1000  # how fast: benchmarks/factory.py (P4)
    assert set(report.refused) == {"overlap", "zinc", "nan", "../escape"}
    assert "apart" in report.refused["overlap"] and "Zn" in report.refused["zinc"]
    assert "NaN" in report.refused["nan"] and "uid" in report.refused["../escape"]
    assert report.duplicates == {"twin-of-7": "si-7"}
    assert launchpad.fireworks.count_documents({}) == 3000
    again = submit(good[:10] + [rattled_si(5000)], fast_config, launchpad=launchpad)
    assert len(again.duplicates) == 10 and list(again.fw_ids) == ["si-5000"]
    assert launchpad.fireworks.count_documents({}) == 3003


def test_the_calculation_key_follows_geometry_and_physics_only(fast_config):
    from qe_factory.engine.inputs import InputGenerator
    from qe_factory.workflow.flows import structure_key

    atoms = rattled_si(0)
    key = structure_key(atoms, InputGenerator(fast_config))
    same_physics = fast_config.with_changes(mpi_ranks=2, timeout=9, work_dir="elsewhere", max_retries=1)
    assert structure_key(atoms, InputGenerator(same_physics)) == key
    assert structure_key(atoms, InputGenerator(fast_config.with_changes(degauss=0.03))) != key
    assert structure_key(atoms, InputGenerator(fast_config.with_changes(kpoint_density=0.5))) != key
    moved = atoms.copy()
    moved.positions[0, 0] += 1e-4
    assert structure_key(moved, InputGenerator(fast_config)) != key


def test_submit_takes_pymatgen_structures_and_knows_them_again_as_atoms(home, fast_config):
    from pymatgen.io.ase import AseAtomsAdaptor

    from qe_factory.workflow.flows import submit

    launchpad = get_launchpad()
    report = submit([AseAtomsAdaptor.get_structure(rattled_si(11))], fast_config, launchpad=launchpad)
    assert list(report.fw_ids) == ["s-000000"]
    again = submit([rattled_si(11)], fast_config, launchpad=launchpad)
    assert again.duplicates == {"si-11": "s-000000"} and again.fw_ids == {}


@pytest.mark.pwx
def test_failed_scf_becomes_a_detour_and_validation_reads_the_recovered_result(home, fast_config):
    from qe_factory.workflow.flows import submit

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
    assert detour["spec"]["electrons"]["mixing_beta"] == 0.3 and detour["spec"]["correction"] == "mixing_beta=0.3"
    assert (detour["spec"]["stage"], detour["spec"]["uid"], detour["spec"]["attempt"]) == ("scf", "si-1", 2)
    assert launchpad.workflows.find_one({"metadata.uid": "si-1"})["state"] == "COMPLETED"
    (result,) = load_results(get_jobstore(), ["si-1"])
    assert result.succeeded and result.final_mixing_beta == 0.3
    assert [a.error_type for a in result.attempts] == ["SCF_NOT_CONVERGED", "OK"]


def test_the_recovery_policy_and_settings_travel_with_the_workflow(fast_config):
    """The Firework document (as the LaunchPad stores it) rebuilds the user's RecoveryHandler subclass with its
    field values and the physics settings, and carries none of the submitting machine's execution settings."""
    from fireworks import Workflow
    from jobflow.managers.fireworks import flow_to_workflow
    from monty.json import MontyEncoder

    from qe_factory.workflow.jobs import LabelMaker

    config = fast_config.with_changes(degauss=0.03, mpi_ranks=2, command="/opt/special/pw.x")
    flow = LabelMaker(config=config, recovery=MoreStepsFirst(steps=77)).make(rattled_si(0), "si-0")
    text = json.dumps(flow_to_workflow(flow).to_dict(), cls=MontyEncoder)
    assert "/opt/special/pw.x" not in text and str(fast_config.execution.work_dir) not in text
    scf = next(fw for fw in Workflow.from_dict(json.loads(text)).fws if fw.spec["stage"] == "scf")
    maker = scf.tasks[0]["job"].function.__self__
    assert type(maker.recovery) is MoreStepsFirst and maker.recovery.steps == 77
    assert maker.config.degauss == 0.03 and maker.config.execution.mpi_ranks is None


@pytest.mark.pwx
def test_a_custom_recovery_handler_runs_under_stock_rlaunch(home, fast_config):
    from qe_factory.workflow.flows import submit

    config = fast_config.with_changes(pw_parameters={"electrons": {"electron_maxstep": 3}})
    launchpad = get_launchpad()
    submit([rattled_si(4)], config, launchpad=launchpad, recovery=MoreStepsFirst(steps=90))
    release_launchpad(launchpad)
    env = {**os.environ, **config_environment(home), "PYTHONPATH": str(Path(__file__).parent),
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


@pytest.mark.pwx
def test_exhausted_recovery_fizzles_with_the_reason(home, fast_config):
    from qe_factory.workflow.flows import submit

    config = fast_config.with_changes(**{"max_retries": 2, "pw_parameters": {"electrons": {"electron_maxstep": 1}}})
    launchpad = get_launchpad()
    submit([rattled_si(2)], config, launchpad=launchpad)
    assert run_worker(launchpad, launch_root=home / "launches") == 3  # inputs, scf attempt 1 (replaced), attempt 2
    report = status_report(launchpad)
    (failure,) = report["failures"]
    assert (failure["uid"], failure["stage"]) == ("si-2", "scf")  # the retry kept its stage
    assert failure["error_type"] == "SCF_NOT_CONVERGED" and "gave up" in failure["message"]
    assert report["workflows"] == {"FIZZLED": 1}
    cli = subprocess.run([str(BIN / "qe-factory"), "--home", str(home), "status"], capture_output=True, text=True)
    assert "FAILED si-2" in cli.stdout and "SCF_NOT_CONVERGED" in cli.stdout and "ONE client" in cli.stdout


@pytest.mark.pwx
def test_killed_worker_is_detected_and_rerun_without_duplicates(home, fast_config):
    from qe_factory.workflow.flows import submit

    slow = bulk("Si", cubic=True)  # 8 atoms: long enough to be killed mid-SCF
    slow.rattle(0.05, seed=3)
    slow.info["uid"] = "slow"
    launchpad = get_launchpad()
    submit([slow], fast_config.with_changes(**{"kpoint_density": 0.6}), launchpad=launchpad)
    release_launchpad(launchpad)
    qe_factory = [str(BIN / "qe-factory"), "--home", str(home)]
    worker = subprocess.Popen([*qe_factory, "worker"], cwd=home, start_new_session=True)
    pw_out = home / "runs" / "run_slow" / "attempt_1" / "pw.out"
    wait_for(lambda: worker.poll() is not None or "iteration #  2" in read_text(pw_out))  # pw.x is mid-SCF
    assert worker.poll() is None, "the worker ended before it could be killed mid-SCF"
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pw.x, as a node loss would
    worker.wait()
    assert get_launchpad(read_only=True).fireworks.find_one({"spec.stage": "scf"})["state"] == "RUNNING"
    lost = subprocess.run([*qe_factory, "rerun-lost", "--time", "0"], capture_output=True, text=True, check=True)
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
