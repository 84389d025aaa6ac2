"""`qe-factory e0s`: isolated-atom energies through the home's workflows."""

from __future__ import annotations

import argparse
import sys

from qe_factory.cli.format import refusal_lines
from qe_factory.cli.options import config_from
from qe_factory.engine.runner import REFUSALS
from qe_factory.workflow.pipelines import Listener, home_e0s


def e0s(args: argparse.Namespace) -> int:
    """Compute the isolated-atom energies (E0s) of ELEMENTS with the config's settings (its cutoffs, else each
    element's own), once per element and settings, through the home's workflows (recovery, parallel workers), and
    print them (workflow.pipelines.home_e0s)."""
    from qe_factory.engine.references import E0

    class Refusals(Listener):
        def references_submitted(self, reports: list) -> None:
            for line in refusal_lines(reports):
                print(line)

    try:
        found = home_e0s(args.elements, config_from(args), args.home, parallel=args.parallel,
                         live_logs=args.verbose, listener=Refusals(), dataset=args.dataset)
    except (*REFUSALS, ValueError) as exc:
        print(f"qe-factory: {exc}", file=sys.stderr)
        return 2
    print(f"{'element':<8} {'E0 (eV)':>16} {'moment':>7} {'attempts':>8}  settings key")
    for element, e0 in found.items():
        if isinstance(e0, E0):
            moment = "-" if e0.magnetization is None else f"{e0.magnetization:.2f}"
            print(f"{element:<8} {e0.energy:16.6f} {moment:>7} {e0.attempts:>8}  {e0.settings_key[:12]}")
        else:
            print(f"{element:<8} {'FAILED':>16} {'':>7} {'':>8}  {e0}")
    return 0 if all(isinstance(e0, E0) for e0 in found.values()) else 1
