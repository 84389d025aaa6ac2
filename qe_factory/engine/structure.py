"""Refusal of structures that cannot give a meaningful pw.x result, before anything runs."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols, covalent_radii
from ase.neighborlist import neighbor_list

from qe_factory.engine.document import Document
from qe_factory.engine.outcomes import CarriesOutcome, Outcome


class StructureError(CarriesOutcome, ValueError):
    """The structure cannot be calculated as given; the message says why."""

    outcome = Outcome.REFUSED


_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]{0,199}$")


def check_uid(uid: str) -> str:
    """A uid names a directory: letters, digits and _.+=- only, no path separators, no '..'."""
    if not isinstance(uid, str) or not _UID.match(uid) or ".." in uid:
        raise StructureError(
            f"uid {uid!r} refused: use 1-200 letters, digits or _.+=- (no path separators, no '..', "
            "not starting with a dot)"
        )
    return uid


def _contacts(atoms: Atoms) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance Å, distance / sum of covalent radii) of every pair within the sum of their covalent radii (at
    least 2 Å), periodic images included."""
    radii = covalent_radii[atoms.numbers]
    cutoff = [max(1.0, r) for r in radii]
    i, j, d = neighbor_list("ijd", atoms, cutoff, self_interaction=False)
    return i, j, d, d / (radii[i] + radii[j])


def closest_contact(atoms: Atoms) -> tuple[int, int, float, float] | None:
    """(i, j, distance Å, distance / sum of covalent radii) of the closest pair, periodic images included."""
    if len(atoms) < 2 and not atoms.pbc.any():
        return None
    i, j, d, ratio = _contacts(atoms)
    if len(d) == 0:
        return None
    k = int(np.argmin(ratio))
    return int(i[k]), int(j[k]), float(d[k]), float(ratio[k])


def atom_contacts(atoms: Atoms) -> dict[int, tuple[int, float, float]]:
    """Atom index → (j, distance Å, distance / sum of covalent radii) of its closest neighbour, for the atoms that have
    one within the sum of their covalent radii (at least 2 Å)."""
    if len(atoms) < 2 and not atoms.pbc.any():
        return {}
    closest: dict[int, tuple[int, float, float]] = {}
    for i, j, d, ratio in zip(*_contacts(atoms)):
        if int(i) not in closest or ratio < closest[int(i)][2]:
            closest[int(i)] = (int(j), float(d), float(ratio))
    return closest


SCREEN_LIMIT = 20_000  # pair-image distances the brute-force screen computes at most (larger: ASE alone)


def clearly_apart(atoms: Atoms, factor: float) -> bool:
    """True when no two atoms (periodic images included) are closer than `factor` × the sum of their covalent radii:
    a quick sufficient test for small cells (brute force over every periodic image within reach), False when it
    cannot tell. `closest_contact` (ASE's neighbour list: ~1 ms even for 2 atoms) then decides."""
    radii = covalent_radii[atoms.numbers]
    reach = factor * 2 * float(radii.max())  # no pair closer than this can be too close
    fractional = atoms.get_scaled_positions(wrap=True)  # in [0, 1] along periodic axes
    # |Δf_k + s_k| ≤ reach·|b_k| for any image within reach (b_k: reciprocal vector without 2π), and |Δf_k| ≤ 1
    spans = [math.ceil(reach * length) + 1 if periodic else 0
             for length, periodic in zip(np.linalg.norm(atoms.cell.reciprocal(), axis=1), atoms.pbc)]
    if len(atoms) ** 2 * math.prod(2 * n + 1 for n in spans) > SCREEN_LIMIT:
        return False
    shifts = np.array(list(itertools.product(*(range(-n, n + 1) for n in spans))), dtype=float)
    delta = fractional[None, :, None, :] - fractional[:, None, None, :] + shifts[None, None, :, :]  # i, j, image
    distances = np.linalg.norm(delta @ atoms.cell.array, axis=-1)
    distances[np.arange(len(atoms)), np.arange(len(atoms)), len(shifts) // 2] = np.inf  # an atom and itself
    ratios = distances / (radii[:, None, None] + radii[None, :, None])
    return bool(ratios.min() >= factor * (1 + 1e-6))


def check_structure(atoms: Atoms, min_distance_factor: float = 0.5) -> None:
    """Raise StructureError if pw.x cannot (or should not) run on `atoms`."""
    if not isinstance(atoms, Atoms):
        raise StructureError(f"expected an ase.Atoms, got {type(atoms).__name__}")
    if "unreadable" in atoms.info:
        raise StructureError(atoms.info["unreadable"])
    if len(atoms) == 0:
        raise StructureError("the structure has no atoms")
    unknown = sorted({s for s in atoms.get_chemical_symbols() if s not in chemical_symbols[1:]})
    if unknown or np.any(atoms.numbers <= 0):
        raise StructureError(f"unknown element(s): {unknown or 'atomic number 0 (X)'}")
    if not np.all(np.isfinite(atoms.positions)):
        bad = np.where(~np.all(np.isfinite(atoms.positions), axis=1))[0].tolist()
        raise StructureError(f"non-finite positions (NaN/inf) for atoms {bad}")
    cell = np.asarray(atoms.cell)
    if not np.all(np.isfinite(cell)):
        raise StructureError("the cell contains NaN/inf")
    lengths = np.linalg.norm(cell, axis=1)
    if np.any(lengths < 1e-6):
        missing = [ax for ax, ln in zip("abc", lengths) if ln < 1e-6]
        raise StructureError(
            f"no cell vector along {', '.join(missing)}: pw.x needs a full 3D cell (put molecules in a box, "
            "e.g. atoms.center(vacuum=6))"
        )
    volume = float(np.linalg.det(cell))
    if volume <= 1e-6:
        raise StructureError(f"the cell volume is {volume:.4g} Å^3: the cell must be right-handed and non-degenerate")
    contact = None if clearly_apart(atoms, min_distance_factor) else closest_contact(atoms)
    if contact and contact[3] < min_distance_factor:
        i, j, d, ratio = contact
        s = atoms.get_chemical_symbols()
        raise StructureError(
            f"atoms {i} ({s[i]}) and {j} ({s[j]}) are {d:.3f} Å apart, {ratio:.2f} of their covalent radii sum "
            f"(minimum allowed {min_distance_factor}): overlapping cores give no meaningful DFT label"
        )


class StructureDoc(Document):
    """An Atoms as a document: what a calculation needs from it (Å; initial moments in μB when set), and the
    `config_type` of its training-set group (atoms.info["config_type"], as MACE names it) when it has one."""

    numbers: list[int]
    positions: list[list[float]]
    cell: list[list[float]]
    pbc: list[bool]
    magmoms: list[float] | None = None
    config_type: str | None = None  # a label for the exported training set; not part of the calculation

    @classmethod
    def from_atoms(cls, atoms: Atoms) -> StructureDoc:
        magmoms = atoms.get_initial_magnetic_moments().tolist() if atoms.has("initial_magmoms") else None
        config_type = atoms.info.get("config_type")
        return cls(
            numbers=atoms.numbers.tolist(), positions=atoms.positions.tolist(), cell=atoms.cell.array.tolist(),
            pbc=atoms.pbc.tolist(), magmoms=magmoms, config_type=None if config_type is None else str(config_type),
        )

    def to_atoms(self) -> Atoms:
        atoms = Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        if self.magmoms is not None:
            atoms.set_initial_magnetic_moments(self.magmoms)
        if self.config_type is not None:
            atoms.info["config_type"] = self.config_type
        return atoms


XYZ = (".xyz", ".extxyz")  # frame by frame: one unreadable frame is refused alone


def _frames(path: Path) -> list[Atoms]:
    """Every frame of a file. In an (ext)xyz file a frame ASE cannot read (e.g. an unknown element symbol) becomes an
    empty Atoms marked `unreadable` with the reason, which check_structure refuses: one bad frame costs only itself."""
    from ase.io import iread

    if not path.is_file():
        raise StructureError(f"cannot read structures from {path}: no such file")
    frames: list[Atoms] = []
    while True:
        try:
            for atoms in iread(path, index=f"{len(frames)}:"):
                frames.append(atoms)
            return frames
        except Exception as exc:  # ASE raises many types for unreadable frames
            if path.suffix not in XYZ or not _has_frame(path, len(frames) + 1):
                raise StructureError(f"cannot read structures from {path}: {exc}") from exc
            reason = f"unknown chemical symbol {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            frames.append(Atoms(info={"unreadable": f"frame {len(frames)} of {path.name} cannot be read: {reason}"}))
            if not _has_frame(path, len(frames) + 1):
                return frames


def _has_frame(path: Path, count: int) -> bool:
    """Whether an (ext)xyz file has at least `count` frames, counted without reading the atoms."""
    lines = path.read_text().splitlines()
    at, frames = 0, 0
    while at < len(lines) and lines[at].strip().isdigit():
        frames += 1
        at += int(lines[at]) + 2
    return frames >= count


def read_structures(source: str | Path | Atoms | Iterable) -> list[tuple[str | None, Atoms]]:
    """(uid or None, Atoms) for Atoms, pymatgen Structures or files (any format ASE reads, all frames); pairs it
    made already pass through."""

    if isinstance(source, (str, Path)):
        stem = Path(source).stem
        return [(str(a.info.get("uid") or f"{stem}-{i:05d}"), a) for i, a in enumerate(_frames(Path(source)))]
    items = [source] if isinstance(source, Atoms) else list(source)
    out: list[tuple[str | None, Atoms]] = []
    for item in items:
        if isinstance(item, (str, Path)):
            out.extend(read_structures(item))
        elif isinstance(item, Atoms):
            out.append((item.info.get("uid"), item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Atoms):  # read here already
            out.append(item)
        elif hasattr(item, "to_ase_atoms"):  # pymatgen Structure / Molecule
            out.append((None, item.to_ase_atoms()))
        else:
            raise TypeError(f"cannot use {type(item).__name__} as a structure")
    return out
