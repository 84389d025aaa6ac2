"""pw.x output (stdout text + CRASH file) → PwOutput, as pure functions of the text.

Units on output: energy eV, forces eV/Å, stress eV/Å³ in ASE's sign convention (positive = tensile, i.e. the
negative of the matrix pw.x prints, so that pressure = -trace/3). The full printed 3×3 stress is kept; ASE's own
espresso-out reader keeps only its upper triangle and says nothing of convergence, hence this parser.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from ase.units import Bohr, Ry
from pydantic import BaseModel, ConfigDict

_FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eEdD][-+]?\d+)?"


class OutputIncompleteError(RuntimeError):
    """pw.x output lacks a result (energy, forces or stress): the run died or the file is truncated."""


class PwOutput(BaseModel):
    """Everything the factory reads from one pw.x run."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pw_version: str | None = None
    natoms: int | None = None
    energy: float | None = None
    forces: list[list[float]] | None = None
    stress: list[list[float]] | None = None
    stress_kbar: list[list[float]] | None = None
    total_magnetization: float | None = None
    absolute_magnetization: float | None = None
    negative_rho: float | None = None
    scf_accuracy: list[float] = []
    scf_iterations: int = 0
    converged: bool = False
    convergence_failed: bool = False
    job_done: bool = False
    warnings: list[str] = []  # pw.x's non-fatal messages, each once
    final_warnings: list[str] = []  # those printed in or after the last SCF iteration (judged by the sanitizer)
    final_ethr: float | None = None  # Ry: the diagonalization threshold of the last SCF iteration ("ethr = ...")
    final_unconverged: int = 0  # eigenvalues Davidson left unconverged in the last SCF iteration (all k-points)
    eigenvalues: int | None = None  # Kohn-Sham states × k-points (pw.x's counts), what Davidson solves per iteration
    errors: list[str] = []
    crash: str | None = None
    wall_time: float | None = None
    cpu_time: float | None = None
    # element (as the file's own header says: pw.x prints it) → {"path", "md5"} of the file pw.x says it read
    pseudos_read: dict[str, dict[str, str]] = {}
    # pw.x's XML record of a converged run, read back by the runner: its summary (pwxml.PwXml.summary) and where it
    # disagrees with this stdout or with the input asked for (sanitize.xml_problems)
    xml: dict[str, Any] | None = None
    xml_problems: list[str] = []

    def missing_results(self) -> list[str]:
        """Names of the results this output lacks."""
        return [name for name in ("energy", "forces", "stress") if getattr(self, name) is None]

    def require_results(self) -> None:
        """Raise OutputIncompleteError naming what is missing and how far pw.x got."""
        missing = self.missing_results()
        if missing:
            where = "after JOB DONE" if self.job_done else "and no JOB DONE (killed or truncated)"
            raise OutputIncompleteError(
                f"pw.x output has no {', '.join(missing)} {where}; {self.scf_iterations} SCF iterations seen"
            )


def _number(text: str) -> float:
    return float(text.lower().replace("d", "e"))


def _seconds(text: str) -> float:
    """pw.x times: '12.3s', '1m 2.5s', '1h 2m', '1d 2h 3m'."""
    total = 0.0
    for value, unit in re.findall(r"(\d+\.?\d*)\s*([dhms])", text):
        total += float(value) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[unit]
    return total


def _error_blocks(text: str) -> list[str]:
    """Contents of the %%%% blocks pw.x prints around a fatal error, one string per block."""
    blocks = re.findall(r"%{20,}\s*\n(.*?)\n\s*%{20,}", text, re.DOTALL)
    return [" ".join(line.strip() for line in block.splitlines() if line.strip()) for block in blocks]


def _matrix_after(lines: list[str], header: int, rows: int, columns: slice) -> list[list[float]] | None:
    block = lines[header + 1 : header + 1 + rows]
    try:
        matrix = [[_number(v) for v in line.split()[columns]] for line in block]
    except ValueError:
        return None
    if len(matrix) != rows or any(len(row) != 3 for row in matrix):
        return None
    return matrix


def _forces(lines: list[str], natoms: int | None) -> list[list[float]] | None:
    """The total forces: the first run of `atom N type M force =` lines after the last "Forces acting on atoms".

    With verbosity='high' pw.x follows that run with one run per contribution (non-local, ionic, local, core
    correction, Hubbard, SCF correction), each under its own title line and of the same shape; only the first run is
    the total. The block counts only when the run holds atoms 1..natoms in order and "Total force" follows it.
    """
    start = next((i for i in range(len(lines) - 1, -1, -1) if "Forces acting on atoms" in lines[i]), None)
    if start is None or natoms is None:
        return None
    pattern = re.compile(rf"atom\s+(\d+)\s+type\s+\d+\s+force\s+=\s+({_FLOAT})\s+({_FLOAT})\s+({_FLOAT})")
    rest = lines[start + 1 :]
    first = next((i for i, line in enumerate(rest) if line.strip()), len(rest))
    forces, atoms = [], []
    for line in rest[first:]:
        if not (match := pattern.search(line)):
            break
        atoms.append(int(match.group(1)))
        forces.append([_number(v) * Ry / Bohr for v in match.groups()[1:]])
    if atoms != list(range(1, natoms + 1)):
        return None
    after = rest[first + len(forces) :]
    return forces if any("Total force" in line for line in after) else None  # the block is complete only then


_ITERATION = re.compile(r"^\s*iteration #\s*\d+")
# pw.x's non-fatal messages (sanitize.TROUBLE says which refuse a label): WARNING/Warning lines, infomsg's "Message from
# routine X:" with its text on the next line, Davidson's "c_bands: N eigenvalues not converged", atomic_rho's and
# set_rhoc's "Check: negative starting/core charge", forces.f90's "SCF correction compared to forces is large".
# The per-iteration "negative rho (up, down)" lines are not among them: their last value is `negative_rho`.
_WARNING = re.compile(
    r"warning|Message from routine|eigenvalues not converged|Check: negative|SCF correction compared|BEWARE",
    re.IGNORECASE,
)


_UNCONVERGED = re.compile(r"c_bands:\s*(\d+) eigenvalues not converged")


def _warnings(lines: list[str]) -> list[tuple[int, str]]:
    """(line number, text) of every non-fatal message pw.x printed."""
    return [
        (i, " ".join(part.strip() for part in lines[i : i + 2 if "Message from routine" in line else i + 1]))
        for i, line in enumerate(lines)
        if _WARNING.search(line)
    ]


def parse_pw_output(text: str, crash: str | None = None) -> PwOutput:
    """Read a pw.x stdout text (and its CRASH file text, if any) into a PwOutput."""
    lines = text.splitlines()
    out: dict = {"crash": crash or None}
    if m := re.search(r"Program PWSCF (v\.\S+)", text):
        out["pw_version"] = m.group(1)
    if m := re.search(r"number of atoms/cell\s*=\s*(\d+)", text):
        out["natoms"] = int(m.group(1))
    energies = re.findall(rf"^!\s+total energy\s+=\s+({_FLOAT})\s+Ry", text, re.MULTILINE)
    if energies:
        out["energy"] = _number(energies[-1]) * Ry
    out["forces"] = _forces(lines, out.get("natoms"))
    stress_at = [i for i, line in enumerate(lines) if re.search(r"total\s+stress\s+\(Ry/bohr\*\*3\)", line)]
    if stress_at:
        ry_bohr3 = _matrix_after(lines, stress_at[-1], 3, slice(0, 3))
        kbar = _matrix_after(lines, stress_at[-1], 3, slice(3, 6))
        if ry_bohr3 is not None and kbar is not None:
            out["stress"] = (-np.array(ry_bohr3) * Ry / Bohr**3).tolist()
            out["stress_kbar"] = kbar
    if mags := re.findall(rf"total magnetization\s+=\s+({_FLOAT})", text):
        out["total_magnetization"] = _number(mags[-1])
    if mags := re.findall(rf"absolute magnetization\s+=\s+({_FLOAT})", text):
        out["absolute_magnetization"] = _number(mags[-1])
    if rho := re.findall(rf"negative rho \(up, down\):\s*({_FLOAT})\s+({_FLOAT})", text):
        out["negative_rho"] = _number(rho[-1][0]) + _number(rho[-1][1])
    out["scf_accuracy"] = [_number(v) for v in re.findall(rf"estimated scf accuracy\s+<\s+({_FLOAT})", text)]
    out["scf_iterations"] = len(re.findall(r"^\s*iteration #\s*\d+", text, re.MULTILINE))
    out["converged"] = "convergence has been achieved" in text
    out["convergence_failed"] = "convergence NOT achieved" in text
    out["job_done"] = "JOB DONE" in text
    warnings = _warnings(lines)
    last_iteration = max((i for i, line in enumerate(lines) if _ITERATION.match(line)), default=-1)
    out["warnings"] = sorted({text for _, text in warnings})
    out["final_warnings"] = sorted({text for at, text in warnings if at > last_iteration})
    if ethr := re.findall(rf"^\s*ethr\s*=\s*({_FLOAT})", text, re.MULTILINE):
        out["final_ethr"] = _number(ethr[-1])
    out["final_unconverged"] = sum(
        int(m.group(1)) for line in lines[last_iteration + 1 :] if (m := _UNCONVERGED.search(line))
    )
    states = re.search(r"number of Kohn-Sham states=\s*(\d+)", text)
    kpoints = re.search(r"number of k points=\s*(\d+)", text)
    if states and kpoints:
        out["eigenvalues"] = int(states.group(1)) * int(kpoints.group(1))
    out["errors"] = _error_blocks(text) + (_error_blocks(crash) if crash else [])
    if m := re.search(r"PWSCF\s*:\s*(.*?)CPU\s*(.*?)WALL", text):
        out["cpu_time"], out["wall_time"] = _seconds(m.group(1)), _seconds(m.group(2))
    out["pseudos_read"] = {
        element: {"path": path, "md5": md5}
        for element, path, md5 in re.findall(
            r"PseudoPot\. #\s*\d+ for (\S+)\s+read from file:\s*\n\s*(\S+)\s*\n\s*MD5 check sum:\s*(\S+)", text
        )
    }
    return PwOutput(**out)


def read_run_texts(directory: Path) -> tuple[str, str, str | None]:
    """(stdout, stderr, CRASH file or None) of a pw.x run directory; missing files read as empty."""

    def text(name: str) -> str | None:
        path = directory / name
        return path.read_text(errors="replace") if path.exists() else None

    return text("pw.out") or "", text("pw.err") or "", text("CRASH")


def read_pw_run(directory: Path) -> PwOutput:
    """Parse the pw.x stdout file and the CRASH file (if any) in a run directory."""
    stdout, _, crash = read_run_texts(directory)
    return parse_pw_output(stdout, crash)
