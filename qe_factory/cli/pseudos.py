"""`qe-factory pseudos`: install a family, list what the families cover."""

from __future__ import annotations

import argparse
import sys

from qe_factory.engine.structure import read_structures


def pseudos(args: argparse.Namespace) -> int:
    """Install a pseudopotential family from a downloaded archive (md5-checked), or list the families, the elements
    each covers and, for a structure file, what is missing."""
    import textwrap

    from ase.data import atomic_numbers

    from qe_factory.engine import pseudos as pp

    try:
        if args.action == "install":
            path = pp.install_family(args.family, args.source)
            family = pp.load_family(path.name)
            print(f"{family.name}: {len(family.entries)} pseudopotentials checked and installed in {path}; "
                  f"use it with  pseudo_family: {family.name}")
            return 0
        needed = {s for _, atoms in read_structures(args.structures) for s in atoms.get_chemical_symbols()} \
            if args.structures else set()
        for name in pp.known_families():
            family = pp.load_family(name)
            absent = pp.missing_pseudos(family, family.entries)
            print(f"{name:<24} {family.functional or '?':<6} {len(family.entries):>3} elements, "
                  f"{len(family.entries) - len(absent)} installed in {family.directory}")
            print(textwrap.fill(" ".join(sorted(family.entries, key=atomic_numbers.get)), 116,
                                initial_indent="    ", subsequent_indent="    "))
            if args.structures:
                missing = pp.missing_pseudos(family, needed)
                print(f"    {args.structures}: " + (", ".join(f"{el} ({why})" for el, why in missing.items())
                                                    + " missing" if missing else f"all {len(needed)} elements ready"))
        return 0
    except pp.PseudopotentialError as exc:
        print(f"qe-factory: {exc}", file=sys.stderr)
        return 2
