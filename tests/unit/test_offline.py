"""Offline runs without pw.x: a Firework reserved into a launch directory, run there with no LaunchPad (FireWorks'
offline Rocket, an in-memory JobStore), taken back in; lost workers; the SLURM coordinator's options and the
MongoDB passthrough."""

from __future__ import annotations

import json

import pytest
from fireworks import Firework, FWorker, ScriptTask

from qe_factory.engine.outcomes import Outcome
from qe_factory.workflow.coordinator import settle_offline_runs
from qe_factory.workflow.offline import MAX_LOST_RUNS, OUTPUTS, pending_runs, reserve, run_offline, take_back
from qe_factory.workflow.state import get_jobstore, get_launchpad, launch_failure


def add_scf(launchpad, command: str = "true") -> int:
    (fw_id,) = launchpad.add_wf(Firework(ScriptTask.from_str(command), spec={"stage": "scf"}, name="scf x")).values()
    return fw_id


def test_a_reserved_firework_runs_offline_and_is_taken_back(home, tmp_path):
    launchpad, store = get_launchpad(), get_jobstore()
    fw_id = add_scf(launchpad, "echo offline > proof.txt")
    run = reserve(launchpad, FWorker(), tmp_path / "launch", store, fw_id)
    assert launchpad.get_fw_by_id(fw_id).state == "RESERVED" and [r.fw_id for r in pending_runs(launchpad)] == [fw_id]
    assert not run.finished()
    assert run_offline(run.launch_dir) == "COMPLETED"  # no LaunchPad in there: only the directory
    assert run.finished() and json.loads((run.launch_dir / OUTPUTS).read_text())["docs"] == []
    assert (run.launch_dir / "proof.txt").read_text() == "offline\n"
    assert launchpad.get_fw_by_id(fw_id).state == "RESERVED"  # until the coordinator takes it back
    assert take_back(launchpad, run, store) == "COMPLETED"
    assert launchpad.get_fw_by_id(fw_id).state == "COMPLETED" and pending_runs(launchpad) == []


def test_an_offline_run_pings_in_its_launch_directory_only(home, tmp_path, monkeypatch):
    """FireWorks' ping thread pings once more after the rocket has left the launch directory: in a worker process
    that runs launch after launch, that ping landed in the worker's own directory (a stray FW_ping.json)."""
    import fireworks.core.rocket as rocket

    pings = []
    monkeypatch.setattr(rocket, "ping_launch", lambda *args: pings.append(args))
    launchpad, store = get_launchpad(), get_jobstore()
    run = reserve(launchpad, FWorker(), tmp_path / "launch", store, add_scf(launchpad))
    assert run_offline(run.launch_dir) == "COMPLETED"
    assert pings == [] and (run.launch_dir / "FW_ping.json").is_file()  # the rocket's own last ping, in there


def test_a_lost_worker_puts_its_firework_back_and_the_last_time_fizzles_it(home, tmp_path):
    launchpad, store = get_launchpad(), get_jobstore()
    fw_id = add_scf(launchpad)
    for n in range(1, MAX_LOST_RUNS + 1):
        run = reserve(launchpad, FWorker(), tmp_path / f"launch-{n}", store, fw_id)
        state = take_back(launchpad, run, store)  # no worker ever finished it
        assert state == ("READY" if n < MAX_LOST_RUNS else "FIZZLED") == launchpad.get_fw_by_id(fw_id).state
    launch = launchpad.launches.find_one({"fw_id": fw_id, "state": "FIZZLED"})
    failure = launch_failure(launch)
    assert failure.outcome is Outcome.WORKER_LOST and f"{MAX_LOST_RUNS} times" in failure.message


def test_a_new_coordinator_leaves_live_slurm_jobs_alone_and_takes_the_rest_back(home, tmp_path, scontrol):
    launchpad, store = get_launchpad(), get_jobstore()
    alive, gone, local = (add_scf(launchpad) for _ in range(3))
    runs = {fw_id: reserve(launchpad, FWorker(), tmp_path / f"l{fw_id}", store, fw_id)
            for fw_id in (alive, gone, local)}
    launchpad.set_reservation_id(runs[alive].launch_id, "101")
    launchpad.set_reservation_id(runs[gone].launch_id, "102")
    taken_in, lost = settle_offline_runs(launchpad, store, queue_alive=lambda job_id: job_id == "101")
    assert taken_in == [] and sorted(lost) == sorted([gone, local])  # the local one died with its coordinator
    assert {fw_id: launchpad.get_fw_by_id(fw_id).state for fw_id in runs} == {
        alive: "RESERVED", gone: "READY", local: "READY"}
    assert [(r.fw_id, r.job_id) for r in pending_runs(launchpad)] == [(alive, "101")]



def test_beside_other_coordinators_a_live_ones_local_runs_are_left_alone(home, tmp_path):
    """MongoDB: coordinators in several jobs share one LaunchPad. A coordinator starting up takes back only the runs
    of dead coordinators (and its own from an earlier life); before, it gave every other job's running
    structures back to READY (they then ran twice)."""
    import socket
    import subprocess

    from qe_factory.workflow.coordinator import coordinator_id

    launchpad, store = get_launchpad(), get_jobstore()
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()  # its pid names no process now
        owners = {"live": f"local-{socket.gethostname()}-{sleeper.pid}",
                  "dead": f"local-{socket.gethostname()}-{dead.pid}", "mine": coordinator_id()}
        fw_ids = {name: add_scf(launchpad) for name in owners}
        for name, owner in owners.items():
            reserve(launchpad, FWorker(), tmp_path / name, store, fw_ids[name], owner=owner)
        lost = sorted([fw_ids["dead"], fw_ids["mine"]])
        assert settle_offline_runs(launchpad, store, owners_alive=True) == ([], lost)
        assert [run.fw_id for run in pending_runs(launchpad)] == [fw_ids["live"]]
        assert settle_offline_runs(launchpad, store) == ([], [fw_ids["live"]])  # embedded: the lock proves it dead
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_reservation_takes_only_a_ready_firework_of_its_stage(home, tmp_path):
    """Reserving by stage (no fw_id) is FireWorks' atomic find-and-reserve of a READY Firework: one another
    coordinator reserved meanwhile is not taken again (with an fw_id FireWorks takes a RESERVED one too)."""
    from qe_factory.workflow.state import stage_fworker

    launchpad, store = get_launchpad(), get_jobstore()
    fw_id = add_scf(launchpad)
    launchpad.add_wf(Firework(ScriptTask.from_str("true"), spec={"stage": "validate"}, name="validate x"))
    first = reserve(launchpad, stage_fworker(FWorker(), "scf"), tmp_path / "a", store)
    assert first is not None and first.fw_id == fw_id
    assert reserve(launchpad, stage_fworker(FWorker(), "scf"), tmp_path / "b", store) is None
    assert not (tmp_path / "b").exists()  # no empty launch directory left behind

def test_qlaunch_options_are_stock_qlaunchs():
    from qe_factory.cli.workers import qlaunch_options

    options = qlaunch_options(["rapidfire", "-m", "8", "--nlaunches", "20", "--timeout", "600"])
    assert (options.maxjobs_queue, options.nlaunches, options.timeout, options.offline) == (8, 20, 600, False)
    assert qlaunch_options(["--offline", "singleshot"]).nlaunches == 1
    assert (options.single, options.slots) == (False, 0)  # pilot jobs by default, a slot per core of the job
    assert qlaunch_options(["rapidfire", "--single"]).single
    with pytest.raises(SystemExit):
        qlaunch_options(["rapidfire", "--no-such-option"])


def test_a_pilot_jobs_slots_are_its_cores_from_the_queue_adapter():
    from fireworks.user_objects.queue_adapters.common_adapter import CommonAdapter

    from qe_factory.workflow.host import job_cores

    def adapter(**resources):
        return CommonAdapter("SLURM", **resources)

    assert job_cores(adapter(ntasks=32, nodes=2)) == 32
    assert job_cores(adapter(nodes=2, ntasks_per_node=48)) == 96
    assert job_cores(adapter(nodes=None, ntasks=None)) == 1


def test_qlaunch_on_a_mongodb_home_is_stock_qlaunch(home, tmp_path, monkeypatch):  # home: the environment restored
    """Without MONGOMOCK_SERVERSTORE_FILE the home is a MongoDB one: stock qlaunch, online (no server needed to see
    the command it would run)."""
    from qe_factory import cli
    from qe_factory.cli import workers
    from qe_factory.workflow.home import init_home

    home = init_home(tmp_path / "mongo")
    settings = home / "fw_config" / "FW_config.yaml"
    settings.write_text("\n".join(line for line in settings.read_text().splitlines()
                                  if not line.startswith("MONGOMOCK_SERVERSTORE_FILE")))
    monkeypatch.delenv("MONGOMOCK_SERVERSTORE_FILE", raising=False)  # FireWorks exports it for the embedded `home`
    seen = []
    monkeypatch.setattr(workers.subprocess, "run", lambda argv, env: seen.append((argv, env)) or type("P", (), {
        "returncode": 0})())
    assert cli.main(["--home", str(home), "qlaunch", "rapidfire", "-m", "3"]) == 0
    (argv, env), = seen
    assert argv[0].endswith("qlaunch") and argv[1:] == ["-c", str(home / "fw_config"), "rapidfire", "-m", "3"]
    assert "MONGOMOCK_SERVERSTORE_FILE" not in env


def test_a_lost_run_names_what_slurm_said_and_a_cancelled_one_is_not_rerun(home, tmp_path, scontrol):
    """A job that left the queue before its worker recorded anything: what slurmstepd wrote in its stderr (the
    template's `<name>-<job id>.error`) or scontrol says names the cause; a cancel FIZZLES at once (never rerun), a
    node failure goes back to READY."""
    launchpad, store = get_launchpad(), get_jobstore()
    cancelled, node_lost = add_scf(launchpad), add_scf(launchpad)
    runs = {fw_id: reserve(launchpad, FWorker(), tmp_path / f"l{fw_id}", store, fw_id)
            for fw_id in (cancelled, node_lost)}
    runs[cancelled].job_id = "73"
    (runs[cancelled].launch_dir / "scf_x-73.error").write_text(
        "slurmstepd-vm: error: *** JOB 73 ON vm CANCELLED AT 2026-12-02T07:08:39 ***\n")
    runs[node_lost].job_id = "76"
    scontrol("JobId=76 JobName=scf_x JobState=NODE_FAIL Reason=NodeDown Dependency=(null)\n")
    assert take_back(launchpad, runs[cancelled], store) == "FIZZLED" == launchpad.get_fw_by_id(cancelled).state
    failure = launch_failure(launchpad.launches.find_one({"fw_id": cancelled, "state": "FIZZLED"}))
    assert failure.error_type == "SLURM_CANCELLED" and "*** JOB 73 ON vm CANCELLED AT" in failure.message
    assert take_back(launchpad, runs[node_lost], store) == "READY" == launchpad.get_fw_by_id(node_lost).state


def test_each_offline_run_s_state_is_recorded_as_it_moves(home, tmp_path):
    """RESERVED at reservation, RUNNING once a worker started it (FireWorks' offline Rocket writes started_on),
    FINISHED or LOST, then TAKEN_BACK: recorded with FireWorks' own entry for the run, which status counts."""
    from qe_factory.workflow.offline import RunState
    from qe_factory.workflow.state import offline_entries, run_state_counts

    launchpad, store = get_launchpad(), get_jobstore()
    done, lost = add_scf(launchpad), add_scf(launchpad)
    runs = {fw_id: reserve(launchpad, FWorker(), tmp_path / f"launch-{fw_id}", store, fw_id) for fw_id in (done, lost)}
    assert {e.fw_id: e.run_state for e in offline_entries(launchpad)} == {done: "RESERVED", lost: "RESERVED"}
    assert not runs[done].started()
    run_offline(runs[done].launch_dir)
    assert runs[done].started() and runs[done].finished()
    take_back(launchpad, runs[done], store)
    take_back(launchpad, runs[lost], store)  # its worker never ran it
    assert runs[done].state is runs[lost].state is RunState.TAKEN_BACK
    assert run_state_counts(launchpad) == {"TAKEN_BACK": 2} and offline_entries(launchpad) == []


def test_pilot_jobs_still_queued_when_no_launch_is_left_are_cancelled(tmp_path):
    """1,000 structures through -m 4 on a 2-core node: two jobs did all the work, two waited in the queue; they
    would have started after the coordinator ended, to find nothing."""
    from pathlib import Path

    from qe_factory.workflow.host import HostRecord, PilotJobs, write_record
    from qe_factory.workflow.offline import OfflineRun

    class Hosts:
        def __init__(self):
            self.submitted, self.cancelled = 0, []

        def submit(self) -> str:
            self.submitted += 1
            return f"slurm-{self.submitted}"

        def alive(self, host_id: str) -> bool:
            return host_id not in self.cancelled

        def cancel(self, host_id: str) -> None:
            self.cancelled.append(host_id)

    hosts = Hosts()
    jobs = PilotJobs(tmp_path / "queue", hosts, max_jobs=3, slots=1, poll_seconds=0.01)
    runs = [OfflineRun(n, n, Path(tmp_path / f"l{n}")) for n in range(3)]
    for run in runs:
        jobs.start(run)
    assert hosts.submitted == 3
    write_record(tmp_path / "queue", HostRecord("slurm-1", 1, "node", "1", slots=1))  # job 1 started
    jobs.close()
    assert hosts.cancelled == []  # launches still wait: every job may still take one
    jobs.runs.clear()
    for ticket in (tmp_path / "queue" / "ready").glob("*.json"):
        ticket.unlink()
    jobs.close()
    assert hosts.cancelled == ["slurm-2", "slurm-3"]  # the started one ends by itself (idle)
