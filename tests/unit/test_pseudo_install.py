"""`qe-factory pseudos install/list`: a family's archive downloaded from an HTTP server on 127.0.0.1, md5-checked,
installed all or nothing, then usable by name. The SSSP files themselves are not on this machine, so the install
logic is tested with a table of the same format for three of Debian's PBE files (their md5s are the bundled
debian-pbe table's); the bundled SSSP table's own integrity is tested in test_pseudos.py."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest
from ase.build import bulk
from ase.io import write

from qe_factory import DFTConfig
from qe_factory.cli import main
from qe_factory.engine.inputs import InputGenerator
from qe_factory.engine.pseudos import PseudopotentialError, install_family, load_family, resolve_pseudos

DEBIAN = Path("/usr/share/espresso/pseudo")
pytestmark = pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian's quantum-espresso-data not installed")
ELEMENTS = ("H", "O", "Si")


@pytest.fixture
def data_home(tmp_path, monkeypatch) -> Path:
    """An empty user data directory ($XDG_DATA_HOME), for this process and the commands it runs."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path / "data" / "qe_factory" / "pseudos"


@pytest.fixture
def http_server(tmp_path):
    """`python -m http.server` on 127.0.0.1 (a free port) serving tmp_path/served: (folder, base URL), once the
    server has bound its socket (it prints its port after that) and has answered a request."""
    served = tmp_path / "served"
    served.mkdir()
    with (tmp_path / "http.log").open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(served)],
            stdout=subprocess.PIPE, stderr=log, text=True,
        )
    try:
        port = re.search(r"port (\d+)", server.stdout.readline())
        assert port, f"http.server did not start: {(tmp_path / 'http.log').read_text()}"
        url = f"http://127.0.0.1:{port.group(1)}"
        with urllib.request.urlopen(url + "/", timeout=30) as response:
            assert response.status == 200
        yield served, url
    finally:
        server.terminate()
        server.wait()


def debian_rows() -> dict:
    """Three rows of the bundled debian-pbe table, in the table format every family uses."""
    family = load_family("debian-pbe")
    return {el: {"filename": e.filename, "md5": e.md5, "cutoff_wfc": e.cutoff_wfc, "cutoff_rho": e.cutoff_rho}
            for el, e in family.entries.items() if el in ELEMENTS}


def family_table(tmp_path: Path) -> Path:
    path = tmp_path / "test-pbe.json"
    path.write_text(json.dumps({"name": "test-pbe", "functional": "PBE", "pseudopotentials": debian_rows()}))
    return path


def tarball(path: Path, files: dict[str, bytes]) -> Path:
    """A gzipped tar with the files in one folder, as the SSSP archive has them."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"SSSP_test/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def debian_files() -> dict[str, bytes]:
    return {row["filename"]: (DEBIAN / row["filename"]).read_bytes() for row in debian_rows().values()}


@pytest.fixture
def factory(capsys):
    """`qe-factory pseudos ARGS` in this process: (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["pseudos", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_install_from_a_url_makes_the_family_usable_by_name(tmp_path, data_home, http_server, factory):
    served, url = http_server
    tarball(served / "test.tar.gz", {**debian_files(), "README": b"not a pseudopotential"})
    code, out, err = factory("install", str(family_table(tmp_path)), "--from", f"{url}/test.tar.gz")
    assert code == 0, err
    assert f"test-pbe: 3 pseudopotentials checked and installed in {data_home / 'test-pbe'}" in out
    assert sorted(p.name for p in (data_home / "test-pbe").iterdir()) == sorted([*debian_files(), "family.json"])

    family = load_family("test-pbe")  # by name, from the installed table
    resolved = resolve_pseudos(family, ["Si", "O", "H"])
    assert {el: p.md5 for el, p in resolved.items()} == {el: row["md5"] for el, row in debian_rows().items()}
    pw_input = InputGenerator(DFTConfig(pseudo_family="test-pbe")).generate(bulk("Si"))
    assert pw_input.parameters["control"]["pseudo_dir"] == str(data_home / "test-pbe")

    write(tmp_path / "mixed.extxyz", [bulk("Si"), bulk("Fe")])
    code, out, err = factory("list", "--structures", str(tmp_path / "mixed.extxyz"))
    assert code == 0, err
    blocks = {block.split()[0]: block for block in re.split(r"\n(?=\S)", out.strip())}
    assert set(blocks) == {"debian-pbe", "sssp-efficiency-1.3", "test-pbe"}
    assert f"PBE      3 elements, 3 installed in {data_home / 'test-pbe'}" in blocks["test-pbe"]
    assert "\n    H O Si\n" in blocks["test-pbe"] and "Fe (not in the table) missing" in blocks["test-pbe"]
    assert "all 2 elements ready" in blocks["debian-pbe"]
    assert "103 elements, 0 installed" in blocks["sssp-efficiency-1.3"]
    assert "Fe (Fe.pbe-spn-kjpaw_psl.0.2.1.UPF not installed)" in blocks["sssp-efficiency-1.3"]


def test_a_bad_md5_or_a_missing_file_installs_nothing(tmp_path, data_home, http_server, factory):
    served, url = http_server
    files = debian_files()
    si, o = debian_rows()["Si"], debian_rows()["O"]
    bad = {**files, si["filename"]: files[si["filename"]] + b"\n"}
    del bad[o["filename"]]
    tarball(served / "bad.tar.gz", bad)
    table = str(family_table(tmp_path))

    code, _, err = factory("install", table, "--from", f"{url}/bad.tar.gz")
    bad_md5 = hashlib.md5(bad[si["filename"]]).hexdigest()
    assert code == 2
    assert f"{si['filename']} (Si) has md5 {bad_md5}, the table says {si['md5']}" in err
    assert f"{o['filename']} (O) is not in the archive" in err
    assert list(data_home.iterdir()) == []  # no family, no half-unpacked folder

    good = tarball(tmp_path / "good.tar.gz", files)  # a local file this time
    assert factory("install", table, "--from", str(good))[0] == 0
    assert factory("install", table, "--from", f"{url}/bad.tar.gz")[0] == 2
    assert [p.name for p in data_home.iterdir()] == ["test-pbe"]  # the good installation is left as it was
    installed = (data_home / "test-pbe" / si["filename"]).read_bytes()
    assert hashlib.md5(installed).hexdigest() == si["md5"]


def test_the_bundled_sssp_family_needs_its_whole_archive(tmp_path, data_home, http_server):
    served, url = http_server
    with pytest.raises(PseudopotentialError) as info:
        install_family("sssp-efficiency-1.3", str(tarball(tmp_path / "debian.tar.gz", debian_files())))
    assert "Fe.pbe-spn-kjpaw_psl.0.2.1.UPF (Fe) is not in the archive" in str(info.value)
    assert str(info.value).count("is not in the archive") == 103  # none of Debian's files is an SSSP one
    (served / "notes.txt").write_text("not an archive")
    for source, message in ((f"{url}/notes.txt", "neither a tar nor a zip"), (f"{url}/absent.tar.gz", "404"),
                            (str(tmp_path / "absent.tar.gz"), "no such archive")):
        with pytest.raises(PseudopotentialError, match=message):
            install_family("sssp-efficiency-1.3", source)
    with pytest.raises(PseudopotentialError, match="bundled family read from its own directory"):
        install_family("debian-pbe", str(tmp_path / "debian.tar.gz"))
    assert list(data_home.iterdir()) == []
