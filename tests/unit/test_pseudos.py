"""Pseudopotential families: tables, UPF header checks, md5, functional consistency."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from ase.data import chemical_symbols

from qe_factory.engine.pseudos import (
    PseudopotentialError,
    bundled_families,
    load_family,
    normalise_functional,
    parse_upf_header,
    resolve_pseudos,
)

DEBIAN = Path("/usr/share/espresso/pseudo")
needs_debian = pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian's quantum-espresso-data not installed")


def test_bundled_families():
    assert {"debian-pbe", "sssp-efficiency-1.3"} <= set(bundled_families())
    sssp = load_family("sssp-efficiency-1.3")
    assert sssp.entries["Fe"].filename == "Fe.pbe-spn-kjpaw_psl.0.2.1.UPF"
    assert (sssp.entries["Fe"].cutoff_wfc, sssp.entries["Fe"].cutoff_rho) == (90, 1080)
    assert sssp.entries["Si"].md5 == "0b0bb1205258b0d07b9f9672cf965d36"


def test_bundled_sssp_table_is_the_complete_published_one():
    """SSSP efficiency 1.3 covers H to Rn and La to Lr (Z 1-103): one file per element, each with its own md5, both
    cutoffs, and a charge-density cutoff 4, 8 or 12 times the wavefunction one (the duals the table uses)."""
    sssp = load_family("sssp-efficiency-1.3")
    assert sssp.name == "sssp-efficiency-1.3" and sssp.functional == "PBE"
    assert set(sssp.entries) == set(chemical_symbols[1:104])
    for el, entry in sssp.entries.items():
        assert re.fullmatch(r"[0-9a-f]{32}", entry.md5), el
        assert entry.cutoff_wfc > 0 and entry.cutoff_rho / entry.cutoff_wfc in (4, 8, 12), el
        assert re.match(rf"{el}[._-]", entry.filename, re.IGNORECASE), el  # every file name starts with its element
    assert len({e.md5 for e in sssp.entries.values()}) == len({e.filename for e in sssp.entries.values()}) == 103
    cu, no = sssp.entries["Cu"], sssp.entries["No"]  # Cu changed in 1.3; "No" is the one a YAML reader turns False
    assert (cu.filename, cu.cutoff_wfc) == ("Cu.paw.z_11.ld1.psl.v1.0.0-low.upf", 90)
    assert cu.md5 == "619f40885d92a09a85a8b37550532d0c"
    assert no.filename == "No.paw.z_24.ld1.uni-marburg.v0.upf"


def test_unknown_family_lists_the_choices():
    with pytest.raises(PseudopotentialError, match="debian-pbe"):
        load_family("sssp-nonexistent")


@pytest.mark.parametrize(
    "text, name",
    [("PBE", "PBE"), (" SLA  PW   PBX  PBC ", "PBE"), ("SLA  PW   PBE  PBE", "PBE"), ("SLA  PZ   NOGX NOGC", "LDA"),
     ("SLA PW PSX PSC", "PBESOL")],
)
def test_functional_spellings(text, name):
    assert normalise_functional(text) == name


@needs_debian
def test_headers_of_upf_v1_and_v2():
    v2 = parse_upf_header((DEBIAN / "Si.pbe-nl-rrkjus_psl.1.0.0.UPF").read_text())
    assert (v2.element, v2.functional, v2.z_valence, v2.suggested_wfc, v2.suggested_rho) == ("Si", "PBE", 4, 44, 175)
    v1 = parse_upf_header((DEBIAN / "Rh.pbe-rrkjus_lb.UPF").read_text())
    assert (v1.element, v1.functional) == ("Rh", "PBE")
    with pytest.raises(PseudopotentialError, match="PP_HEADER"):
        parse_upf_header("not a pseudopotential")


@needs_debian
def test_debian_family_resolves_with_md5():
    resolved = resolve_pseudos(load_family("debian-pbe"), ["Si", "O", "Si"])
    assert set(resolved) == {"O", "Si"}
    assert resolved["Si"].md5 == "78279d3766ecb5dbdc0623f3e93c9a23"


def _family(tmp_path: Path, rows: dict) -> Path:
    path = tmp_path / "family.json"
    path.write_text(json.dumps({"functional": "PBE", "pseudopotentials": rows}))
    return path


@needs_debian
def test_wrong_element_wrong_md5_and_mixed_functional_are_refused(tmp_path):
    shutil.copy(DEBIAN / "O.pbe-kjpaw.UPF", tmp_path / "Si.fake.UPF")
    shutil.copy(DEBIAN / "Al.pz-vbc.UPF", tmp_path / "Al.pz-vbc.UPF")
    rows = {
        "Si": {"filename": "Si.fake.UPF", "cutoff_wfc": 30, "cutoff_rho": 240, "md5": "0" * 32},
        "Al": {"filename": "Al.pz-vbc.UPF", "cutoff_wfc": 30, "cutoff_rho": 120},
    }
    family = load_family(str(_family(tmp_path, rows)))
    with pytest.raises(PseudopotentialError) as info:
        resolve_pseudos(family, ["Si", "Al"])
    message = str(info.value)
    assert "pseudopotential for O" in message  # header says O, table says Si
    assert "md5" in message
    assert "LDA" in message  # Al is LDA, the family PBE


def test_missing_files_name_every_element_and_path(tmp_path):
    rows = {el: {"filename": f"{el}.UPF", "cutoff_wfc": 30, "cutoff_rho": 240} for el in ("Si", "Fe")}
    family = load_family(str(_family(tmp_path, rows)))
    with pytest.raises(PseudopotentialError) as info:
        resolve_pseudos(family, ["Si", "Fe", "Au"])
    message = str(info.value)
    assert f"Fe (expected {tmp_path / 'Fe.UPF'})" in message
    assert f"Si (expected {tmp_path / 'Si.UPF'})" in message
    assert "Au (not in family" in message
