"""`qe-factory webgui`: FireWorks' web GUI on an embedded home, looked at in headless Chromium while a coordinator
works on the same home. pw.x is tests/fake_pw.py replaying real pw.x outputs (a converged run; an SCF that did not
converge): the GUI shows states, not physics, and real pw.x would only make the test slower."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from ase.build import bulk
from ase.io import write
from browser import page_dom, screenshot

BIN = Path(sys.executable).parent
FAKE_PW = Path(__file__).resolve().parents[1] / "fake_pw.py"
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")


def qef(tmp_path: Path, plan: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}
    env.update(FAKE_PW_PLAN=plan, FAKE_PW_COUNTER=str(tmp_path / "calls"))
    return subprocess.run([str(BIN / "qe-factory"), "--home", str(tmp_path / "home"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


def structure_file(tmp_path: Path, uid: str, seed: int) -> str:
    atoms = bulk("Si")
    atoms.rattle(0.01, seed=seed)
    atoms.info["uid"] = uid
    write(tmp_path / f"{uid}.extxyz", atoms)
    return f"{uid}.extxyz"


@pytest.fixture
def factory(tmp_path) -> Path:
    """A home where si-good was labelled; the fixtures' settings (bulk Si at kpoint_spacing 0.6), one attempt."""
    (tmp_path / "fake.yaml").write_text(
        "kpoint_spacing: 0.6\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\nmax_retries: 1\nmpi_ranks: 1\n"
        f"command: {sys.executable} {FAKE_PW}\n")
    good = qef(tmp_path, "replay:si_scf", "run", structure_file(tmp_path, "si-good", 1), "-c", "fake.yaml", "--no-e0s")
    assert good.returncode == 0, good.stdout + good.stderr
    return tmp_path / "home"


@pytest.fixture
def gui(factory):
    """`qe-factory webgui` on a free port, once it answers: (address, process)."""
    env = {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}
    proc = subprocess.Popen([str(BIN / "qe-factory"), "--home", str(factory), "webgui", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        url = match.group(0)
        with urllib.request.urlopen(url, timeout=60) as page:  # the server answers once it serves
            assert page.status == 200
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} give them) of the sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


def state_files(home: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (home / "state").iterdir() if p.is_file()}


def test_webgui_shows_uids_states_and_reasons_fresh_beside_a_running_coordinator(factory, gui, tmp_path):
    url, server = gui
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    assert listening(port) == ["0100007F"]  # 127.0.0.1 only: no 0.0.0.0, no IPv6 socket
    home = page_dom(url)
    assert "1 structure(s) labelled" in home and "<strong>si-good</strong>" in home and "Failures (0)" in home

    # a coordinator runs while the GUI is up: the GUI holds no lock, so it is not refused
    stubborn = structure_file(tmp_path, "si-stubborn", 2)
    failed = qef(tmp_path, "replay:si_unconverged", "run", stubborn, "-c", "fake.yaml", "--no-e0s")
    assert failed.returncode == 1 and "FAILED at scf: SCF_NOT_CONVERGED" in failed.stdout, failed.stdout + failed.stderr
    submitted = qef(tmp_path, "", "submit", structure_file(tmp_path, "si-waiting", 3), "-c", "fake.yaml", "--no-e0s")
    assert "1 added" in submitted.stdout, submitted.stdout + submitted.stderr
    before = state_files(factory)

    home = page_dom(url)  # a reload shows the saved state
    failures = re.search(r'id="failures".*?</table>', home, re.S).group(0)
    assert "Failures (1)" in failures and "<strong>si-stubborn</strong>" in failures
    assert "SCF_NOT_CONVERGED" in failures and "gave up: 1 attempt(s) made" in failures
    newest = home[home.index("Newest Workflows"):]
    for uid, state in (("si-stubborn", "FIZZLED"), ("si-waiting", "READY")):  # workflows named by their uid
        assert re.search(rf">\s*<strong>{uid}</strong>\s*</a>.*?<span class=\"label {state}\">", newest, re.S), uid

    workflow = page_dom(f"{url}wf/metadata/uid/si-stubborn/")  # FireWorks' lookup by metadata: the uid
    rows = re.search(r'id="fireworks".*?</table>', workflow, re.S).group(0)
    assert re.search(r'<h4 class="text-center">si-stubborn <span class="label FIZZLED">FIZZLED', workflow)
    assert re.search(r"scf si-stubborn attempt 1</a>.*?FIZZLED.*?SCF_NOT_CONVERGED.*?gave up", rows, re.S), rows
    assert re.search(r"inputs si-stubborn</a>.*?COMPLETED", rows, re.S), rows
    fw_id = re.search(r'<a href="/fw/(\d+)">', failures).group(1)
    firework = page_dom(f"{url}fw/{fw_id}")
    assert re.search(r'id="failure".*?scf si-stubborn attempt 1 FIZZLED: SCF_NOT_CONVERGED', firework, re.S)

    shots = Path(os.environ.get("QE_FACTORY_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    screenshot(url, shots / "webgui-home.png", height=1400)
    screenshot(f"{url}wf/metadata/uid/si-stubborn/", shots / "webgui-workflow.png", height=900)

    assert "coordinator: none running" in qef(tmp_path, "", "status").stdout  # the GUI holds no lock
    server.terminate()
    assert server.wait(timeout=60) in (0, -15)
    assert state_files(factory) == before  # the GUI wrote nothing, not at exit either


def test_stock_lpad_webgui_on_an_embedded_home_points_to_qe_factory_webgui(tmp_path):
    (tmp_path / "home").mkdir()
    refused = qef(tmp_path, "", "lpad", "webgui")
    assert refused.returncode == 2 and "qe-factory webgui" in refused.stderr
