"""Memory a pw.x SCF needs, estimated before it runs, and the budget that refuses a structure above it.

The estimate follows pw.x 6.7's own (PW/src/memory_report.f90, printed as "Estimated max dynamical RAM per
process"), its largest terms only, for one MPI rank: the wavefunctions of every k-point kept in memory (disk_io='low'),
the projectors, the densities and potentials on the FFT grid with the mixing history, plus the largest scratch
(Davidson's work arrays, or the ultrasoft/PAW augmentation arrays of the forces and the stress). pw.x 6.7 sums some
terms in 32-bit integers: on FFT grids above ~2³¹ bytes they overflow (a 720³ grid prints "rho,v,vnew: -2048 MB") and
its own estimate falls short; this one does not. Asking pw.x itself (a run stopped
after it prints the estimate) was measured at 0.4-2.8 s per structure (a 720³ FFT grid takes the longest): this is
instant. tests/unit/test_memory.py compares it with pw.x's printed estimate on real outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from qe_factory.engine.inputs import InputError, PwInput, irreducible_kpoint_count
from qe_factory.engine.pseudos import ResolvedPseudo

BOHR = 0.529177210903  # Å
COMPLEX, REAL = 16, 8  # bytes
MIXING_HISTORY = 8  # pw.x's default mixing_ndim
GB = 1024**3


class MemoryBudgetError(InputError):
    """pw.x would need more memory than the configured budget."""


def fft_dimension(minimum: int) -> int:
    """The smallest length ≥ minimum with no prime factor above 5 (pw.x's good_fft_order with FFTW)."""
    n = minimum
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def band_count(electrons: float, parameters: dict[str, dict]) -> int:
    """Kohn-Sham states pw.x allocates (setup.f90): half the electrons (per spin channel the larger), and with
    smearing 20% more, at least 4 more; an explicit nbnd stands."""
    system = parameters.get("system", {})
    if "nbnd" in system:
        return int(system["nbnd"])
    magnetization = float(system.get("tot_magnetization", 0.0) or 0.0)
    up, down = (electrons + magnetization) / 2, (electrons - magnetization) / 2
    bands = max(round(electrons / 2), round(up), round(down))
    if system.get("occupations", "smearing") == "smearing":
        bands = max(round(1.2 * electrons / 2), round(1.2 * up), round(1.2 * down), bands + 4)
    return bands


@dataclass(frozen=True)
class MemoryEstimate:
    """What a serial pw.x SCF would allocate, with the sizes it comes from."""

    bytes: float
    plane_waves: int
    bands: int
    kpoints: int  # k-points × spin channels
    fft_grid: tuple[int, int, int]

    @property
    def gb(self) -> float:
        return self.bytes / GB

    def describe(self) -> str:
        nr1, nr2, nr3 = self.fft_grid
        return (f"{self.gb:.1f} GB ({self.plane_waves} plane waves × {self.bands} bands × "
                f"{self.kpoints} k-points×spins, FFT grid {nr1}×{nr2}×{nr3})")


def estimate_memory(atoms: Atoms, pw_input: PwInput, pseudos: dict[str, ResolvedPseudo]) -> MemoryEstimate:
    """pw.x 6.7's estimate of its largest memory use on one MPI rank (see the module docstring)."""
    system = pw_input.parameters["system"]
    ecutwfc, ecutrho = float(system["ecutwfc"]), float(system["ecutrho"])
    symbols = atoms.get_chemical_symbols()
    volume = abs(float(np.linalg.det(atoms.cell.array))) / BOHR**3
    half = 2 if pw_input.isolated else 1  # Γ-only runs keep half the G-vectors (real wavefunctions)

    def sphere(cutoff: float) -> float:  # G-vectors with |G|² < cutoff (Ry), volume in bohr³
        return volume * cutoff**1.5 / (6 * math.pi**2) / half

    npw, ngm, ngms = sphere(ecutwfc), sphere(ecutrho), sphere(4 * ecutwfc)
    lengths = np.linalg.norm(atoms.cell.array, axis=1) / BOHR
    grid = tuple(fft_dimension(2 * int(math.sqrt(ecutrho) * a / (2 * math.pi)) + 1) for a in lengths)
    nnr = math.prod(grid)
    nspin = 2 if system.get("nspin") == 2 else 1
    kpoints = (1 if pw_input.isolated else irreducible_kpoint_count(pw_input.kpts)) * nspin
    bands = band_count(sum(pseudos[s].header.z_valence for s in symbols), pw_input.parameters)
    species = len(set(symbols))
    projectors = sum(pseudos[s].header.projectors for s in symbols)

    buffers = 1 if kpoints == 1 else kpoints + 1  # every k-point's wavefunctions and one more, in memory
    density = (COMPLEX * ngm + REAL * nnr) * nspin  # one density or potential (scf_type)
    static = (
        COMPLEX * bands * npw * buffers + COMPLEX * projectors * npw  # wavefunctions, projectors
        + 4 * density + COMPLEX * ngm * nspin * 2 * MIXING_HISTORY  # rho, v, vnew, rhoin; mixing history
        + COMPLEX * (nnr + ngm * (1 + 2 * species)) + REAL * nnr * (2 + nspin)  # local potential, core, ...
        + REAL * ngm * 4 + 4 * ngm * 7 + 4 * ngms * 2  # G-vectors and their indices
    )
    ultrasoft = [pseudos[s].header for s in set(symbols) if pseudos[s].header.ultrasoft]
    work = 2 * bands  # Davidson's basis: psi, hpsi (and spsi for ultrasoft/PAW), and its small matrices
    scratch = COMPLEX * work * npw * (3 if ultrasoft else 2) + COMPLEX / half * (3 * work**2 + projectors * bands)
    if ultrasoft:  # augmentation charges' forces (an array per atom and direction) and stress, on the dense G-vectors
        pairs = max(h.projectors * (h.projectors + 1) // 2 for h in ultrasoft)
        lmaxq = 2 * max(max(h.beta_l, default=0) for h in ultrasoft) + 1
        forces = (REAL * ngm * (nspin + lmaxq**2 + 1) + COMPLEX * ngm * (pairs + 3 * len(atoms))
                  + REAL * pairs * len(atoms) * 3 * nspin)
        stress = REAL * ngm * (nspin + 2 * lmaxq**2 + 1) + COMPLEX * ngm * (pairs + 3 + nspin)
        scratch = max(scratch, forces, stress)
    return MemoryEstimate(bytes=static + scratch, plane_waves=round(npw), bands=bands, kpoints=kpoints,
                          fft_grid=grid)  # type: ignore[arg-type]


def check_memory(estimate: MemoryEstimate, budget_gb: float) -> None:
    """Refuse a structure whose estimated pw.x memory exceeds the budget (MemoryBudgetError with the numbers)."""
    if estimate.gb > budget_gb:
        raise MemoryBudgetError(
            f"pw.x would need about {estimate.describe()}, more than memory_budget_gb={budget_gb:g}: "
            "use a smaller cell, coarser k-points or lower cutoffs, or raise memory_budget_gb where the memory is there"
        )
