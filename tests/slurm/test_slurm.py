"""End-to-end on a real single-node SLURM: `qe-factory qlaunch rapidfire` → sbatch → `qe-factory worker` → real pw.x.

The cluster comes from scripts/slurm_cluster.sh (root only; the tests are skipped with the reason otherwise). Each test
has its own factory home with the embedded, file-backed LaunchPad, the repository's fw_config and SLURM template.

ONE worker job at a time: the file-backed LaunchPad allows one client process at a time, so qlaunch runs with `-m 1`
(at most one job in the queue). `qe-factory qlaunch` gives qlaunch a snapshot of the LaunchPad file, so qlaunch
never sees the workers' progress and keeps submitting up to --nlaunches (a job that finds nothing READY exits at
once): the test stops qlaunch as soon as every workflow is finished. `lpad` writes the file back when it exits,
so it runs only after the last job has left the queue.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ase import Atoms
from ase.build import bulk
from ase.io import write

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "scripts" / "slurm_cluster.sh"
BIN = Path(sys.executable).parent
QE_FACTORY = str(BIN / "qe-factory")
LPAD = str(BIN / "lpad")
FINISHED = {"COMPLETED", "FIZZLED", "DEFUSED"}
ENV_KEYS = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")


@pytest.fixture(scope="module")
def slurm():
    """The single-node SLURM cluster, started for this module and stopped after it (unless it was running before)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: scripts/slurm_cluster.sh installs and starts munged, slurmctld and slurmd")
    was_running = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    start = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=600)
    if start.returncode != 0:  # as root the script can install and start everything: a failure is a failure
        pytest.fail(f"scripts/slurm_cluster.sh start failed:\n{start.stdout[-2000:]}\n{start.stderr[-2000:]}")
    yield
    if not was_running:
        stop = subprocess.run([CLUSTER, "stop"], capture_output=True, text=True, timeout=120)
        print(stop.stdout + stop.stderr)


# -- helpers -------------------------------------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    """This environment without any factory/FireWorks settings of the test process; tests/ importable (the
    recovery policies a workflow may carry), also in the SLURM jobs (sbatch exports the environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    return {**env, "PYTHONPATH": str(REPO / "tests")}


def factory(home: Path, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run(
        [QE_FACTORY, "--home", str(home), *args], capture_output=True, text=True, timeout=timeout, env=base_env()
    )
    assert proc.returncode == 0, f"qe-factory {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@functools.cache
def home_env(home: Path) -> dict[str, str]:
    """The environment `eval "$(qe-factory --home H env)"` gives stock lpad (`--home` goes before the command)."""
    exports = dict(re.findall(r"^export (\w+)=(.*)$", factory(home, "env"), flags=re.M))
    assert set(exports) >= {"FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE"}, exports
    return {**base_env(), **exports}


def lpad(home: Path, *args: str) -> list[dict]:
    """Stock `lpad ... -d more|all` as a list of documents (lpad prints one document bare)."""
    proc = subprocess.run([LPAD, *args], capture_output=True, text=True, timeout=120, env=home_env(home))
    assert proc.returncode == 0, f"lpad {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    data = json.loads(proc.stdout)
    return data if isinstance(data, list) else [data]


def make_home(tmp_path: Path, **qadapter) -> Path:
    """A factory home from the repository's fw_config and template, with test settings in its my_qadapter.yaml."""
    home = tmp_path / "home"
    factory(home, "init")
    path = home / "fw_config" / "my_qadapter.yaml"
    settings = yaml.safe_load(path.read_text())
    settings.update(qadapter)
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return home


def submit(home: Path, tmp_path: Path, structures: dict[str, Atoms], config: dict, recovery: str | None = None) -> None:
    """`qe-factory submit`; with `recovery` (a policy of tests/recovery_policies.py, as Python), the documented
    Python `submit` with that RecoveryHandler."""
    frames = []
    for uid, atoms in structures.items():
        atoms.info["uid"] = uid
        frames.append(atoms)
    write(tmp_path / "structures.extxyz", frames)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    if recovery is None:
        out = factory(home, "submit", str(tmp_path / "structures.extxyz"), "-c", str(tmp_path / "config.yaml"))
    else:
        code = (
            f"from qe_factory.workflow.home import activate; activate({str(home)!r}); "
            "from qe_factory import DFTConfig; from qe_factory.workflow.flows import submit; "
            f"from recovery_policies import *; print(submit({str(tmp_path / 'structures.extxyz')!r}, "
            f"DFTConfig.from_yaml({str(tmp_path / 'config.yaml')!r}), recovery={recovery}).summary())"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env=base_env())
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
    assert f"{len(structures)} added" in out, out


def our_jobs(job_name: str) -> list[str]:
    """'<id> <state>' of this test's jobs still known to SLURM as pending or running."""
    out = subprocess.run(
        ["squeue", "-h", "-n", job_name, "-t", "PENDING,RUNNING,CONFIGURING,COMPLETING", "-o", "%i %T"],
        capture_output=True, text=True, timeout=30,
    ).stdout
    return out.split("\n")[:-1]


def workflow_states(home: Path) -> dict[str, str]:
    """uid → workflow state from a read-only LaunchPad client (never writes the file; safe beside a worker)."""
    code = (
        "import json; from qe_factory.workflow.launchpad import get_launchpad; lp = get_launchpad(read_only=True); "
        "print(json.dumps({w['metadata']['uid']: w['state'] for w in lp.workflows.find({}, {'metadata': 1, "
        "'state': 1})}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=home_env(home)
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def job_outputs(launch_dir: Path) -> dict[int, str]:
    """SLURM job id → its stdout + stderr (files named by the template's --output/--error)."""
    outputs = {}
    for out in sorted(launch_dir.glob("block_*/launcher_*/*-*.out")):
        error = out.with_suffix(".error")
        text = out.read_text(errors="replace") + (error.read_text(errors="replace") if error.exists() else "")
        outputs[int(out.stem.rsplit("-", 1)[1])] = text
    return outputs


def diagnostics(home: Path, launch_dir: Path) -> str:
    parts = []
    for title, argv in (("squeue", ["squeue"]), ("sinfo", ["sinfo", "-N"])):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        parts.append(f"----- {title}\n{proc.stdout}{proc.stderr}")
    log = launch_dir / "qlaunch.log"
    if log.exists():
        parts.append("----- qlaunch (last 40 lines)\n" + "\n".join(log.read_text().splitlines()[-40:]))
    for job_id, text in job_outputs(launch_dir).items():
        parts.append(f"----- SLURM job {job_id} output (last 40 lines)\n" + "\n".join(text.splitlines()[-40:]))
    jobcomp = Path(os.environ.get("QE_FACTORY_SLURM_STATE", "/var/run/qe_factory_slurm")) / "log" / "jobcomp.log"
    if jobcomp.exists():
        parts.append("----- jobcomp.log (last 10 lines)\n" + "\n".join(jobcomp.read_text().splitlines()[-10:]))
    status = subprocess.run([QE_FACTORY, "--home", str(home), "status"], capture_output=True, text=True,
                            timeout=120, env=base_env())
    parts.append(f"----- qe-factory status\n{status.stdout}{status.stderr}")
    return "\n".join(parts)


def run_qlaunch(home: Path, launch_dir: Path, job_name: str, nlaunches: int, timeout: float) -> float:
    """`qe-factory qlaunch rapidfire -m 1` until every workflow is finished; returns the seconds it took.

    Workflows can only finish when a job ends, so their states are read whenever none of this test's jobs is
    queued. Fails with squeue, qlaunch's log and every job's output after `timeout` seconds.
    """
    launch_dir.mkdir()
    start = time.monotonic()
    argv = [QE_FACTORY, "--home", str(home), "qlaunch", "rapidfire", "-m", "1", "--nlaunches", str(nlaunches),
            "--sleep", "2"]
    with (launch_dir / "qlaunch.log").open("w") as log:
        qlaunch = subprocess.Popen(argv, cwd=launch_dir, stdout=log, stderr=subprocess.STDOUT, env=base_env(),
                                   start_new_session=True)  # its own process group: qe-factory and stock qlaunch
    states: dict[str, str] = {}
    try:
        while True:
            time.sleep(1)
            if time.monotonic() - start > timeout:
                pytest.fail(f"not finished after {timeout:.0f} s (workflows {states})\n"
                            + diagnostics(home, launch_dir))
            if our_jobs(job_name):
                continue
            if qlaunch.poll() is not None:  # all --nlaunches jobs submitted and none left in the queue
                break
            states = workflow_states(home)
            if states and set(states.values()) <= FINISHED:
                break
    finally:
        if qlaunch.poll() is None:
            os.killpg(qlaunch.pid, signal.SIGTERM)
            qlaunch.wait(timeout=30)
    while our_jobs(job_name):  # one more job may have been submitted meanwhile: it finds nothing READY
        if time.monotonic() - start > timeout:
            pytest.fail(f"jobs still queued after {timeout:.0f} s\n" + diagnostics(home, launch_dir))
        time.sleep(1)
    elapsed = time.monotonic() - start
    print(f"\n{job_name}: {len(job_outputs(launch_dir))} SLURM job(s) in {elapsed:.0f} s")
    return elapsed


def stored_results(home: Path, monkeypatch) -> dict:
    """uid → DFTResult from the home's JobStore (qe_factory.workflow.launchpad.load_results)."""
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.launchpad import get_jobstore, load_results

    for key in ENV_KEYS:  # activate() sets them: monkeypatch restores the test process's values afterwards
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    activate(home)
    store = get_jobstore()
    try:
        return {result.uid: result for result in load_results(store)}
    finally:
        store.close()


def fireworks_named(home: Path, name: str) -> list[dict]:
    return lpad(home, "get_fws", "-n", name, "-d", "all")


# -- tests ---------------------------------------------------------------------------------------------------------


def rattled_si(seed: int, amount: float = 0.05, repeat=(1, 1, 1)) -> Atoms:
    atoms = bulk("Si") * repeat
    atoms.rattle(amount, seed=seed)
    return atoms


def test_three_structures_one_recovered_through_qlaunch(slurm, tmp_path, monkeypatch):
    """3 workflows through qlaunch rapidfire -m 1 (one worker job at a time: file-backed LaunchPad); one recovers.

    electron_maxstep 10 (measured with pw.x 6.7, 1 rank): the 2-atom cells converge in 7 iterations; the strongly
    rattled 8-atom chain (1x1x4 primitive cells) needs 16 with an erratic trace, so attempt 1 fails and the
    recovery lowers mixing_beta to 0.3, which converges in 9.
    """
    home = make_home(tmp_path, job_name="qef-e2e")
    config = {"kpoint_density": 0.8, "ecutwfc": 25, "ecutrho": 200, "timeout": 300,  # mpi_ranks: SLURM_NTASKS
              "pw_parameters": {"electrons": {"electron_maxstep": 10}}}
    structures = {"si-0": rattled_si(0), "si-hard": rattled_si(0, 0.2, (1, 1, 4)), "si-1": rattled_si(1)}
    submit(home, tmp_path, structures, config)
    launch_dir = tmp_path / "launch"

    run_qlaunch(home, launch_dir, "qef-e2e", nlaunches=6, timeout=240)

    workflows = lpad(home, "get_wflows", "-d", "more")
    assert {wf["name"].split("--")[0]: wf["state"] for wf in workflows} == {
        f"qe_factory {uid}": "COMPLETED" for uid in structures
    }, workflows
    retry = fireworks_named(home, "scf si-hard attempt 2")
    assert len(retry) == 1 and retry[0]["state"] == "COMPLETED"
    assert retry[0]["spec"]["electrons"]["mixing_beta"] == 0.3
    assert retry[0]["spec"]["correction"] == "mixing_beta=0.3"
    assert not fireworks_named(home, "scf si-0 attempt 2") and not fireworks_named(home, "scf si-1 attempt 2")

    results = stored_results(home, monkeypatch)
    assert set(results) == set(structures)
    assert all(r.succeeded for r in results.values()), {u: r.error_message for u, r in results.items()}
    assert [a.error_type for a in results["si-hard"].attempts] == ["SCF_NOT_CONVERGED", "OK"]
    assert results["si-hard"].final_mixing_beta == 0.3
    for uid in ("si-0", "si-1"):
        assert [a.error_type for a in results[uid].attempts] == ["OK"]
    assert all(a.ranks == 1 for r in results.values() for a in r.attempts)  # SLURM_NTASKS of the job

    outputs = job_outputs(launch_dir)
    ran = [int(n) for text in outputs.values() for n in re.findall(r"worker ran (\d+) Firework", text)]
    assert len(ran) == len(outputs) >= 3, outputs
    assert sum(ran) == 3 * 3 + 1  # inputs, scf, validate per structure, and the recovery attempt
    for uid in structures:  # one structure per job (--structures 1): its whole workflow ran in one SLURM job
        assert sum(f"Starting job - validate {uid} " in text for text in outputs.values()) == 1


def test_walltime_limited_job_stops_pw_and_next_job_restarts(slurm, tmp_path, monkeypatch):
    """A 2-minute job: pw.x's max_seconds comes from the allocation's time left, pw.x stops cleanly (PW_WALLTIME)
    before SLURM's limit, and the replacement attempt (restart_mode='restart') runs in the next job.

    Why 2 minutes and not 1: the worker starts no Firework with less than 60 s left, and a 1-minute job has less
    than that once the worker is up; --time is rounded up to whole minutes. So attempt 1 gets max_seconds =
    0.9 * (time left - 30 s) ≈ 78 s. Attempt 1 asks for an unreachable conv_thr (1e-30), so it iterates until
    max_seconds on any machine; the workflow's own policy (tests/recovery_policies.py, carried by the workflow to
    the SLURM job) restarts it with a reachable one, and the restart converges in the next job.
    """
    walltime_s = 120
    home = make_home(tmp_path, job_name="qef-walltime", walltime="00:02:00", signal="B:USR1@30")
    config = {"kpoint_density": 0.5, "ecutwfc": 25, "ecutrho": 200, "timeout": 600, "max_retries": 3,
              "pw_parameters": {"electrons": {"conv_thr": 1e-30, "electron_maxstep": 100000}}}
    atoms = rattled_si(4)
    submit(home, tmp_path, {"si-walltime": atoms}, config, recovery="RestartToConverge(conv_thr=1e-8)")
    launch_dir = tmp_path / "launch"

    run_qlaunch(home, launch_dir, "qef-walltime", nlaunches=6, timeout=330)

    (workflow,) = lpad(home, "get_wflows", "-d", "more")
    assert workflow["state"] == "COMPLETED", workflow
    restart = fireworks_named(home, "scf si-walltime attempt 2")
    assert len(restart) == 1 and restart[0]["spec"]["correction"] == "restart_mode=restart"

    result = stored_results(home, monkeypatch)["si-walltime"]
    assert result.succeeded, result.error_message
    assert [a.error_type for a in result.attempts] == ["PW_WALLTIME", "OK"]
    first, second = result.attempts
    assert (second.restart, second.parameters["control"]["restart_mode"]) == ("full", "restart")
    assert second.parameters["electrons"]["conv_thr"] == 1e-8
    assert 30 < first.parameters["control"]["max_seconds"] <= 0.9 * (walltime_s - 30)  # from the allocation
    assert first.wall_time < walltime_s - 10  # pw.x stopped by itself, before SLURM's limit
    assert -300 < result.energy < -250  # two Si atoms, about -139 eV each with this pseudopotential

    outputs = job_outputs(launch_dir)
    assert not [job for job, text in outputs.items() if "DUE TO TIME LIMIT" in text], outputs  # no job was killed
    ran_in = {n: [job for job, text in outputs.items() if f"Starting job - scf si-walltime attempt {n} " in text]
              for n in (1, 2)}
    assert all(len(jobs) == 1 for jobs in ran_in.values()), ran_in
    assert ran_in[1] != ran_in[2]  # the restart ran in a later SLURM job
