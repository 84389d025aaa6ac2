"""The home's inbox: submissions wait here as files of workflows until the coordinator takes them into the LaunchPad
(which holds only the work in progress). Any process may post; only the coordinator takes in.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from qe_factory.workflow import state

if TYPE_CHECKING:
    from fireworks import LaunchPad, Workflow

POST_FILE_SIZE = 20  # workflows per inbox file: the coordinator takes in (and saves) one file at a time
# Unfinished workflows the embedded LaunchPad holds before the coordinator takes in more (plus one inbox file): its
# file-backed store scans every document on each query, so it holds the work in progress, not the whole backlog.
LAUNCHPAD_WORKFLOWS = 20


def inbox_folder(home: Path) -> Path:
    return home / "inbox"


def post(home: Path, workflows: Iterable[Workflow], per_file: int = POST_FILE_SIZE) -> list[Path]:
    """Leave workflows in the home's inbox for its coordinator to add, `per_file` to a file, in order; each file
    appears whole (atomically). Each workflow is serialised and written as it comes: given a generator, a bulk
    submission never holds them all. If writing fails, the files this call already posted are taken back (unless
    taken in meanwhile)."""
    folder = inbox_folder(home)
    folder.mkdir(exist_ok=True)
    remaining, paths = iter(workflows), []
    try:
        while path := _post_file(folder, itertools.islice(remaining, per_file)):
            paths.append(path)
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise
    return paths


def _post_file(folder: Path, workflows: Iterable[Workflow]) -> Path | None:
    """One inbox file: the JSON list of the workflows in the form the LaunchPad stores them (`stored_form`),
    written beside and renamed into place; None (no file) when there are no workflows."""
    from monty.json import MontyEncoder

    from qe_factory.workflow.fireworks_adapter import stored_form

    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns():020d}.json"
    tmp, count = folder / f".{name}.tmp", 0
    try:
        with open(tmp, "w") as handle:
            for count, workflow in enumerate(workflows, 1):
                handle.write(("[" if count == 1 else ", ") + json.dumps(stored_form(workflow), cls=MontyEncoder))
            handle.write("]")
            handle.flush()
            os.fsync(handle.fileno())
        if count:
            os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    return folder / name if count else None


def waiting(home: Path) -> list[Path]:
    """Submissions in the inbox, oldest first."""
    folder = inbox_folder(home)
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


class Intake(NamedTuple):
    """What one inbox file brought: uid → Firework ids of each workflow added, and how many were already known."""

    file: str
    added: dict[str, list[int]]
    skipped: int

    def line(self) -> str:
        return f"took in {self.file}: {len(self.added)} workflow(s) added" + (
            f", {self.skipped} already here or labelled" if self.skipped else "")


def take_in(home: Path, launchpad: LaunchPad, save, store=None, capacity: int | None = None) -> list[Intake]:
    """Add the inbox's workflows to the LaunchPad, oldest file first, while it holds fewer than `capacity`
    unfinished workflows (None: all); skip a uid or calculation already in the LaunchPad or labelled in `store` (a
    JobStore). The files taken in are saved in (once), then deleted. Only the coordinator calls this."""
    from qe_factory.workflow.fireworks_adapter import add_stored_forms

    def full() -> bool:
        return capacity is not None and state.unfinished_count(launchpad) >= capacity

    intakes = []
    for path in [] if full() else waiting(home):  # the inbox is listed only when there is room (100,000 structures
        if intakes and full():  # wait there in 5,000 files)
            break
        forms = [stored(document) for document in json.loads(path.read_text())]
        metadata = [form["workflow"]["metadata"] for form in forms]
        keys, uids = [m.get("qe_factory_key") for m in metadata], [m.get("uid") for m in metadata]
        known = state.workflows_with(launchpad, keys, uids) + state.labels_with(store, keys, uids)
        taken = {value for meta in known for value in (meta.get("qe_factory_key"), meta.get("uid"))}
        new = [form for form, key, uid in zip(forms, keys, uids, strict=True) if not {key, uid} & taken]
        ids = add_stored_forms(launchpad, new)
        intakes.append(Intake(path.name, {form["workflow"]["metadata"]["uid"]: sorted(fw_ids)
                                          for form, fw_ids in zip(new, ids, strict=True)}, len(forms) - len(new)))
    if intakes:
        save(launchpad)
        for intake in intakes:
            (inbox_folder(home) / intake.file).unlink()
    return intakes


def stored(document: dict) -> dict:
    """An inbox entry in the form the LaunchPad stores (`stored_form`); files posted before that form was the
    inbox's hold `Workflow.to_dict()` documents."""
    from fireworks import Workflow

    from qe_factory.workflow.fireworks_adapter import stored_form

    return stored_form(Workflow.from_dict(document)) if "fws" in document else document
