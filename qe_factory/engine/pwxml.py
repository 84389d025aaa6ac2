"""pw.x's own record of a run, `data-file-schema.xml` (QEXSD, Hartree atomic units) → PwXml, in the factory's units.

ASE 3.29 reads no pw.x XML (its espresso formats are espresso-in and espresso-out) and qeschema is not a dependency:
xml.etree reads the few elements a label needs. Units on output as in parsers.py: eV, eV/Å, eV/Å³ with ASE's stress
sign (the negative of pw.x's); cutoffs and degauss in Ry (as pw.in gives them), scf_error in Ry (as pw.out prints it).

What pw.x 6.7 writes (seen on real runs): `<outdir>/<prefix>.save/data-file-schema.xml` after every SCF, converged
or not, and the same file as `<outdir>/<prefix>.xml` only after a converged one; smearing under its canonical short
name ('cold' → 'mv'); an SCF that did not converge still has an <etot> (its last iteration's) with
convergence_achieved false, and no forces or stress; <status> is 0 even then; <magnetization> holds total 0 and
absolute 0 when the run is not spin-polarised.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from ase.units import Bohr, Hartree
from pydantic import BaseModel

XML_NAME = "data-file-schema.xml"
HARTREE_IN_RY = 2.0
# pw.x's smearing synonyms → the name it writes in the XML (PW/src/pw_init_qexsd_input.f90)
SMEARING_NAMES = {
    **dict.fromkeys(("gaussian", "gauss"), "gaussian"),
    **dict.fromkeys(("methfessel-paxton", "m-p", "mp"), "mp"),
    **dict.fromkeys(("marzari-vanderbilt", "cold", "m-v", "mv"), "mv"),
    **dict.fromkeys(("fermi-dirac", "f-d", "fd"), "fd"),
}


class XmlError(ValueError):
    """The file is no pw.x XML the factory can read (truncated, empty, another program's)."""


class XmlInput(BaseModel):
    """The input pw.x says it used: its <input> block, the settings that make a label what it is."""

    ecutwfc: float  # Ry
    ecutrho: float  # Ry
    smearing: str | None = None  # pw.x's canonical name (SMEARING_NAMES)
    degauss: float | None = None  # Ry
    pseudopotentials: dict[str, str]  # species label → UPF file name
    kpoints: list[int] | None = None  # Monkhorst-Pack mesh; None for an explicit list (e.g. Γ)
    kpoint_shift: list[int] | None = None
    gamma_only: bool = False
    lsda: bool = False
    functional: str | None = None


class PwXml(BaseModel):
    """What the factory reads from data-file-schema.xml."""

    pw_version: str | None = None
    energy: float | None = None  # eV; also written when the SCF did not converge: read `converged` with it
    forces: list[list[float]] | None = None
    stress: list[list[float]] | None = None
    total_magnetization: float | None = None  # μB/cell; None unless spin-polarised
    absolute_magnetization: float | None = None
    converged: bool = False
    scf_steps: int | None = None
    scf_error: float | None = None  # Ry
    input: XmlInput

    def summary(self) -> dict[str, Any]:
        """What a label keeps of it: all but forces and stress (the label's own, once checked equal)."""
        return self.model_dump(mode="json", exclude={"forces", "stress"})


def xml_path(outdir: Path, prefix: str) -> Path:
    """Where pw.x writes its XML in `outdir` (the one written after every SCF, converged or not)."""
    return outdir / f"{prefix}.save" / XML_NAME


def _text(root: ET.Element, path: str) -> str | None:
    element = root.find(path)
    return element.text.strip() if element is not None and element.text and element.text.strip() else None


def _float(root: ET.Element, path: str) -> float | None:
    value = _text(root, path)
    return float(value) if value is not None else None


def _matrix(root: ET.Element, path: str, rows: int, scale: float) -> list[list[float]] | None:
    """A Fortran-ordered array of shape (3, rows) as `rows` rows of 3, times `scale`."""
    value = _text(root, path)
    if value is None:
        return None
    numbers = np.array(value.split(), dtype=float)
    return (numbers.reshape(rows, 3) * scale).tolist()


def _input(root: ET.Element) -> XmlInput:
    block = root.find("input")
    if block is None:
        raise XmlError("no <input> block")
    smearing = block.find("bands/smearing")
    mesh = block.find("k_points_IBZ/monkhorst_pack")
    return XmlInput(
        ecutwfc=_float(block, "basis/ecutwfc") * HARTREE_IN_RY,
        ecutrho=_float(block, "basis/ecutrho") * HARTREE_IN_RY,
        smearing=smearing.text.strip() if smearing is not None and smearing.text else None,
        degauss=float(smearing.get("degauss")) * HARTREE_IN_RY if smearing is not None else None,
        pseudopotentials={
            species.get("name"): _text(species, "pseudo_file") for species in block.iterfind("atomic_species/species")
        },
        kpoints=[int(mesh.get(f"nk{i}")) for i in (1, 2, 3)] if mesh is not None else None,
        kpoint_shift=[int(mesh.get(f"k{i}")) for i in (1, 2, 3)] if mesh is not None else None,
        gamma_only=_text(block, "basis/gamma_only") == "true",
        lsda=_text(block, "spin/lsda") == "true",
        functional=_text(block, "dft/functional"),
    )


def parse_pw_xml(text: str) -> PwXml:
    """Read the text of a pw.x data-file-schema.xml; raises XmlError when it is not one."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as error:
        raise XmlError(f"not well-formed XML ({error})") from None
    output = root.find("output")
    if not root.tag.endswith("espresso") or output is None:
        raise XmlError("no pw.x <output> block")
    try:
        natoms = int(output.find("atomic_structure").get("nat"))
        lsda = _text(output, "magnetization/lsda") == "true"
        creator = root.find("general_info/creator")
        energy = _float(output, "total_energy/etot")
        scf_error = _float(output, "convergence_info/scf_conv/scf_error")
        steps = _text(output, "convergence_info/scf_conv/n_scf_steps")
        return PwXml(
            pw_version=creator.get("VERSION") if creator is not None else None,
            energy=energy * Hartree if energy is not None else None,
            forces=_matrix(output, "forces", natoms, Hartree / Bohr),
            stress=_matrix(output, "stress", 3, -Hartree / Bohr**3),  # symmetric: Fortran order does not matter
            total_magnetization=_float(output, "magnetization/total") if lsda else None,
            absolute_magnetization=_float(output, "magnetization/absolute") if lsda else None,
            converged=_text(output, "convergence_info/scf_conv/convergence_achieved") == "true",
            scf_steps=int(steps) if steps is not None else None,
            scf_error=scf_error * HARTREE_IN_RY if scf_error is not None else None,
            input=_input(root),
        )
    except (AttributeError, TypeError, ValueError) as error:  # a missing element or attribute, a bad number
        raise XmlError(f"incomplete pw.x XML ({error})") from None


def read_pw_xml(path: Path) -> PwXml:
    """Read a data-file-schema.xml file; raises FileNotFoundError or XmlError."""
    return parse_pw_xml(path.read_text(errors="replace"))


def species_element(label: str) -> str:
    """The element of an ATOMIC_SPECIES label ('Fe1', 'Fe_up' → 'Fe')."""
    return re.match(r"[A-Z][a-z]?", label).group(0)
