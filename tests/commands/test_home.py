"""The factory home itself: rendered from the project's top-level fw_config/ and templates/, `--home` winning over
whatever factory environment a process inherits, and created once when several commands start on a new home at
the same time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ase.io import write
from structures import rattled_si

from qe_factory.workflow.home import CONFIG_TEMPLATES, activate, config_environment, embedded_file, init_home

REPO = Path(__file__).resolve().parents[2]
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")
FAST = "kpoint_spacing: 0.8\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\n"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}


def command(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "qe_factory.cli", "--home", str(home), *args]


def qef(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(home, *args), capture_output=True, text=True, env=env or clean_env(),
                          cwd=home.parent, timeout=300)


def workflows(home: Path) -> dict[str, str]:
    """uid → workflow state in the home's embedded LaunchPad (its file: mongomock-persistence's JSON)."""
    database = json.loads((home / "state" / "launchpad.json").read_text()).get("qe_factory", {})
    return {doc["metadata"]["uid"]: doc["state"] for _, doc in database.get("workflows", {}).get("documents", [])}


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path]:
    """Two one-structure files (si-1, si-2) and a quick configuration."""
    write(tmp_path / "si1.extxyz", rattled_si(1))
    write(tmp_path / "si2.extxyz", rattled_si(2))
    (tmp_path / "fast.yaml").write_text(FAST)
    return tmp_path / "si1.extxyz", tmp_path / "fast.yaml"


def test_a_home_is_rendered_from_the_top_level_templates(home):
    """fw_config/ and templates/ at the project's top level are the one copy (the package ships them from there:
    pyproject.toml); a home holds each file with its absolute paths filled in."""
    assert not (REPO / "qe_factory" / "workflow" / "data").exists()  # no second copy in the package's folder
    values = {"${QE_FACTORY_HOME}": str(home), "${QE_FACTORY_BIN}": str(Path(sys.executable).parent)}
    for folder in CONFIG_TEMPLATES:
        templates = sorted((REPO / folder).iterdir())
        assert templates and sorted(p.name for p in (home / folder).iterdir()) == [t.name for t in templates]
        for template in templates:
            text = template.read_text()
            for placeholder, value in values.items():
                text = text.replace(placeholder, value)
            assert (home / folder / template.name).read_text() == text, template.name
    assert "${QE_FACTORY" in (REPO / "fw_config" / "my_qadapter.yaml").read_text()  # the templates stay templates


def test_an_existing_homes_edits_survive(home):
    settings = home / "fw_config" / "my_qadapter.yaml"
    settings.write_text(settings.read_text().replace("queue: null", "queue: debug"))
    (home / "templates" / "SLURM_template.txt").unlink()
    assert activate(home) == home
    assert "queue: debug" in settings.read_text()  # the user's edit stays ...
    assert (home / "templates" / "SLURM_template.txt").is_file()  # ... and a deleted template comes back


def test_home_wins_over_an_inherited_factory_environment(home, inputs, tmp_path, monkeypatch):
    """A process that activated home A, with A's LaunchPad file in MONGOMOCK_SERVERSTORE_FILE (exported by FireWorks,
    or by the user), starts `qe-factory --home B`: B's command uses B's configuration and LaunchPad, never A's."""
    structure, config = inputs
    a, b = home, tmp_path / "b"
    monkeypatch.setenv("MONGOMOCK_SERVERSTORE_FILE", str(a / "state" / "launchpad.json"))
    inherited = dict(os.environ)
    assert inherited["QE_FACTORY_HOME"] == str(a)
    assert embedded_file(a) == a / "state" / "launchpad.json"
    submitted = qef(b, "submit", str(structure), "--no-e0s", "-c", str(config), env=inherited)
    assert submitted.returncode == 0 and "1 added" in submitted.stdout, submitted.stdout + submitted.stderr
    status = qef(b, "status", env=inherited)
    assert status.returncode == 0 and f"LaunchPad: {b / 'state' / 'launchpad.json'}" in status.stdout, status.stdout
    assert embedded_file(b) == b / "state" / "launchpad.json"  # the home's own file, whatever the environment says
    assert config_environment(b)["MONGOMOCK_SERVERSTORE_FILE"] == str(b / "state" / "launchpad.json")
    assert workflows(b) == {"si-1": "READY"} and workflows(a) == {}


def test_a_mongodb_home_unsets_an_inherited_launchpad_file(home, tmp_path):
    """A MongoDB home (no MONGOMOCK_SERVERSTORE_FILE in its FW_config.yaml) activated after an embedded one: the
    embedded file's variable is removed, so FireWorks connects to MongoDB (no server needed to see that)."""
    import fireworks.fw_config

    mongo = init_home(tmp_path / "mongo")
    settings = mongo / "fw_config" / "FW_config.yaml"
    settings.write_text("\n".join(line for line in settings.read_text().splitlines()
                                  if not line.startswith("MONGOMOCK_SERVERSTORE_FILE")))
    assert os.environ["MONGOMOCK_SERVERSTORE_FILE"] == str(home / "state" / "launchpad.json")
    assert embedded_file(mongo) is None and "MONGOMOCK_SERVERSTORE_FILE" not in config_environment(mongo)
    activate(mongo)
    assert "MONGOMOCK_SERVERSTORE_FILE" not in os.environ
    assert fireworks.fw_config.MONGOMOCK_SERVERSTORE_FILE is None
    assert os.environ["FW_CONFIG_FILE"] == str(settings)
    activate(home)  # and back: the embedded home's file again
    file = fireworks.fw_config.MONGOMOCK_SERVERSTORE_FILE
    assert file == str(home / "state" / "launchpad.json") == os.environ["MONGOMOCK_SERVERSTORE_FILE"]


ROUNDS = 3  # before the fix: 4 runs of this test failed in their first round
# a command that loads the slow libraries first, says so, and starts when the file argv[1] appears: the commands of
# a round then reach the home within a few milliseconds of each other, not a second apart as their imports would
STARTS_WHEN_TOLD = ("import os, sys, time, ase.io, fireworks, jobflow, maggma.stores, montydb\n"
                    "import qe_factory.workflow.home\n"
                    "from qe_factory.cli import main\n"
                    "print('ready', flush=True)\n"
                    "while not os.path.exists(sys.argv[1]):\n"
                    "    time.sleep(0.001)\n"
                    "sys.exit(main(sys.argv[2:]))")


def test_commands_started_together_on_a_new_home_create_it_once(inputs, tmp_path):
    """Several commands starting at once on a home that does not exist yet: each either creates the whole home or
    uses the one another created; none sees a half-made one (montydb's configuration being written: "Empty module
    name"; a JobStore not created yet: "is missing ... repair")."""
    structure, config = inputs
    for round in range(ROUNDS):
        home = tmp_path / f"home{round}"
        go = tmp_path / "go"
        procs = [subprocess.Popen([sys.executable, "-c", STARTS_WHEN_TOLD, str(go), "--home", str(home), *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
                                  cwd=tmp_path)
                 # two submits: the one that finds the other coordinating posts to its inbox (was: exit 3)
                 for args in (["init"], ["submit", str(structure), "--no-e0s", "-c", str(config)],
                              ["submit", str(tmp_path / "si2.extxyz"), "--no-e0s", "-c", str(config)], ["status"])]
        assert [proc.stdout.readline() for proc in procs] == ["ready\n"] * len(procs)
        go.touch()
        outcomes = [(*proc.communicate(timeout=300), proc.returncode) for proc in procs]
        go.unlink()
        assert all(code == 0 for _, _, code in outcomes), (round, outcomes)
        folders = (home, home / "state", home / "fw_config", home / "templates")
        assert not [path for folder in folders for path in folder.iterdir() if path.name.startswith(".")], round
        status = qef(home, "status")
        assert status.returncode == 0 and "structures seen: 2:" in status.stdout, (round, status.stdout)
        assert "2 waiting" in status.stdout, (round, status.stdout)  # in the LaunchPad, or in its inbox
    assert sorted(path.name for path in tmp_path.iterdir()) == [  # nothing left beside the homes
        "fast.yaml", *(f"home{round}" for round in range(ROUNDS)), "si1.extxyz", "si2.extxyz"]
