"""Options several qe-factory commands share, and what they turn into."""

from __future__ import annotations

import argparse

from qe_factory.engine.config import PRESETS, DFTConfig
from qe_factory.engine.export import EXPORT_FORMATS


def config_from(args: argparse.Namespace) -> DFTConfig:
    """The config file's settings (or the defaults) over the `--protocol` preset, if one was named."""
    preset = {"protocol": args.protocol} if getattr(args, "protocol", None) else {}
    return DFTConfig.from_yaml(args.config, **preset) if args.config else DFTConfig.create(**preset)


def resources_from(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (("ntasks", args.ntasks), ("walltime", args.walltime)) if v}


def training_set_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include-marked", action="store_true", help="also export labels made with other settings")
    p.add_argument("--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0],
                   help="mace-extxyz: REF_energy/REF_forces/REF_stress; nequip-extxyz: energy/forces/stress; "
                   "ase-db: an ASE database (ase db FILE)")
    p.add_argument("--config-type", help="config_type of the structures whose input had none (atoms.info)")


def dataset_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="default",
                   help="the home's data set: its protocol (one cutoff pair and one set of settings for all its "
                   "labels) is pinned by its first submission (default: default)")


def protocol_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", choices=list(PRESETS), help="a named preset of settings under the config file's: "
                   + "; ".join(f"{name}: {values}" for name, values in PRESETS.items()))
