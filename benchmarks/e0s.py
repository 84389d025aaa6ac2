"""Isolated-atom references (E0s) with real pw.x: convergence with the box, and each element at the family's own
cutoffs (the data set's nominal settings) — converged?, attempts, SCF iterations, wall time, E0, moment.

    .venv/bin/python benchmarks/e0s.py box [--element Si] [--edges 8,10,12,14] [--low-cutoffs]
    .venv/bin/python benchmarks/e0s.py elements [--elements Fe,Ni,Cr,Cu,O,H,Si] [--json out.json]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["box", "elements"])
    parser.add_argument("--element", default="Si")
    parser.add_argument("--edges", default="8,10,12,14", help="smallest box edge (Å); the others +0.5, +1")
    parser.add_argument("--elements", default="Fe,Ni,Cr,Cu,O,H,Si")
    parser.add_argument("--low-cutoffs", action="store_true", help="box study at 30/240 Ry (allow_low_cutoffs)")
    parser.add_argument("--json", help="append each row as a JSON line to this file")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per pw.x attempt")
    parser.add_argument("--work-dir", help="keep pw.x's runs here (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="e0s-"))
    base = DFTConfig(mpi_ranks=1, timeout=args.timeout, work_dir=work)
    if args.what == "box":
        config = base.with_changes(ecutwfc=30, ecutrho=240, allow_low_cutoffs=True) if args.low_cutoffs else base
        rows = []
        for edge in (float(e) for e in args.edges.split(",")):
            references.ATOM_BOX = (edge, edge + 0.5, edge + 1.0)
            rows.append({"box": references.ATOM_BOX, **run_element(args.element, config)})
            print(json.dumps(rows[-1]), flush=True)
        last = rows[-1].get("energy")
        for row in rows:
            if row.get("energy") is not None and last is not None:
                print(f"box {row['box']}: E0 {row['energy']:.5f} eV, {1000 * (row['energy'] - last):+.2f} meV vs "
                      f"the largest; {row['wall_time']:.0f} s")
        rows_out = rows
    else:
        rows_out = []
        for element in args.elements.split(","):
            row = run_element(element, base)
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "a") as handle:
            for row in rows_out:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
