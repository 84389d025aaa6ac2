"""What the factory needs from FireWorks, jobflow and mongomock-persistence that no public API offers.

Each function names the behaviour of those libraries it relies on, and tests/unit/test_fireworks_adapter.py has
one test per behaviour: an upgrade that changes one breaks a named test rather than the factory. Nothing else in
qe_factory touches these internals.
"""

from __future__ import annotations

import calendar
import datetime
import errno
import functools
import importlib
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qe_factory.engine.outcomes import DiskFullError
from qe_factory.engine.process import process_alive

if TYPE_CHECKING:
    from fireworks import LaunchPad

# LaunchPad methods through which launch_rocket changes a Firework's state
STATE_CHANGING_METHODS = ("checkout_fw", "reserve_fw", "complete_launch")


def reload_configuration() -> None:
    """Make FireWorks and jobflow, if already imported, read their configuration files again.

    Relies on: `fireworks.fw_config` reads FW_CONFIG_FILE / MONGOMOCK_SERVERSTORE_FILE once, at import, and
    `fireworks.core.launchpad` binds `MongoClient` from it at import; `jobflow.SETTINGS` is built once, at import,
    from JOBFLOW_CONFIG_FILE.
    """
    if "fireworks.fw_config" in sys.modules:
        fw_config = importlib.reload(sys.modules["fireworks.fw_config"])
        if "fireworks.core.launchpad" in sys.modules:
            sys.modules["fireworks.core.launchpad"].MongoClient = fw_config.MongoClient
    if "jobflow" in sys.modules:
        import jobflow

        jobflow.SETTINGS = jobflow.settings.JobflowSettings()


@contextmanager
def jobflow_store(store: Any) -> Iterator[None]:
    """Let jobs run in this block read and write `store` (then restore the configured one).

    Relies on: jobflow's JobFiretask uses `jobflow.SETTINGS.JOB_STORE` when its Firework names no store (the
    factory's workflows never do), looked up when the task runs.
    """
    import jobflow

    configured = jobflow.SETTINGS.JOB_STORE
    jobflow.SETTINGS.JOB_STORE = store
    try:
        yield
    finally:
        jobflow.SETTINGS.JOB_STORE = configured


@functools.cache
def named_outcomes_store_class() -> type:
    """A JobStore whose connections, reads and writes raise a full disk or a locked sqlite database as the factory's
    named outcomes (engine.outcomes), so that a job failing on them FIZZLES with its outcome as data.

    Relies on: a JobStore reads through `query` (a generator; query_one, get_output and count build on it or on the
    docs store's count) and writes through `update`, after `connect`.
    """
    from jobflow import JobStore

    from qe_factory.engine.outcomes import named_store_faults

    class NamedOutcomesJobStore(JobStore):
        def connect(self, force_reset: bool = False):
            with named_store_faults():
                return super().connect(force_reset)

        def count(self, criteria: dict | None = None) -> int:
            with named_store_faults():
                return super().count(criteria)

        def query(self, *args, **kwargs):
            with named_store_faults():
                yield from super().query(*args, **kwargs)

        def update(self, *args, **kwargs):
            with named_store_faults():
                return super().update(*args, **kwargs)

    return NamedOutcomesJobStore


def embedded_store(launchpad: LaunchPad) -> Any | None:
    """The file-backed store behind an embedded LaunchPad; None for a MongoDB LaunchPad.

    Relies on: with MONGOMOCK_SERVERSTORE_FILE set, `LaunchPad.connection` is a mongomock MongoClient whose
    `_store` (a mongomock ServerStore patched by mongomock-persistence) has the file's path in `_filename`.
    """
    store = getattr(launchpad.connection, "_store", None)
    return store if getattr(store, "_filename", None) else None


# the fields FireWorks (and state.py) look documents up by, per LaunchPad collection (values never change, or only grow)
INDEXED_FIELDS = {"fireworks": ("fw_id", "launches"), "launches": ("launch_id", "fw_id", "launch_dir"),
                  "workflows": ("nodes",), "offline_runs": ("launch_id",)}
# fields (tuples: looked up together) whose values change in place, that FireWorks looks documents up by: its
# checkout of the next READY Firework (of a stage: state.stage_fworker), the count of those waiting
CHANGING_FIELDS = {"fireworks": (("state", "spec.stage"), ("state",))}


def index_embedded_collections(launchpad: LaunchPad) -> None:
    """Give an embedded LaunchPad's collections look-ups by _id and by their id fields (INDEXED_FIELDS), instead of
    mongomock's reading of every document for every query, update and find-and-modify: the coordinator's cost per
    Firework then no longer grows with the work in progress (benchmarks/README.md, coordinator.py).

    Relies on: every mongomock Collection operation selects its documents through `_iter_documents(filter)`, a
    filter applied to each of `_store.documents` (CollectionStore, keyed by _id, in insertion order).
    """
    for name, fields in INDEXED_FIELDS.items():
        index_collection(getattr(launchpad, name), fields, CHANGING_FIELDS.get(name, ()))


def index_collection(collection: Any, fields: tuple[str, ...], changing: tuple[tuple[str, ...], ...] = ()) -> None:
    """Give one mongomock collection IndexedDocuments on `fields` (and `changing` ones) and a find_one that copies
    only what it returns.

    Relies on: mongomock's `find_one` and `_find_and_modify` (find_one_and_update, FireWorks' checkout of the next
    READY Firework) go through `self.find_one`, looked up on the instance; its Cursor copies every matching
    document (`_get_dataset`, a generator of copies, made into a list) before returning the first.
    """
    texts = DocumentTexts()
    collection._store.document_texts = texts  # write_store reuses the texts of documents that did not change
    collection._iter_documents = IndexedDocuments(collection, fields, changing, texts)
    collection.find_one = functools.partial(find_first, collection, collection.find_one)


def find_first(collection: Any, find_one: Callable, filter: Any = None, *args: Any, **kwargs: Any) -> Any:
    """mongomock's `find_one(filter, projection=, sort=)`, copying only the document it returns (the sort still
    orders every match); any other call goes to mongomock's own `find_one`."""
    from mongomock import helpers

    if args or not isinstance(filter, dict) or set(kwargs) - {"projection", "sort"} or \
            collection.codec_options.tz_aware:
        return find_one(filter, *args, **kwargs)
    spec = helpers.patch_datetime_awareness_in_document(filter)
    return next(collection._get_dataset(spec, kwargs.get("sort"), kwargs.get("projection"), dict), None)


class IndexedDocuments:
    """`_iter_documents` of one mongomock collection: a filter naming one _id, or values of one of `fields` or of
    `changing` fields, is applied to the few documents that can match; any other filter to all of them. What
    FireWorks asks is decided cheaply (`decide`); mongomock's filter decides the rest.

    Relies on: mongomock changes a stored document in place only in `_update` (update_*, replace_*,
    find_one_and_*), and only a document this method yielded; so every document yielded is noted (`touched`), the
    changing indexes read its field again before their next look-up, and its saved text (`texts`) is made again."""

    def __init__(self, collection: Any, fields: tuple[str, ...], changing: tuple[tuple[str, ...], ...] = (),
                 texts: DocumentTexts | None = None):
        self.collection, self.scan = collection, collection._iter_documents
        self.indexes = [FieldIndex(field) for field in fields]
        self.changing = [ChangingFieldIndex(together) for together in changing]
        self.touched: set[Any] = set()  # _ids of documents yielded since the changing indexes last looked
        self.texts = texts

    def __call__(self, filter: Any):
        from mongomock.filtering import filter_applies

        if not isinstance(filter, dict):
            return self.noted(self.scan(filter))
        candidates = self.candidates(filter)
        if candidates is None:
            candidates = self.collection._store._documents.values()

        def selected(doc: dict) -> bool:
            verdict = decide(filter, doc)
            return verdict if verdict is not None else filter_applies(filter, doc)

        return self.noted(doc for doc in list(candidates) if selected(doc))

    def noted(self, documents: Iterator[dict]) -> Iterator[dict]:
        from mongomock.helpers import hashdict

        for doc in documents:  # the caller may change it in place
            key = doc.get("_id")
            key = hashdict(key) if isinstance(key, dict) else key  # as mongomock keys it
            if self.changing:
                self.touched.add(key)
            if self.texts is not None:
                self.texts.changed.add(key)
            yield doc

    def candidates(self, filter: dict) -> list[dict] | None:
        from bson import ObjectId

        documents = self.collection._store._documents
        key = filter.get("_id")
        if isinstance(key, str | int | ObjectId):
            return [documents[key]] if key in documents else []
        for index in self.indexes:
            if (values := index.values_in(filter)) is not None:
                return index.documents(documents, values)
        for index in self.changing:
            if (values := index.values_in(filter)) is not None:
                for each in self.changing:
                    each.refresh(documents, self.touched)
                self.touched = set()
                return index.documents(documents, values)
        return None


MISSING = object()  # a field a document does not have


def decide(filter: dict, doc: dict) -> bool | None:
    """MongoDB's verdict on `doc` for `filter`, decided cheaply (mongomock's filter costs ~1000 times more) where
    the filter is made of what FireWorks asks: equality to a plain value (str, int, ObjectId) or None, `$in`/`$nin`
    plain values, `$ne` a plain value, `$exists`, `$and`/`$or` of these, on fields reached through documents only. None:
    mongomock must decide (another operator, a list on the way or in the field, a number of another type)."""
    verdict: bool | None = True
    for key, condition in sorted(filter.items(), key=lambda item: item[0].startswith("$")):  # fields first
        if key in ("$and", "$or") and isinstance(condition, list) and condition:
            verdicts = [decide(sub, doc) if isinstance(sub, dict) else None for sub in condition]
            found = key == "$or"  # the verdict that settles it: one True for $or, one False for $and
            this = found if found in verdicts else (not found if all(v is not None for v in verdicts) else None)
        else:
            this = None if key.startswith("$") else field_verdict(field_value(doc, key), condition)
        if this is False:
            return False
        verdict = verdict if this is True else None
    return verdict


def field_value(doc: dict, path: str) -> Any:
    """The value at a dotted path, MISSING, or None when something other than a document is met on the way."""
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict):
            return None if node is not MISSING else MISSING
        node = node.get(part, MISSING)
    return node


def field_verdict(node: Any, condition: Any) -> bool | None:
    if isinstance(condition, dict) and set(condition) == {"$exists"} and isinstance(condition["$exists"], bool):
        return None if node is None else (node is not MISSING) == condition["$exists"]
    if node is None or isinstance(node, list | dict):
        return None
    if condition is None:
        return node is MISSING
    if isinstance(condition, dict) and len(condition) == 1:
        (operator, operand), = condition.items()
        if operator == "$in" and isinstance(operand, list) and all(map(is_plain, operand)):
            return equals_one(node, operand)
        unequal = [operand] if operator == "$ne" else operand if operator == "$nin" else None
        if isinstance(unequal, list) and all(map(is_plain, unequal)):
            equal = equals_one(node, unequal)
            return None if equal is None else not equal
        return None
    return equals_one(node, [condition]) if is_plain(condition) else None


def is_plain(value: Any) -> bool:
    from bson import ObjectId

    return isinstance(value, str | int | ObjectId) and not isinstance(value, bool)


def equals_one(node: Any, values: list) -> bool | None:
    """Whether a plain field value (or MISSING) equals one of `values`: None where only the type differs (1 and
    1.0; mongomock decides)."""
    if node is MISSING:
        return False
    if any(type(node) is type(value) and node == value for value in values):
        return True
    return None if any(node == value for value in values) else False


def asked_values(filter: dict, field: str) -> list | None:
    """The values a filter asks a field for (one, or `$in` a list), if they can be looked up (str or int)."""
    value = filter.get(field)
    values = value.get("$in") if isinstance(value, dict) and set(value) == {"$in"} else [value]
    ok = isinstance(values, list) and all(isinstance(v, int | str) and not isinstance(v, bool) for v in values)
    return values if ok else None


def added_since(documents: dict, last: Any) -> list:
    """The _ids after `last` in a collection's documents (insertion order), newest first: every _id if `last` is
    gone."""
    return list(itertools.takewhile(lambda doc_id: doc_id != last, reversed(documents)))


class FieldIndex:
    """value → _ids of the documents holding it in one field (a list field: each of its items). The documents added
    since it last looked (at the end: a new document has a new _id; an update keeps its place) are added to it; a
    value it does not name is looked for in every document (a list field may have grown in place); it is rebuilt
    when it names many deleted documents. What it names is checked on each use (deleted, changed)."""

    def __init__(self, field: str):
        self.field = field
        self.ids: dict[Any, list[Any]] = {}
        self.last: Any = None  # the last document's _id it holds
        self.place: dict[Any, int] = {}  # _id → its place in insertion order

    def values_in(self, filter: dict) -> list | None:
        return asked_values(filter, self.field)

    def documents(self, documents: dict, values: list) -> list[dict]:
        self.add_new(documents)
        found = [self.lookup(documents, v) or self.rescan(documents, v) for v in values]
        unique = {id(doc): doc for docs in found for doc in docs}  # a document once, even if it holds two values
        return sorted(unique.values(), key=lambda doc: self.place.get(doc.get("_id"), 0))  # in mongomock's order

    def add_new(self, documents: dict) -> None:
        """Index the documents after the last one indexed (all of them if that one is gone, or if most of what the
        index names is gone)."""
        if len(self.place) > 2 * len(documents) + 100:
            self.ids, self.last, self.place = {}, None, {}
        new = added_since(documents, self.last)
        if len(new) == len(documents):
            self.ids, self.place = {}, {}
        for doc_id in reversed(new):
            self.place[doc_id] = len(self.place)
            field = documents[doc_id].get(self.field)
            for item in field if isinstance(field, list) else [field]:
                if isinstance(item, int | str):
                    self.ids.setdefault(item, []).append(doc_id)
        if new:
            self.last = new[0]

    def rescan(self, documents: dict, value: Any) -> list[dict]:
        """The documents holding a value the index does not name: a list field may have grown in place."""
        docs = [doc for doc in documents.values() if self.holds(doc.get(self.field), value)]
        self.ids[value] = [doc["_id"] for doc in docs]
        return docs

    def lookup(self, documents: dict, value: Any) -> list[dict]:
        docs = [documents[doc_id] for doc_id in self.ids.get(value, ()) if doc_id in documents]
        return [doc for doc in docs if self.holds(doc.get(self.field), value)]

    @staticmethod
    def holds(field: Any, value: Any) -> bool:
        return value in field if isinstance(field, list) else value == field


class ChangingFieldIndex:
    """values → _ids of the documents holding them in fields whose values change in place (a Firework's state and
    stage; looked up together). `refresh` reads the fields again in the documents added since it last looked and in
    those named `touched` (IndexedDocuments: yielded, so maybe changed). A document where one is not a plain str or
    int (a list, a number of another type, none) is a candidate for every look-up: the filter decides."""

    def __init__(self, fields: tuple[str, ...]):
        self.fields = fields
        self.ids: dict[Any, set[Any]] = {}
        self.value_of: dict[Any, Any] = {}  # _id → the values it is filed under (OTHER: not plain values)
        self.place: dict[Any, int] = {}  # _id → its place in insertion order
        self.last: Any = None

    def values_in(self, filter: dict) -> list[tuple] | None:
        """The value combinations the filter asks these fields for (each: one, or `$in` a list), if it asks all."""
        asked = [asked_values(filter, field) if field in filter else None for field in self.fields]
        return None if None in asked else list(itertools.product(*asked))

    def refresh(self, documents: dict, touched: set[Any]) -> None:
        if len(self.place) > 2 * len(documents) + 100:  # mostly deleted documents: start again
            self.ids, self.value_of, self.place, self.last = {}, {}, {}, None
        new = added_since(documents, self.last)
        if len(new) == len(documents):
            self.ids, self.value_of, self.place = {}, {}, {}
        for doc_id in reversed(new):
            self.place[doc_id] = len(self.place)
        if new:
            self.last = new[0]
        for doc_id in itertools.chain(new, touched):
            self.file(doc_id, documents.get(doc_id))

    def file(self, doc_id: Any, doc: dict | None) -> None:
        if (old := self.value_of.pop(doc_id, None)) is not None:
            self.ids[old].discard(doc_id)
        if doc is not None:
            values = tuple(field_value(doc, field) for field in self.fields)
            self.value_of[doc_id] = values if all(type(v) in (str, int) for v in values) else OTHER
            self.ids.setdefault(self.value_of[doc_id], set()).add(doc_id)

    def documents(self, documents: dict, values: list[tuple]) -> list[dict]:
        ids = {doc_id for value in [*values, OTHER] for doc_id in self.ids.get(value, ())}
        docs = [documents[doc_id] for doc_id in ids if doc_id in documents]
        return sorted(docs, key=lambda doc: self.place.get(doc.get("_id"), 0))  # in mongomock's order


OTHER = object()  # ChangingFieldIndex: filed under no value of its own


class DocumentTexts:
    """The saved (extended-JSON) text of each document of one collection, made again only for a document added,
    replaced or `changed` (yielded by the collection's look-ups) since the last save: a save then costs what changed
    since, not the whole LaunchPad (benchmarks/README.md, coordinator.py)."""

    def __init__(self):
        self.texts: dict[Any, tuple[dict, str]] = {}  # _id → (the document it was made of, its text)
        self.changed: set[Any] = set()

    def text(self, documents: dict) -> str:
        """`[[_id, document], ...]` as mongomock-persistence saves a collection's documents."""
        texts = {}
        for doc_id, doc in documents.items():
            made = self.texts.get(doc_id)
            if made is None or made[0] is not doc or doc_id in self.changed:
                made = (doc, json.dumps([doc_id, doc], default=extended_json))
            texts[doc_id] = made
        self.texts = texts
        self.changed.clear()
        return "[" + ", ".join(text for _, text in texts.values()) + "]"


def stored_form(workflow: Any) -> dict:
    """A new workflow as the LaunchPad will hold it (its root Fireworks READY, its ids not yet assigned): the
    workflow's document (timestamps as ISO text) and its Fireworks' documents, JSON-ready.

    Relies on: FireWorks' `bulk_add_wfs` sets the root Fireworks READY, assigns the ids, then inserts
    `Workflow.to_db_dict()` and each `Firework.to_db_dict()`; a Firework's document is JSON-ready (its `to_dict` is
    recursively serialised), a workflow's holds `created_on`/`updated_on` as datetimes.
    """
    for fw_id in workflow.root_fw_ids:
        workflow.id_fw[fw_id].state = "READY"
        workflow.fw_states[fw_id] = "READY"
    document = workflow.to_db_dict()
    for key in ("created_on", "updated_on"):
        document[key] = document[key].isoformat()
    return {"workflow": document, "fireworks": [fw.to_db_dict() for fw in workflow]}


def add_stored_forms(launchpad: LaunchPad, forms: list[dict]) -> list[list[int]]:
    """Insert workflows given in `stored_form` as FireWorks' `bulk_add_wfs` inserts them (ids from the LaunchPad's
    counter, workflows first so that no Firework is checked out before its workflow exists); each one's Firework
    ids. No Workflow object is rebuilt: the coordinator's intake cost half as much (benchmarks/README.md).

    Relies on: the LaunchPad's `fw_id_assigner` counter `next_fw_id`; a stored workflow names its Fireworks in
    `nodes`, `links` and `parent_links` (str keys) and `fw_states` (str keys); a Firework's own id is `fw_id`.
    """
    total = sum(len(form["fireworks"]) for form in forms)
    next_id = launchpad.fw_id_assigner.find_one_and_update({}, {"$inc": {"next_fw_id": total}})["next_fw_id"]
    workflows, fireworks, ids = [], [], []
    for form in forms:
        new = {fw["fw_id"]: next_id + n for n, fw in enumerate(form["fireworks"])}
        next_id += len(new)
        workflows.append(renumbered_workflow(form["workflow"], new))
        fireworks.extend({**fw, "fw_id": new[fw["fw_id"]]} for fw in form["fireworks"])
        ids.append(list(new.values()))
    if workflows:
        launchpad.workflows.insert_many(workflows)
        launchpad.fireworks.insert_many(fireworks)
    return ids


def renumbered_workflow(document: dict, new: dict[int, int]) -> dict:
    """A stored workflow's document with its Firework ids renumbered (`new`: old → new) and its timestamps back
    to datetimes."""
    def links(mapping: dict) -> dict:
        return {str(new[int(key)]): [new[child] for child in children] for key, children in mapping.items()}

    return {**document, "nodes": [new[node] for node in document["nodes"]], "links": links(document["links"]),
            "parent_links": links(document["parent_links"]),
            "fw_states": {str(new[int(key)]): value for key, value in document["fw_states"].items()},
            "created_on": datetime.datetime.fromisoformat(document["created_on"]),
            "updated_on": datetime.datetime.fromisoformat(document["updated_on"])}


def store_file(store: Any) -> Path:
    """The JSON file an embedded store was loaded from (and that its exit-time write rewrites)."""
    return Path(store._filename)


def stop_exit_write(store: Any) -> None:
    """Keep an embedded store from rewriting its file when the process exits.

    Relies on: mongomock-persistence registers `weakref.finalize(store, store._to_file)`, kept as
    `store._finalizer`, which rewrites the whole file (in place, mode 'w') at garbage collection or exit.
    """
    store._finalizer.detach()


def write_store(store: Any, path: Path | None = None) -> None:
    """Write an embedded store to its file (or `path`) atomically: a temporary file, fsync, rename; the file it
    replaces is kept as `<name>.prev` (the previous good state). On a full disk nothing is left half-written.

    Relies on: mongomock-persistence saves `store.to_dict()`, the whole database as {database: {collection:
    {"name": name, "documents": [[_id, document], ...]}}}, and its loader reads MongoDB extended JSON with
    `bson.json_util.loads` (written here by the standard library's C encoder: 4× faster than `bson.json_util.dumps`,
    the same document; each collection's documents from its DocumentTexts where it has them).
    """
    target = path or store_file(store)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(store_text(store))
            handle.flush()
            os.fsync(handle.fileno())
        replace_keeping_previous(tmp, target)
        remove_leftovers(target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(exc.errno, f"no space left to save {target} (the last saved state is intact; "
                                "free space, then run the command again)") from exc
        raise


def store_text(store: Any) -> str:
    """The JSON text of `store.to_dict()`, each collection's documents from its DocumentTexts where it has them."""

    def collection_text(collection: Any) -> str:
        texts = getattr(collection, "document_texts", None)
        documents = texts.text(collection._documents) if texts else json.dumps(
            list(collection._documents.items()), default=extended_json)  # dumps: the C encoder (dump: Python)
        return f'{{"name": {json.dumps(collection.name)}, "documents": {documents}}}'

    return "{" + ", ".join(
        f"{json.dumps(name)}: {{" + ", ".join(f"{json.dumps(key)}: {collection_text(collection)}"
                                              for key, collection in database._collections.items()) + "}"
        for name, database in store._databases.items()) + "}"


def remove_leftovers(target: Path) -> None:
    """Remove the temporary files (`<name>.tmp<pid>`, `<name>.prev<pid>`) that writers killed mid-save left beside
    `target` (their process is gone)."""
    for path in target.parent.glob(f"{target.name}.*"):
        suffix = path.name[len(target.name) + 1:]
        pid = suffix.removeprefix("tmp").removeprefix("prev")
        if pid != suffix and pid.isdigit() and not process_alive(int(pid)):
            path.unlink(missing_ok=True)


def extended_json(value: Any) -> dict:
    """The extended-JSON form `bson.json_util.dumps` gives the BSON types a FireWorks database holds."""
    from bson import ObjectId

    if isinstance(value, ObjectId):
        return {"$oid": str(value)}
    if isinstance(value, datetime.datetime):
        if value.utcoffset() is not None:
            value = value.replace(tzinfo=None) - value.utcoffset()
        return {"$date": calendar.timegm(value.timetuple()) * 1000 + value.microsecond // 1000}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def replace_keeping_previous(new: Path, target: Path) -> None:
    """Rename `new` over `target`, keeping the replaced file as `<target>.prev`; `target` never disappears, even
    for a moment (the previous state is kept through a hard link)."""
    if target.exists():
        link = target.with_name(f"{target.name}.prev{os.getpid()}")
        link.unlink(missing_ok=True)
        os.link(target, link)
        os.replace(link, target.with_name(f"{target.name}.prev"))
    os.replace(new, target)


def connect_store(store: Any) -> None:
    """Connect a maggma store. A MontyStore whose repository is set up already connects without montydb's
    `set_storage`, which maggma calls on every connect and which rewrites the repository's configuration in place
    (a process reading it meanwhile finds it empty: "ValueError: Empty module name").

    Relies on: maggma's MontyStore.connect = montydb.set_storage(database_path, ...) + MontyClient(database_path),
    keeping the collection in `_coll`; montydb's MontyClient reads the repository's `.monty.storage` and config.
    """
    from maggma.stores import MontyStore

    if isinstance(store, MontyStore) and (Path(store.database_path) / MONTY_STORAGE_FILE).is_file():
        if store._coll is None:
            from montydb import MontyClient

            client = MontyClient(store.database_path, **store.client_kwargs)
            store._coll = client[store.database_name][store.collection_name]
        return
    store.connect()


MONTY_STORAGE_FILE = ".monty.storage"  # montydb: names the storage engine of a repository


def after_state_changes(launchpad: LaunchPad, callback: Callable[[str, Any], None]) -> LaunchPad:
    """Call `callback(method name, its result)` after every state change launch_rocket makes through this client.

    Relies on: `launch_rocket` (via Rocket.run) checks out, reserves and completes Fireworks only through the
    LaunchPad methods in STATE_CHANGING_METHODS, looked up on the instance (so instance attributes wrap them);
    `checkout_fw` returns (Firework or None, launch id).
    """
    for name in STATE_CHANGING_METHODS:
        original = getattr(launchpad, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            result = _original(*args, **kwargs)
            callback(_name, result)
            return result

        setattr(launchpad, name, wrapped)
    return launchpad


def mend_offline_rocket() -> None:
    """Make FireWorks' offline Rocket work with the installed monty.

    Relies on: `fireworks.core.rocket` (FireWorks 2.1.4) opens FW_offline.json with `zopen(path)`, no mode, in
    offline mode; monty's `zopen` now requires the mode (TypeError). The rocket module gets a zopen whose mode
    defaults to text reading, as it did.
    """
    import fireworks.core.rocket as rocket
    from monty.io import zopen

    if getattr(rocket.zopen, "mended", False):
        return

    def zopen_text(filename, mode: str = "rt", **kwargs):
        return zopen(filename, mode, **kwargs)

    zopen_text.mended = True  # type: ignore[attr-defined]
    rocket.zopen = zopen_text


@contextmanager
def without_ping_thread() -> Iterator[None]:
    """Run rockets in this process without FireWorks' heartbeat thread (the coordinator's quick stages: a fraction
    of a second each; the coordinator's lock, not pings, tells a dead coordinator on an embedded home; offline runs:
    the coordinator tells a lost one by its worker or owner, and the thread's last ping, after the rocket has left
    the launch directory, wrote FW_ping.json into the worker's own directory).

    Relies on: `Rocket.run` starts its heartbeat with `fireworks.core.rocket.start_ping_launch(lp, launch_id)`,
    looked up in that module when it runs, stops it with `stop_backgrounds(ping_stop, ...)`, which accepts None, and
    pings once more itself at the end. The thread's own last ping runs beside the rocket's last ping and
    `complete_launch` on the same (mongomock) client, or after the coordinator archived the workflow, and then
    finds no launch: "No Launch exists with launch_id=N", a traceback on stderr from the thread.
    """
    import fireworks.core.rocket as rocket

    original = rocket.start_ping_launch
    rocket.start_ping_launch = lambda launchpad, launch_id: None
    try:
        yield
    finally:
        rocket.start_ping_launch = original
