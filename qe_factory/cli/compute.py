"""`qe-factory compute`: pw.x on each structure in turn, no LaunchPad."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ase.io import write
from tqdm import tqdm

from qe_factory.cli.format import summary_line
from qe_factory.cli.options import config_from
from qe_factory.engine.runner import REFUSALS, QERunner
from qe_factory.engine.structure import check_uid, read_structures


def compute(args: argparse.Namespace) -> int:
    """Run every structure of a file in turn and write the labelled ones as extxyz."""
    config = config_from(args)
    runner = QERunner(config)
    structures = read_structures(args.structures)
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
