"""The factory home: FireWorks/jobflow configuration, state (embedded LaunchPad file, JobStore), logs, runs, and
the execution settings of the worker processes that use it.

FireWorks and jobflow read their configuration when first imported: `activate()` points them at a home (and makes
them read it again if they were imported already).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from qe_factory.engine.config import ExecutionSettings
from qe_factory.workflow.fireworks_adapter import reload_configuration

if TYPE_CHECKING:
    from jobflow import JobStore

HOME_ENV = "QE_FACTORY_HOME"
# the environment variables that point FireWorks, jobflow and qe_factory at a home: `activate` sets those the home
# needs (config_environment) and removes the others, since an inherited value may name another home's files
HOME_VARIABLES = (HOME_ENV, "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")
CONFIG_TEMPLATES = ("fw_config", "templates")  # the project's top-level folders, rendered into each home


def factory_home(home: str | Path | None = None) -> Path:
    """The factory's working directory: `home`, else $QE_FACTORY_HOME, else ./factory."""
    return Path(home or os.environ.get(HOME_ENV) or "factory").expanduser().resolve()


def config_templates(folder: str) -> Traversable:
    """The templates of one of a home's configuration folders (CONFIG_TEMPLATES). Their one copy is the project's
    top-level folder of that name: a wheel ships it as qe_factory/workflow/data/<folder> (pyproject.toml maps it
    there), and a checkout (an editable install) is read directly."""
    shipped = resources.files("qe_factory.workflow") / "data" / folder
    return shipped if shipped.is_dir() else Path(__file__).resolve().parents[2] / folder


def config_environment(home: Path) -> dict[str, str]:
    """Every environment variable that makes FireWorks, jobflow and qe_factory use this home: its configuration
    files and, for the embedded LaunchPad, its file (FireWorks takes MONGOMOCK_SERVERSTORE_FILE from the environment
    before FW_config.yaml). A variable of HOME_VARIABLES left out must be unset: a MongoDB home has no LaunchPad file.
    """
    environment = {
        HOME_ENV: str(home),
        "FW_CONFIG_FILE": str(home / "fw_config" / "FW_config.yaml"),
        "JOBFLOW_CONFIG_FILE": str(home / "fw_config" / "jobflow.yaml"),
    }
    if (file := embedded_file(home)) is not None:
        environment["MONGOMOCK_SERVERSTORE_FILE"] = str(file)
    return environment


def init_home(home: Path) -> Path:
    """Create the home once: rendered fw_config/ and templates/, logs/, state/ (LaunchPad file, JobStore).

    Existing files are left alone, so a user's edits (e.g. a MongoDB host) survive; the state is created only with
    a new home (a deleted LaunchPad file or JobStore is reported when used, never silently recreated). Commands
    starting together on a new home never see half of one: each file appears whole, and state/ appears with its
    LaunchPad file and JobStore made (see create_state).
    """
    render_configuration(home)
    create_state(home)
    return home


def render_configuration(home: Path) -> None:
    """Render the missing files of the home's fw_config/ and templates/, each written aside and linked into place
    whole (a link never replaces a file: one another command put there first stays)."""
    values = {"QE_FACTORY_HOME": str(home), "QE_FACTORY_BIN": str(Path(sys.executable).parent)}
    for folder in CONFIG_TEMPLATES:
        for template in sorted(config_templates(folder).iterdir(), key=lambda t: t.name):
            target = home / folder / template.name
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            text = template.read_text()
            for name, value in values.items():  # only ours: FireWorks' own $${key} placeholders stay as they are
                text = text.replace("${" + name + "}", value)
            _write_new(target, text)
    (home / "logs").mkdir(parents=True, exist_ok=True)


def create_state(home: Path) -> None:
    """Create state/ if the home has none: the embedded LaunchPad's file and the JobStore are made in a temporary
    folder beside it, renamed into place whole. When several commands create it at once the first rename wins; the
    others discard theirs and use it (montydb races when two processes create a repository in one folder)."""
    state = home / "state"
    if state.exists():
        return
    launchpad_file = embedded_file(home)
    draft = home / f".state-{os.getpid()}-{secrets.token_hex(4)}"
    draft.mkdir()
    try:
        if launchpad_file is not None and launchpad_file.parent == state:
            (draft / launchpad_file.name).write_text("{}")
        elif launchpad_file is not None and not launchpad_file.exists():  # configured outside state/: in place
            launchpad_file.parent.mkdir(parents=True, exist_ok=True)
            _write_new(launchpad_file, "{}")
        create_jobstore(_draft_jobstore(home, draft))
        try:
            os.rename(draft, state)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not state.is_dir():
                raise
    finally:
        shutil.rmtree(draft, ignore_errors=True)


def _draft_jobstore(home: Path, draft: Path) -> JobStore:
    """The home's JobStore (from its jobflow.yaml, as jobflow reads it) with the paths under state/ in `draft`."""
    from jobflow.settings import JobflowSettings

    text = (home / "fw_config" / "jobflow.yaml").read_text()
    config = draft / "jobflow.yaml"
    config.write_text(re.sub(re.escape(str(home / "state")) + r"(?=[/\s'\"]|$)", str(draft), text, flags=re.M))
    try:
        return JobflowSettings(CONFIG_FILE=str(config)).JOB_STORE
    finally:
        config.unlink()


def _write_new(path: Path, text: str) -> None:
    """Write a file that appears whole, unless one is there already (then it is left alone)."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.new")
    aside.write_text(text)
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    finally:
        aside.unlink()


def embedded_file(home: Path) -> Path | None:
    """The embedded LaunchPad's JSON file named in the home's FW_config.yaml, or None when the home is configured
    for MongoDB (whatever the environment says: an inherited MONGOMOCK_SERVERSTORE_FILE may be another home's)."""
    settings = yaml.safe_load((home / "fw_config" / "FW_config.yaml").read_text()) or {}
    path = settings.get("MONGOMOCK_SERVERSTORE_FILE")
    return Path(path) if path else None


def activate(home: str | Path | None = None) -> Path:
    """Create the home if needed and point FireWorks and jobflow at it (also if they were imported already): every
    variable of HOME_VARIABLES is set as config_environment says, or removed."""
    home = factory_home(home)
    render_configuration(home)
    for key in HOME_VARIABLES:
        os.environ.pop(key, None)
    os.environ.update(config_environment(home))
    create_state(home)  # after the environment: jobflow, if imported here first, reads this home's configuration
    reload_configuration()
    return home


def create_jobstore(store: JobStore | None = None) -> None:
    """Create the JobStore's collections (default: the active home's), before any worker starts (montydb races when
    two processes create them)."""
    import jobflow

    store = store if store is not None else jobflow.SETTINGS.JOB_STORE
    store.connect()
    for sub in (store.docs_store, *store.additional_stores.values()):
        sub.update([{"_qe_factory_init": True, sub.key: "_qe_factory_init"}], key=sub.key)
    store.close()


# The run context of the jobs a coordinator or worker runs: where and how pw.x runs. A context variable, set only
# for the duration of a `with executing(...)` block (jobflow calls a job's function with its own arguments only).
_EXECUTION: ContextVar[ExecutionSettings | None] = ContextVar("qe_factory_execution", default=None)


@contextmanager
def executing(settings: ExecutionSettings | None) -> Iterator[None]:
    """Jobs run inside the block run pw.x with `settings` (None: the default, worker_execution's)."""
    token = _EXECUTION.set(settings)
    try:
        yield
    finally:
        _EXECUTION.reset(token)


def worker_execution() -> ExecutionSettings:
    """Where and how the running job's pw.x runs: the settings of the enclosing `executing` block, else
    ExecutionSettings() from this process's QE_FACTORY_<KEY> environment; a relative work_dir is taken inside the
    factory home (default <home>/runs), since FireWorks runs each job in its own launch directory."""
    settings = _EXECUTION.get() or ExecutionSettings()
    work_dir = Path(settings.work_dir) if "work_dir" in settings.model_fields_set else Path("runs")
    if not work_dir.is_absolute():
        work_dir = factory_home() / work_dir
    return settings.model_copy(update={"work_dir": work_dir})
