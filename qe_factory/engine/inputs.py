"""InputGenerator: the physics rules that turn an ase.Atoms into a pw.x SCF input."""

from __future__ import annotations

import copy
import io
import math
import re
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import kptdensity2monkhorstpack
from ase.data import ground_state_magnetic_moments
from ase.io.espresso import write_espresso_in
from pydantic import BaseModel

from qe_factory.engine.config import NAMELISTS, DFTConfig
from qe_factory.engine.outcomes import CarriesOutcome, Outcome
from qe_factory.engine.pseudos import PseudoFamily, ResolvedPseudo, load_family, resolve_pseudos

# Ry: the tightest SCF threshold asked of a lone atom in a box, the big box's SCF noise floor. H, O and Si reach
# 1e-8 (at a looser threshold a lone H atom's last iteration comes early and ends with Davidson's empty bands
# unconverged). With d projectors: Cr (50/460 Ry) and Cu (50/400) stall at 3e-9-1e-8, Ni (75/600) at 0.8-2.5e-6
# and Fe (40/480) at 1e-5-1e-4 (its d shell's occupations bounce at 0.02 Ry smearing); 1e-5 Ry is 0.14 meV, ten
# times below an MLIP's energy error.
LONE_ATOM_CONV_THR = 1e-8
LONE_D_ATOM_CONV_THR = 1e-5
# Lone PAW atoms measured to need a start without the random noise pw.x's default 'atomic+random' adds to PAW's d
# occupations, which nosym never averages out: a lone Ni atom's first step gave 185 Ry and 20 μB (from 'atomic':
# 0.46 Ry, 2 μB, below 1e-5 Ry at step 30). Not every d shell: from 'atomic', a lone Cu atom's SCF bounced (0.6-1e-4 Ry
# over 12 steps) where the default converges (benchmarks/README.md, lone atoms).
QUIET_START = {"Ni"}
# Elements that get a spin-polarised start when the Atoms carry no initial moments (μB per atom).
MAGNETIC_MOMENTS = {"Cr": 5.0, "Mn": 5.0, "Fe": 5.0, "Co": 5.0, "Ni": 5.0, "Gd": 7.0}
# Below this absolute magnetization per magnetic atom (μB) a converged moment has collapsed.
COLLAPSED_MOMENT = 0.5
# A given start below this (μB; about half the element's moment in its magnetic solids: bcc Fe 2.2, hcp Co 1.7, fcc
# Ni 0.6, Gd 7.6; Cr and Mn order antiferromagnetically with moments of 0.5-3) is weak: it may land on another branch.
# ase.build.bulk's own starts (Fe 2.3, Co 1.2, Ni 0.6) are not weak, so they cost no second run.
WEAK_START = {"Cr": 0.5, "Mn": 0.5, "Fe": 1.1, "Co": 0.8, "Ni": 0.3, "Gd": 3.5}


class InputError(CarriesOutcome, ValueError):
    """The requested calculation is not one the factory runs (e.g. a relaxation)."""

    outcome = Outcome.REFUSED


class PwInput(BaseModel):
    """A complete, serialisable pw.x parameter set for one structure."""

    parameters: dict[str, dict[str, Any]]
    kpts: tuple[int, int, int]
    pseudopotentials: dict[str, str]
    pseudo_md5: dict[str, str]
    starting_magnetization: list[float] | None = None
    starting_moments: list[float] | None = None  # μB per atom pw.x starts from (the fractions × valence); None: nspin 1
    vacuum_axes: tuple[bool, bool, bool] = (False, False, False)  # axes with a vacuum gap: 1 k-point

    @property
    def isolated(self) -> bool:
        """Vacuum along every axis (a molecule or an atom in a box): a Γ-point run."""
        return all(self.vacuum_axes)

    def namelist_value(self, namelist: str, key: str, default: Any = None) -> Any:
        """A value of one namelist (e.g. ('electrons', 'mixing_beta'))."""
        return self.parameters.get(namelist, {}).get(key, default)


def kpoint_mesh(atoms: Atoms, spacing: float) -> tuple[int, int, int]:
    """Monkhorst-Pack mesh whose spacing 2π|b_i|/n_i is at most `spacing` (1/Å, 2π included), the smallest such;
    1 along non-periodic axes. ASE's kptdensity2monkhorstpack with 1/spacing points per Å⁻¹."""
    return tuple(int(n) for n in kptdensity2monkhorstpack(atoms, kptdensity=1.0 / spacing, even=False))  # type: ignore[return-value]


def vacuum_axes(atoms: Atoms, threshold: float) -> tuple[bool, bool, bool]:
    """Per cell axis: do the atoms leave a gap (between atom centres, across the periodic boundary too) wider than
    `threshold` Å along it? Measured perpendicular to the planes spanned by the two other axes."""
    fractional = atoms.get_scaled_positions(wrap=True)
    plane_spacing = 1.0 / np.linalg.norm(atoms.cell.reciprocal(), axis=1)
    gaps = []
    for axis in range(3):
        coordinates = np.sort(fractional[:, axis])
        steps = np.diff(np.append(coordinates, coordinates[0] + 1.0))
        gaps.append(bool(steps.max() * plane_spacing[axis] > threshold))
    return tuple(gaps)  # type: ignore[return-value]


def irreducible_kpoint_count(kpts: tuple[int, int, int]) -> int:
    """Points pw.x keeps from an unshifted MP mesh with nosym: time reversal pairs k with -k."""
    total = math.prod(kpts)
    self_inverse = math.prod(1 if n % 2 else 2 for n in kpts)
    return (total + self_inverse) // 2


def starting_moments(atoms: Atoms, valence: np.ndarray, isolated: bool) -> np.ndarray | None:
    """Initial moments (μB per atom), or None for a spin-restricted run: the Atoms' own if set; else a lone atom's
    Hund's-rule moment (in vacuum: an E0 reference); else defaults for magnetic elements; else 1 μB per atom when the
    valence electrons are odd in number (an open shell has a spin-polarised ground state)."""
    if atoms.has("initial_magmoms"):
        moments = np.asarray(atoms.get_initial_magnetic_moments(), dtype=float)
        if moments.ndim != 1:
            raise InputError("non-collinear initial magnetic moments are not supported")
        return moments if np.any(moments != 0) else None
    if isolated and len(atoms) == 1:  # a lone atom: its own Hund's-rule moment (Fe 4, Ni 2, Cr 6, Cu 1 μB)
        hund = float(ground_state_magnetic_moments[atoms.numbers[0]])
        return np.array([hund]) if hund > 0 else None
    moments = np.array([MAGNETIC_MOMENTS.get(s, 0.0) for s in atoms.get_chemical_symbols()])
    if np.any(moments):
        return moments
    if round(float(valence.sum())) % 2 == 1:
        return np.ones(len(atoms))
    return None


def spin_candidates(nominal: PwInput, pseudos: dict[str, ResolvedPseudo]) -> list[float]:
    """The other spin states worth a run of a lone atom (an E0 reference) held at its Hund's-rule moment M: M−2,
    M−4, … ≥ 0 μB, the lowest energy kept (psiflow computes every multiplicity). Only where it is cheap: atoms
    without d projectors (an sp atom converges in a few iterations; a d atom at its family's cutoffs takes up to 18
    CPU minutes a run, and keeps Hund's). None for anything else."""
    fixed = nominal.parameters["system"].get("tot_magnetization")
    if fixed is None or not nominal.isolated or len(pseudos) != 1:
        return []
    (pseudo,) = pseudos.values()
    if 2 in pseudo.header.beta_l:
        return []
    return [fixed - 2 * step for step in range(1, int(fixed // 2) + 1)]


def high_spin_start(atoms: Atoms, absolute_magnetization: float | None) -> list[float] | None:
    """The start of the magnetic branch check after a run from the Atoms' own moments converged with
    `absolute_magnetization` (μB per cell; None: spin-restricted), or None when no check is due.

    Due for structures with magnetic elements whose given start was weak (some magnetic atom below its element's
    WEAK_START) or whose moment collapsed (below COLLAPSED_MOMENT per magnetic atom). The start: each magnetic
    atom at its element's default moment with the sign it was given (an antiferromagnet stays one), the other atoms
    as given. Atoms without initial moments already started high-spin (the defaults): no check."""
    defaults = np.array([MAGNETIC_MOMENTS.get(s, 0.0) for s in atoms.get_chemical_symbols()])
    magnetic = defaults > 0
    if not magnetic.any() or not atoms.has("initial_magmoms"):
        return None
    given = np.asarray(atoms.get_initial_magnetic_moments(), dtype=float)
    start = np.where(magnetic, np.where(given < 0, -defaults, defaults), given)
    weak_below = np.array([WEAK_START.get(s, 0.0) for s in atoms.get_chemical_symbols()])
    weak = bool(np.any(np.abs(given[magnetic]) < weak_below[magnetic]))
    collapsed = absolute_magnetization is None or absolute_magnetization / magnetic.sum() < COLLAPSED_MOMENT
    if not (weak or collapsed) or np.allclose(start, given):
        return None
    return [float(m) for m in start]


def _merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged = copy.deepcopy(base)
    for namelist, values in extra.items():
        if namelist not in NAMELISTS:
            raise InputError(f"unknown namelist {namelist!r}: use one of {NAMELISTS}")
        merged.setdefault(namelist, {}).update(values)
    return merged


class InputGenerator:
    """Chooses pseudopotentials, cutoffs, k-points, smearing and spin for an SCF run."""

    def __init__(self, config: DFTConfig | None = None, family: PseudoFamily | None = None):
        self.config = config or DFTConfig()
        self.family = family or load_family(self.config.pseudo_family, self.config.pseudo_dir)

    def pseudos(self, atoms: Atoms) -> dict[str, ResolvedPseudo]:
        """The checked pseudopotential of each element in the structure."""
        return resolve_pseudos(self.family, atoms.get_chemical_symbols())

    def generate(self, atoms: Atoms, params: dict[str, dict[str, Any]] | None = None) -> PwInput:
        """Parameters for an SCF of `atoms`; `params` (per namelist) override everything else."""
        cfg = self.config
        pseudos = self.pseudos(atoms)
        vacuum = vacuum_axes(atoms, cfg.vacuum_threshold)
        valence = np.array([pseudos[s].header.z_valence for s in atoms.get_chemical_symbols()])
        moments = starting_moments(atoms, valence, all(vacuum))
        control = {
            "calculation": "scf", "tstress": True, "tprnfor": True, "disk_io": "low",
            "pseudo_dir": str(self.family.directory.resolve()), "outdir": "./out", "prefix": "pwscf",
        }
        system = {
            "ecutwfc": cfg.ecutwfc or max(p.cutoff_wfc for p in pseudos.values()),
            "ecutrho": cfg.ecutrho or max(p.cutoff_rho for p in pseudos.values()),
            "occupations": "smearing", "smearing": cfg.smearing, "degauss": cfg.degauss,
            "nosym": True, "nspin": 2 if moments is not None else 1,
        }
        electrons = {
            "conv_thr": cfg.conv_thr_per_atom * len(atoms), "mixing_beta": cfg.mixing_beta,
            "mixing_mode": "plain", "electron_maxstep": cfg.electron_maxstep,
        }
        if any(vacuum):  # gentler mixing across vacuum; local-TF damps a slab's charge sloshing (it stalls atoms)
            electrons.update(mixing_beta=min(cfg.mixing_beta, 0.3), mixing_mode="plain" if all(vacuum) else "local-TF")
        if all(vacuum) and len(atoms) == 1:  # a lone atom (an E0 reference): only its energy is a label
            (element,) = atoms.get_chemical_symbols()
            pseudo = pseudos[element].header
            d_shell = 2 in pseudo.beta_l  # a projector of angular momentum l = 2
            electrons["conv_thr"] = max(electrons["conv_thr"], LONE_D_ATOM_CONV_THR if d_shell else LONE_ATOM_CONV_THR)
            if pseudo.paw and element in QUIET_START:
                electrons["startingwfc"] = "atomic"
            if moments is not None and not atoms.has("initial_magmoms"):
                # its Hund's-rule spin, fixed — a floating moment stalls its SCF
                system["tot_magnetization"] = float(moments[0])
        parameters = _merge({"control": control, "system": system, "electrons": electrons}, cfg.pw_parameters)
        parameters = _merge(parameters, params or {})
        if parameters["control"]["calculation"] != "scf":
            raise InputError(
                f"calculation={parameters['control']['calculation']!r} refused: the factory runs only 'scf' "
                "(relaxing would move the structures the data set is meant to sample)"
            )
        magnetization = start = None
        if moments is not None and parameters["system"]["nspin"] == 2:
            magnetization = [round(float(m), 6) for m in np.clip(moments / valence, -1.0, 1.0)]
            start = [round(float(m), 6) for m in np.clip(moments, -valence, valence)]
        mesh = kpoint_mesh(atoms, cfg.kpoint_spacing)
        return PwInput(
            parameters=parameters,
            kpts=tuple(1 if empty else n for n, empty in zip(mesh, vacuum)),
            vacuum_axes=vacuum,
            pseudopotentials={el: p.path.name for el, p in pseudos.items()},
            pseudo_md5={el: p.md5 for el, p in pseudos.items()},
            starting_magnetization=magnetization,
            starting_moments=start,
        )

    def create_input_string(self, atoms: Atoms, params: dict[str, dict[str, Any]] | None = None) -> str:
        """The pw.in text for `atoms` (the spec's entry point)."""
        return render(atoms, self.generate(atoms, params))


def render(atoms: Atoms, pw_input: PwInput) -> str:
    """pw.in text of a PwInput; the same input always gives the same text."""
    atoms = atoms.copy()
    atoms.calc = None
    if pw_input.starting_magnetization is not None:
        # ASE writes each atom's initial moment as its species' starting_magnetization (a fraction).
        atoms.set_initial_magnetic_moments(pw_input.starting_magnetization)
    elif atoms.has("initial_magmoms"):
        atoms.set_initial_magnetic_moments(None)
    buffer = io.StringIO()
    write_espresso_in(  # kpts=None: K_POINTS gamma (real wavefunctions: half the memory and time)
        buffer, atoms, input_data=copy.deepcopy(pw_input.parameters),
        pseudopotentials=pw_input.pseudopotentials, kpts=None if pw_input.isolated else pw_input.kpts,
    )
    # ASE writes empty &IONS/&CELL/&FCP/&RISM namelists that pw.x 6.7 reports as ignored cards: drop them.
    return re.sub(r"^&\w+\n/\n", "", buffer.getvalue(), flags=re.MULTILINE)
