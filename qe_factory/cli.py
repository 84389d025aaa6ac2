"""The `qe-factory` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read, write
from ase.units import GPa
from tqdm import tqdm

from qe_factory.config import ConfigError, DFTConfig
from qe_factory.inputs import InputError
from qe_factory.pseudos import PseudopotentialError
from qe_factory.results import DFTResult
from qe_factory.runner import ExecutableNotFoundError, QERunner
from qe_factory.structure import StructureError, check_uid

REFUSALS = (StructureError, PseudopotentialError, InputError)


def read_structures(path: Path) -> list[tuple[str, Atoms]]:
    """Every frame of a structure file with its uid (atoms.info['uid'] or '<file stem>-<index>')."""
    try:
        frames = read(path, index=":")
    except Exception as exc:  # ASE raises many types for unreadable files
        raise ConfigError(f"cannot read structures from {path}: {exc}") from exc
    frames = frames if isinstance(frames, list) else [frames]
    return [(str(atoms.info.get("uid") or f"{path.stem}-{i:05d}"), atoms) for i, atoms in enumerate(frames)]


def summary_line(result: DFTResult) -> str:
    """One line per structure: outcome, energy, largest force, pressure, attempts, wall time."""
    head = f"{result.uid:<24} {result.formula:<10}"
    tries = f"{len(result.attempts)} attempt(s) {result.wall_time:7.1f} s"
    if not result.succeeded:
        return f"{head} FAILED  {tries}  {result.error_message}"
    fmax = float(np.linalg.norm(result.forces, axis=1).max())
    pressure = -np.trace(result.stress) / 3 / GPa
    marks = "" if result.nominal_settings else f"  [settings differ: {result.label_deviations}]"
    return f"{head} OK  E={result.energy:.6f} eV  Fmax={fmax:.4f} eV/Å  P={pressure:.3f} GPa  {tries}{marks}"


def compute(args: argparse.Namespace) -> int:
    """Run every structure of a file in turn and write the labelled ones as extxyz."""
    config = DFTConfig.from_yaml(args.config) if args.config else DFTConfig.create()
    runner = QERunner(config)
    structures = read_structures(Path(args.structures))
    output = Path(args.output)
    report = Path(args.report) if args.report else output.with_suffix(".jsonl")
    output.unlink(missing_ok=True)
    counts = {"ok": 0, "failed": 0, "refused": 0}
    with report.open("w") as report_file:
        for uid, atoms in tqdm(structures, desc="structures", unit="structure", file=sys.stderr):
            try:
                check_uid(uid)
                result = runner.run(atoms, uid, raise_on_failure=False)
            except REFUSALS as exc:
                counts["refused"] += 1
                tqdm.write(f"{uid:<24} {atoms.get_chemical_formula():<10} REFUSED {exc}")
                report_file.write(json.dumps({"uid": uid, "succeeded": False, "refused": str(exc)}) + "\n")
                continue
            report_file.write(result.model_dump_json() + "\n")
            report_file.flush()
            counts["ok" if result.succeeded else "failed"] += 1
            if result.succeeded:
                write(output, result.to_atoms(), format="extxyz", append=True)
            tqdm.write(summary_line(result))
    print(
        f"{counts['ok']} labelled, {counts['failed']} failed, {counts['refused']} refused of {len(structures)}; "
        f"labels in {output}, full report in {report}"
    )
    return 0 if counts["ok"] == len(structures) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qe-factory", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every retry and pw.x run")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compute", help="run pw.x on each structure in turn (no LaunchPad)")
    p.add_argument("structures", help="any file ASE reads (extxyz, CIF, POSCAR, ...)")
    p.add_argument("-o", "--output", default="results.extxyz", help="extxyz with REF_energy/REF_forces/REF_stress")
    p.add_argument("-c", "--config", help="YAML file of DFTConfig settings")
    p.add_argument("--report", help="JSON-lines report of every structure (default: <output>.jsonl)")
    p.set_defaults(func=compute)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ExecutableNotFoundError) as exc:
        print(f"qe-factory: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
