"""End-to-end on a real single-node SLURM: `qe-factory qlaunch rapidfire -m 2` → pilot jobs (sbatch of `qe-factory
host`, launch after launch) → real pw.x, with the embedded (file-backed) LaunchPad and no MongoDB.

The cluster comes from scripts/slurm_cluster.sh (conftest.py; root only: the test is skipped with the reason
otherwise). The test has its own factory home with the package's fw_config and SLURM template. `qe-factory
qlaunch` is the home's coordinator: it reserves SCF Fireworks into launch directories and leaves a ticket for each in
the home's queue, keeps up to -m pilot jobs queued or running while tickets wait (they touch neither the LaunchPad
nor the JobStore), takes the results in, runs the quick stages itself, and ends when every workflow is finished.
Stock `lpad` writes its file back when it exits, so it runs only after the coordinator ended. One launch per job
(`--single`): test_slurm_kills.py.
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
BIN = Path(sys.executable).parent
QE_FACTORY = str(BIN / "qe-factory")
LPAD = str(BIN / "lpad")
FINISHED = {"COMPLETED", "FIZZLED", "DEFUSED"}
ENV_KEYS = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")


# -- helpers -------------------------------------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    """This environment without any factory/FireWorks settings of the test process; this checkout's qe_factory and
    tests/ importable (the recovery policies a workflow may carry), also in the SLURM jobs (sbatch exports the
    environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    return {**env, "PYTHONPATH": os.pathsep.join((str(REPO), str(REPO / "tests")))}  # this checkout's code


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
    """A factory home from the package's fw_config and template, with test settings in its my_qadapter.yaml."""
    home = tmp_path / "home"
    factory(home, "init")
    path = home / "fw_config" / "my_qadapter.yaml"
    settings = yaml.safe_load(path.read_text())
    settings.update(qadapter)
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return home


def submit(home: Path, tmp_path: Path, structures: dict[str, Atoms], config: dict, recovery: str | None = None,
           dataset: str = "default") -> None:
    """`qe-factory submit`; with `recovery` (a policy of tests/recovery_policies.py, as Python), the documented
    Python `submit` with that RecoveryHandler. `dataset`: the home's data set (its protocol) they join."""
    name = "-".join(structures)
    frames = []
    for uid, atoms in structures.items():
        atoms.info["uid"] = uid
        frames.append(atoms)
    write(tmp_path / f"{name}.extxyz", frames)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    if recovery is None:
        out = factory(home, "submit", str(tmp_path / f"{name}.extxyz"), "-c", str(tmp_path / f"{name}.yaml"),
                      "--no-e0s", "--dataset", dataset)
    else:
        code = (
            f"from qe_factory.workflow.home import activate; activate({str(home)!r}); "
            "from qe_factory import DFTConfig; from qe_factory.workflow.submit import submit; "
            f"from recovery_policies import *; print(submit({str(tmp_path / f'{name}.extxyz')!r}, "
            f"DFTConfig.from_yaml({str(tmp_path / f'{name}.yaml')!r}), recovery={recovery}, "
            f"dataset={dataset!r}).summary())"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env=base_env())
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
    assert f"{len(structures)} added" in out, out


def running_jobs() -> int:
    """Jobs that SLURM runs now (the test's cluster runs only this test's jobs; each is named after its Firework,
    as FireWorks' reservation mode names them)."""
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True,
                         timeout=30).stdout
    return len(out.split())


def job_outputs(home: Path) -> dict[int, str]:
    """SLURM job id → its stdout + stderr (files named by the template's --output/--error, in the launch dirs)."""
    outputs = {}
    for out in sorted([*(home / "launches").glob("launcher_*/*-*.out"), *(home / "queue" / "jobs").glob("*/*-*.out")]):
        error = out.with_suffix(".error")
        text = out.read_text(errors="replace") + (error.read_text(errors="replace") if error.exists() else "")
        outputs[int(out.stem.rsplit("-", 1)[1])] = text
    return outputs


def diagnostics(home: Path, log: Path) -> str:
    parts = []
    for title, argv in (("squeue", ["squeue"]), ("sinfo", ["sinfo", "-N"])):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        parts.append(f"----- {title}\n{proc.stdout}{proc.stderr}")
    if log.exists():
        parts.append("----- qlaunch (last 40 lines)\n" + "\n".join(log.read_text().splitlines()[-40:]))
    if (worker_log := home / "logs" / "worker.log").exists():
        parts.append("----- logs/worker.log (last 40 lines)\n" + "\n".join(worker_log.read_text().splitlines()[-40:]))
    for job_id, text in job_outputs(home).items():
        parts.append(f"----- SLURM job {job_id} output (last 40 lines)\n" + "\n".join(text.splitlines()[-40:]))
    jobcomp = Path(os.environ.get("QE_FACTORY_SLURM_STATE", "/var/run/qe_factory_slurm")) / "log" / "jobcomp.log"
    if jobcomp.exists():
        parts.append("----- jobcomp.log (last 10 lines)\n" + "\n".join(jobcomp.read_text().splitlines()[-10:]))
    status = subprocess.run([QE_FACTORY, "--home", str(home), "status"], capture_output=True, text=True,
                            timeout=120, env=base_env())
    parts.append(f"----- qe-factory status\n{status.stdout}{status.stderr}")
    return "\n".join(parts)


def run_qlaunch(home: Path, tmp_path: Path, options: list[str], limit: float) -> tuple[int, str]:
    """`qe-factory qlaunch rapidfire OPTIONS` until it ends by itself (every workflow finished); returns the most
    jobs seen running at once and its output. `limit` only keeps a broken build from hanging the suite."""
    log = tmp_path / "qlaunch.log"
    start = time.monotonic()
    argv = [QE_FACTORY, "--home", str(home), "qlaunch", "rapidfire", *options, "--sleep", "1"]
    with log.open("w") as out:
        qlaunch = subprocess.Popen(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=base_env(),
                                   start_new_session=True)
    most = 0
    try:
        while qlaunch.poll() is None:
            most = max(most, running_jobs())
            if time.monotonic() - start > limit:
                pytest.fail(f"not finished after {limit:.0f} s\n" + diagnostics(home, log))
            time.sleep(0.5)
    finally:
        if qlaunch.poll() is None:
            os.killpg(qlaunch.pid, signal.SIGTERM)
            qlaunch.wait(timeout=30)
    assert qlaunch.returncode == 0, diagnostics(home, log)
    print(f"\n{len(job_outputs(home))} SLURM job(s) in {time.monotonic() - start:.0f} s")
    return most, log.read_text()


def stored_results(home: Path, monkeypatch) -> list:
    """Every DFTResult in the home's JobStore (qe_factory.workflow.state.load_results)."""
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.state import get_jobstore, load_results

    for key in ENV_KEYS:  # activate() sets them: monkeypatch restores the test process's values afterwards
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    activate(home)
    store = get_jobstore()
    try:
        return load_results(store)
    finally:
        store.close()


def fireworks_named(home: Path, name: str) -> list[dict]:
    return lpad(home, "get_fws", "-n", name, "-d", "all")


def rattled_si(seed: int, amount: float = 0.05, repeat=(1, 1, 1)) -> Atoms:
    atoms = bulk("Si") * repeat
    atoms.rattle(amount, seed=seed)
    return atoms


# -- the test ------------------------------------------------------------------------------------------------------


def test_twelve_structures_one_recovered_one_restarted_through_at_most_four_pilot_jobs(slurm, tmp_path, monkeypatch):
    """12 workflows through `qe-factory qlaunch rapidfire -m 2`: pilot jobs (the default), each a 3-minute SLURM job
    that runs launch after launch (one slot: the job's one task):

    - ten 2-atom cells converge at once;
    - the strongly rattled 8-atom chain (1x1x4 primitive cells) needs 16 iterations with an erratic trace: with
      electron_maxstep 10 attempt 1 fails and the recovery detour (more steps from its own state, or mixing_beta
      0.3) converges in 9;
    - one asks for an unreachable conv_thr, so pw.x iterates until the max_seconds its launch derived from the time
      left in its job (the host claims nothing with less than a minute left); the workflow's own policy
      (tests/recovery_policies.py, carried by the workflow to the job) restarts it with a reachable conv_thr in a
      later job.
    """
    walltime_s = 180
    home = make_home(tmp_path, walltime="00:03:00", signal="B:USR1@30")
    config = {"kpoint_spacing": 0.8, "ecutwfc": 25, "ecutrho": 200, "allow_low_cutoffs": True,
              "timeout": 300}  # mpi_ranks: SLURM_NTASKS
    easy = {f"si-{n}": rattled_si(n) for n in range(10)}
    submit(home, tmp_path, easy, config)
    hard_config = {**config, "pw_parameters": {"electrons": {"electron_maxstep": 10}}}
    submit(home, tmp_path, {"si-hard": rattled_si(0, 0.2, (1, 1, 4))}, hard_config)
    endless = {"kpoint_spacing": 0.5, "ecutwfc": 25, "ecutrho": 200, "allow_low_cutoffs": True, "timeout": 600,
               "max_retries": 3,
               "pw_parameters": {"electrons": {"conv_thr": 0.0, "electron_maxstep": 100000}}}
    submit(home, tmp_path, {"si-walltime": rattled_si(4)}, endless, recovery="RestartToConverge(conv_thr=1e-8)",
           dataset="endless")  # other k-points and an unreachable conv_thr: a protocol of its own
    uids = {*easy, "si-hard", "si-walltime"}

    most_running, output = run_qlaunch(home, tmp_path, ["-m", "2", "--idle-exit", "30"], limit=1200)

    assert most_running >= 2, f"at most {most_running} job(s) ran at once"
    results = stored_results(home, monkeypatch)
    assert sorted(r.uid for r in results) == sorted(uids)  # every result in the JobStore, once
    by_uid = {r.uid: r for r in results}
    assert all(r.succeeded for r in results), {r.uid: r.error_message for r in results}
    assert [a.error_type for a in by_uid["si-hard"].attempts] == ["SCF_NOT_CONVERGED", "OK"]
    # recovery v2: its trace still falls at the last step, so it first gets more steps from its own state (β as it
    # was); else the mixing rung
    hard = by_uid["si-hard"]
    assert (hard.attempts[1].correction, hard.final_mixing_beta) in (("more electron steps", 0.7),
                                                                     ("mixing_beta=0.3", 0.3))
    assert all(a.ranks == 1 for r in results for a in r.attempts)  # the job's one task per slot

    walltime = by_uid["si-walltime"]
    assert [a.error_type for a in walltime.attempts] == ["PW_WALLTIME", "OK"]
    first, second = walltime.attempts
    assert (second.restart, second.parameters["control"]["restart_mode"]) == ("full", "restart")
    assert second.parameters["electrons"]["conv_thr"] == 1e-8
    assert 30 < first.parameters["control"]["max_seconds"] <= 0.9 * (walltime_s - 30)  # from the allocation
    assert first.wall_time < walltime_s - 10  # pw.x stopped by itself, before SLURM's limit
    assert -300 < walltime.energy < -250  # two Si atoms, about -139 eV each with this pseudopotential

    outputs = job_outputs(home)
    assert not [job for job, text in outputs.items() if "DUE TO TIME LIMIT" in text], outputs  # no job was killed
    assert 2 <= len(outputs) <= 4, diagnostics(home, tmp_path / "qlaunch.log")  # was: one job per SCF attempt (14)
    ran_in = {name: [job for job, text in outputs.items() if f"Starting job - {name} " in text]
              for name in ("scf si-walltime attempt 1", "scf si-walltime attempt 2", "scf si-hard attempt 2")}
    assert all(len(jobs) == 1 for jobs in ran_in.values()), ran_in
    assert ran_in["scf si-walltime attempt 1"] != ran_in["scf si-walltime attempt 2"]  # restarted in a later job
    assert sum(text.count("Finished job - scf") for text in outputs.values()) == 14  # 12 first attempts, 2 more

    # the stock lpad and qe-factory status tell the same story
    workflows = {wf["name"].split("--")[0]: wf["state"] for wf in lpad(home, "get_wflows", "-d", "more")}
    status = factory(home, "status")
    finished = len(uids) - sum(1 for state in workflows.values() if state != "COMPLETED")
    assert f": {finished} labelled (" in status, status  # "structures seen: N: M labelled (..."
    assert set(workflows.values()) <= {"COMPLETED"}, workflows
    assert f"qlaunch: {len(outputs)} SLURM job(s) submitted" in output, output
