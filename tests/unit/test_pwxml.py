"""pw.x's data-file-schema.xml (qe_factory.engine.pwxml) against the real pw.x 6.7 runs in tests/data, and the check
that compares it with the stdout and with the input asked for (sanitize.xml_problems, runner.read_back).

Expected numbers come from the fixture files themselves (regular expressions on the XML, whitespace splitting on
pw.out), never from the code under test; "altered" XMLs are copies changed in tmp_path, never stored.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from ase.io.espresso import read_fortran_namelist
from ase.units import Bohr, Ry

from qe_factory.engine.inputs import PwInput
from qe_factory.engine.parsers import PwOutput, read_pw_run
from qe_factory.engine.pwxml import XML_NAME, XmlError, parse_pw_xml, read_pw_xml
from qe_factory.engine.runner import SCRATCH_DIR, read_back
from qe_factory.engine.sanitize import xml_problems

DATA = Path(__file__).resolve().parents[1] / "data"
WITH_XML = sorted(p.name for p in DATA.iterdir() if (p / XML_NAME).exists())
HA_IN_RY = 2.0


def xml_text(name: str) -> str:
    return (DATA / name / XML_NAME).read_text()


def xml_number(name: str, tag: str) -> float:
    return float(re.search(rf"<{tag}>(\S+)</{tag}>", xml_text(name)).group(1))


def asked_for(name: str) -> PwInput:
    """The PwInput of the fixture's pw.in, as ASE reads it: what the factory asked pw.x for."""
    with open(DATA / name / "pw.in") as handle:
        namelists, cards = read_fortran_namelist(handle)
    species = cards[cards.index("ATOMIC_SPECIES") + 1 : cards.index("K_POINTS automatic")]
    mesh = cards[cards.index("K_POINTS automatic") + 1].split()
    return PwInput(
        parameters=namelists, kpts=tuple(int(n) for n in mesh[:3]), pseudo_md5={},
        pseudopotentials={line.split()[0]: line.split()[2] for line in species},
    )


def test_the_expected_fixtures_have_their_xml():
    assert {"si_scf", "fe_magnetic", "si_unconverged", "si_smeared"} <= set(WITH_XML)


@pytest.mark.parametrize("name", WITH_XML)
def test_xml_and_stdout_agree_on_every_fixture(name):
    xml, output = read_pw_xml(DATA / name / XML_NAME), read_pw_run(DATA / name)
    assert xml_problems(xml, output, asked_for(name)) == []
    assert xml.converged == output.converged
    assert xml.scf_steps == output.scf_iterations
    assert xml.scf_error == pytest.approx(output.scf_accuracy[-1], rel=0.06)  # pw.out prints 2 significant digits
    assert xml.pw_version == output.pw_version.removeprefix("v.")


@pytest.mark.parametrize("name", [n for n in WITH_XML if "JOB DONE" in (DATA / n / "pw.out").read_text()])
def test_xml_units_and_signs(name):
    xml, out = read_pw_xml(DATA / name / XML_NAME), (DATA / name / "pw.out").read_text()
    if xml.converged:
        bang = float([line for line in out.splitlines() if line.startswith("!")][-1].split("=")[1].split()[0])
        assert xml_number(name, "etot") * HA_IN_RY == pytest.approx(bang, abs=5e-9)  # Ha → the Ry pw.out prints
        assert xml.energy == pytest.approx(bang * Ry, abs=1e-6)
        block = re.search(r"<stress rank[^>]*>(.*?)</stress>", xml_text(name), re.S).group(1)
        stress_ha = np.array(block.split(), dtype=float)
        assert np.array(xml.stress).ravel() == pytest.approx(-stress_ha * HA_IN_RY * Ry / Bohr**3)  # ASE sign
    else:  # pw.x 6.7 writes its last iteration's energy, but no forces or stress, when the SCF did not converge
        assert xml.energy is not None and xml.forces is None and xml.stress is None
    assert xml.input.ecutwfc == float(re.search(r"ecutwfc\s*=\s*(\S+)", (DATA / name / "pw.in").read_text())[1])


def test_fe_magnetization_from_the_xml():
    xml = read_pw_xml(DATA / "fe_magnetic" / XML_NAME)
    assert xml.input.lsda and xml.total_magnetization == xml_number("fe_magnetic", "total") > 1.0
    assert xml.absolute_magnetization == xml_number("fe_magnetic", "absolute")
    assert read_pw_xml(DATA / "si_scf" / XML_NAME).total_magnetization is None  # 0 in the file: not spin-polarised


def test_smearing_is_written_under_its_canonical_name():
    assert re.search(r"smearing\s*=\s*'cold'", (DATA / "si_scf" / "pw.in").read_text())
    assert read_pw_xml(DATA / "si_scf" / XML_NAME).input.smearing == "mv"


# -- altered copies are caught, each as a named problem ---------------------------------------------------------------
ALTERATIONS = [
    ("si_scf", r"<etot>(\S+)</etot>", lambda v: f"{float(v) + 1e-6:.15e}", "energy differs"),  # 27 μeV
    ("si_scf", r"<ecutwfc>(\S+)</ecutwfc>", lambda v: "1.5e1", "used ecutwfc 30.0"),
    ("si_scf", r"<ecutrho>(\S+)</ecutrho>", lambda v: "1.2e2", "used ecutrho 240.0"),
    ("si_scf", r'<smearing degauss="(\S+)"', lambda v: "2.5e-2", "used degauss 0.05"),
    ("si_scf", r'<smearing degauss="\S+">(\w+)<', lambda v: "gaussian", "used smearing 'gaussian'"),
    ("si_scf", r"<pseudo_file>(\S+)</pseudo_file>", lambda v: "Si.pz-vbc.UPF", "used pseudopotentials {'Si': 'Si.pz"),
    ("si_scf", r'monkhorst_pack nk1="(\d)"', lambda v: "5", "used k-points [5, 4, 4, 0, 0, 0]"),
    ("si_scf", r"<convergence_achieved>(\w+)<", lambda v: "false", "converged False vs True"),
    ("fe_magnetic", r"<total>(\S+)</total>", lambda v: f"{float(v) + 0.01}", "total magnetization differs"),
    ("fe_magnetic", r"<lsda>(\w+)</lsda>", lambda v: "false", "used lsda False"),
]


def altered(name: str, pattern: str, change) -> str:
    text = xml_text(name)
    match = re.search(pattern, text)
    return text[: match.start(1)] + change(match.group(1)) + text[match.end(1) :]


@pytest.mark.parametrize("name, pattern, change, expected", ALTERATIONS)
def test_an_altered_xml_is_caught_as_a_named_problem(name, pattern, change, expected, tmp_path):
    attempt = tmp_path / "run" / "attempt_1"
    attempt.mkdir(parents=True)
    (attempt / XML_NAME).write_text(altered(name, pattern, change))
    checked = read_back(read_pw_run(DATA / name), attempt, asked_for(name))
    assert any(expected in problem for problem in checked.xml_problems), checked.xml_problems
    assert all(problem.startswith(("pw.x used", "pw.x's XML and stdout")) for problem in checked.xml_problems)
    assert checked.xml is not None


def test_the_force_check_is_tight():
    xml = parse_pw_xml(xml_text("si_scf"))
    forces = np.array(xml.forces)
    forces[1, 2] += 2e-6  # eV/Å
    problems = xml_problems(xml.model_copy(update={"forces": forces.tolist()}), read_pw_run(DATA / "si_scf"),
                            asked_for("si_scf"))
    assert len(problems) == 1
    assert re.fullmatch(r"pw.x's XML and stdout disagree: forces differs by 2(\.\d+)?e-06 \(limit 1e-06\)", problems[0])


def test_the_stdout_of_another_run_is_caught():
    problems = xml_problems(read_pw_xml(DATA / "si_scf" / XML_NAME), read_pw_run(DATA / "si_smeared"),
                            asked_for("si_smeared"))
    assert any("energy differs" in p for p in problems) and any("used degauss 0.02" in p for p in problems)


# -- read back from the scratch, missing, unreadable -----------------------------------------------------------------
def test_read_back_copies_the_xml_from_the_scratch_beside_pw_out(tmp_path):
    attempt, save = tmp_path / "attempt_1", tmp_path / SCRATCH_DIR / "pwscf.save"
    attempt.mkdir()
    save.mkdir(parents=True)
    shutil.copy(DATA / "fe_magnetic" / XML_NAME, save / XML_NAME)
    checked = read_back(read_pw_run(DATA / "fe_magnetic"), attempt, asked_for("fe_magnetic"))
    assert (attempt / XML_NAME).read_text() == xml_text("fe_magnetic")
    assert checked.xml_problems == [] and checked.xml["input"]["lsda"] is True
    assert "forces" not in checked.xml and checked.xml["total_magnetization"] > 1.0


def test_a_missing_xml_is_a_problem(tmp_path):
    checked = read_back(read_pw_run(DATA / "si_scf"), tmp_path, asked_for("si_scf"))
    assert checked.xml is None and checked.xml_problems == [f"pw.x wrote no {XML_NAME}: the label cannot be checked"]


@pytest.mark.parametrize("text", ["", "<qes:espresso", xml_text("si_scf")[: len(xml_text("si_scf")) // 2],
                                  "<root><output/></root>"])
def test_an_unreadable_xml_is_a_problem(text, tmp_path):
    (tmp_path / XML_NAME).write_text(text)
    with pytest.raises(XmlError):
        read_pw_xml(tmp_path / XML_NAME)
    checked = read_back(PwOutput(), tmp_path, asked_for("si_scf"))
    assert checked.xml is None and checked.xml_problems[0].startswith(f"pw.x's {XML_NAME} is unreadable: ")
