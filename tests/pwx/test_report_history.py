"""`qe-factory status`, `show` and `report` on a home that has seen every outcome, with real pw.x and the CLI as a
user types it: labels (one of them after a recovery; labelled workflows leave the LaunchPad), a failure (recovery
exhausted), a refusal at submission and a structure still waiting. The report is opened in headless Chromium."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from ase import Atoms
from ase.build import bulk
from ase.io import read, write
from browser import page_dom, screenshot
from structures import rattled_si

BIN = Path(sys.executable).parent
FAST = "kpoint_spacing: 0.8\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\n"
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")
PNG = b"\x89PNG\r\n\x1a\n"


def qef(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}
    return subprocess.run([str(BIN / "qe-factory"), "--home", str(home), *args], capture_output=True, text=True,
                          env=env, cwd=home.parent, timeout=600)


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> Path:
    """A home that labelled si-1, ge-1 and si-3 (after a second attempt), failed si-4, refused `overlap` at
    submission and holds si-5 waiting; the submissions' outputs are checked on the way."""
    root = tmp_path_factory.mktemp("seen")
    home = root / "home"
    germanium = bulk("Ge")
    germanium.rattle(0.05, seed=1)
    germanium.info["uid"] = "ge-1"
    overlap = Atoms("Si2", positions=[(0, 0, 0), (0.4, 0, 0)], cell=[5, 5, 5], pbc=True, info={"uid": "overlap"})
    submissions = {  # name: (structures, settings)
        "good": ([rattled_si(1), germanium, overlap], FAST),
        "slow": ([rattled_si(3)], FAST + "pw_parameters: {electrons: {electron_maxstep: 4}}\n"),  # mixing_beta=0.3
        "hopeless": ([rattled_si(4)], FAST + "max_retries: 2\npw_parameters: {electrons: {electron_maxstep: 1}}\n"),
    }
    for name, (structures, settings) in submissions.items():
        write(root / f"{name}.extxyz", structures)
        (root / f"{name}.yaml").write_text(settings)
        out = qef(home, "submit", str(root / f"{name}.extxyz"), "-c", str(root / f"{name}.yaml"))
        assert out.returncode == 0, out.stdout + out.stderr
    (root / "one-rank.yaml").write_text("mpi_ranks: 1\n")
    worker = qef(home, "worker", "-c", str(root / "one-rank.yaml"))
    assert worker.returncode == 0, worker.stdout + worker.stderr
    write(root / "later.extxyz", [rattled_si(5)])
    assert qef(home, "submit", str(root / "later.extxyz"), "-c", str(root / "good.yaml")).returncode == 0
    return home


def test_status_counts_every_structure_the_home_has_seen(seen):
    out = qef(seen, "status")
    assert out.returncode == 0, out.stderr
    assert ("structures seen: 6: 3 labelled (0 of them with settings other than the nominal ones), 1 failed, "
            "1 refused, 1 waiting, 0 running") in out.stdout, out.stdout
    # the labelled ones left the LaunchPad: their counts come from the JobStore
    assert "workflows in the LaunchPad (labelled ones leave it): 1 FIZZLED, 1 READY" in out.stdout, out.stdout
    assert "REFUSED overlap at submit: atoms 0 (Si) and 1 (Si) are 0.400 Å apart" in out.stdout
    assert "FAILED si-4 at scf: SCF_NOT_CONVERGED (410)" in out.stdout


def test_show_tells_a_recovered_structure_attempt_by_attempt_with_its_label(seen):
    out = qef(seen, "show", "si-3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "si-3  Si2  labelled"
    export = qef(seen, "export", "-o", str(seen / "labels.extxyz"))
    assert export.returncode == 0, export.stderr
    label = next(a for a in read(seen / "labels.extxyz", index=":") if a.info["uid"] == "si-3")
    assert f"energy       {label.info['REF_energy']:.6f} eV" in out.stdout
    assert "k-points 3×3×3" in out.stdout and "Si: Si.pbe-nl-rrkjus_psl.1.0.0.UPF (md5 " in out.stdout
    assert "deviations   none: the nominal settings" in out.stdout
    first, second = (line for line in lines if line.startswith(("  #1 ", "  #2 ")))
    assert first.startswith("  #1  SCF_NOT_CONVERGED (410)  start from_scratch, 4 SCF iterations"), first
    assert re.match(r"  #2  OK \(0\)  correction (more electron steps|mixing_beta=0\.3), start from_", second), second
    assert "convergence NOT achieved after   4 iterations" in out.stdout  # the key line of pw.x's output
    directories = [Path(line.strip()) for line in lines if line.strip().startswith(str(seen / "runs"))]
    assert [d.name for d in directories] == ["attempt_1", "attempt_2"] and all(d.is_dir() for d in directories)


def test_show_tells_a_failure_a_refusal_and_a_waiting_structure(seen):
    failed = qef(seen, "show", "si-4")
    assert failed.returncode == 0, failed.stderr
    assert failed.stdout.startswith("si-4  Si2  failed\n  cause        at scf: SCF_NOT_CONVERGED (410)")
    assert "[gave up: 2 attempt(s) made" in failed.stdout and "attempts: 2 (" in failed.stdout
    files = [Path(line.split(": ", 1)[1]) for line in failed.stdout.splitlines() if line.startswith("files: ")]
    assert files[0] == seen / "runs" / "run_si-4" and all(path.is_dir() for path in files) and len(files) == 2
    refused = qef(seen, "show", "overlap")
    assert refused.stdout.startswith("overlap  Si2  refused\n  cause        at submit: atoms 0 (Si) and 1 (Si)")
    assert "refused submission (" in refused.stdout
    waiting = qef(seen, "show", "si-5")
    assert waiting.stdout.startswith("si-5  Si2  waiting") and "inputs si-5 READY" in waiting.stdout
    unknown = qef(seen, "show", "si-99")
    assert unknown.returncode == 2 and "never seen a structure with uid 'si-99'" in unknown.stderr


class Page(HTMLParser):
    """The images (src), table rows (cell texts) and text of a page."""

    def __init__(self, dom: str):
        super().__init__()
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self.in_cell = False
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.rows[-1].append("")
            self.in_cell = True

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.in_cell = False

    def handle_data(self, data):
        self.text.append(data)
        if self.in_cell:
            self.rows[-1][-1] += data

    def cells(self) -> list[list[str]]:
        return [[" ".join(cell.split()) for cell in row] for row in self.rows]


def test_report_page_shows_outcomes_labels_recovery_and_failures(seen, tmp_path):
    out = qef(seen, "report", "-o", str(tmp_path / "report.html"))
    assert out.returncode == 0, out.stderr
    assert "report on 6 structure(s) and 2 isolated-atom reference(s) written to" in out.stdout  # E0s: Si, Ge
    url = (tmp_path / "report.html").as_uri()
    page = Page(page_dom(url))
    text = " ".join(" ".join(page.text).split())
    for count, name in ((3, "labelled"), (0, "of them non-nominal"), (1, "failed"), (1, "refused"), (1, "waiting"),
                        (0, "running")):
        assert f"{count} {name}" in text, name
    pngs = [base64.b64decode(src.split(",", 1)[1]) for src in page.images if src.startswith("data:image/png;base64,")]
    assert len(pngs) == len(page.images) == 3  # energy, |F| and pressure: all embedded
    assert all(png.startswith(PNG) and len(png) > 5000 for png in pngs)
    rows = {(row[0], len(row)): row[1:] for row in page.cells() if row}  # (first cell, cells) → the other cells
    assert rows[("Si", 11)][:2] == ["2", "4"] and rows[("Ge", 11)][:2] == ["1", "2"]  # structures, atoms
    # recovery: si-3's and si-4's first attempts, one fixed (recovery v2: more steps or mixing_beta=0.3)
    recovery = [row[1:] for row in page.cells() if len(row) == 5 and row[0] == "SCF_NOT_CONVERGED"]
    assert [sum(int(row[i]) for row in recovery) for i in (1, 2, 3)] == [2, 1, 1], recovery
    assert {row[0] for row in recovery} <= {"more electron steps", "mixing_beta=0.3"}, recovery
    assert rows[("1", 3)] == ["2", "0"] and rows[("2", 3)] == ["1", "1"]  # attempts per structure: labelled, failed
    assert rows[("isolated-atom references (E0s)", 4)][0] == "4"  # Si, Ge: Hund's triplet and the singlet each
    assert rows[("all pw.x runs", 4)][0] == "10"  # 6 for the structures, 4 for the E0s
    e0s = [row for row in page.cells() if len(row) == 4 and row[3].startswith("e0-")]
    assert sorted((row[0], row[1]) for row in e0s) == [("Ge", "labelled"), ("Si", "labelled")], e0s
    assert all(-5000 < float(row[2]) < -100 for row in e0s)
    failure = rows[("si-4", 8)]
    assert failure[:4] == ["Si2", "failed", "scf", "SCF_NOT_CONVERGED"] and "gave up" in failure[4]
    assert str(seen / "runs" / "run_si-4") in failure[6]
    refusal = rows[("overlap", 8)]
    assert refusal[:3] == ["Si2", "refused", "submit"] and "0.400 Å apart" in refusal[4]
    assert rows[("ecutwfc (Ry)", 2)] == ["25.0 (3)"]
    assert rows[("Ge", 4)][0] == "Ge.pbe-kjpaw.UPF" and rows[("Si", 4)][2] == "2"  # pseudopotential, labels
    shot = screenshot(url, tmp_path / "report.png")
    assert shot.read_bytes().startswith(PNG)
