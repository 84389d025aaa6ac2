"""The factory home: FireWorks/jobflow configuration, state (embedded LaunchPad file, JobStore), logs, runs, and
the execution settings of the worker processes that use it.

FireWorks and jobflow read their configuration when first imported: `activate()` points them at a home (and makes
them read it again if they were imported already).
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

import yaml

from qe_factory.engine.config import ExecutionSettings
from qe_factory.workflow.fireworks_adapter import reload_configuration

HOME_ENV = "QE_FACTORY_HOME"
CONFIG_TEMPLATES = ("fw_config", "templates")  # package data under qe_factory/workflow/data/, one folder each


def factory_home(home: str | Path | None = None) -> Path:
    """The factory's working directory: `home`, else $QE_FACTORY_HOME, else ./factory."""
    return Path(home or os.environ.get(HOME_ENV) or "factory").expanduser().resolve()


def config_environment(home: Path) -> dict[str, str]:
    """Environment variables that make FireWorks, jobflow and qe_factory use this home."""
    return {
        HOME_ENV: str(home),
        "FW_CONFIG_FILE": str(home / "fw_config" / "FW_config.yaml"),
        "JOBFLOW_CONFIG_FILE": str(home / "fw_config" / "jobflow.yaml"),
    }


def init_home(home: Path) -> Path:
    """Create the home once: rendered fw_config/ and templates/, state/ (LaunchPad file, JobStore), logs/.

    Existing files are left alone, so a user's edits (e.g. a MongoDB host) survive; the state is created only with
    a new home (a deleted LaunchPad file or JobStore is reported when used, never silently recreated).
    """
    new_state = not (home / "state").exists()
    values = {"QE_FACTORY_HOME": str(home), "QE_FACTORY_BIN": str(Path(sys.executable).parent)}
    for folder in CONFIG_TEMPLATES:
        source = resources.files("qe_factory.workflow") / "data" / folder
        for template in sorted(source.iterdir(), key=lambda t: t.name):
            target = home / folder / template.name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                text = template.read_text()
                for name, value in values.items():  # only ours: FireWorks' own $${key} placeholders stay as they are
                    text = text.replace("${" + name + "}", value)
                target.write_text(text)
    (home / "logs").mkdir(exist_ok=True)
    (home / "state").mkdir(exist_ok=True)
    launchpad_file = embedded_file(home)
    if new_state and launchpad_file is not None and not launchpad_file.exists():
        launchpad_file.parent.mkdir(parents=True, exist_ok=True)
        launchpad_file.write_text("{}")
    return home


def embedded_file(home: Path) -> Path | None:
    """The embedded LaunchPad's JSON file, or None when the home is configured for MongoDB."""
    settings = yaml.safe_load((home / "fw_config" / "FW_config.yaml").read_text()) or {}
    path = os.environ.get("MONGOMOCK_SERVERSTORE_FILE") or settings.get("MONGOMOCK_SERVERSTORE_FILE")
    return Path(path) if path else None


def activate(home: str | Path | None = None) -> Path:
    """Create the home if needed and point FireWorks and jobflow at it (also if they were imported already)."""
    home = factory_home(home)
    new_store = not (home / "state").exists()
    init_home(home)
    os.environ.update(config_environment(home))
    reload_configuration()
    if new_store:
        create_jobstore()
    return home


def create_jobstore() -> None:
    """Create the JobStore's collections once, with the home, before any worker starts (montydb races when two
    processes create them)."""
    import jobflow

    store = jobflow.SETTINGS.JOB_STORE
    store.connect()
    for sub in (store.docs_store, *store.additional_stores.values()):
        sub.update([{"_qe_factory_init": True, sub.key: "_qe_factory_init"}], key=sub.key)
    store.close()


_worker_execution: ExecutionSettings | None = None


def use_execution(settings: ExecutionSettings | None) -> None:
    """Set the execution settings this process's jobs run pw.x with (None: back to the default)."""
    global _worker_execution
    _worker_execution = settings


def worker_execution() -> ExecutionSettings:
    """Where and how this worker process runs pw.x: the settings given with `use_execution`, else
    ExecutionSettings() from its QE_FACTORY_<KEY> environment; a relative work_dir is taken inside the factory
    home (default <home>/runs), since FireWorks runs each job in its own launch directory."""
    settings = _worker_execution or ExecutionSettings()
    work_dir = Path(settings.work_dir) if "work_dir" in settings.model_fields_set else Path("runs")
    if not work_dir.is_absolute():
        work_dir = factory_home() / work_dir
    return settings.model_copy(update={"work_dir": work_dir})
