"""A real install: the package built as a wheel and installed (not editable) into a fresh venv works from a directory
outside the checkout, with no PYTHONPATH: `qe-factory init` renders a home from the package data, `pseudos list`
reads the bundled tables, and `qe-factory run` labels the bundled example with real pw.x.

To stay offline and quick, the fresh venv is given the dependencies already installed in the project's venv by a .pth
file naming that venv's site-packages, and the wheel is installed with --no-deps --ignore-installed (pip then never
looks at, nor touches, the project's editable install there). The .pth line is a plain path: the editable install's
own .pth hook in that folder is not run, so the checkout cannot be imported through it (asserted below).
`--system-site-packages` would not do: it exposes the base interpreter's packages, not the project venv's.
The wheel is built as `pip install .` builds it (pip's build isolation) from a copy of the package sources and the
top-level fw_config/ and templates/ (pyproject.toml maps them into the package), so no build/ folder is left in the
checkout.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from ase.io import read

from qe_factory.workflow.home import CONFIG_TEMPLATES

REPO = Path(__file__).resolve().parents[2]
UNSET = ("PYTHONPATH", "VIRTUAL_ENV", "QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE",
         "MONGOMOCK_SERVERSTORE_FILE")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its bin/."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    for folder in ("qe_factory", *CONFIG_TEMPLATES):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(source)], check=True, timeout=600)
    (wheel,) = (root / "dist").glob("qe_factory-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=300)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--ignore-installed", "-q", str(wheel)],
                   check=True, timeout=600)
    return python.parent


def run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    proc = subprocess.run([str(venv / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_installed_package_creates_a_home_from_its_package_data(venv, tmp_path):
    where = run(venv, tmp_path, "python", "-c", "import qe_factory, sys; print(qe_factory.__file__); print(sys.path)")
    package = Path(where.stdout.splitlines()[0])
    assert package.is_relative_to(venv.parent), package  # the installed copy ...
    # ... and the checkout is on no path (the project venv's site-packages may lie inside it: the dependencies)
    assert str(REPO) not in ast.literal_eval(where.stdout.splitlines()[1])
    init = run(venv, tmp_path, "qe-factory", "--home", "home", "init")
    home = tmp_path / "home"
    assert f"factory home {home} (embedded LaunchPad {home / 'state' / 'launchpad.json'})" in init.stdout
    shipped = package.parent / "workflow" / "data"
    for folder in CONFIG_TEMPLATES:  # the checkout's top-level folders, shipped inside the package
        names = sorted(p.name for p in (REPO / folder).iterdir())
        assert sorted(p.name for p in (shipped / folder).iterdir()) == names
        assert names and sorted(p.name for p in (home / folder).iterdir()) == names
    # pyproject.toml lists the packages: one added to the checkout and not there would be missing from the wheel
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "qe_factory").rglob("*.py"))
    assert sorted(str(p.relative_to(package.parents[1])) for p in package.parent.rglob("*.py")) == modules
    assert len(list((home / "fw_config").iterdir())) == 5
    for path in [*(home / "fw_config").iterdir(), *(home / "templates").iterdir()]:
        assert "${QE_FACTORY" not in path.read_text(), path
    assert f"rocket_launch: {venv}/qe-factory" in (home / "fw_config" / "my_qadapter.yaml").read_text()
    assert (home / "state" / "launchpad.json").is_file() and (home / "state" / "jobstore").exists()
    listing = run(venv, tmp_path, "qe-factory", "pseudos", "list")  # the bundled tables, read as package data
    assert "debian-pbe" in listing.stdout and "sssp-efficiency-1.3      PBE    103 elements" in listing.stdout


def test_installed_package_runs_the_bundled_example(venv, tmp_path):
    config = tmp_path / "fast.yaml"
    config.write_text("kpoint_spacing: 0.8\necutwfc: 25\necutrho: 200\nallow_low_cutoffs: true\n")
    shutil.copy(REPO / "examples" / "structures.extxyz", tmp_path)
    result = run(venv, tmp_path, "qe-factory", "run", "structures.extxyz", "-c", "fast.yaml", "-o", "labels.extxyz",
                 "--no-e0s")  # the E0s have their own tests (tests/pwx/test_e0s.py): not the subject here
    assert "4 labelled structures in labels.extxyz; 0 failed" in result.stdout
    frames = read(tmp_path / "labels.extxyz", index=":")
    assert sorted(a.info["uid"] for a in frames) == ["ge-rattled", "si-compressed", "si-hot", "si-rattled"]
    assert all(a.arrays["REF_forces"].shape == (2, 3) for a in frames)
    assert (tmp_path / "factory" / "fw_config" / "FW_config.yaml").is_file()
