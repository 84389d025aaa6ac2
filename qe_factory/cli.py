"""The `qe-factory` command: compute directly, or submit/run/watch/export through FireWorks."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
from ase.io import write
from ase.units import GPa
from tqdm import tqdm

from qe_factory.engine.config import ConfigError, DFTConfig
from qe_factory.engine.outcomes import EnvironmentFault
from qe_factory.engine.results import EXPORT_FORMATS, DFTResult
from qe_factory.engine.runner import REFUSALS, QERunner
from qe_factory.engine.structure import StructureError, check_uid, read_structures
from qe_factory.workflow.pipelines import Listener, home_e0s, label


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


def failure_line(story) -> str:
    """One line for a structure that failed or was refused (a history.Story)."""
    from qe_factory.workflow.history import cause

    return f"{story.uid:<24} {story.outcome.upper()} {cause(story)}"


def compute(args: argparse.Namespace) -> int:
    """Run every structure of a file in turn and write the labelled ones as extxyz."""
    config = _config(args)
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


def _config(args: argparse.Namespace) -> DFTConfig:
    return DFTConfig.from_yaml(args.config) if args.config else DFTConfig.create()


def _resources(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (("ntasks", args.ntasks), ("walltime", args.walltime)) if v}


def init(args: argparse.Namespace) -> int:
    """Create the factory home (configuration, embedded LaunchPad, JobStore) and say how to use it."""
    from qe_factory.workflow.home import activate, embedded_file

    home = activate(args.home)
    mode = f"embedded LaunchPad {embedded_file(home)}" if embedded_file(home) else "MongoDB LaunchPad"
    print(f"factory home {home} ({mode}); for lpad/rlaunch/qlaunch run:  eval \"$(qe-factory env)\"")
    return 0


def env(args: argparse.Namespace) -> int:
    """Print the exports that point stock lpad/rlaunch/qlaunch at the factory home."""
    from qe_factory.workflow.home import activate, config_environment

    home = activate(args.home)
    for key, value in config_environment(home).items():
        print(f"export {key}={value}")
    # stock lpad through the coordinator's rules: reads on a snapshot, writes only when no coordinator runs
    print(f'lpad() {{ "{Path(sys.executable).with_name("qe-factory")}" --home "{home}" lpad "$@"; }}')
    return 0


def submit_cmd(args: argparse.Namespace) -> int:
    """Add one workflow per structure to the LaunchPad."""
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.state import get_jobstore
    from qe_factory.workflow.submit import structure_references, submit, submit_references

    activate(args.home)

    config = _config(args)
    if config.execution.model_fields_set:
        print(f"note: {', '.join(sorted(config.execution.model_fields_set))} are execution settings: they stay with "
              "the workers (qe-factory worker -c FILE, or QE_FACTORY_<KEY>), not with the workflows")
    if not args.no_e0s:
        references = structure_references([atoms for _, atoms in read_structures(args.structures)], config)
        for line in reference_lines(submit_references(references.values(), None, get_jobstore(), _resources(args))):
            print(line)
    report = submit(args.structures, config, resources=_resources(args), store=get_jobstore(), progress=progress_bar)
    for uid, why in report.refused.items():
        print(f"{uid:<24} REFUSED {why}")
    for uid, other in report.duplicates.items():
        print(f"{uid:<24} DUPLICATE of {other} (same structure and settings)")
    print(report.summary())
    if report.queued:
        print("queued structures wait in the home's inbox; the coordinator (qe-factory run/worker/qlaunch) takes them "
              "in as workflows finish; `qe-factory status` shows the inbox")
    return 0


def worker(args: argparse.Namespace) -> int:
    """Run READY Fireworks in this process (what the SLURM template launches)."""
    from qe_factory.workflow.coordinator import run_coordinator
    from qe_factory.workflow.home import activate

    home = activate(args.home)
    execution = _config(args).execution if args.config else None
    launched = run_coordinator(
        max_structures=args.structures, nlaunches=args.nlaunches, launch_root=home / "launches", execution=execution,
        log=None if args.verbose else home / "logs" / "worker.log", parallel=args.parallel,
    )
    print(f"worker ran {launched} Firework(s)")
    return 0


class RunLines(Listener):
    """`qe-factory run` on the terminal: a progress bar over the structures and a line per structure."""

    def __init__(self, uids: set[str], output):
        self.uids, self.output, self.progress = uids, output, None

    def started(self, home: Path, launchpad: str, structures: int) -> None:
        print(f"factory home {home}; LaunchPad {launchpad}; {structures} structures")

    def references_submitted(self, reports: list) -> None:
        for line in reference_lines(reports):
            print(line)

    def submitted(self, report, labelled_before: dict[str, DFTResult]) -> None:
        self.progress = tqdm(total=len(self.uids), desc="structures", unit="structure", file=sys.stderr)
        for uid, why in report.refused.items():
            tqdm.write(f"{uid:<24} REFUSED {why}")
        for uid, other in report.duplicates.items():
            tqdm.write(f"{summary_line(labelled_before[uid])}  (labelled before)" if other == uid and uid in
                       labelled_before else f"{uid:<24} DUPLICATE of {other} (same structure and settings)")
        self.progress.update(len(report.refused) + len(report.duplicates))

    def finished(self, story) -> None:
        if story.uid in self.uids:
            self.progress.update(1)
        if story.uid in self.uids or (story.is_reference and story.outcome == "labelled"):
            tqdm.write(summary_line(story.result) if story.outcome == "labelled" else failure_line(story))

    def exported(self, export) -> None:
        if self.progress is not None:
            self.progress.close()
        export_lines(export, self.output)


def run(args: argparse.Namespace) -> int:
    """Submit, run locally in this process, and export: the whole pipeline with no server
    (workflow.pipelines.label)."""
    uids = [uid for uid, _ in read_structures(args.structures)]
    report = label(args.structures, _config(args), args.home, args.output, parallel=args.parallel,
                   export_format=args.format, config_type=args.config_type, include_marked=args.include_marked,
                   e0s=not args.no_e0s, live_logs=args.verbose,
                   listener=RunLines(set(uids), args.output))
    print(report.summary())
    return 0 if report.written == len(uids) else 1


def reference_lines(reports: list) -> list[str]:
    """Lines saying which isolated-atom references (E0s) were refused and how many were submitted."""
    lines = [f"{uid:<24} REFUSED {why}" for report in reports for uid, why in report.refused.items()]
    added = sum(len(report.fw_ids) + len(report.queued) for report in reports)
    return lines + ([f"{added} isolated-atom reference(s) (E0s) submitted ahead of the structures"] if added else [])


def export_lines(export, output) -> None:
    """Say where the E0s went and what was left out of an export."""
    from qe_factory.engine.references import mace_e0s

    for uid, why in export.unphysical.items():
        print(f"{uid:<24} LEFT OUT: {why}")
    if export.e0s_file is not None:
        print(f"E0s of {', '.join(export.e0s)} as IsolatedAtom frames in {output} and in {export.e0s_file}: "
              f"mace_run_train ... --E0s='{mace_e0s(export.e0s)}'")
    for element, why in export.missing.items():
        print(f"no E0 for {element}: {why}")


def status(args: argparse.Namespace) -> int:
    """Every structure the home has seen by outcome, the offline runs by state, Fireworks per state, and every
    failure with its reason."""
    from qe_factory.workflow import state
    from qe_factory.workflow.history import cause, home_history, outcome_counts, split_references
    from qe_factory.workflow.home import activate, embedded_file
    from qe_factory.workflow.inbox import waiting
    from qe_factory.workflow.lock import holder
    from qe_factory.workflow.offline import pending_runs

    home = activate(args.home)
    launchpad = state.get_launchpad(read_only=True)
    file = embedded_file(home)
    print(f"LaunchPad: {file if file else 'MongoDB'}")
    if file:
        who = holder(home)
        print("  coordinator: " + (f"PID {who['pid']} ({who['command']}, since {who['since']})" if who else
                                   "none running (the next run/worker/submit becomes it)"))
        if inbox := waiting(home):
            print(f"  inbox: {len(inbox)} submission(s) waiting for the coordinator")
    stories = home_history(home, launchpad, state.get_jobstore())
    structures, references = split_references(stories)
    counts = outcome_counts(structures)
    print(f"structures seen: {len(structures)}: {counts['labelled']} labelled ({counts['marked']} of "
          f"them with settings other than the nominal ones), {counts['failed']} failed, {counts['refused']} refused, "
          f"{counts['waiting']} waiting, {counts['running']} running")
    if references:
        done = outcome_counts(references)
        print(f"isolated-atom references (E0s): {done['labelled']} computed, {done['failed']} failed, "
              f"{done['waiting'] + done['running']} to do")
    print("workflows in the LaunchPad (labelled ones leave it): "
          + (", ".join(f"{n} {name}" for name, n in sorted(state.workflow_counts(launchpad).items())) or "none"))
    if runs := pending_runs(launchpad):
        jobs = [run.job_id for run in runs if run.job_id]
        print(f"  workers: {len(runs)} SCF run(s) reserved offline" + (f", {len(jobs)} of them in SLURM job(s) "
                                                                      f"{', '.join(jobs)}" if jobs else ""))
    if run_states := state.run_state_counts(launchpad):
        print("  offline runs by state: " + ", ".join(f"{n} {name}" for name, n in sorted(run_states.items())))
    for name, stages in sorted(state.firework_counts(launchpad).items()):
        print(f"  {name:<10} " + ", ".join(f"{n} {stage}" for stage, n in sorted(stages.items())))
    for story in stories:
        if story.outcome in ("failed", "refused"):
            print(f"{story.outcome.upper()} {story.uid} {cause(story)}")
    return 0


def show(args: argparse.Namespace) -> int:
    """One structure's whole story: its outcome, label (energy, forces, stress, settings, provenance) or cause of
    failure, every pw.x attempt, and where its files are."""
    from qe_factory.workflow.history import home_history, story_lines
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.state import get_jobstore, get_launchpad

    home = activate(args.home)
    stories = home_history(home, get_launchpad(read_only=True), get_jobstore(), uids=[args.uid], load=True)
    if not stories:
        print(f"qe-factory: the home {home} has never seen a structure with uid {args.uid!r} (qe-factory status "
              "lists what it has)", file=sys.stderr)
        return 2
    print("\n".join(story_lines(stories[0])))
    return 0


def report(args: argparse.Namespace) -> int:
    """Write one self-contained HTML page about the home: outcomes, label distributions, recovery, failures,
    settings and pseudopotentials."""
    from qe_factory.workflow.history import home_history, split_references
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.report import report_html
    from qe_factory.workflow.state import get_jobstore, get_launchpad

    home = activate(args.home)
    with tqdm(total=6, desc="report", unit="step", file=sys.stderr) as progress:
        progress.set_postfix_str("reading the JobStore and the LaunchPad")
        stories = home_history(home, get_launchpad(read_only=True), get_jobstore(), load=True)

        def step(name: str) -> None:
            progress.update(1)
            progress.set_postfix_str(name[:40])

        page = report_html(stories, str(home), step)
        Path(args.output).write_text(page)
        progress.update(progress.total - progress.n)
    structures, references = split_references(stories)
    print(f"report on {len(structures)} structure(s) and {len(references)} isolated-atom reference(s) written "
          f"to {args.output}")
    return 0


def export(args: argparse.Namespace) -> int:
    """Write the validated results as a training set, with the E0s made with exactly their settings."""
    from qe_factory.engine.references import is_reference, write_labels
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.state import get_jobstore, load_results

    activate(args.home)
    results = list(progress_bar(load_results(get_jobstore()), "export"))
    written = write_labels(results, args.output, args.include_marked, args.format, args.config_type)
    export_lines(written, args.output)
    print(f"{written.labels} of {sum(not is_reference(r) for r in results)} results written to {args.output} "
          f"({args.format})")
    return 0


def e0s(args: argparse.Namespace) -> int:
    """Compute the isolated-atom energies (E0s) of ELEMENTS with the config's settings (its cutoffs, else each
    element's own), once per element and settings, through the home's workflows (recovery, parallel workers), and
    print them (workflow.pipelines.home_e0s)."""
    from qe_factory.engine.references import E0

    class Refusals(Listener):
        def references_submitted(self, reports: list) -> None:
            for line in reference_lines(reports)[:-1] if reports else []:
                print(line)

    try:
        found = home_e0s(args.elements, _config(args), args.home, parallel=args.parallel,
                         live_logs=args.verbose, listener=Refusals())
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


def rerun_lost(args: argparse.Namespace) -> int:
    """Put RUNNING Fireworks whose worker died back to READY.

    Embedded home: with no coordinator alive, every RUNNING Firework is lost (refused while one is alive: its runs
    are not). MongoDB: those not pinged for --time seconds (FireWorks' detect_lostruns).
    """
    from qe_factory.workflow.coordinator import settle_offline_runs
    from qe_factory.workflow.home import activate, embedded_file
    from qe_factory.workflow.lock import command_line, coordinate
    from qe_factory.workflow.state import get_jobstore, get_launchpad, save_launchpad

    home = activate(args.home)
    with coordinate(home, command_line()):
        launchpad = get_launchpad()
        expiration = 0 if embedded_file(home) else args.time
        _, lost_fws, _ = launchpad.detect_lostruns(expiration_secs=expiration, rerun=True)
        lost_fws = sorted([*lost_fws, *settle_offline_runs(launchpad, get_jobstore())[1]])  # workers' reserved runs
        save_launchpad(launchpad)
    print(f"{len(lost_fws)} lost Firework(s) put back to READY: {lost_fws}")
    return 0


def repair(args: argparse.Namespace) -> int:
    """Rebuild a missing or damaged LaunchPad file or JobStore from the previous good state, the launch
    directories and the JobStore, and say what could not be rebuilt."""
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.repair import repair as repair_home

    for line in repair_home(activate(args.home)):
        print(line)
    return 0


def lpad(args: argparse.Namespace) -> int:
    """Stock lpad on this home: reading commands on a snapshot (safe beside a running worker), others as the
    home's coordinator (refused while one runs), written back atomically."""
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.lpad import run_lpad

    return run_lpad(args.lpad_args, activate(args.home))


def webgui(args: argparse.Namespace) -> int:
    """FireWorks' web GUI on this home at http://127.0.0.1:PORT/: read-only (it takes no lock, writes nothing: it
    runs beside a coordinator), each reload showing the last saved state, failures with their reasons."""
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.webgui import serve

    serve(activate(args.home), args.port)
    return 0


def qlaunch(args: argparse.Namespace) -> int:
    """SLURM worker jobs for this home. Embedded LaunchPad (or --offline): this process is the home's coordinator;
    it keeps up to -m jobs in the queue, each running one SCF Firework offline (FireWorks' reservation mode, no
    database access from the job), and takes their results in. MongoDB: stock qlaunch with the home's config."""
    from qe_factory.workflow.home import activate, embedded_file
    from qe_factory.workflow.lpad import qlaunch_command

    home = activate(args.home)
    options = qlaunch_options(args.qlaunch_args)
    if embedded_file(home) is None and not options.offline:
        argv, environment = qlaunch_command(args.qlaunch_args, home)
        return subprocess.run(argv, env=environment).returncode
    from fireworks.fw_config import QUEUEADAPTER_LOC
    from fireworks.utilities.fw_serializers import load_object_from_file

    from qe_factory.workflow.coordinator import run_coordinator
    from qe_factory.workflow.workers import QueueWorkers

    jobs = QueueWorkers(load_object_from_file(QUEUEADAPTER_LOC), options.maxjobs_queue, options.sleep,
                        options.nlaunches)
    launched = run_coordinator(launch_root=home / "launches", workers=jobs, timeout=options.timeout,
                               log=None if args.verbose else home / "logs" / "worker.log")
    waiting = len(jobs.running())
    print(f"qlaunch: {jobs.submitted} SLURM job(s) submitted, {launched} Firework(s) finished"
          + (f"; {waiting} job(s) still queued or running: the next `qe-factory qlaunch` (or run/worker) takes "
             "them in" if waiting else ""))
    return 0


def qlaunch_options(argv: list[str]) -> argparse.Namespace:
    """The qlaunch options the offline coordinator understands (as stock qlaunch spells them)."""
    parser = argparse.ArgumentParser(prog="qe-factory qlaunch")
    parser.add_argument("--offline", action="store_true", help="offline jobs also with MongoDB")
    parser.add_argument("mode", choices=["rapidfire", "singleshot"], nargs="?", default="rapidfire")
    parser.add_argument("-m", "--maxjobs_queue", type=int, default=1, help="jobs in the queue at once")
    parser.add_argument("--nlaunches", type=int, default=0, help="jobs to submit in all (0: until done)")
    parser.add_argument("--timeout", type=float, help="seconds after which no new job is submitted")
    parser.add_argument("--sleep", type=float, default=10, help="seconds between looks at the queue")
    options = parser.parse_args(argv)
    if options.mode == "singleshot":
        options.maxjobs_queue, options.nlaunches = 1, 1
    return options


def launch_offline(args: argparse.Namespace) -> int:
    """Run the Firework reserved in a launch directory, with no LaunchPad or JobStore access (a SLURM job)."""
    import signal

    from qe_factory.engine.process import STOP
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.offline import run_offline

    activate(args.home)
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # the time limit is near: pw.x's max_seconds acts
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: STOP.set())
    state = run_offline(Path(args.launch_dir).resolve())
    print(f"launch-offline: {state}")
    return 0


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


PROGRESS_FROM = 100  # structures from which a step (checking, making workflows, export) shows a progress bar


def progress_bar(items, description: str):
    """`items` with a progress bar on stderr that goes away when done (none for fewer than PROGRESS_FROM)."""
    items = list(items)
    return tqdm(items, desc=description, unit="structure", file=sys.stderr, leave=False,
                disable=len(items) < PROGRESS_FROM)


def training_set_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include-marked", action="store_true", help="also export labels made with other settings")
    p.add_argument("--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0],
                   help="mace-extxyz: REF_energy/REF_forces/REF_stress; nequip-extxyz: energy/forces/stress; "
                   "ase-db: an ASE database (ase db FILE)")
    p.add_argument("--config-type", help="config_type of the structures whose input had none (atoms.info)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qe-factory", description=__doc__)
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
        if output:
            p.add_argument("-o", "--output", default="results.extxyz", help="the training set file")
        p.set_defaults(func=func)
        return p

    p = command("compute", compute, "run pw.x on each structure in turn (no LaunchPad)", True, True, True)
    p.add_argument("--report", help="JSON-lines report of every structure (default: <output>.jsonl)")
    command("init", init, "create the factory home")
    command("env", env, "print exports for stock lpad/rlaunch/qlaunch")
    p = command("submit", submit_cmd, "add workflows to the LaunchPad", True, True)
    p.add_argument("--ntasks", type=int, help="MPI ranks per structure (SLURM, qlaunch -r)")
    p.add_argument("--walltime", help="wall time per SCF job, HH:MM:SS (SLURM, qlaunch -r)")
    p.add_argument("--no-e0s", action="store_true", help="do not add the isolated-atom references (E0s)")
    p = command("worker", worker, "run READY Fireworks in this process")
    p.add_argument("-c", "--config", help="YAML whose execution settings (command, mpi_ranks, timeout, work_dir, ...) "
                   "this worker uses; what is computed comes with each workflow")
    p.add_argument("--structures", type=int, help="stop after this many structures finished")
    p.add_argument("--nlaunches", type=int, help="stop after this many Fireworks")
    p.add_argument("--parallel", type=int, help="pw.x runs at once, each with cores/N ranks (default: automatic)")
    p = command("run", run, "submit + run locally + export (the whole pipeline)", True, True, True)
    p.add_argument("--parallel", type=int, help="pw.x runs at once, each with cores/N ranks (default: automatic)")
    training_set_options(p)
    p.add_argument("--no-e0s", action="store_true", help="do not compute the isolated-atom references (E0s) first")
    p = command("e0s", e0s, "isolated-atom energies (E0s) of elements, computed once per settings", config=True)
    p.add_argument("elements", nargs="+", help="chemical symbols, e.g. Fe O H")
    p.add_argument("--parallel", type=int, help="pw.x runs at once, each with cores/N ranks (default: automatic)")
    command("status", status, "every structure seen, by outcome; failures with reasons")
    command("show", show, "one structure's whole story: every attempt and its label").add_argument("uid")
    command("report", report, "an HTML page of the home's outcomes, labels and recovery").add_argument(
        "-o", "--output", default="report.html", help="the HTML file (default report.html)")
    training_set_options(command("export", export, "write validated results as a training set, and their E0s beside "
                                 "it", output=True))
    p = command("qlaunch", qlaunch, "SLURM worker jobs for this home, e.g. qe-factory qlaunch rapidfire -m 8")
    p.add_argument("qlaunch_args", nargs=argparse.REMAINDER, help="arguments for qlaunch")
    p = command("launch-offline", launch_offline, "run one reserved Firework offline (what a SLURM job runs)")
    p.add_argument("launch_dir", help="the launch directory holding FW.json and FW_offline.json")
    p = command("rerun-lost", rerun_lost, "requeue Fireworks whose worker died")
    p.add_argument("--time", type=int, default=1800,
                   help="MongoDB only: seconds without a ping before a run is lost (embedded: no coordinator = lost)")
    command("repair", repair, "rebuild a missing or damaged LaunchPad file or JobStore")
    p = command("lpad", lpad, "stock lpad on this home, e.g. qe-factory lpad get_wflows -d count")
    p.add_argument("lpad_args", nargs=argparse.REMAINDER, help="arguments for lpad")
    p = command("pseudos", pseudos, "pseudopotential families: install one from an archive, list what they cover")
    actions = p.add_subparsers(dest="action", required=True)
    install = actions.add_parser("install", help="unpack and md5-check a family's archive (path or URL)")
    install.add_argument("family", help="family name (e.g. sssp-efficiency-1.3) or the path of its JSON table")
    install.add_argument("--from", dest="source", required=True, help="the downloaded archive (tar/zip) or its URL")
    actions.add_parser("list", help="families, their elements, and what --structures needs").add_argument(
        "--structures", help="a structure file: show which of its elements each family lacks")
    p = command("webgui", webgui, "FireWorks' web GUI on this home, read-only, on 127.0.0.1")
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
        return args.func(args)
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
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"qe-factory: no space left on device ({exc}); the last saved state is intact: free space, then run "
              "the command again", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
