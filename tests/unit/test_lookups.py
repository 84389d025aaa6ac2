"""The embedded home's fast look-ups: the LaunchPad's indexed collections (fireworks_adapter.IndexedDocuments) answer
exactly as mongomock's full scans do, and the JobStore's recent outputs (recent_outputs.RecentOutputs) answer only
what they know whole."""

from __future__ import annotations

import json
import random

import mongomock
from maggma.stores import MontyStore

from qe_factory.workflow.fireworks_adapter import IndexedDocuments
from qe_factory.workflow.recent_outputs import RecentOutputs


def test_indexed_lookups_answer_as_full_scans_do_through_inserts_updates_and_deletes():
    client = mongomock.MongoClient()
    plain, indexed = client.db.plain, client.db.indexed
    indexed._iter_documents = IndexedDocuments(indexed, ("fw_id",))
    rng = random.Random(7)
    for step in range(400):
        fw_id = rng.randrange(60)
        op = rng.choice(["insert", "update", "delete", "replace", "find"])
        for collection in (plain, indexed):
            if op == "insert":
                collection.insert_one({"fw_id": fw_id, "nodes": [fw_id, fw_id + 1], "state": "READY", "n": step})
            elif op == "update":
                collection.update_one({"fw_id": fw_id, "state": "READY"}, {"$set": {"state": "RUNNING"}})
            elif op == "delete":
                collection.delete_one({"fw_id": fw_id})
            elif op == "replace":
                collection.find_one_and_replace({"fw_id": fw_id}, {"fw_id": fw_id, "state": "COMPLETED", "n": step})
        found = [[{k: v for k, v in doc.items() if k != "_id"} for doc in c.find({"fw_id": fw_id})]
                 for c in (plain, indexed)]
        assert found[0] == found[1], (step, op, fw_id)
        assert plain.count_documents({"fw_id": fw_id, "state": "READY"}) == indexed.count_documents(
            {"fw_id": fw_id, "state": "READY"})
    any_doc = indexed.find_one({})
    assert indexed.find_one({"_id": any_doc["_id"]}) == any_doc  # by _id: the store's own key



def test_lookups_by_a_field_changed_in_place_answer_as_full_scans_do():
    """A Firework's state (and stage) change in place (update_*, find_one_and_*, replace_*): the indexes on them
    read them again wherever mongomock may have changed them, so every look-up by state, or state and stage
    (FireWorks' checkout of the next READY Firework of a stage, sorted), finds what mongomock's full scan finds,
    through inserts, updates, upserts and deletes, with values no index can file (lists, None, floats, booleans,
    missing). The text a save writes of them, made again only for the documents that changed, stays the whole one's."""
    from qe_factory.workflow.fireworks_adapter import extended_json, index_collection

    client = mongomock.MongoClient()
    plain, indexed = client.db.plain, client.db.indexed
    index_collection(indexed, ("fw_id",), (("state", "spec.stage"), ("state",)))
    rng = random.Random(3)
    states = ["READY", "RESERVED", "WAITING", 1, 1.0, True, None, ["READY"]]
    specs = [{"stage": "scf"}, {"stage": "quick"}, {}, {"stage": 1.0}, {"stage": ["scf"]}, {"stage": {"x": 1}}]
    for step in range(600):
        fw_id, state, new, stage = rng.randrange(50), rng.choice(states[:3]), rng.choice(states), rng.choice(states)
        op = rng.choice(["insert", "insert_many", "update_one", "update_many", "checkout", "replace", "upsert",
                         "delete", "delete_many", "unset"])
        for collection in (plain, indexed):
            doc = {"fw_id": fw_id, "n": step, "spec": specs[step % len(specs)],
                   **({} if new is None and step % 2 else {"state": new})}
            if op == "insert":
                collection.insert_one(dict(doc))
            elif op == "insert_many":
                collection.insert_many([dict(doc), {**doc, "fw_id": fw_id + 1}])
            elif op == "update_one":
                collection.update_one({"fw_id": fw_id}, {"$set": {"state": new, "spec.stage": stage}})
            elif op == "update_many":
                collection.update_many({"state": state}, {"$set": {"state": new}})
            elif op == "checkout":
                collection.find_one_and_update({"state": state}, {"$set": {"state": "RESERVED"}},
                                               sort=[("fw_id", -1), ("n", 1)])
            elif op == "replace":
                collection.find_one_and_replace({"fw_id": fw_id}, dict(doc))
            elif op == "upsert":
                collection.update_one({"fw_id": fw_id + 100}, {"$set": {"state": new}}, upsert=True)
            elif op == "delete":
                collection.delete_one({"state": state})
            elif op == "delete_many":
                collection.delete_many({"fw_id": fw_id})
            else:
                collection.update_many({"fw_id": {"$in": [fw_id, fw_id + 1]}}, {"$unset": {"state": ""}})
        for query in ({"state": state}, {"state": {"$in": [state, "WAITING"]}}, {"state": 1},
                      {"state": "READY", "fw_id": {"$ne": 3}}, {"state": state, "spec.stage": "scf"},
                      {"state": "READY", "spec.stage": {"$in": ["scf", "quick"]}}, {"state": state, "spec.stage": 1}):
            found = [[(d["fw_id"], d.get("n")) for d in c.find(query, sort=[("n", -1)])] for c in (plain, indexed)]
            assert found[0] == found[1], (step, op, query)
        documents = indexed._store._documents  # the saved text, made again only for what changed, is the whole one's
        saved = json.dumps(list(documents.items()), default=extended_json)
        assert indexed._store.document_texts.text(documents) == saved, (step, op)


def test_indexed_lookups_of_list_fields_find_every_document_holding_the_value():
    client = mongomock.MongoClient()
    workflows = client.db.workflows
    workflows._iter_documents = IndexedDocuments(workflows, ("nodes",))
    workflows.insert_many([{"nodes": [1, 2, 3]}, {"nodes": [4, 5]}])
    assert workflows.find_one({"nodes": 5})["nodes"] == [4, 5]
    workflows.insert_one({"nodes": [6]})  # after the index was built
    assert workflows.find_one({"nodes": 6})["nodes"] == [6] and workflows.find_one({"nodes": 7}) is None


def monty(tmp_path) -> MontyStore:
    store = MontyStore("outputs", database_path=str(tmp_path), database_name="db", storage="sqlite", key="uuid")
    store.connect()
    return store


def output(uuid: str, index: int, value: float) -> dict:
    return {"uuid": uuid, "index": index, "output": {"energy": value}, "metadata": {"stage": "scf"}}


def test_recent_outputs_answer_reads_of_what_they_saw_written_from_the_first_index_on(tmp_path):
    store = RecentOutputs(monty(tmp_path))
    store.update([output("a", 1, -1.0), output("a", 2, -2.0), output("b", 1, -3.0)], key=["uuid", "index"])
    RecentOutputs(store.store).update([output("c", 2, -4.0)], key=["uuid", "index"])  # by an earlier coordinator
    store.update([output("c", 3, -5.0)], key=["uuid", "index"])
    calls = []
    real_query = store.store.query
    store.store.query = lambda **kwargs: calls.append(kwargs) or real_query(**kwargs)

    last = list(store.query({"uuid": "a"}, ["output"], sort={"index": -1}, limit=1))
    assert last == [{"output": {"energy": -2.0}}] and calls == []
    both = list(store.query({"uuid": {"$in": ["a", "b"]}}))
    assert [(d["uuid"], d["index"]) for d in both] == [("a", 1), ("a", 2), ("b", 1)] and calls == []
    last[0]["output"]["energy"] = 0.0  # a caller's change is its own
    assert next(store.query({"uuid": "a", "index": 2}))["output"]["energy"] == -2.0

    assert [d["index"] for d in store.query({"uuid": "c"}, sort={"index": 1})] == [2, 3]  # 1..2 unseen: by id
    assert calls == []
    assert len(list(store.query({"metadata.stage": "scf"}))) == 5 and len(calls) == 1  # other criteria: the store


def test_recent_outputs_read_the_jobs_they_did_not_see_by_their_ids_not_every_document(tmp_path, monkeypatch):
    """A coordinator taking over workflows half done resolves their references to outputs an earlier coordinator
    wrote: montydb's query loads every row of the table at once (170 MB at 100,000 structures labelled), for
    each reference."""
    import montydb.storage.sqlite

    earlier = RecentOutputs(monty(tmp_path))
    earlier.update([output("a", 1, -1.0), output("a", 2, -2.0), output("b", 1, -3.0)], key=["uuid", "index"])
    earlier.update([output("c", i, -float(i)) for i in range(1, 12)], key=["uuid", "index"])  # indexes 1..11
    earlier.update([output("c:1", 1, -9.0), output("cc", 1, -8.0)], key=["uuid", "index"])  # ids beside c's
    earlier.update([{**output(f"other-{n}", 1, 0.0)} for n in range(50)], key=["uuid", "index"])
    plain = monty(tmp_path)
    store = RecentOutputs(plain)
    store.read()  # as state.get_jobstore does: the one read of every document

    def asked(criteria, properties=None, sort=None, limit=0):
        return [{k: v for k, v in d.items() if k != "_id"} for d in plain.query(
            criteria, properties=properties, sort=sort, limit=limit)]

    rows = []
    read_all = montydb.storage.sqlite.SQLiteKVEngine.read_all
    monkeypatch.setattr(montydb.storage.sqlite.SQLiteKVEngine, "read_all",
                        lambda self, *args: rows.append(args) or read_all(self, *args))
    queries = [({"uuid": "a"}, ["index"], {"index": -1}, 1),  # jobflow: the latest index of a reference
               ({"uuid": "a", "index": 2}, None, {"index": -1}, 1),  # jobflow: its output
               ({"uuid": "c"}, None, {"index": 1}, 0), ({"uuid": "c", "index": 10}, ["output"], None, 0),
               ({"uuid": {"$in": ["b", "missing", "c:1", "cc"]}}, None, None, 0)]  # offline.referenced_documents
    answers = [[{k: v for k, v in d.items() if k != "_id"} for d in store.query(
        criteria, properties=properties, sort=sort, limit=limit)] for criteria, properties, sort, limit in queries]
    assert rows == []  # no montydb query, no document decoded but the few asked for
    rows.clear()
    assert answers == [asked(*query) for query in queries] and rows  # what the store's own query says
    assert [d["index"] for d in answers[2]] == list(range(1, 12)) and answers[3] == [{"output": {"energy": -10.0}}]
    assert sorted(d["uuid"] for d in answers[4]) == ["b", "c:1", "cc"]


def test_recent_outputs_leave_the_jobs_they_did_not_see_to_the_store_where_jobs_have_other_ids(tmp_path):
    plain = monty(tmp_path)
    plain.update([output("a", 1, -1.0), output("a", 2, -2.0)], key=["uuid", "index"])  # maggma's: ObjectIds
    store = RecentOutputs(plain)
    store.read()
    calls = []
    real_query = store.store.query
    store.store.query = lambda **kwargs: calls.append(kwargs) or real_query(**kwargs)
    assert [d["index"] for d in store.query({"uuid": "a"}, sort={"index": -1})] == [2, 1] and len(calls) == 1


def test_recent_outputs_write_a_job_by_its_own_id_and_a_rerun_replaces_it(tmp_path):
    store = RecentOutputs(monty(tmp_path))
    store.update([output("a", 1, -1.0)], key=["uuid", "index"])
    store.update([output("a", 1, -1.5)], key=["uuid", "index"])  # the job ran again
    stored = list(store.store.query({"uuid": "a"}))
    assert [(d["_id"], d["output"]["energy"]) for d in stored] == [("a:1", -1.5)]


def test_recent_outputs_keep_the_stores_update_where_jobs_have_other_ids(tmp_path):
    """A home written before keeps its ObjectIds: inserting by `<uuid>:<index>` would add a second document."""
    plain = monty(tmp_path)
    plain.update([output("a", 1, -1.0)], key=["uuid", "index"])  # maggma's: an ObjectId
    store = RecentOutputs(plain)
    store.update([output("a", 1, -1.5)], key=["uuid", "index"])
    assert [d["output"]["energy"] for d in plain.query({"uuid": "a"})] == [-1.5]


def test_recent_outputs_know_the_labels_of_the_store_and_of_their_own_writes(tmp_path):
    """The coordinator's intake skips structures already labelled; it asked the store (every document read) once
    per inbox file."""
    def label(uuid: str, uid: str, key: str) -> dict:
        return {"uuid": uuid, "index": 1, "metadata": {"stage": "validate", "uid": uid, "qe_factory_key": key}}

    plain = monty(tmp_path)
    plain.update([label("a", "si-1", "k1"), output("b", 1, -1.0)], key=["uuid", "index"])
    store = RecentOutputs(plain)
    assert [m["uid"] for m in store.labels_with(["k1", "k9"], ["si-9"])] == ["si-1"]
    store.update([label("c", "si-2", "k2")], key=["uuid", "index"])
    assert sorted(m["uid"] for m in store.labels_with(["k2"], ["si-1", None])) == ["si-1", "si-2"]
    assert store.labels_with([None], ["si-3"]) == []


def test_indexed_lookups_of_several_values_answer_as_full_scans_do():
    client = mongomock.MongoClient()
    plain, indexed = client.db.plain, client.db.indexed
    indexed._iter_documents = IndexedDocuments(indexed, ("nodes",))
    for collection in (plain, indexed):
        collection.insert_many([{"nodes": [1, 2], "n": 0}, {"nodes": [3], "n": 1}, {"nodes": [4, 5], "n": 2}])
    for query in ({"nodes": {"$in": [2, 1]}}, {"nodes": {"$in": [5, 1, 9]}}, {"nodes": {"$in": []}},
                  {"nodes": {"$in": [3]}, "n": 0}):
        assert [d["n"] for d in plain.find(query)] == [d["n"] for d in indexed.find(query)], query


def test_indexed_collections_find_sort_and_check_out_as_mongomock_does():
    """The plain-equality tests (nested fields, lists, missing fields, numbers) and the find_one that copies only its
    answer give what mongomock gives, for FireWorks' kind of checkout: find_one_and_update, sorted."""
    from qe_factory.workflow.fireworks_adapter import index_collection

    client = mongomock.MongoClient()
    plain, indexed = client.db.plain, client.db.indexed
    index_collection(indexed, ("fw_id",))
    rng = random.Random(11)
    for step in range(300):
        doc = {"fw_id": rng.randrange(40), "state": rng.choice(["READY", "WAITING", ["READY"]]),
               "spec": rng.choice([{"stage": rng.choice(["scf", "quick", 1, 1.0, True, ["scf"]])}, {},
                                   [{"stage": "scf"}], "x"]),
               "priority": rng.choice([None, 1, 2.0, "a"]), "n": step}
        stage = rng.choice(["scf", "quick", 1])
        query = {"state": "READY", "spec.stage": rng.choice([stage, {"$in": [stage, "quick"]}, {"$in": []}])}
        sort = [("priority", rng.choice([1, -1])), ("n", rng.choice([1, -1]))]
        results = []
        for collection in (plain, indexed):
            collection.insert_one(dict(doc))
            found = collection.find_one_and_update(query, {"$set": {"state": "RUNNING"}}, sort=sort,
                                                   projection={"_id": 0})
            results.append((found, collection.find_one({"fw_id": doc["fw_id"]}, {"_id": 0}),
                            [d["n"] for d in collection.find(query)]))
        assert results[0] == results[1], (step, query)
    answer = indexed.find_one({"state": "RUNNING"})
    answer["n"] = -1  # a caller's change is its own
    assert indexed.count_documents({"n": -1}) == 0


def test_what_the_indexed_collections_decide_themselves_mongomock_decides_alike():
    """decide() answers FireWorks' kind of filter ($and/$or of equalities, None, $in, $nin, $ne, $exists on nested
    fields) without mongomock: on random documents (missing fields, lists, None, numbers of other types) and random
    filters of that kind, every find and sorted find_one_and_update gives what mongomock's own gives."""
    from qe_factory.workflow.fireworks_adapter import index_collection

    rng = random.Random(5)
    values = ["READY", "scf", 1, 1.0, True, None, ["READY"], {"a": 1}]

    def document(n: int) -> dict:
        doc = {"n": n, "state": rng.choice(values), "spec": rng.choice([{}, {"stage": rng.choice(values)}, "x",
                                                                        {"_fworker": rng.choice(values)}, None])}
        return {k: v for k, v in doc.items() if rng.random() > 0.1 or k == "n"}

    def criterion(depth: int = 0) -> dict:
        field = rng.choice(["state", "spec.stage", "spec._fworker", "spec", "missing.x"])
        plain = rng.choice(["READY", "scf", 1])
        kind = rng.randrange(8 if depth < 2 else 6)
        if kind == 6:
            return {rng.choice(["$and", "$or"]): [criterion(depth + 1) for _ in range(rng.randrange(1, 4))]}
        if kind == 7:
            return {**criterion(depth + 1), **criterion(depth + 1)}
        return {field: [plain, None, {"$in": [plain, "scf"]}, {"$ne": plain}, {"$exists": rng.random() < 0.5},
                        {"$nin": [plain, "scf"]}][kind]}

    client = mongomock.MongoClient()
    plain, indexed = client.db.plain, client.db.indexed
    index_collection(indexed, ("n",))
    for n in range(120):
        doc = document(n)
        plain.insert_one(dict(doc))
        indexed.insert_one(dict(doc))
    for _ in range(400):
        query, sort = criterion(), [("spec.stage", rng.choice([1, -1])), ("n", 1)]
        assert [d["n"] for d in plain.find(query)] == [d["n"] for d in indexed.find(query)], query
        update = {"$set": {"state": rng.choice(values)}}
        found = [c.find_one_and_update(query, update, sort=sort, projection={"_id": 0}) for c in (plain, indexed)]
        assert found[0] == found[1], query


def test_a_coordinators_e0s_are_read_by_their_labels_ids_not_by_a_query_of_every_document(tmp_path, monkeypatch):
    """The first validation of a coordinator that finds an element's E0 labelled reads it (montydb's query of
    the labels by uid loaded every row of the table at once)."""
    import montydb.storage.sqlite
    from jobflow import JobStore
    from monty.json import jsanitize

    from qe_factory import DFTConfig
    from qe_factory.engine.references import Reference
    from qe_factory.workflow.state import stored_e0s
    from tests.unit.test_references import result

    def label(uuid: str, uid: str, energy: float) -> dict:
        return {"uuid": uuid, "index": 1, "output": jsanitize(result(uid, "Si", 25, energy), strict=True,
                                                             allow_bson=True),
                "metadata": {"stage": "validate", "uid": uid, "qe_factory_key": f"key-{uid}"}}

    earlier = RecentOutputs(monty(tmp_path))
    earlier.update([label("j1", "e0-Si-aaaaaaaaaaaa", -1.0), label("j2", "e0-Si-bbbbbbbbbbbb", -2.0),
                    output("j3", 1, -3.0)], key=["uuid", "index"])
    store = RecentOutputs(monty(tmp_path))
    store.read()
    rows = []
    read_all = montydb.storage.sqlite.SQLiteKVEngine.read_all
    monkeypatch.setattr(montydb.storage.sqlite.SQLiteKVEngine, "read_all",
                        lambda self, *args: rows.append(args) or read_all(self, *args))
    references = [Reference("Si", DFTConfig(), "b" * 12, "e0-Si-bbbbbbbbbbbb"),
                  Reference("Si", DFTConfig(), "c" * 12, "e0-Si-cccccccccccc")]  # not computed
    found = stored_e0s(JobStore(store, {}), references)
    assert {uid: e0.energy for uid, e0 in found.items()} == {"e0-Si-bbbbbbbbbbbb": -2.0} and rows == []
