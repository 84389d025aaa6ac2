"""The `qe-factory` command: a module per noun (compute, home, structures, workers, e0s, pseudos) over the engine
and the workflow layer's Python API; what it prints is in format.py."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from qe_factory.cli import compute, e0s, home, pseudos, structures, workers
from qe_factory.cli.options import dataset_option, protocol_option, training_set_options
from qe_factory.engine.config import ConfigError
from qe_factory.engine.outcomes import EnvironmentFault
from qe_factory.engine.structure import StructureError

DESCRIPTION = "Quantum ESPRESSO labels for MLIPs: compute directly, or submit/run/watch/export through FireWorks."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qe-factory", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every retry and pw.x run; FireWorks' and jobflow's lines live (else in <home>/logs/)")
    parser.add_argument("--home", help="factory home (default $QE_FACTORY_HOME or ./factory)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help_text, structures=False, config=False, output=False):
        p = sub.add_parser(name, help=help_text, description=func.__doc__)
        p.add_argument("--home", default=argparse.SUPPRESS, help="factory home (default $QE_FACTORY_HOME or ./factory)")
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="FireWorks' and jobflow's log lines live (else in <home>/logs/)")
        if structures:
            p.add_argument("structures", help="any file ASE reads (extxyz, CIF, POSCAR, ...)")
        if config:
            p.add_argument("-c", "--config", help="YAML file of DFTConfig settings")
            protocol_option(p)
        if output:
            p.add_argument("-o", "--output", default="results.extxyz", help="the training set file")
        p.set_defaults(func=func)
        return p

    p = command("compute", compute.compute, "run pw.x on each structure in turn (no LaunchPad)", True, True, True)
    p.add_argument("--report", help="JSON-lines report of every structure (default: <output>.jsonl)")
    command("init", home.init, "create the factory home")
    command("env", home.env, "print exports for stock lpad/rlaunch/qlaunch")
    p = command("submit", structures.submit_cmd, "add workflows to the LaunchPad", True, True)
    p.add_argument("--ntasks", type=int, help="MPI ranks per structure (SLURM, qlaunch -r)")
    p.add_argument("--walltime", help="wall time per SCF job, HH:MM:SS (SLURM, qlaunch -r)")
    p.add_argument("--no-e0s", action="store_true", help="do not add the isolated-atom references (E0s)")
    dataset_option(p)
    p = command("worker", workers.worker, "run READY Fireworks in this process")
    p.add_argument("-c", "--config", help="YAML whose execution settings (command, mpi_ranks, timeout, work_dir, ...) "
                   "this worker uses; what is computed comes with each workflow")
    p.add_argument("--structures", type=int, help="stop after this many structures finished")
    p.add_argument("--nlaunches", type=int, help="stop after this many Fireworks")
    p.add_argument("--parallel", type=int, help="pw.x runs at once, each with cores/N ranks (default: automatic)")
    p = command("run", structures.run, "submit + run locally + export (the whole pipeline)", True, True, True)
    p.add_argument("--parallel", type=int, help="pw.x runs at once, each with cores/N ranks (default: automatic)")
    training_set_options(p)
    p.add_argument("--no-e0s", action="store_true", help="do not compute the isolated-atom references (E0s) first")
    dataset_option(p)
    p = command("e0s", e0s.e0s, "isolated-atom energies (E0s) of elements, computed once per settings", config=True)
    p.add_argument("elements", nargs="+", help="chemical symbols, e.g. Fe O H")
    dataset_option(p)
    p.add_argument("--parallel", type=int, help="pw.x runs at once, each with cores/N ranks (default: automatic)")
    command("status", home.status, "every structure seen, by outcome; failures with reasons")
    command("show", home.show, "one structure's whole story: every attempt and its label").add_argument("uid")
    command("report", home.report, "an HTML page of the home's outcomes, labels and recovery").add_argument(
        "-o", "--output", default="report.html", help="the HTML file (default report.html)")
    p = command("export", structures.export, "write validated results as a training set, and their E0s beside it",
                output=True)
    training_set_options(p)
    dataset_option(p)
    p = command("qlaunch", workers.qlaunch, "SLURM worker jobs for this home, e.g. qe-factory qlaunch rapidfire -m 8")
    p.add_argument("qlaunch_args", nargs=argparse.REMAINDER, help="arguments for qlaunch")
    p = command("host", workers.host, "be a pilot host: run launches from the home's queue (what a pilot job runs)")
    p.add_argument("-c", "--config", help="YAML whose execution settings this host's pw.x runs use")
    p.add_argument("--slots", type=int, help="launches at once (default: one 1-rank pw.x per core)")
    p.add_argument("--idle-exit", type=float, default=60, help="seconds without work before the host ends")
    p = command("launch-offline", workers.launch_offline, "run one reserved Firework offline (what a SLURM job runs)")
    p.add_argument("launch_dir", help="the launch directory holding FW.json and FW_offline.json")
    p = command("rerun-lost", workers.rerun_lost, "requeue Fireworks whose worker died")
    p.add_argument("--time", type=int, default=1800,
                   help="MongoDB only: seconds without a ping before a run is lost (embedded: no coordinator = lost)")
    command("repair", home.repair, "rebuild a missing or damaged LaunchPad file or JobStore")
    p = command("lpad", home.lpad, "stock lpad on this home, e.g. qe-factory lpad get_wflows -d count")
    p.add_argument("lpad_args", nargs=argparse.REMAINDER, help="arguments for lpad")
    p = command("pseudos", pseudos.pseudos,
                "pseudopotential families: install one from an archive, list what they cover")
    actions = p.add_subparsers(dest="action", required=True)
    install = actions.add_parser("install", help="unpack and md5-check a family's archive (path or URL)")
    install.add_argument("family", help="family name (e.g. sssp-efficiency-1.3) or the path of its JSON table")
    install.add_argument("--from", dest="source", required=True, help="the downloaded archive (tar/zip) or its URL")
    actions.add_parser("list", help="families, their elements, and what --structures needs").add_argument(
        "--structures", help="a structure file: show which of its elements each family lacks")
    p = command("webgui", home.webgui, "FireWorks' web GUI on this home, read-only, on 127.0.0.1")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000; 0: any free one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    level = logging.INFO if args.verbose else logging.WARNING
    # FireWorks' loggers print their own INFO lines; pass on only ours (and anyone's warnings)
    handler.addFilter(lambda record: record.name.startswith("qe_factory") or record.levelno >= logging.WARNING)
    logging.basicConfig(level=level, handlers=[handler])
    from qe_factory.engine.outcomes import DiskFullError
    from qe_factory.workflow.coordinator import Stopped
    from qe_factory.workflow.lock import HomeBusy
    from qe_factory.workflow.state import StateError

    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
        return code
    except (ConfigError, StructureError) as exc:
        print(f"qe-factory: {exc}", file=sys.stderr)
        return 2
    except EnvironmentFault as exc:
        print(f"qe-factory: this machine cannot run the work: {exc}", file=sys.stderr)
        return 5
    except HomeBusy as exc:
        print(f"qe-factory: {exc}", file=sys.stderr)
        return 3
    except (StateError, DiskFullError) as exc:
        print(f"qe-factory: {exc}", file=sys.stderr)
        return 4
    except Stopped as exc:
        print(f"qe-factory: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except BrokenPipeError:  # the reader went away (qe-factory status | head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"qe-factory: no space left on device ({exc}); the last saved state is intact: free space, then run "
              "the command again", file=sys.stderr)
        return 4
