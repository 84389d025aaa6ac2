"""Isolated-atom references (E0s) with real pw.x: convergence with the box, and each element at the family's own
cutoffs (the data set's nominal settings) — converged?, attempts, SCF iterations, wall time, E0, moment.

    .venv/bin/python benchmarks/e0s.py box [--element Si] [--edges 8,10,12,14] [--low-cutoffs]
    .venv/bin/python benchmarks/e0s.py elements [--elements Fe,Ni,Cr,Cu,O,H,Si] [--json out.json]
    .venv/bin/python benchmarks/e0s.py --smoke   # both, on H in 6-7 Å boxes at 25/200 Ry (tests/pwx/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from qe_factory import DFTConfig, QERunner
from qe_factory.engine import references
from qe_factory.engine.references import E0, e0_uid, isolated_atom, settings_key


def run_element(element: str, config: DFTConfig) -> dict:
    runner = QERunner(config)
    key = settings_key(element, generator=runner.generator)
    result = runner.run(isolated_atom(element, config), uid=e0_uid(element, key), raise_on_failure=False)
    row = {"element": element, "converged": result.succeeded, "attempts": len(result.attempts),
           "corrections": [a.correction for a in result.attempts],
           "iterations": [a.scf_iterations for a in result.attempts], "wall_time": result.wall_time,
           "ecutwfc": result.ecutwfc or result.parameters.get("system", {}).get("ecutwfc"),
           "ecutrho": result.ecutrho or result.parameters.get("system", {}).get("ecutrho"),
           "error": result.error_message}
    if result.succeeded:
        e0 = E0.from_result(result, key)
        row.update(energy=e0.energy, moment=e0.magnetization)
    return row


def element_line(row: dict) -> str:
    """The README table's columns for one element."""
    figures = f"E0 {row['energy']:.6f} eV, moment {row['moment']:.2f}" if row["converged"] else row["error"]
    return (f"element {row['element']}: converged {'yes' if row['converged'] else 'no'}, {row['attempts']} attempt(s), "
            f"{sum(row['iterations'])} SCF iterations, {row['wall_time']:.1f} s, {row['ecutwfc']}/{row['ecutrho']} Ry, "
            f"{figures}")


def box_study(element: str, edges: list[float], config: DFTConfig) -> list[dict]:
    """E0 of `element` in boxes of edges L × (L+0.5) × (L+1); each row printed as it comes, then each against the
    largest box."""
    rows = []
    for edge in edges:
        references.ATOM_BOX = (edge, edge + 0.5, edge + 1.0)
        rows.append({"box": references.ATOM_BOX, **run_element(element, config)})
        print(json.dumps(rows[-1]), flush=True)
    last = rows[-1].get("energy")
    for row in rows:
        if row.get("energy") is not None and last is not None:
            print(f"box {row['box']}: E0 {row['energy']:.5f} eV, {1000 * (row['energy'] - last):+.2f} meV vs "
                  f"the largest; {row['wall_time']:.0f} s")
    return rows


def elements_study(elements: list[str], config: DFTConfig) -> list[dict]:
    rows = []
    for element in elements:
        rows.append(run_element(element, config))
        print(json.dumps(rows[-1]), flush=True)
        print(element_line(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=["box", "elements"], help="the study (--smoke: both)")
    parser.add_argument("--element", default="Si")
    parser.add_argument("--edges", default="8,10,12,14", help="smallest box edge (Å); the others +0.5, +1")
    parser.add_argument("--elements", default="Fe,Ni,Cr,Cu,O,H,Si")
    parser.add_argument("--low-cutoffs", action="store_true", help="box study at 30/240 Ry (allow_low_cutoffs)")
    parser.add_argument("--json", help="append each row as a JSON line to this file")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per pw.x attempt")
    parser.add_argument("--work-dir", help="keep pw.x's runs here (default: a temporary directory)")
    parser.add_argument("--smoke", action="store_true", help="both studies on H at 25/200 Ry (allow_low_cutoffs): "
                        "edges 6,7 Å (vacuum_threshold 3 Å, so that they count as vacuum), then the element in the "
                        "6 Å box; tests/pwx/test_benchmarks.py runs it")
    args = parser.parse_args()
    if args.what is None and not args.smoke:
        parser.error("say which study: box or elements (or --smoke)")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="e0s-"))
    base = DFTConfig(mpi_ranks=1, timeout=args.timeout, work_dir=work)
    if args.smoke:
        config = base.with_changes(ecutwfc=25, ecutrho=200, allow_low_cutoffs=True, vacuum_threshold=3.0,
                                   timeout=min(args.timeout, 300))
        rows_out = box_study("H", [6.0, 7.0], config.with_changes(work_dir=work / "box"))
        references.ATOM_BOX = (6.0, 6.5, 7.0)  # its own work_dir: run again, not taken in from the box study
        rows_out += elements_study(["H"], config.with_changes(work_dir=work / "elements"))
    elif args.what == "box":
        config = base.with_changes(ecutwfc=30, ecutrho=240, allow_low_cutoffs=True) if args.low_cutoffs else base
        rows_out = box_study(args.element, [float(e) for e in args.edges.split(",")], config)
    else:
        rows_out = elements_study(args.elements.split(","), base)
    if args.json:
        with open(args.json, "a") as handle:
            for row in rows_out:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
