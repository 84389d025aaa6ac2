"""One test per FireWorks / jobflow / mongomock-persistence behaviour that qe_factory.workflow.fireworks_adapter
relies on (no public API offers them): an upgrade that changes one fails here, by name."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ENV_KEYS = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ENV_KEYS}


def python(code: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env or clean_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_configuration_is_read_at_import_and_again_after_reload(tmp_path):
    """FireWorks' fw_config (and the MongoClient bound into fireworks.core.launchpad) and jobflow.SETTINGS are
    fixed at import; reload_configuration makes them read the files named in the environment now."""
    (tmp_path / "FW_config.yaml").write_text(f"MONGOMOCK_SERVERSTORE_FILE: {tmp_path / 'lp.json'}\n")
    (tmp_path / "jobflow.yaml").write_text("DIRECTORY_FORMAT: '%Y-qe'\n")
    code = f"""
import os, fireworks.core.launchpad as lpmod, fireworks.fw_config as fwc, jobflow
before = (fwc.MONGOMOCK_SERVERSTORE_FILE, jobflow.SETTINGS.DIRECTORY_FORMAT)
os.environ["FW_CONFIG_FILE"] = "{tmp_path / 'FW_config.yaml'}"
os.environ["JOBFLOW_CONFIG_FILE"] = "{tmp_path / 'jobflow.yaml'}"
import fireworks.fw_config as same
unchanged = (same.MONGOMOCK_SERVERSTORE_FILE, jobflow.SETTINGS.DIRECTORY_FORMAT)
from qe_factory.workflow.fireworks_adapter import reload_configuration
reload_configuration()
import mongomock_persistence, sys
fwc = sys.modules["fireworks.fw_config"]
after = (fwc.MONGOMOCK_SERVERSTORE_FILE, jobflow.SETTINGS.DIRECTORY_FORMAT)
print(before[0], unchanged == before, after[0], after[1], lpmod.MongoClient is mongomock_persistence.MongoClient)
"""
    fields = python(code).split()
    assert fields == ["None", "True", str(tmp_path / "lp.json"), "%Y-qe", "True"]


def test_the_embedded_launchpad_store_knows_its_file(home):
    import pymongo

    from qe_factory.workflow.fireworks_adapter import embedded_store, store_file
    from qe_factory.workflow.state import get_launchpad

    store = embedded_store(get_launchpad())
    assert store is not None and store_file(store) == home / "state" / "launchpad.json"
    assert hasattr(store, "to_dict") and hasattr(store, "_finalizer")

    class MongoLaunchPad:  # what a MongoDB LaunchPad's connection is: a pymongo client (no server needed here)
        connection = pymongo.MongoClient("mongodb://127.0.0.1:9", connect=False)

    assert embedded_store(MongoLaunchPad()) is None


ADD_ONE_WORKFLOW = """
import sys
from qe_factory.workflow.home import activate
activate(sys.argv[1])
from fireworks import Firework, LaunchPad, ScriptTask
from fireworks.fw_config import LAUNCHPAD_LOC
from qe_factory.workflow.fireworks_adapter import embedded_store, stop_exit_write
from qe_factory.workflow.state import get_launchpad, release_launchpad
release_launchpad(get_launchpad())  # the file now holds an initialised, empty LaunchPad
launchpad = get_launchpad() if sys.argv[2] == "ours" else LaunchPad.from_file(LAUNCHPAD_LOC)
launchpad.add_wf(Firework(ScriptTask.from_str("true"), name="added"))
if sys.argv[2] == "detach":
    stop_exit_write(embedded_store(launchpad))
"""


@pytest.mark.parametrize("client, written", [("stock", True), ("detach", False), ("ours", False)])
def test_an_embedded_store_rewrites_its_file_at_exit_unless_detached(tmp_path, client, written):
    """A stock client rewrites the whole file at exit (so an old client undoes a worker's saves); ours never do."""
    home = tmp_path / "home"
    subprocess.run([sys.executable, "-c", ADD_ONE_WORKFLOW, str(home), client], check=True, env=clean_env())
    assert ('"added"' in (home / "state" / "launchpad.json").read_text()) is written


def test_write_store_replaces_the_file_in_one_step(home):
    import bson.json_util

    from qe_factory.workflow.fireworks_adapter import embedded_store, write_store
    from qe_factory.workflow.state import get_launchpad

    store = embedded_store(get_launchpad())
    target = home / "state" / "copy.json"
    write_store(store, target)
    assert bson.json_util.loads(target.read_text()).keys() == store.to_dict().keys()
    assert [p.name for p in target.parent.iterdir() if ".tmp" in p.name] == []


def test_launch_rocket_changes_states_only_through_the_wrapped_methods(home, tmp_path, monkeypatch):
    from fireworks import Firework, FWorker, ScriptTask
    from fireworks.core.rocket_launcher import launch_rocket

    from qe_factory.workflow.fireworks_adapter import STATE_CHANGING_METHODS, after_state_changes
    from qe_factory.workflow.state import get_launchpad

    launchpad = get_launchpad()
    fw_id = list(launchpad.add_wf(Firework(ScriptTask.from_str("true"), name="one")).values())[0]
    seen: list[str] = []
    checked_out = []

    def record(name, result):
        seen.append(launchpad.fireworks.find_one({"fw_id": fw_id})["state"])
        if name == "checkout_fw":
            checked_out.append(result[0].fw_id)

    after_state_changes(launchpad, record)
    assert all(name in vars(launchpad) for name in STATE_CHANGING_METHODS)
    monkeypatch.chdir(tmp_path)
    launch_rocket(launchpad, FWorker(), strm_lvl="ERROR")
    assert seen[0] == "RUNNING" and seen[-1] == "COMPLETED"
    assert checked_out == [fw_id]  # checkout_fw's result names the Firework


def test_write_store_writes_what_bson_json_util_writes(home, tmp_path, monkeypatch):
    import bson.json_util
    from fireworks import Firework, FWorker, ScriptTask
    from fireworks.core.rocket_launcher import launch_rocket

    from qe_factory.workflow.fireworks_adapter import embedded_store, write_store
    from qe_factory.workflow.state import get_launchpad

    launchpad = get_launchpad()
    launchpad.add_wf(Firework(ScriptTask.from_str("true"), name="one"))
    launchpad.add_wf(Firework(ScriptTask.from_str("true"), name="two"))
    monkeypatch.chdir(tmp_path)
    launch_rocket(launchpad, FWorker(), strm_lvl="ERROR")  # launches: ObjectIds, dates with and without a zone
    store = embedded_store(launchpad)
    write_store(store, tmp_path / "ours.json")
    expected = bson.json_util.loads(bson.json_util.dumps(store.to_dict()))
    assert bson.json_util.loads((tmp_path / "ours.json").read_text()) == expected
    for change in (lambda: launch_rocket(launchpad, FWorker(), strm_lvl="ERROR"), lambda: launchpad.delete_wf(1)):
        change()  # the next save makes again the texts of what changed only
        write_store(store, tmp_path / "ours.json")
        expected = bson.json_util.loads(bson.json_util.dumps(store.to_dict()))
        assert bson.json_util.loads((tmp_path / "ours.json").read_text()) == expected


OFFLINE_ROCKET = """
import json, os, sys
from fireworks import Firework, FWorker, ScriptTask
from fireworks.core.rocket_launcher import launch_rocket
os.chdir(sys.argv[1])
Firework(ScriptTask.from_str("true"), name="one", fw_id=1).to_file("FW.json")
open("FW_offline.json", "w").write('{"launch_id": 1}')
if sys.argv[2] == "mended":
    from qe_factory.workflow.fireworks_adapter import mend_offline_rocket
    mend_offline_rocket()
try:
    launch_rocket(None, FWorker(), strm_lvl="ERROR")
except TypeError as exc:
    print("TypeError", exc)
print(json.load(open("FW_offline.json")).get("state"))
"""


def test_the_offline_rocket_runs_only_once_mended(tmp_path):
    """FireWorks 2.1.4's offline Rocket calls monty's zopen without a mode, which monty now refuses. When this
    test's first assertion fails, FireWorks was fixed: mend_offline_rocket can go."""
    (tmp_path / "stock").mkdir()
    (tmp_path / "mended").mkdir()
    stock = subprocess.run([sys.executable, "-c", OFFLINE_ROCKET, str(tmp_path / "stock"), "stock"],
                           capture_output=True, text=True, env=clean_env())
    assert "TypeError" in stock.stdout and "mode" in stock.stdout, stock.stdout + stock.stderr
    mended = subprocess.run([sys.executable, "-c", OFFLINE_ROCKET, str(tmp_path / "mended"), "mended"],
                            capture_output=True, text=True, env=clean_env())
    assert mended.stdout.strip().splitlines()[-1] == "COMPLETED", mended.stdout + mended.stderr


@pytest.mark.parametrize("quiet", [False, True])
def test_a_rocket_pings_from_a_thread_unless_run_without_it(home, tmp_path, monkeypatch, quiet):
    import contextlib

    import fireworks.core.rocket as rocket
    from fireworks import Firework, FWorker, ScriptTask
    from fireworks.core.rocket_launcher import launch_rocket

    from qe_factory.workflow.fireworks_adapter import without_ping_thread
    from qe_factory.workflow.state import get_launchpad

    threads: list[int] = []
    monkeypatch.setattr(rocket, "ping_launch", lambda launchpad, launch_id, stop, master: threads.append(launch_id))
    pings: list[int] = []
    launchpad = get_launchpad()
    monkeypatch.setattr(launchpad, "ping_launch", lambda launch_id, *args, **kwargs: pings.append(launch_id))
    fw_id = list(launchpad.add_wf(Firework(ScriptTask.from_str("true"))).values())[0]
    monkeypatch.chdir(tmp_path)
    with without_ping_thread() if quiet else contextlib.nullcontext():
        launch_rocket(launchpad, FWorker(), strm_lvl="ERROR")
    assert launchpad.fireworks.find_one({"fw_id": fw_id})["state"] == "COMPLETED"
    launch_id = launchpad.launches.find_one({"fw_id": fw_id})["launch_id"]
    assert threads == ([] if quiet else [launch_id])  # the heartbeat thread (its target a recorder here), or none
    assert set(pings) == {launch_id}  # the rocket's own pings, with or without the thread
    assert rocket.start_ping_launch.__module__ == "fireworks.core.rocket"  # put back


def test_a_failed_task_s_outcome_is_kept_as_data_and_requeue_reads_it(home, tmp_path, monkeypatch):
    """Contract of state.launch_failure / state.requeue: FireWorks' Rocket stores `exception.to_dict()` of a failed
    task under the FIZZLED launch's `action.stored_data._exception._details`; requeue puts back only the outcomes
    asked for."""
    from fireworks import Firework, FWorker, PyTask
    from fireworks.core.rocket_launcher import launch_rocket

    from qe_factory.engine.outcomes import Outcome
    from qe_factory.workflow import state

    launchpad = state.get_launchpad()
    (refused,) = launchpad.add_wf(Firework(PyTask(func="qe_factory.engine.structure.check_uid", args=["a b"]))).values()
    (stopped,) = launchpad.add_wf(Firework(PyTask(func="qe_factory.engine.process.execute",
                                                  args=[["true"], ".", {}, -1]))).values()
    monkeypatch.chdir(tmp_path)
    from qe_factory.engine.process import STOP

    STOP.set()  # execute raises Interrupted before it starts anything
    try:
        for fw_id in (refused, stopped):
            launch_rocket(launchpad, FWorker(), fw_id=fw_id, strm_lvl="ERROR")
    finally:
        STOP.clear()
    failure = state.last_failure(launchpad, refused)
    assert failure.outcome is Outcome.REFUSED and failure.error_type == "StructureError" and "a b" in failure.message
    assert state.last_failure(launchpad, stopped).outcome is Outcome.INTERRUPTED
    assert sorted(state.requeue(launchpad, [Outcome.INTERRUPTED])) == [stopped]
    assert launchpad.get_fw_by_id(stopped).state == "READY" and launchpad.get_fw_by_id(refused).state == "FIZZLED"


def test_a_save_removes_what_writers_killed_mid_save_left(home):
    from qe_factory.workflow.fireworks_adapter import embedded_store, store_file, write_store
    from qe_factory.workflow.state import get_launchpad

    launchpad = get_launchpad()
    target = store_file(embedded_store(launchpad))
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid names no process now
    leftovers = [target.with_name(f"{target.name}.tmp{gone.pid}"), target.with_name(f"{target.name}.prev{gone.pid}")]
    for path in leftovers:
        path.write_text("")
    write_store(embedded_store(launchpad))
    assert not any(path.exists() for path in leftovers) and target.with_name(f"{target.name}.prev").exists()


def test_stored_forms_are_inserted_as_bulk_add_wfs_inserts_workflows(home):
    """The inbox holds workflows in the LaunchPad's own form; adding them must store what bulk_add_wfs stores."""
    import datetime
    import json

    from fireworks import Firework, ScriptTask, Workflow
    from monty.json import MontyEncoder

    from qe_factory.workflow.fireworks_adapter import add_stored_forms, stored_form
    from qe_factory.workflow.state import get_launchpad

    def workflow(name: str) -> Workflow:
        fws = [Firework(ScriptTask.from_str(f"echo {n}"), name=f"{name}-{n}", spec={"stage": n}) for n in "abc"]
        return Workflow(fws, {fws[0]: [fws[1], fws[2]], fws[1]: [fws[2]]}, name=name, metadata={"uid": name})

    launchpad = get_launchpad()
    launchpad.bulk_add_wfs([workflow("x")])
    forms = json.loads(json.dumps([stored_form(workflow("x"))], cls=MontyEncoder))  # through an inbox file
    [ids] = add_stored_forms(launchpad, forms)
    first = min(ids) - 3

    def documents(collection: str, nodes: list[int]) -> list[dict]:
        field = "fw_id" if collection == "fireworks" else "nodes"
        docs = [{k: v for k, v in doc.items() if k not in ("_id", "created_on", "updated_on")}
                for doc in getattr(launchpad, collection).find({field: {"$in": nodes}})]
        return [_renumbered({**doc, "nodes": sorted(doc.get("nodes", []))}, nodes[0]) for doc in docs]  # a set

    assert ids == [first + 3, first + 4, first + 5]
    assert documents("fireworks", ids) == documents("fireworks", [first, first + 1, first + 2])
    assert documents("workflows", ids) == documents("workflows", [first, first + 1, first + 2])
    added = launchpad.workflows.find_one({"nodes": ids[0]})
    assert isinstance(added["created_on"], datetime.datetime)
    assert launchpad.fireworks.find_one({"fw_id": ids[0]})["state"] == "READY"


def _renumbered(doc: dict, first: int):
    """A document with Firework ids counted from 0 (ints and str keys alike), to compare two workflows."""
    if isinstance(doc, dict):
        return {(str(int(k) - first) if k.isdigit() else k): _renumbered(v, first) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_renumbered(v, first) for v in doc]
    return doc - first if isinstance(doc, int) and not isinstance(doc, bool) and doc >= first else doc
