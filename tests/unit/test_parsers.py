"""qe_factory.engine.parsers against real pw.x 6.7 outputs stored in tests/data (made by tests/data/make_fixtures.py).

Every expected number is read from the fixture text itself with the simplest possible code (split on whitespace),
never from the parser under test, and converted with ase.units: the tests check the parser's units, signs and
bookkeeping, not numbers copied by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.stress import full_3x3_to_voigt_6_stress
from ase.units import Bohr, GPa, Ry

from qe_factory.engine.parsers import OutputIncompleteError, PwOutput, parse_pw_output, read_pw_run

DATA = Path(__file__).resolve().parents[1] / "data"
FIXTURES = sorted(p.name for p in DATA.iterdir() if (p / "meta.json").exists())
CONVERGED = ["si_scf", "fe_magnetic", "h2_overlap", "si_too_many_pools", "si_verbosity_high"]
KBAR = GPa / 10  # eV/Å³ per kbar


def text(name: str, filename: str = "pw.out") -> str:
    return (DATA / name / filename).read_text()


def meta(name: str) -> dict:
    return json.loads(text(name, "meta.json"))


def parsed(name: str) -> PwOutput:
    return read_pw_run(DATA / name)


# -- independent readers of the raw text (whitespace splitting only) --------------------------------------------------
def bang_energy_ry(out: str) -> float:
    return float([line for line in out.splitlines() if line.startswith("!")][-1].split("=")[1].split()[0])


def forces_ry_bohr(out: str) -> np.ndarray:
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if "Forces acting on atoms" in line)
    rows = []
    for line in lines[start + 1 :]:
        if "force =" in line:
            rows.append([float(v) for v in line.split("=")[1].split()])
        elif rows:
            break
    return np.array(rows)


def stress_block(out: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(Ry/bohr³ matrix, kbar matrix, printed pressure P in kbar) of the last stress block."""
    lines = out.splitlines()
    header = max(i for i, line in enumerate(lines) if "total   stress" in line)
    rows = np.array([[float(v) for v in lines[header + k].split()] for k in (1, 2, 3)])
    return rows[:, :3], rows[:, 3:], float(lines[header].split("P=")[1])


def pw_in_value(name: str, key: str) -> str:
    return re.search(rf"^\s*{key}\s*=\s*(\S+)", text(name, "pw.in"), re.MULTILINE).group(1)


# -- the fixtures themselves ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_is_complete_and_small(name):
    directory = DATA / name
    info = meta(name)
    for filename in ("pw.in", "pw.out", "pw.err", "meta.json"):
        assert (directory / filename).is_file(), filename
    assert (directory / "CRASH").exists() == info["crash_file"]
    assert {"argv", "returncode", "timed_out"} <= info.keys()
    assert "pw.x" in " ".join(info["argv"])
    assert text(name).strip(), "empty pw.out"
    assert all(path.stat().st_size < 200_000 for path in directory.iterdir())
    if "derived_from" not in info:
        assert "real pw.x run" in info["generated_by"]


def test_all_required_fixtures_exist():
    required = {
        "si_scf", "fe_magnetic", "si_unconverged", "si_walltime", "si_missing_pseudo", "si_bad_input",
        "si_too_many_pools", "si_truncated", "h2_overlap", "si_verbosity_high",
    }
    assert required <= set(FIXTURES)


# -- energy, forces, stress ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONVERGED)
def test_energy_is_the_bang_line_in_ev(name):
    out = text(name)
    energy = parsed(name).energy
    assert energy == pytest.approx(bang_energy_ry(out) * Ry, rel=1e-12)
    assert energy == pytest.approx(bang_energy_ry(out) * 13.6056931, rel=1e-8)  # 1 Ry in eV (CODATA 2014/2018)


@pytest.mark.parametrize("name", CONVERGED)
def test_forces_are_the_ry_bohr_block_converted(name):
    out = parsed(name)
    expected = forces_ry_bohr(text(name)) * Ry / Bohr
    forces = np.array(out.forces)
    assert forces.shape == (out.natoms, 3) == expected.shape
    np.testing.assert_allclose(forces, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-6)  # pw.x removes the net force


def test_si_scf_forces_are_not_trivial():
    forces = np.array(parsed("si_scf").forces)
    assert np.abs(forces).max() > 0.1  # eV/Å: the rattle gives real forces
    atom_1 = re.search(r"atom\s+1\s+type\s+1\s+force\s+=\s+(\S+)\s+(\S+)\s+(\S+)", text("si_scf")).groups()
    assert forces[0, 1] == pytest.approx(float(atom_1[1]) * Ry / Bohr, rel=1e-7)  # the y component, ≈ 0.73 eV/Å
    assert abs(forces[0, 1]) > 0.1


# -- verbosity='high': the total forces are followed by their contributions, in the same line shape -------------------
def test_verbosity_high_fixture_really_prints_the_contributions():
    lines = text("si_verbosity_high").splitlines()
    start = next(i for i, line in enumerate(lines) if "Forces acting on atoms" in line)
    end = next(i for i in range(start, len(lines)) if "Total force" in lines[i])
    force_lines = [line for line in lines[start:end] if "force =" in line]
    natoms = int(pw_in_value("si_verbosity_high", "nat"))
    assert len(force_lines) > natoms  # what made the parser return None before
    for title in ("The non-local contrib.  to forces", "The ionic contribution  to forces",
                  "The SCF correction term to forces"):
        assert any(title in line for line in lines[start:end]), title
    assert pw_in_value("si_verbosity_high", "verbosity") == "'high'"


def test_verbosity_high_gives_the_total_forces():
    out = parsed("si_verbosity_high")
    lines = text("si_verbosity_high").splitlines()
    start = next(i for i, line in enumerate(lines) if "Forces acting on atoms" in line)
    # the total block: the natoms lines right after the header's blank line
    total = np.array([[float(v) for v in lines[start + 2 + k].split("=")[1].split()] for k in range(out.natoms)])
    np.testing.assert_allclose(out.forces, total * Ry / Bohr, rtol=1e-12, atol=1e-12)
    assert out.energy == pytest.approx(bang_energy_ry(text("si_verbosity_high")) * Ry, rel=1e-12)
    assert out.stress is not None and not out.missing_results()
    # ASE's espresso-out reader takes the natoms lines after the header too
    ase_forces = ase.io.read(DATA / "si_verbosity_high" / "pw.out", format="espresso-out").get_forces()
    np.testing.assert_allclose(out.forces, ase_forces, rtol=1e-6, atol=1e-9)
    # verbosity changes what is printed, not the physics: the same input without it (si_scf) has the same forces
    np.testing.assert_allclose(out.forces, parsed("si_scf").forces, atol=1e-5)


def test_verbosity_high_contribution_lines_never_count_as_totals():
    """Dropping the total block's lines leaves only contribution lines: the parser must refuse, not read those."""
    lines = text("si_verbosity_high").splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if "Forces acting on atoms" in line)
    natoms = int(pw_in_value("si_verbosity_high", "nat"))
    without_totals = "".join(lines[: start + 2] + lines[start + 2 + natoms :])
    assert parse_pw_output(without_totals).forces is None


@pytest.mark.parametrize("name", CONVERGED)
def test_stress_is_minus_the_printed_block(name):
    out = parsed(name)
    ry_bohr3, kbar, pressure = stress_block(text(name))
    stress = np.array(out.stress)
    assert stress.shape == (3, 3)
    np.testing.assert_allclose(stress, stress.T, atol=1e-12)
    # ASE convention: the negative of what pw.x prints (positive = tensile) ...
    np.testing.assert_allclose(stress, -ry_bohr3 * Ry / Bohr**3, rtol=1e-12, atol=1e-15)
    # ... and the same in kbar (printed with 2 decimals): 1 kbar = 0.1 GPa
    np.testing.assert_allclose(stress, -kbar * KBAR, atol=0.0051 * KBAR)
    assert np.array(out.stress_kbar) == pytest.approx(kbar)
    # pw.x's P is -trace(stress)/3 in ASE's convention
    assert -np.trace(stress) / 3 / KBAR == pytest.approx(pressure, abs=0.006)


def test_si_scf_stress_sign_and_shear_explicitly():
    stress = np.array(parsed("si_scf").stress) / KBAR  # kbar, ASE sign
    _, printed, pressure = stress_block(text("si_scf"))
    assert pressure > 0  # compressed cell: pw.x prints a positive pressure ...
    assert np.all(np.diag(stress) < 0)  # ... which is a negative (compressive) stress for ASE
    assert np.all(np.diag(printed) > 0)
    assert abs(stress[0, 2]) > 10  # the shear gives off-diagonal stress (|s_xz| ≈ 25 kbar)
    assert stress[0, 2] == pytest.approx(-printed[0, 2], abs=0.01)


def test_h2_overlap_stress_is_anisotropic_with_the_right_signs():
    stress = np.array(parsed("h2_overlap").stress) / KBAR
    _, printed, _ = stress_block(text("h2_overlap"))
    assert printed[2, 2] > 100 and stress[2, 2] < -100  # the squeezed bond pushes outwards along z
    assert stress[0, 0] == pytest.approx(-printed[0, 0], abs=0.01) and stress[0, 0] > 0


@pytest.mark.parametrize("name", CONVERGED)
def test_agrees_with_ase_reader(name):
    atoms = ase.io.read(DATA / name / "pw.out", format="espresso-out")
    out = parsed(name)
    # ASE's espresso reader converts with CODATA 2006 units: agreement to ~1e-7, not to the last digit
    assert out.energy == pytest.approx(atoms.get_potential_energy(), rel=1e-6)
    np.testing.assert_allclose(out.forces, atoms.get_forces(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        full_3x3_to_voigt_6_stress(np.array(out.stress)), atoms.get_stress(), rtol=1e-6, atol=1e-9
    )


# -- magnetization ---------------------------------------------------------------------------------------------------
def test_fe_total_magnetization():
    out = parsed("fe_magnetic")
    printed = re.findall(r"total magnetization\s+=\s+(\S+)", text("fe_magnetic"))
    assert len(printed) == out.scf_iterations  # one per SCF iteration
    assert out.total_magnetization == float(printed[-1])
    assert out.total_magnetization > 1.0  # bcc Fe: ~2 μB/atom
    assert out.absolute_magnetization >= abs(out.total_magnetization)
    assert pw_in_value("fe_magnetic", "nspin") == "2"
    assert out.converged and not out.missing_results()


def test_non_magnetic_runs_have_no_magnetization():
    assert parsed("si_scf").total_magnetization is None


# -- unconverged, stopped, truncated, killed ----------------------------------------------------------------------
def test_unconverged():
    out = parsed("si_unconverged")
    assert meta("si_unconverged")["returncode"] == 2
    assert out.converged is False
    assert out.convergence_failed is True
    assert out.job_done is True  # pw.x 6.7 prints JOB DONE after a failed SCF
    assert out.energy is None and out.forces is None and out.stress is None
    assert out.missing_results() == ["energy", "forces", "stress"]
    maxstep = int(pw_in_value("si_unconverged", "electron_maxstep"))
    assert out.scf_iterations == maxstep
    with pytest.raises(OutputIncompleteError, match=rf"no energy, forces, stress after JOB DONE; {maxstep} SCF iter"):
        out.require_results()


def test_walltime_stop():
    out = parsed("si_walltime")
    assert meta("si_walltime")["returncode"] == 2
    assert out.job_done and not out.converged and not out.convergence_failed
    assert out.energy is None
    started = [line for line in text("si_walltime").splitlines() if "iteration #" in line and "ecut=" in line]
    assert out.scf_iterations == len(started)
    assert out.scf_iterations >= 1
    with pytest.raises(OutputIncompleteError, match="after JOB DONE"):
        out.require_results()


def test_truncated_in_the_forces_block():
    out = parsed("si_truncated")
    full = parsed("si_scf")
    assert "force =" in text("si_truncated").splitlines()[-1]  # it really ends inside the forces block
    assert out.forces is None and out.stress is None
    assert out.energy == full.energy  # the '!' line came before the cut
    assert out.converged and not out.job_done
    with pytest.raises(OutputIncompleteError, match=r"no forces, stress and no JOB DONE \(killed or truncated\)"):
        out.require_results()


def _cut_points(out: str) -> list[int]:
    """Every line end of a pw.out, and every character from the forces header to the end of the total stress."""
    lines = np.cumsum([len(line) for line in out.splitlines(keepends=True)]).tolist()
    start = out.index("Forces acting on atoms")
    end = out.index("total   stress")
    for _ in range(4):  # the header line and the three rows of the matrix
        end = out.index("\n", end) + 1
    return sorted({0, *lines, *range(start, end)})


def test_truncation_at_line_ends_never_gives_wrong_numbers():
    out = text("si_scf")
    full = parse_pw_output(out)
    ends = np.cumsum([len(line) for line in out.splitlines(keepends=True)]).tolist()
    for cut in ends:
        part = parse_pw_output(out[:cut])
        for name in ("energy", "forces", "stress"):
            value = getattr(part, name)
            assert value is None or value == getattr(full, name), (name, cut)
        if part.missing_results():
            with pytest.raises(OutputIncompleteError):
                part.require_results()


def test_truncation_mid_line_never_gives_wrong_forces():
    out = text("si_scf")
    full = parse_pw_output(out)
    wrong = []
    for cut in _cut_points(out):
        part = parse_pw_output(out[:cut])
        for name in ("energy", "forces", "stress"):
            value = getattr(part, name)
            if value is not None and value != getattr(full, name):
                wrong.append((name, cut, out[:cut].splitlines()[-1]))
    assert not wrong, wrong[:3]


@pytest.mark.parametrize("name", ["si_scf", "si_verbosity_high"])
def test_truncation_anywhere_is_refused_or_right(name):
    """Wherever the file is cut (even inside a line), a frame either passes require_results() with the full file's
    numbers or is refused."""
    out = text(name)
    full = parse_pw_output(out)
    for cut in _cut_points(out):
        part = parse_pw_output(out[:cut])
        if part.missing_results():
            with pytest.raises(OutputIncompleteError):
                part.require_results()
        else:
            assert (part.energy, part.forces, part.stress) == (full.energy, full.forces, full.stress), cut


@pytest.mark.parametrize("name", ["si_killed_sigkill", "si_killed_sigsegv", "si_out_of_memory"])
def test_killed_runs(name):
    out = parsed(name)
    assert meta(name)["returncode"] != 0
    assert not out.job_done and out.crash is None and out.errors == []
    assert out.energy is None
    with pytest.raises(OutputIncompleteError, match="no JOB DONE"):
        out.require_results()


# -- error blocks and CRASH ---------------------------------------------------------------------------------------
def test_missing_pseudo_error_block():
    out = parsed("si_missing_pseudo")
    pseudo_dir = pw_in_value("si_missing_pseudo", "pseudo_dir").strip("'")
    assert out.errors[0] == f"Error in routine readpp (1): file {pseudo_dir}/Si.does-not-exist.UPF not found"
    assert "from readpp : error #" in out.crash
    assert any("from readpp" in block and "Si.does-not-exist.UPF not found" in block for block in out.errors)
    assert out.pw_version == text("si_missing_pseudo").split("Program PWSCF")[1].split()[0]
    assert out.pw_version.startswith("v.6.7")
    assert out.energy is None and not out.job_done and out.natoms is None


def test_bad_input_error_block():
    out = parsed("si_bad_input")
    assert out.errors[0].startswith("Error in routine  read_namelists (1): bad line in namelist &system:")
    assert "not_a_variable" in out.errors[0]
    assert "read_namelists" in out.crash
    assert not out.job_done


def test_pools_error_block_printed_by_every_rank():
    out = parsed("si_pools_out_of_range")
    assert out.errors
    assert all("invalid number of pools, out of range" in block for block in out.errors)
    assert any("mp_start_pools" in block for block in out.errors)


def test_info_message_is_a_warning_not_an_error():
    out = parsed("si_too_many_pools")
    assert out.errors == [] and out.crash is None
    assert any("divide_et_impera" in warning for warning in out.warnings)
    assert out.converged and not out.missing_results()


def test_info_message_text_is_kept():
    assert any("some nodes have no k-points" in warning for warning in parsed("si_too_many_pools").warnings)


def test_the_pseudopotential_files_read_are_named_by_their_element():
    """pw.x names each file by the element its header gives, padded to two characters ('H ', 'C ')."""
    assert parsed("h2_overlap").pseudos_read["H"]["path"].endswith("/H.pbe-kjpaw.UPF")
    wrong = parsed("si_wrong_pseudo").pseudos_read  # carbon's UPF under the Si file name
    assert list(wrong) == ["C"] and wrong["C"]["path"].endswith("/Si.pbe-nl-rrkjus_psl.1.0.0.UPF")


def test_notes_printed_before_the_scf_are_not_final():
    out = parsed("fe_magnetic")  # set_rhoc's check, printed once before the first SCF iteration
    assert out.warnings == ["Check: negative core charge=   -0.000355"] and out.final_warnings == []


def test_successful_run_has_no_errors():
    out = parsed("si_scf")
    assert out.errors == [] and out.crash is None and out.warnings == []
    assert out.converged and not out.convergence_failed and out.job_done
    out.require_results()


# -- SCF trace, negative rho, timing --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["si_scf", "fe_magnetic", "si_too_many_pools", "si_verbosity_high"])
def test_scf_accuracy_trace(name):
    out = parsed(name)
    iterations = int(re.search(r"convergence has been achieved in\s+(\d+) iterations", text(name)).group(1))
    printed = [float(v) for v in re.findall(r"estimated scf accuracy\s+<\s+(\S+)", text(name))]
    assert out.scf_iterations == iterations
    assert len(out.scf_accuracy) == iterations == len(printed)
    assert out.scf_accuracy == printed
    conv_thr = float(pw_in_value(name, "conv_thr"))
    assert out.scf_accuracy[-1] < conv_thr < out.scf_accuracy[0]


def test_scf_accuracy_trace_of_unconverged_run():
    out = parsed("si_unconverged")
    assert len(out.scf_accuracy) == out.scf_iterations == int(pw_in_value("si_unconverged", "electron_maxstep"))
    assert out.scf_accuracy[-1] > float(pw_in_value("si_unconverged", "conv_thr"))


def test_negative_rho():
    out = parsed("h2_overlap")
    last = re.findall(r"negative rho \(up, down\):\s+(\S+)\s+(\S+)", text("h2_overlap"))[-1]
    assert out.negative_rho == pytest.approx(float(last[0]) + float(last[1]))
    assert out.negative_rho > 0
    assert parsed("si_scf").negative_rho is None


def test_h2_overlap_converges_to_huge_forces():
    """pw.x does not complain about H atoms 0.3 Å apart and converges to forces above 100 eV/Å.

    Nor do the sanitizer's default thresholds (max_force 1000 eV/Å) refuse this frame: a known gap, documented in
    tests/test_sanitize.py; only tighter thresholds refuse it there."""
    out = parsed("h2_overlap")
    assert out.converged and out.job_done and out.errors == [] and not out.missing_results()
    assert np.linalg.norm(out.forces, axis=1).max() > 100  # eV/Å


@pytest.mark.parametrize("name", [n for n in FIXTURES if "JOB DONE" in text(n)])
def test_wall_time(name):
    out = parsed(name)
    cpu, wall = re.search(r"PWSCF\s+:\s+(\S+)s CPU\s+(\S+)s WALL", text(name)).groups()
    assert out.wall_time == float(wall) and out.cpu_time == float(cpu)
    assert 0 < out.wall_time <= meta(name)["wall_time_s"] or "derived_from" in meta(name)


def test_no_wall_time_without_the_final_clock():
    assert parsed("si_truncated").wall_time is None
    assert parsed("si_missing_pseudo").wall_time is None


# The formats of pw.x 6.7's first clock (UtilXlib/clocks_handler.f90, print_this_clock) above one minute.
@pytest.mark.parametrize(
    "line, cpu, wall",
    [
        ("     PWSCF        :      2.17s CPU      3.29s WALL", 2.17, 3.29),
        ("     PWSCF        :  1m23.45s CPU     1m25.37s WALL", 83.45, 85.37),
        ("     PWSCF        :  1m 3.45s CPU     2m 0.05s WALL", 63.45, 120.05),
        ("     PWSCF        :    1h 2m CPU        1h 3m WALL", 3720, 3780),
        ("     PWSCF        :    1d    2h 3m CPU        1d    2h 5m WALL", 93780, 93900),
    ],
)
def test_wall_time_formats(line, cpu, wall):
    out = parse_pw_output(re.sub(r"^\s+PWSCF\s+:.*WALL$", lambda _: line, text("si_scf"), count=1, flags=re.M))
    assert (out.cpu_time, out.wall_time) == (pytest.approx(cpu), pytest.approx(wall))
