"""The QC certificate of a label (engine/certificate.py): its numbers against pw.x's own output and files, read
independently (the fixture's pw.out, the pseudopotential file's bytes), and its round trip through every export
format. Labels come from recorded real pw.x runs (tests/fake_pw.py replays them)."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.db import connect
from ase.io import read

from qe_factory import QERunner, SanitizerThresholds
from qe_factory.engine.certificate import certificate
from qe_factory.engine.export import EXPORT_FORMATS, write_labels
from qe_factory.engine.parsers import PwOutput
from qe_factory.engine.protocol import protocol_hash
from qe_factory.engine.pseudos import load_family
from qe_factory.engine.results import DFTResult
from qe_factory.engine.sanitize import check_of, provenance_problems, sanitize
from qe_factory.engine.structure import StructureDoc

TESTS = Path(__file__).resolve().parents[1]
FAKE_PW = TESTS / "fake_pw.py"
README = TESTS.parent / "README.md"


def pw_out(fixture: str) -> str:
    return (TESTS / "data" / fixture / "pw.out").read_text()


@pytest.fixture
def replay(fast_config, monkeypatch, tmp_path):
    """A runner whose pw.x replays `fixture` (its settings: si_scf 25/200 Ry at k-spacing 0.6, fe_magnetic 30/240)."""
    def make(fixture: str, **changes) -> QERunner:
        monkeypatch.setenv("FAKE_PW_PLAN", f"replay:{fixture}")
        monkeypatch.setenv("FAKE_PW_COUNTER", str(tmp_path / f"calls-{fixture}"))
        return QERunner(fast_config.with_changes(command=f"{sys.executable} {FAKE_PW}", **changes))
    return make


@pytest.fixture
def si_label(replay) -> tuple[DFTResult, QERunner]:
    runner = replay("si_scf", kpoint_spacing=0.6)
    result = runner.run(bulk("Si"), uid="si")
    assert result.succeeded, result.error_message
    return result, runner


def documented_keys() -> set[str]:
    """The certificate keys README.md's table names (`qc_pseudo_md5_<El>` stands for one per element)."""
    section = README.read_text().split("#### QC certificate", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `(qc_\w+?)(?:<El>)?` \|", section, re.MULTILINE))


def test_a_real_label_s_certificate_holds_pw_x_s_own_numbers(si_label):
    result, runner = si_label
    cert = certificate(result)
    out = pw_out("si_scf")
    forces = np.asarray(result.forces)
    assert cert["qc_max_force"] == pytest.approx(np.linalg.norm(forces, axis=1).max(), abs=1e-12)
    # bulk Si: 2.35 Å apart, beyond the covalent radii sum 2.22 Å: no contact, the bound is contact_force
    assert cert["qc_force_bound"] == SanitizerThresholds().contact_force == 15.0
    assert cert["qc_force_ratio"] == pytest.approx(cert["qc_max_force"] / 15.0)
    assert certificate(result, SanitizerThresholds(contact_force=30.0))["qc_force_bound"] == 30.0
    last_accuracy = float(re.findall(r"estimated scf accuracy\s+<\s+(\S+) Ry", out)[-1])
    assert cert["qc_scf_accuracy"] == pytest.approx(last_accuracy, rel=0.02)  # pw.out prints 2 digits
    assert cert["qc_scf_iterations"] == int(re.search(r"achieved in\s+(\d+) iterations", out).group(1))
    assert cert["qc_conv_thr"] == float(re.search(r"conv_thr\s*=\s*(\S+)",
                                                  (runner.run_dir("si") / "attempt_1" / "pw.in").read_text()).group(1))
    assert cert["qc_pw_version"] == re.search(r"Program PWSCF (\S+)", out).group(1) == "v.6.7MaX"
    family = load_family(runner.config.pseudo_family, runner.config.pseudo_dir)
    md5 = hashlib.md5((family.directory / family.entries["Si"].filename).read_bytes()).hexdigest()
    assert cert["qc_pseudo_md5_Si"] == md5
    assert cert["qc_protocol_hash"] == protocol_hash(runner.config) and len(cert["qc_protocol_hash"]) == 64
    assert (cert["qc_xml_check"], cert["qc_warnings"], cert["qc_problems"]) == ("agrees", len(result.warnings), 0)
    assert (cert["qc_nspin"], cert["qc_total_magnetization"], cert["qc_absolute_magnetization"]) == (1, 0.0, 0.0)
    assert (cert["qc_magnetic_start"], cert["qc_branch"], cert["qc_branches"]) == (0.0, 0, 1)
    assert "qc_cohesive_energy" not in cert  # no E0 given: not judged, left out rather than None
    assert all(isinstance(v, (int, float, str)) and not isinstance(v, np.generic) for v in cert.values())
    assert {re.sub(r"_[A-Z][a-z]?$", "_", k) for k in cert} | {"qc_cohesive_energy"} == {
        k if not k.endswith("md5") else k + "_" for k in documented_keys()}


def test_a_magnetic_label_keeps_its_moments_its_start_and_the_branch_kept(replay):
    weak = bulk("Fe", "bcc", a=2.83)
    weak.set_initial_magnetic_moments([0.6])  # a weak start: the high-spin branch (5 μB) is checked too
    result = replay("fe_magnetic", ecutwfc=30, ecutrho=240).run(weak, uid="fe")
    assert result.succeeded and len(result.magnetic_branches) == 2
    cert = certificate(result)
    out = pw_out("fe_magnetic")
    assert cert["qc_nspin"] == 2
    assert cert["qc_total_magnetization"] == float(re.findall(r"total magnetization\s+=\s+(\S+)", out)[-1]) == 1.90
    assert cert["qc_absolute_magnetization"] == float(re.findall(r"absolute magnetization\s+=\s+(\S+)", out)[-1])
    assert (cert["qc_magnetic_start"], cert["qc_branch"], cert["qc_branches"]) == (0.6, 0, 2)  # a tie keeps the first
    older = result.model_copy(update={"magnetic_start": None, "absolute_magnetization": None})  # stored before
    stood_in = certificate(older)  # the kept branch's start and pw.x's XML (unrounded) stand in
    assert stood_in.pop("qc_absolute_magnetization") == pytest.approx(cert.pop("qc_absolute_magnetization"), abs=0.006)
    assert stood_in == cert


@pytest.mark.parametrize("format", EXPORT_FORMATS)
def test_every_export_format_gives_the_certificate_back_unchanged(si_label, tmp_path, format):
    result, _ = si_label
    atom = Atoms("Si", positions=[[5, 5, 5]], cell=[10, 10.5, 11], pbc=True)  # an isolated-atom reference (E0)
    e0 = result.model_copy(update={
        "uid": "e0-Si-0123456789ab", "formula": "Si", "structure": StructureDoc.from_atoms(atom), "energy": -134.5,
        "forces": [[0.0, 0.0, 0.0]], "total_magnetization": 2.0, "pw_version": "v.7.2"})
    path = tmp_path / ("labels.db" if format == "ase-db" else "labels.extxyz")
    export = write_labels([result, e0], path, format=format)
    assert export.labels == 1
    expected = {"si": certificate(export.exported[0]), "e0-Si-0123456789ab": certificate(e0)}
    assert expected["si"]["qc_cohesive_energy"] == pytest.approx((result.energy + 269.0) / 2)  # judged at export
    if format == "ase-db":
        got = {row.uid: {k: v for k, v in row.key_value_pairs.items() if k.startswith("qc_")}
               for row in connect(path).select()}
    else:
        got = {a.info["uid"]: {k: v for k, v in a.info.items() if k.startswith("qc_")}
               for a in read(path, index=":")}
    if format == "nequip-extxyz":  # no IsolatedAtom frames: NequIP trains on every frame
        expected.pop("e0-Si-0123456789ab")
    assert got == expected
    for uid, cert in got.items():  # names stay names, integers integers (ASE reads numpy scalars)
        assert {k: kind(v) for k, v in cert.items()} == {k: kind(v) for k, v in expected[uid].items()}, uid


def kind(value) -> str:
    return "str" if isinstance(value, str) else "int" if isinstance(value, (int, np.integer)) else "float"


def test_every_sanitizer_problem_is_counted_under_its_check():
    atoms = Atoms("Si2", positions=[[2.0, 5.0, 5.0], [5.0, 5.0, 5.0]], cell=[10.0, 10.0, 10.0], pbc=True)
    good = dict(energy=-200.0, forces=[[1.0, 0, 0], [-1.0, 0, 0]], stress=np.eye(3).tolist(), converged=True)
    cases = {
        "max_force": dict(forces=[[2000.0, 0, 0], [-2000.0, 0, 0]]),
        "contact_force": dict(forces=[[100.0, 0, 0], [-100.0, 0, 0]]),
        "finite_values": dict(forces=[[np.nan, 0, 0], [0, 0, 0]]),
        "energy_per_atom": dict(energy=200.0),
        "max_stress": dict(stress=(np.eye(3) * 10.0).tolist()),
        "max_stress_asymmetry": dict(stress=[[0.0, 0.01, 0], [0, 0, 0], [0, 0, 0]]),
        "max_negative_rho": dict(negative_rho=1.0),
        "scf_converged": dict(converged=False),
        "pw_warnings": dict(final_warnings=["eigenvalues not converged"]),
        "missing_results": dict(stress=None),
    }
    for check, change in cases.items():
        problems = sanitize(PwOutput(**{**good, **change}), atoms)
        assert problems and {check_of(p) for p in problems} == {check}, (check, problems)
    read_wrong = PwOutput(pseudos_read={"C": {"path": "/p/Si.UPF", "md5": "x"}})
    assert {check_of(p) for p in provenance_problems(read_wrong, {"Si": "y"}, {"Si": "Si.UPF"})} == {
        "pseudopotential_provenance"}
    assert check_of("pw.x used ecutwfc 30.0 (its XML), not the 25.0 asked for") == "xml_cross_check"
    assert check_of("pw.x wrote no data-file-schema.xml: the label cannot be checked") == "xml_cross_check"
    assert check_of("cohesive energy +88.300 eV/atom (E − ΣE0 per atom) outside [-10, 2]: ...") == "cohesive_energy"


def test_show_prints_every_key_of_the_certificate(si_label):
    from qe_factory.workflow.history import Story, story_lines

    result, _ = si_label
    lines = story_lines(Story(uid="si", outcome="labelled", formula="Si2", result=result))
    start = next(i for i, line in enumerate(lines) if line.startswith("  certificate "))
    block = [lines[start], *(line for line in lines[start + 1:] if line.startswith(" " * 14))]
    assert all(len(line) <= 118 for line in block)
    shown = dict(item.split("=", 1) for line in block for item in line.split()[line.startswith("  certificate"):])
    cert = certificate(result)
    assert set(shown) == set(cert)
    for key, value in cert.items():
        assert shown[key] == str(value) if isinstance(value, str) else float(shown[key]) == pytest.approx(value, 1e-5)
