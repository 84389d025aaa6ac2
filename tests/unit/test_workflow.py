"""The workflow layer without pw.x: the rendered home, flow compilation, what travels with a workflow, the
calculation key, bulk submission with refusal and de-duplication. Every test has its own factory home (embedded
LaunchPad)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from ase import Atoms
from recovery_policies import MoreStepsFirst
from structures import rattled_si

from qe_factory.workflow.home import config_environment, factory_home
from qe_factory.workflow.inbox import LAUNCHPAD_WORKFLOWS, take_in
from qe_factory.workflow.state import get_jobstore, get_launchpad, release_launchpad, save_launchpad

BIN = Path(sys.executable).parent


def test_home_is_rendered_and_stock_lpad_sees_the_same_launchpad(home, fast_config):
    from qe_factory.workflow.submit import submit

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
    from qe_factory.workflow.submit import submit

    good = [rattled_si(seed) for seed in range(200)]  # 10 × what the embedded LaunchPad holds
    bad = [
        Atoms("Si2", positions=[(0, 0, 0), (0.3, 0, 0)], cell=[5, 5, 5], pbc=True, info={"uid": "overlap"}),
        Atoms("Zn", cell=[3, 3, 3], pbc=True, info={"uid": "zinc"}),
        Atoms("Si", positions=[(np.nan, 0, 0)], cell=[5, 5, 5], pbc=True, info={"uid": "nan"}),
        Atoms("Si", cell=[5, 5, 5], pbc=True, info={"uid": "../escape"}),
    ]
    twin = rattled_si(7)
    twin.info["uid"] = "twin-of-7"
    launchpad = get_launchpad()
    report = submit([*good[:100], *bad, twin, *good[100:]], fast_config, launchpad=launchpad)
    # the embedded LaunchPad takes what it holds at most; the rest waits in the inbox (how fast: benchmarks/)
    assert len(report.fw_ids) == LAUNCHPAD_WORKFLOWS and len(report.queued) == 200 - LAUNCHPAD_WORKFLOWS
    assert sorted([*report.fw_ids, *report.queued]) == sorted(a.info["uid"] for a in good)
    assert set(report.refused) == {"overlap", "zinc", "nan", "../escape"}
    assert "apart" in report.refused["overlap"] and "Zn" in report.refused["zinc"]
    assert "NaN" in report.refused["nan"] and "uid" in report.refused["../escape"]
    assert report.duplicates == {"twin-of-7": "si-7"}
    assert launchpad.fireworks.count_documents({}) == 3 * LAUNCHPAD_WORKFLOWS
    again = submit(good[:10] + good[190:] + [rattled_si(5000)], fast_config, launchpad=launchpad)
    assert len(again.duplicates) == 10 and again.fw_ids == {}  # si-0..9 are in the LaunchPad; nothing fits
    assert sorted(again.queued) == sorted([f"si-{n}" for n in range(190, 200)] + ["si-5000"])
    intakes = take_in(factory_home(), launchpad, save_launchpad, get_jobstore())  # no bound: all of it
    assert sum(len(intake.added) for intake in intakes) == 200 - LAUNCHPAD_WORKFLOWS + 1
    assert sum(intake.skipped for intake in intakes) == 10  # si-190..199 were queued twice: added once
    assert launchpad.fireworks.count_documents({}) == 3 * 201


def test_the_calculation_key_follows_geometry_and_physics_only(fast_config):
    from qe_factory.engine.inputs import InputGenerator
    from qe_factory.workflow.submit import structure_key

    atoms = rattled_si(0)
    key = structure_key(atoms, InputGenerator(fast_config))
    same_physics = fast_config.with_changes(mpi_ranks=2, timeout=9, work_dir="elsewhere", max_retries=1)
    assert structure_key(atoms, InputGenerator(same_physics)) == key
    assert structure_key(atoms, InputGenerator(fast_config.with_changes(degauss=0.03))) != key
    assert structure_key(atoms, InputGenerator(fast_config.with_changes(kpoint_spacing=0.5))) != key
    moved = atoms.copy()
    moved.positions[0, 0] += 1e-4
    assert structure_key(moved, InputGenerator(fast_config)) != key


def test_submit_takes_pymatgen_structures_and_knows_them_again_as_atoms(home, fast_config):
    from pymatgen.io.ase import AseAtomsAdaptor

    from qe_factory.workflow.submit import submit

    launchpad = get_launchpad()
    report = submit([AseAtomsAdaptor.get_structure(rattled_si(11))], fast_config, launchpad=launchpad)
    assert list(report.fw_ids) == ["s-000000"]
    again = submit([rattled_si(11)], fast_config, launchpad=launchpad)
    assert again.duplicates == {"si-11": "s-000000"} and again.fw_ids == {}


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


def test_post_streams_workflows_into_inbox_files_of_bounded_size(home, fast_config):
    """A generator of workflows goes to the inbox in files of at most `per_file`, in order, each the JSON list of
    the workflows in the LaunchPad's form (the workflow's document and its Fireworks')."""
    from qe_factory.workflow.inbox import post, waiting
    from qe_factory.workflow.state import get_jobstore
    from qe_factory.workflow.submit import make_workflows, plan_workflows

    report, planned = plan_workflows([rattled_si(seed) for seed in range(7)], fast_config, get_launchpad(),
                                     get_jobstore())
    paths = post(home, (wf for _, wf in make_workflows(planned, fast_config)), per_file=3)
    assert paths == waiting(home) and len(paths) == 3
    documents = [doc for path in paths for doc in json.loads(path.read_text())]
    assert [len(json.loads(path.read_text())) for path in paths] == [3, 3, 1]
    assert [doc["workflow"]["metadata"]["uid"] for doc in documents] == [f"si-{seed}" for seed in range(7)]
    assert post(home, iter(())) == [] and len(waiting(home)) == 3
