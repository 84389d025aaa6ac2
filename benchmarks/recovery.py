"""Recovery benchmark (prints ratios; not a timed test).

Requirement: on structures that fail with default settings, report the success rate and (total pw.x CPU seconds
to success) ÷ (CPU seconds of a direct run with the final settings), goal ≤ 1.3, per class of structure (bulk,
slabs/clusters, isolated atoms, molecules), for the factory's recovery and for aiida-quantumespresso's strategy.

Strategies (each a RecoveryHandler given to QERunner, all with the same max_retries):
  ours           the default RecoveryHandler(): more electron steps first while the SCF is nearly converged or
                 still falling (at most twice, for that attempt only), then the ladder mixing_beta 0.3 → local-TF
                 → mixing_beta 0.1 with mixing_ndim 16 → degauss 0.05 → cg, each from the last density and
                 wavefunctions when they fit and the density is usable; early stop after two rungs without progress
  peer           aiida-quantumespresso's PwBaseWorkChain (PeerHandler, below)
  ours-no-trend  ours with read_trend=False: the ladder at once (ablation of the trend test)
  ours-no-reuse  opt-in (--strategies ...,ours-no-reuse): ours with every restart made FROM_SCRATCH

The peer, as found in aiida-quantumespresso (src/aiida_quantumespresso/workflows/pw/base.py, read Dec 2026):
`handle_electronic_convergence_not_reached` (exit code ERROR_ELECTRONIC_CONVERGENCE_NOT_REACHED) multiplies
ELECTRONS.mixing_beta by `delta_factor_mixing_beta` = 0.8 and calls `set_restart_type(RestartType.FULL,
calculation.outputs.remote_folder)`: CONTROL.restart_mode='restart' with the last calculation's folder as
parent_folder, startingpot/startingwfc removed. For an scf, pw.x 6.7 with restart_mode='restart' after a run that
stopped at electron_maxstep (no restart file of an interrupted loop) reads both the last density and the last
wavefunctions ("The initial density is read from file", "Starting wfcs from file"; checked on a Si cell): the peer
continues from the last state, like our FROM_WAVE_FUNCTIONS, with β × 0.8 lasting. (Its own FROM_WAVE_FUNCTIONS sets
startingwfc='file' alone; the "from scratch" β × 0.8 is its handler for relax runs whose final SCF failed.) Other
failures: the peer gives up (its diagonalization and walltime handlers are not exercised by these structures).

The structures are real pw.x 6.7 failures at the factory's default SCF settings (mixing_beta 0.7, plain mixing,
cold smearing 0.02 Ry; vacuum-aware: slabs mixing_beta 0.3 with local-TF, atoms/molecules Γ, spin-polarised, a lone
atom at its fixed Hund moment) but with reduced cutoffs, coarse k-points and a low electron_maxstep so that runs are
short.

    .venv/bin/python benchmarks/recovery.py [--quick] [--strategies ours,peer] [--json out.json]
    .venv/bin/python benchmarks/recovery.py --smoke   # one structure, 1 rank, about a minute (tests/pwx/)
    .venv/bin/python benchmarks/recovery.py --report out.json   # print the tables of a saved run again
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.build import bulk, diamond100, fcc111
from ase.data import covalent_radii
from pydantic import Field

from qe_factory import DFTConfig, DFTErrorType, DFTResult, QERunner, RecoveryHandler
from qe_factory.engine.config import OWNED_KEYS
from qe_factory.engine.parsers import PwOutput
from qe_factory.engine.recovery import LADDERS, STEPS, Correction, RestartType, without_restart

GOAL = 1.3
MAXSTEP = 15  # electron_maxstep of the benchmark's "default settings" (the factory's own default is 100)
MAX_RETRIES = 6
DIRECT_MAXSTEP = 100  # the direct run gets the factory's default electron_maxstep, so that it converges
# Not given to the direct run: keys the factory sets itself, and max_seconds that the runner sets per attempt.
DROPPED = {**OWNED_KEYS, "control": (*OWNED_KEYS["control"], "max_seconds")}
FROM_DENSITY = (RestartType.FROM_CHARGE_DENSITY, RestartType.FROM_WAVE_FUNCTIONS)


# -- structures ---------------------------------------------------------------------------------------------------
def _squeeze(atoms: Atoms, i: int, j: int, factor: float) -> Atoms:
    """Move atom j along i→j (nearest image) to `factor` × the sum of their covalent radii from atom i."""
    vector = atoms.get_distance(i, j, mic=True, vector=True)
    target = factor * (covalent_radii[atoms.numbers[i]] + covalent_radii[atoms.numbers[j]])
    atoms.positions[j] = atoms.positions[i] + vector / np.linalg.norm(vector) * target
    return atoms


def _boxed(atoms: Atoms, vacuum: float) -> Atoms:
    atoms.center(vacuum=vacuum)
    atoms.pbc = True
    return atoms


def fe2_rattled() -> Atoms:
    atoms = bulk("Fe", "bcc", a=2.87, cubic=True)
    atoms.rattle(0.2, seed=11)
    return atoms


def fe2_overlap() -> Atoms:
    atoms = bulk("Fe", "bcc", a=2.87, cubic=True)
    atoms.rattle(0.05, seed=6)
    return _squeeze(atoms, 0, 1, 0.65)


def cr2_hot() -> Atoms:
    atoms = bulk("Cr", "bcc", a=2.88, cubic=True)
    atoms.rattle(0.3, seed=4)
    atoms.set_initial_magnetic_moments([3.0, -3.0])
    return atoms


def si_slab() -> Atoms:
    return diamond100("Si", (1, 1, 8), vacuum=8.0)


def cu_slab() -> Atoms:
    return fcc111("Cu", (1, 1, 5), vacuum=7.0)


def cu5_cluster() -> Atoms:
    positions = [[0, 0, 0], [2.4, 0, 0], [1.2, 2.08, 0], [1.2, 0.69, 1.96], [1.2, 0.69, -1.96]]
    return _boxed(Atoms("Cu5", positions=positions), 3.0)


def in_box(symbols: str, positions: list[list[float]], size: float = 8.0) -> Atoms:
    """Atoms centred in an orthorhombic box of about `size` Å (sides differ by 0.5 Å: no accidental symmetry)."""
    atoms = Atoms(symbols, positions=positions, cell=[size, size + 0.5, size + 1.0], pbc=True)
    atoms.center()
    return atoms


def atom(symbol: str) -> Callable[[], Atoms]:
    return lambda: in_box(symbol, [[0, 0, 0]])


def no_molecule() -> Atoms:
    return in_box("NO", [[0, 0, 0], [0, 0, 1.15]])


def o2_molecule() -> Atoms:
    return in_box("O2", [[0, 0, 0], [0, 0, 1.21]])


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # one of KINDS
    description: str
    build: Callable[[], Atoms]
    kpoint_spacing: float  # 1/Å, 2π included
    ecutwfc: float = 25.0
    ecutrho: float = 200.0
    quick: bool = False


KINDS = ("bulk", "slab/cluster", "atom", "molecule")
SMOKE_CASE = "fe2-rattled"  # fails at attempt 1 and recovers in two or three, a few CPU seconds each
CASES = [
    Case("fe2-rattled", "bulk", "bcc Fe, 2 atoms, rattled 0.2 Å, ferromagnetic start", fe2_rattled, 1.2, quick=True),
    Case("fe2-overlap", "bulk", "bcc Fe, 2 atoms 0.65 × covalent radii sum apart", fe2_overlap, 1.2, quick=True),
    # Cr PAW at 25/200 Ry diverges with any mixing (negative rho of tens of electrons): 35/350 Ry
    Case("cr2-hot", "bulk", "bcc Cr, 2 atoms, rattled 0.3 Å, antiferromagnetic start", cr2_hot, 1.2, 35, 350,
         quick=True),
    Case("si-slab", "slab/cluster", "Si(001) slab, 8 layers, 16 Å vacuum", si_slab, 0.6),
    Case("cu-slab", "slab/cluster", "Cu(111) slab, 5 layers, 14 Å vacuum", cu_slab, 1.0),
    Case("cu5-cluster", "slab/cluster", "Cu5 trigonal bipyramid, 3 Å vacuum each side, Γ only", cu5_cluster, 10.0),
    Case("fe-atom", "atom", "Fe atom in an 8 × 8.5 × 9 Å box, Γ, fixed Hund moment", atom("Fe"), 1.0, quick=True),
    Case("ni-atom", "atom", "Ni atom in an 8 × 8.5 × 9 Å box, Γ, fixed Hund moment", atom("Ni"), 1.0),
    Case("cr-atom", "atom", "Cr atom in an 8 × 8.5 × 9 Å box, Γ, fixed Hund moment", atom("Cr"), 1.0, 35, 350),
    Case("cu-atom", "atom", "Cu atom in an 8 × 8.5 × 9 Å box, Γ, fixed Hund moment", atom("Cu"), 1.0),
    Case("no", "molecule", "NO molecule (1.15 Å) in an 8 × 8.5 × 9 Å box, Γ, spin-polarised", no_molecule, 1.0),
    Case("o2", "molecule", "O2 molecule (1.21 Å) in an 8 × 8.5 × 9 Å box, Γ, spin-polarised", o2_molecule, 1.0),
]


# -- strategies ---------------------------------------------------------------------------------------------------
class PeerHandler(RecoveryHandler):
    """aiida-quantumespresso's PwBaseWorkChain on a non-converged SCF (handle_electronic_convergence_not_reached):
    mixing_beta × 0.8 (its delta_factor_mixing_beta) and RestartType.FULL from the last calculation, every time;
    gives up on anything else (its other handlers are not exercised here). No trend reading, no early stop, and a
    β that made the SCF worse is kept (the runner's drop_worse is off)."""

    read_trend: bool = False
    drop_worse: bool = False
    give_up_after: int = 0

    def next_correction(
        self, error_type: DFTErrorType, parameters: dict[str, dict[str, Any]], tried: Sequence[str] = (),
        output: PwOutput | None = None,
    ) -> Correction | None:
        if error_type is not DFTErrorType.SCF_NOT_CONVERGED:
            return None
        b = float(parameters.get("electrons", {}).get("mixing_beta", 0.7))
        return Correction(
            name=f"mixing_beta={b * 0.8:.3g}", changes={"electrons": {"mixing_beta": b * 0.8}},
            restart=RestartType.FULL,
        )


def from_scratch(correction: Correction) -> Correction:
    """The correction with a density restart replaced by a start from scratch."""
    if correction.restart in FROM_DENSITY:
        return correction.model_copy(update={"restart": RestartType.FROM_SCRATCH})
    return correction


def _ladders_without_reuse() -> dict[str, list[Correction]]:
    return {error.name: [from_scratch(c) for c in ladder] for error, ladder in LADDERS.items()}


class NoReuseHandler(RecoveryHandler):
    """Ours with every correction (the ladders' and "more electron steps") restarting from scratch."""

    ladders: dict[str, list[Correction]] = Field(default_factory=_ladders_without_reuse)

    def next_correction(
        self, error_type: DFTErrorType, parameters: dict[str, dict[str, Any]], tried: Sequence[str] = (),
        output: PwOutput | None = None,
    ) -> Correction | None:
        correction = super().next_correction(error_type, parameters, tried, output)
        return None if correction is None else from_scratch(correction)


def no_trend_handler() -> RecoveryHandler:
    """Ours without trend reading: the ladder at once, never "more electron steps" first."""
    return RecoveryHandler(read_trend=False)


STRATEGIES: dict[str, Callable[[], RecoveryHandler]] = {
    "ours": RecoveryHandler,
    "peer": PeerHandler,
    "ours-no-trend": no_trend_handler,
}
OPT_IN = {"ours-no-reuse": NoReuseHandler}  # run only when named in --strategies

SHORT = {
    "more electron steps": "+steps", "mixing_mode=local-TF": "TF", "degauss=0.05": "dg.05",
    "diagonalization=cg": "cg", "nominal settings": "nominal", "mixing_beta=0.1, mixing_ndim=16": "β0.1/16",
}


def short(name: str) -> str:
    if name.startswith("mixing_beta="):
        return "β" + name.split("=", 1)[1]
    return SHORT.get(name, name)


def path(record: Record) -> str:
    return " → ".join(short(p) for p in record.path) or "-"


# -- one run ------------------------------------------------------------------------------------------------------
@dataclass
class Record:
    case: str
    strategy: str
    natoms: int
    succeeded: bool
    attempts: int
    path: list[str]
    first_error: str
    cpu: float  # pw.x CPU seconds over all attempts
    iterations: int
    wall: float
    kind: str = ""  # the case's class (KINDS); empty in runs saved before classes were added
    energy: float | None = None
    magnetization: float | None = None
    label_deviations: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    attempt_cpu: list[float] = field(default_factory=list)
    direct_cpu: float | None = None
    direct_iterations: int | None = None
    direct_energy: float | None = None
    direct_ok: bool | None = None
    direct_key: str | None = None
    best_direct_cpu: float | None = None  # the cheapest direct run of this structure, whichever strategy's settings
    final_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    trace: list[dict[str, Any]] = field(default_factory=list)  # per attempt: correction, outcome, iterations, ...

    @property
    def ratio(self) -> float | None:
        return self.cpu / self.direct_cpu if self.succeeded and self.direct_cpu else None

    @property
    def best_ratio(self) -> float | None:
        return self.cpu / self.best_direct_cpu if self.succeeded and self.best_direct_cpu else None

    @property
    def iteration_ratio(self) -> float | None:
        return self.iterations / self.direct_iterations if self.succeeded and self.direct_iterations else None


def attempt_cpu(result: DFTResult) -> list[float]:
    """pw.x's own CPU seconds per attempt (rank 0); the wall time when pw.x printed none (it died)."""
    return [a.cpu_time if a.cpu_time is not None else a.wall_time for a in result.attempts]


def config_for(case: Case, args: argparse.Namespace, work_dir: Path, **changes: Any) -> DFTConfig:
    values: dict[str, Any] = dict(
        kpoint_spacing=case.kpoint_spacing, ecutwfc=case.ecutwfc, ecutrho=case.ecutrho, allow_low_cutoffs=True,
        mpi_ranks=args.ranks,
        max_retries=args.max_retries, timeout=args.timeout, work_dir=work_dir,
        pw_parameters={"electrons": {"electron_maxstep": args.maxstep}},
    )
    values.update(changes)
    return DFTConfig(**values)


def direct_parameters(final: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The final attempt's effective parameters for a run from scratch, with steps enough to converge."""
    params = {
        nl: {k: v for k, v in values.items() if k not in DROPPED.get(nl, ())}
        for nl, values in without_restart(final).items()
    }
    electrons = params.setdefault("electrons", {})
    electrons["electron_maxstep"] = max(DIRECT_MAXSTEP, int(electrons.get("electron_maxstep", 0)))
    return params


def run_strategy(case: Case, atoms: Atoms, strategy: str, args: argparse.Namespace, work_dir: Path) -> Record:
    runner = QERunner(config_for(case, args, work_dir), recovery={**STRATEGIES, **OPT_IN}[strategy]())
    started = time.monotonic()
    result = runner.run(atoms, uid=f"{case.name}.{strategy}", raise_on_failure=False)
    cpu = attempt_cpu(result)
    return Record(
        case=case.name, strategy=strategy, kind=case.kind, natoms=len(atoms), succeeded=result.succeeded,
        attempts=len(result.attempts), path=[a.correction for a in result.attempts[1:] if a.correction],
        first_error=result.attempts[0].error_type, cpu=round(sum(cpu), 2),
        iterations=sum(a.scf_iterations for a in result.attempts), wall=round(time.monotonic() - started, 1),
        energy=result.energy, magnetization=result.total_magnetization,
        label_deviations=dict(result.label_deviations), error=result.error_message, attempt_cpu=cpu,
        final_parameters=result.parameters,
        trace=[
            dict(correction=a.correction, error_type=a.error_type, iterations=a.scf_iterations,
                 final_scf_accuracy=a.final_scf_accuracy, cpu=c, restart=a.restart)
            for a, c in zip(result.attempts, cpu)
        ],
    )


def run_direct(case: Case, atoms: Atoms, params: dict[str, dict[str, Any]], number: int,
               args: argparse.Namespace, work_dir: Path) -> DFTResult:
    config = config_for(case, args, work_dir, recoverable=False, max_retries=1, pw_parameters=params)
    return QERunner(config).run(atoms, uid=f"{case.name}.direct{number}", raise_on_failure=False)


# -- report -------------------------------------------------------------------------------------------------------
def fmt(value: float | None, spec: str = ".2f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(records: list[Record]) -> None:
    print("\nstructure × strategy (CPU = pw.x's own CPU seconds, rank 0; ratio = total ÷ direct run with this "
          "strategy's final settings;\n  vs best = total ÷ the cheapest direct run of the structure, whichever "
          "strategy's final settings it used)")
    header = f"{'structure':13s} {'strategy':14s} {'ok':4s} {'att':>3s} {'CPU s':>7s} {'direct s':>8s} {'ratio':>6s} "
    header += f"{'vs best':>7s} {'SCF it':>6s} {'direct it':>9s} {'it ratio':>8s}  corrections"
    print(header)
    print("-" * len(header))
    for r in records:
        direct = fmt(r.direct_cpu, ".1f") if r.direct_ok else ("failed" if r.direct_ok is False else "-")
        print(
            f"{r.case:13s} {r.strategy:14s} {'yes' if r.succeeded else 'NO':4s} {r.attempts:3d} {r.cpu:7.1f} "
            f"{direct:>8s} {fmt(r.ratio):>6s} {fmt(r.best_ratio):>7s} {r.iterations:6d} "
            f"{fmt(r.direct_iterations, 'd'):>9s} {fmt(r.iteration_ratio):>8s}  {path(r)}"
        )


def print_summary(records: list[Record], strategies: list[str], cases: list[str]) -> dict[str, Any]:
    print(f"\nper strategy (goal: ratio ≤ {GOAL})")
    header = f"{'strategy':14s} {'success':>8s} {'rate':>5s} {'median':>7s} {'mean':>6s} {'max':>6s} "
    header += f"{'≤goal':>5s} {'vs best':>7s} {'it median':>9s} {'all-ok median':>13s} {'CPU total':>9s}"
    print(header)
    print("-" * len(header))
    everywhere = [c for c in cases if all(r.succeeded and r.ratio for r in records if r.case == c)]
    summary = {}
    for s in strategies:
        mine = [r for r in records if r.strategy == s]
        ok = [r for r in mine if r.succeeded]
        ratios = [r.ratio for r in ok if r.ratio is not None]
        iteration_ratios = [r.iteration_ratio for r in ok if r.iteration_ratio is not None]
        best = [r.best_ratio for r in ok if r.best_ratio is not None]
        paired = [r.ratio for r in ok if r.case in everywhere and r.ratio is not None]
        row = dict(
            succeeded=len(ok), structures=len(mine), success_rate=len(ok) / len(mine) if mine else None,
            median_ratio=statistics.median(ratios) if ratios else None,
            mean_ratio=statistics.fmean(ratios) if ratios else None, max_ratio=max(ratios) if ratios else None,
            within_goal=sum(x <= GOAL for x in ratios),
            median_ratio_vs_best_direct=statistics.median(best) if best else None,
            median_iteration_ratio=statistics.median(iteration_ratios) if iteration_ratios else None,
            median_ratio_where_all_succeeded=statistics.median(paired) if paired else None,
            cpu_total=round(sum(r.cpu for r in mine), 1),
        )
        summary[s] = row
        print(
            f"{s:14s} {len(ok):>4d}/{len(mine):<3d} {fmt(row['success_rate'], '.0%'):>5s} "
            f"{fmt(row['median_ratio']):>7s} {fmt(row['mean_ratio']):>6s} {fmt(row['max_ratio']):>6s} "
            f"{row['within_goal']:>5d} {fmt(row['median_ratio_vs_best_direct']):>7s} "
            f"{fmt(row['median_iteration_ratio']):>9s} "
            f"{fmt(row['median_ratio_where_all_succeeded']):>13s} {row['cpu_total']:>9.1f}"
        )
    print(f"(all-ok median: only the {len(everywhere)} structure(s) every strategy labelled: {', '.join(everywhere)};"
          " CPU total includes failed strategies' attempts)")
    return summary


def print_classes(records: list[Record], strategies: list[str]) -> dict[str, Any]:
    """Per class of structure: success rate, median CPU ratio and median iteration ratio of each strategy."""
    print("\nper class (ratio: CPU s of all attempts ÷ CPU s of a direct run with the final settings; it ratio: the "
          "same in SCF iterations, load-free)")
    header = f"{'class':13s} {'strategy':14s} {'success':>8s} {'CPU ratio':>9s} {'it ratio':>8s} {'CPU total':>9s}"
    print(header)
    print("-" * len(header))
    table = {}
    for kind in [k for k in KINDS if any(r.kind == k for r in records)]:
        for s in strategies:
            mine = [r for r in records if r.kind == kind and r.strategy == s]
            ratios = [r.ratio for r in mine if r.ratio is not None]
            its = [r.iteration_ratio for r in mine if r.iteration_ratio is not None]
            row = dict(succeeded=sum(r.succeeded for r in mine), structures=len(mine),
                       median_ratio=statistics.median(ratios) if ratios else None,
                       median_iteration_ratio=statistics.median(its) if its else None,
                       cpu_total=round(sum(r.cpu for r in mine), 1))
            table[f"{kind} {s}"] = row
            print(f"{kind:13s} {s:14s} {row['succeeded']:>4d}/{row['structures']:<3d} {fmt(row['median_ratio']):>9s} "
                  f"{fmt(row['median_iteration_ratio']):>8s} {row['cpu_total']:>9.1f}")
    return table


def print_labels(records: list[Record], cases: list[str]) -> None:
    """Label consistency: each successful label against its own direct run and against a per-structure reference."""
    print("\nlabel consistency (meV/atom; reference = first direct run with nominal label settings)")
    header = f"{'structure':13s} {'strategy':14s} {'|E-E_direct|':>12s} {'|E-E_ref|':>9s} {'mag μB':>7s}"
    header += "  label_deviations"
    print(header)
    print("-" * len(header))
    for case in cases:
        mine = [r for r in records if r.case == case and r.succeeded and r.energy is not None]
        references = [r.direct_energy for r in mine if r.direct_ok and not r.label_deviations]
        reference = references[0] if references else None
        for r in mine:
            own = 1000 * abs(r.energy - r.direct_energy) / r.natoms if r.direct_ok else None
            ref = 1000 * abs(r.energy - reference) / r.natoms if reference is not None else None
            flag = "  > 1 meV/atom" if (ref or 0) > 1 or (own or 0) > 1 else ""
            print(
                f"{case:13s} {r.strategy:14s} {fmt(own, '.3f'):>12s} {fmt(ref, '.3f'):>9s} "
                f"{fmt(r.magnetization, '.2f'):>7s}  {r.label_deviations or '-'}{flag}"
            )


def print_noise(records: list[Record], cases: list[str]) -> None:
    """Attempt 1 is the same pw.x run for every strategy: its spread is the CPU-time noise of this machine."""
    spreads = []
    for case in cases:
        firsts = [r.attempt_cpu[0] for r in records if r.case == case and r.attempt_cpu]
        if len(firsts) > 1:
            spreads.append(f"{case} {min(firsts):.1f}–{max(firsts):.1f}")
    if spreads:
        print("\nnoise: CPU s of the identical attempt 1 across strategies: " + "; ".join(spreads))


# -- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the 4 cheapest structures")
    parser.add_argument("--smoke", action="store_true", help=f"only {SMOKE_CASE} (a cheap one), every strategy, 1 MPI "
                        "rank: about a minute; tests/pwx/test_benchmarks.py runs it")
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES),
        help=f"comma list of {', '.join(STRATEGIES)} (default: all of them) and the opt-in {', '.join(OPT_IN)}",
    )
    parser.add_argument("--structures", help=f"comma list of {', '.join(c.name for c in CASES)}")
    parser.add_argument("--json", type=Path, help="save the raw numbers here")
    parser.add_argument("--maxstep", type=int, default=MAXSTEP, help="electron_maxstep of every attempt")
    parser.add_argument("--max-retries", type=int, default=MAX_RETRIES, help="attempts per structure, all strategies")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks per pw.x run")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pw.x run")
    parser.add_argument("--work-dir", type=Path, help="keep the runs here (default: a temporary directory, removed)")
    parser.add_argument("--report", type=Path, nargs="+",
                        help="print the tables of runs saved with --json (several: merged), run nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the runner's retry log")
    args = parser.parse_args(argv)
    if args.smoke:
        args.structures, args.ranks = args.structures or SMOKE_CASE, 1
    unknown = set(args.strategies.split(",")) - set(STRATEGIES) - set(OPT_IN)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; choose from {', '.join([*STRATEGIES, *OPT_IN])}")
    return args


def header(args: argparse.Namespace, cases: list[Case], strategies: list[str], work_dir: Path) -> None:
    print(
        f"Recovery benchmark: {len(cases)} structures × {len(strategies)} strategies, real pw.x, {args.ranks} MPI "
        f"ranks.\nSettings: the factory's default SCF settings (mixing_beta 0.7, plain mixing, cold smearing 0.02 "
        f"Ry, conv_thr 2e-10 Ry/atom) with\n  reduced cutoffs, coarse k-points and electron_maxstep={args.maxstep} "
        f"(factory default 100) so that runs are short;\n  max_retries={args.max_retries} for every strategy. "
        f"Direct run: from scratch with the final attempt's effective\n  parameters (startingpot/restart_mode "
        f"dropped), electron_maxstep raised to {DIRECT_MAXSTEP} so that it converges.\n"
        f"Work dir: {work_dir}"
    )
    for c in cases:
        print(f"  {c.name:12s} {c.description}; {c.ecutwfc:g}/{c.ecutrho:g} Ry, k-density {c.kpoint_spacing} 1/Å")
    print()


def run_all(args: argparse.Namespace, cases: list[Case], strategies: list[str], work_dir: Path) -> list[Record]:
    """Every strategy on every structure, then a direct run with each distinct set of final settings."""
    records: list[Record] = []
    directs: dict[tuple[str, str], DFTResult] = {}
    total = len(cases) * len(strategies)
    for case in cases:
        if args.json:
            save(args, records)
        atoms = case.build()
        for strategy in strategies:
            ours = [r for r in records if r.case == case.name and r.strategy == "ours"]
            if strategy == "ours-no-trend" and ours and STEPS not in ours[0].path:
                # ours never read the trend into more steps: the ablation makes the same decisions on the same
                # (deterministic, 1-rank) pw.x runs; its record is ours' (CPU seconds included), not a new run
                record = replace(ours[0], strategy=strategy)
            else:
                record = run_strategy(case, atoms, strategy, args, work_dir)
            records.append(record)
            print(
                f"[{len(records):2d}/{total}] {case.name:12s} {strategy:14s} {'OK  ' if record.succeeded else 'FAIL'} "
                f"{record.attempts} attempt(s) {record.iterations:3d} it  CPU {record.cpu:6.1f} s  "
                f"wall {record.wall:6.1f} s  {path(record)}",
                flush=True,
            )
            if record.first_error == DFTErrorType.OK.name:  # attempt 1 is the same run for every strategy
                print(f"        {case.name} did not fail at attempt 1: not a failing structure, left out")
                records.pop()
                break
            if not record.succeeded:
                continue
            params = direct_parameters(record.final_parameters)
            record.direct_key = json.dumps(params, sort_keys=True, default=str)
            cached = (case.name, record.direct_key) in directs
            if not cached:
                directs[(case.name, record.direct_key)] = run_direct(case, atoms, params, len(directs) + 1, args,
                                                                     work_dir)
            direct = directs[(case.name, record.direct_key)]
            record.direct_ok = direct.succeeded
            if direct.succeeded:
                record.direct_cpu = round(sum(attempt_cpu(direct)), 2)
                record.direct_iterations = direct.scf_iterations
                record.direct_energy = direct.energy
            print(
                f"        direct run{' (cached)' if cached else ''}: {'OK' if direct.succeeded else 'FAILED'} "
                f"{direct.scf_iterations or direct.attempts[0].scf_iterations} it  CPU {fmt(record.direct_cpu, '.1f')}"
                f" s  ratio {fmt(record.ratio)}",
                flush=True,
            )
    return records


def report(records: list[Record]) -> dict[str, Any]:
    for record in records:
        costs = [r.direct_cpu for r in records if r.case == record.case and r.direct_cpu]
        record.best_direct_cpu = min(costs) if costs else None
    strategies = list(dict.fromkeys(r.strategy for r in records))
    names = list(dict.fromkeys(r.case for r in records))
    print_table(records)
    summary = print_summary(records, strategies, names)
    summary["classes"] = print_classes(records, strategies)
    print_labels(records, names)
    print_noise(records, names)
    return summary


def save(args: argparse.Namespace, records: list[Record], summary: dict[str, Any] | None = None) -> None:
    """The raw numbers as JSON in args.json (also after each structure: a run cut short keeps what it measured)."""
    args.json.write_text(json.dumps(
        {"settings": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
         "records": [{**asdict(r), "ratio": r.ratio, "best_ratio": r.best_ratio,
                      "iteration_ratio": r.iteration_ratio} for r in records]},
        indent=1, default=str,
    ))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        names = {f.name for f in fields(Record)}
        records = [json.loads(path.read_text())["records"] for path in args.report]
        report([Record(**{k: v for k, v in r.items() if k in names}) for part in records for r in part])
        return 0
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL, format="    %(message)s")
    strategies = args.strategies.split(",")
    cases = [c for c in CASES if c.quick] if args.quick else CASES
    if args.structures:
        cases = [c for c in CASES if c.name in args.structures.split(",")]
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="qe-recovery-bench-"))
    header(args, cases, strategies, work_dir)
    started = time.monotonic()
    try:
        records = run_all(args, cases, strategies, work_dir)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    summary = report(records)
    print(f"\nelapsed {(time.monotonic() - started) / 60:.1f} min")
    if args.json:
        save(args, records, summary)
        print(f"raw numbers in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
