"""The job outputs a coordinator wrote lately, kept in memory in front of the embedded JobStore.

The embedded JobStore (montydb on sqlite) has no index: each query reads every document, so resolving a job's
references (the SCF reads its inputs job's output, the validation the SCF's) grew with every structure the home
ever labelled. The coordinator is the embedded home's one writer (lock.py) and a job reads the outputs of its own
workflow's earlier jobs, written moments before by the same coordinator: `RecentOutputs` answers those reads from
what it saw written, and passes every other call to the store. It never answers from memory for a job whose output
it has not seen from its first index on (jobflow numbers a job's outputs 1, 2, … as detours replace it), so an
answer is never missing a document the store holds. Writes skip maggma's look-up of the document being replaced
(another read of every document): a job's output is stored under its own id, `<uuid>:<index>`. The jobs it has not
seen (written before this process started: a coordinator taking over a workflow half done) are read by those ids,
sqlite's primary key, instead of montydb's query, which loads every row of the table at once (170 MB and 20 s at
100,000 structures labelled, for each reference resolved). Not for MongoDB: other coordinators write there too
(and it has indexes). Figures: benchmarks/README.md, "coordinator.py".
"""

from __future__ import annotations

import contextlib
import copy
import sqlite3
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CAPACITY = 4096  # jobs (a structure has three); the work in progress is a few hundred structures at most
INDEX_DIGITS = 10  # a job's outputs read by id (stored_jobs): indexes of up to this many digits


class RecentOutputs:
    """A maggma docs store (keyed by uuid and index) with the outputs written through it kept for reading back."""

    def __init__(self, store: Any, capacity: int = CAPACITY):
        self.store, self.capacity = store, capacity
        self.jobs: OrderedDict[str, dict[int, dict]] = OrderedDict()  # uuid → index → document
        self.by_id: bool | None = None  # whether job outputs are inserted by their own id (inserts)
        self.labels: dict[str, dict] | None = None  # calculation key and uid → a label's metadata (labels_with)
        self.e0s: dict[str, Any] = {}  # reference uid → its E0, once found (state.stored_e0s)

    def __getattr__(self, name: str) -> Any:  # everything else: the store's own
        return getattr(self.store, name)

    def update(self, docs: list[dict] | dict, key: list[str] | str | None = None, **kwargs) -> None:
        docs = [docs] if isinstance(docs, dict) else list(docs)
        if key == ["uuid", "index"] and self.inserts():
            for doc in docs:
                self.insert(doc)
        else:
            self.store.update(docs, key=key, **kwargs)
        for doc in docs:
            self.remember_label(doc)
            if isinstance(doc.get("uuid"), str) and isinstance(doc.get("index"), int):
                self.jobs.setdefault(doc["uuid"], {})[doc["index"]] = copy.deepcopy(doc)
                self.jobs.move_to_end(doc["uuid"])
        while len(self.jobs) > self.capacity:
            self.jobs.popitem(last=False)

    def read(self) -> None:
        """Read every document once (montydb reads them all for any query): the labels (labels_with), and whether
        job outputs can be written by their own id (inserts)."""
        self.labels, others = {}, False
        for doc in self.every_document():
            self.remember_label(doc)
            others = others or ("index" in doc and not isinstance(doc.get("_id"), str))
        self.by_id = type(self.store).__name__ == "MontyStore" and not others

    def every_document(self) -> Iterator[dict]:
        """The store's documents one at a time (montydb's own query holds all of them in memory first: a GB at
        100,000 structures)."""
        path = self.sqlite_file()
        if path is None:
            yield from self.store.query({}, properties=["_id", "uuid", "index", "metadata"])
            return
        import bson

        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as connection:
            for (value,) in connection.execute("SELECT v FROM documents"):
                yield bson.decode(value)

    def sqlite_file(self) -> Path | None:
        """The sqlite file of a MontyStore on sqlite; None for any other store.

        Relies on: a MontyStore on sqlite keeps a collection in
        `<database_path>/<database_name>/<collection>.collection`, table `documents`, each document BSON in `v`."""
        path = Path(getattr(self.store, "database_path", "")) / str(getattr(self.store, "database_name", "")) / (
            f"{getattr(self.store, 'collection_name', '')}.collection")
        if type(self.store).__name__ != "MontyStore" or getattr(self.store, "storage", "") != "sqlite" or (
                not path.is_file()):
            return None
        return path

    def stored_jobs(self, uuids: list[str]) -> dict[str, dict[int, dict]] | None:
        """uuid → index → document of every output of these jobs in the store, read by their own ids
        (`<uuid>:<index>`, which every job document has when `inserts`) through sqlite's primary key: a few rows
        read, not every one. None when the store is not such a store (the store's own query must answer).

        Relies on: montydb's sqlite table `documents` has the primary key `k`, a document's `_id` as
        `montydb.types.bson.id_encode(_id)` (set up once the store is connected), and the document in `v` as
        `bson.document_encode(doc)`."""
        path = self.sqlite_file()
        if path is None or not self.inserts():
            return None
        from montydb.types import bson as monty_bson

        ranges = " OR ".join(["k BETWEEN ? AND ?"] * INDEX_DIGITS)
        found: dict[str, dict[int, dict]] = {}
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as connection:
            for uuid in uuids:
                # the ids of indexes of one number of digits are one range of keys ('0'…'9' sort as the numbers)
                bounds = [monty_bson.id_encode(f"{uuid}:{digit * digits}") for digits in range(1, INDEX_DIGITS + 1)
                          for digit in "09"]
                found[uuid] = {}
                for (value,) in connection.execute(f"SELECT v FROM documents WHERE {ranges}", bounds):
                    doc = monty_bson.document_decode(value)
                    if doc.get("uuid") == uuid and isinstance(doc.get("index"), int):
                        found[uuid][doc["index"]] = doc
        return found

    def labels_with(self, keys, uids) -> list[dict]:
        """Metadata of the labels (validations' outputs) with one of these calculation keys or uids: from the one
        read of the store, kept up to date by the writes."""
        if self.labels is None:
            self.read()
        found = {id(meta): meta for value in (*keys, *uids) if (meta := self.labels.get(value)) is not None}
        return list(found.values())

    def remember_label(self, doc: dict) -> None:
        meta = doc.get("metadata") or {}
        if self.labels is not None and meta.get("stage") == "validate":
            label = {"uid": meta.get("uid"), "qe_factory_key": meta.get("qe_factory_key")}  # what callers read
            for value in label.values():
                if value:
                    self.labels[value] = label
            if isinstance(doc.get("uuid"), str):  # its job: the label read by id (state.stored_e0s)
                label["uuid"] = doc["uuid"]

    def inserts(self) -> bool:
        """Whether a job's output can be written by its own id, `<uuid>:<index>` (one sqlite insert; maggma's
        update first looks for the document by reading them all): a montydb store none of whose job documents has
        another id (a home written before this kept ObjectIds: there the store's update is used)."""
        if self.by_id is None:
            self.read()
        return bool(self.by_id)

    def insert(self, doc: dict) -> None:
        """Relies on: maggma's MontyStore keeps its montydb collection as `_collection`, and stores what its update
        would (the document made JSON-safe by monty's jsanitize)."""
        from monty.json import jsanitize
        from montydb.errors import DuplicateKeyError

        doc = {**jsanitize(doc, allow_bson=True), "_id": f"{doc['uuid']}:{doc['index']}"}
        try:
            self.store._collection.insert_one(doc)
        except DuplicateKeyError:  # the job ran again (a rerun): its new output replaces the old one
            self.store._collection.replace_one({"_id": doc["_id"]}, doc)

    def query(self, criteria: dict | None = None, properties: dict | list | None = None,
              sort: dict | None = None, skip: int = 0, limit: int = 0, **kwargs):
        docs = None if kwargs else self.answer(criteria or {}, sort)
        if docs is None:
            yield from self.store.query(criteria=criteria, properties=properties, sort=sort, skip=skip,
                                        limit=limit, **kwargs)
            return
        docs = docs[skip:skip + limit] if limit else docs[skip:]
        fields = list(properties) if isinstance(properties, list | tuple) else None
        for doc in docs:
            yield copy.deepcopy({k: v for k, v in doc.items() if k in fields} if fields else doc)

    def answer(self, criteria: dict, sort: dict | None) -> list[dict] | None:
        """The documents matching {"uuid": u or {"$in": [...]}[, "index": i]} sorted by index (or as stored): of
        the jobs seen from their first output on, from memory; of the others, read by their ids (stored_jobs).
        None when that cannot be done (the store answers)."""
        if not set(criteria) <= {"uuid", "index"} or (sort and set(sort) != {"index"}):
            return None
        uuid, index = criteria.get("uuid"), criteria.get("index")
        uuids = [uuid] if isinstance(uuid, str) else (uuid or {}).get("$in") if isinstance(uuid, dict) else None
        if not uuids or (isinstance(uuid, dict) and set(uuid) != {"$in"}) or not isinstance(index, int | None) or (
                not all(isinstance(u, str) for u in uuids)):
            return None
        outputs = {u: self.jobs.get(u) for u in uuids}
        unseen = [u for u, seen in outputs.items() if not seen or set(seen) != set(range(1, max(seen) + 1))]
        if unseen:
            stored = self.stored_jobs(unseen)
            if stored is None:
                return None
            outputs.update(stored)
        docs = [doc for u in uuids for i, doc in sorted(outputs[u].items()) if index is None or i == index]
        if sort:
            docs.sort(key=lambda doc: doc["index"], reverse=sort["index"] == -1)
        return docs
