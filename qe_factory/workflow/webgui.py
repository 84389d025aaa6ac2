"""FireWorks' web GUI (the Flask app of `lpad webgui`) on a factory home: read-only, on 127.0.0.1 only, fresh on
every reload.

An embedded LaunchPad is one JSON file that its coordinator replaces atomically at each save. The GUI loads it into
a client of its own, which never writes it back (not at exit either), and loads it again whenever the file was
replaced: a reload shows the last saved state (at most `launchpad.SAVE_INTERVAL` seconds behind the coordinator).
It takes no lock and writes nothing, so it runs beside a coordinator. FireWorks' pages stay as they are; the
templates in webgui_templates/ extend three of them with what a factory home adds: the labelled structures (their
workflows have left the LaunchPad), the coordinator, and each failure's reason written out.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qe_factory.workflow import state
from qe_factory.workflow.history import home_history, outcome_counts, split_references
from qe_factory.workflow.home import embedded_file
from qe_factory.workflow.inbox import waiting
from qe_factory.workflow.lock import holder

if TYPE_CHECKING:
    from fireworks import LaunchPad
    from flask import Flask

HOST = "127.0.0.1"  # never another address: the GUI has no authentication of its own
TEMPLATES = Path(__file__).with_name("webgui_templates")
LATEST = 20  # labelled structures listed on the home page (FireWorks' own tables show 20 rows too)


class Snapshot:
    """The home's LaunchPad as last saved: a read-only client, loaded again when the file was replaced."""

    def __init__(self, file: Path | None):
        self.file, self.signature, self.launchpad = file, None, None

    def current(self) -> LaunchPad:
        signature = _signature(self.file) if self.file else None
        if self.launchpad is None or signature != self.signature:
            self.launchpad, self.signature = state.get_launchpad(read_only=True), signature
        return self.launchpad


def _signature(file: Path) -> tuple[int, int, int] | None:
    try:
        stat = file.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def failure(launchpad: LaunchPad, fw_id: int) -> tuple[str, str] | None:
    """(error type, message) of a Firework's last FIZZLED launch, or None."""
    found = state.last_failure(launchpad, fw_id)
    return (found.error_type, found.message) if found else None


def fireworks_of(launchpad: LaunchPad, wf: dict) -> list[dict[str, Any]]:
    """The Fireworks of a workflow summary (LaunchPad.get_wf_summary_dict, mode "all") in id order: id, name,
    state, launch directories, and (error type, message) if it FIZZLED."""
    rows = []
    for key, fw_state in wf["states"].items():
        name, fw_id = key.rsplit("--", 1)
        rows.append({"fw_id": int(fw_id), "name": name, "state": fw_state,
                     "launch_dirs": wf["launch_dirs"].get(key, []),
                     "failure": failure(launchpad, int(fw_id)) if fw_state == "FIZZLED" else None})
    return sorted(rows, key=lambda row: row["fw_id"])


def home_summary(home: Path, launchpad: LaunchPad) -> dict[str, Any]:
    """What the home page shows above FireWorks' tables: coordinator, inbox, failures, labelled structures."""
    store = state.get_jobstore()
    labelled = [label for label in state.label_summaries(store, limit=LATEST) if label.get("energy") is not None]
    stories = home_history(home, launchpad, store)
    structures, references = split_references(stories)
    counts = outcome_counts(structures)
    results = {"validated": counts["labelled"], "marked": counts["marked"],
               "references": outcome_counts(references)["labelled"]}
    return {"home": home, "coordinator": holder(home) if embedded_file(home) else None, "inbox": len(waiting(home)),
            "results": results, "labelled": labelled, "failures": [
                {"uid": s.uid, "stage": s.stage, "error_type": s.error_type, "message": s.message, "fw_id": fw_id}
                for s in stories for fw_id in [f for f, _, fw_state in s.fireworks if fw_state == "FIZZLED"][-1:]]}


def make_app(home: Path) -> Flask:
    """FireWorks' Flask app reading this home's LaunchPad (fresh at each request) and JobStore."""
    from fireworks.flask_site.app import app
    from jinja2 import ChoiceLoader, FileSystemLoader, PrefixLoader

    snapshot = Snapshot(embedded_file(home))
    stock = FileSystemLoader(os.path.join(app.root_path, app.template_folder))
    app.jinja_loader = ChoiceLoader([FileSystemLoader(TEMPLATES), PrefixLoader({"fireworks": stock}), stock])

    @app.before_request
    def fresh() -> None:
        app.lp = snapshot.current()

    app.add_template_global(lambda fw_id: failure(app.lp, fw_id), "failure")
    app.add_template_global(lambda wf: fireworks_of(app.lp, wf), "fireworks_of")
    app.add_template_global(lambda: home_summary(home, app.lp), "factory")
    app.register_error_handler(state.StateError, lambda exc: (f"<pre>{html.escape(str(exc))}</pre>", 503))
    return app


def serve(home: Path, port: int = 5000) -> None:
    """Serve the GUI on 127.0.0.1:`port` (0: a free port) until interrupted; prints its address first."""
    from werkzeug.serving import make_server

    server = make_server(HOST, port, make_app(home), threaded=False)  # one request at a time: one JobStore client
    print(f"FireWorks web GUI of {home} (read-only): http://{HOST}:{server.port}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
