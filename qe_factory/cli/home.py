"""The home and its state: init, env, status, show, report, webgui, repair, lpad."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from qe_factory.cli.format import protocol_line


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


def status(args: argparse.Namespace) -> int:
    """Every structure the home has seen by outcome, the offline runs by state, Fireworks per state, and every
    failure with its reason."""
    from qe_factory.workflow import state
    from qe_factory.workflow.history import cause, home_history, outcome_counts, split_references
    from qe_factory.workflow.home import activate, embedded_file
    from qe_factory.workflow.host import host_records, queue_folder
    from qe_factory.workflow.inbox import waiting
    from qe_factory.workflow.lock import holder
    from qe_factory.workflow.offline import pending_runs
    from qe_factory.workflow.protocols import home_protocols

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
    for protocol in home_protocols(home):
        print(protocol_line(protocol))
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
    for record in host_records(queue_folder(home)):
        print(f"  pilot host {record.host_id}: {record.state}, {record.done} launch(es) done, {record.running} "
              f"running, busy {record.busy_fraction():.0%} of {record.slots} slot(s)")
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
    from qe_factory.workflow.host import host_records, queue_folder
    from qe_factory.workflow.report import report_html
    from qe_factory.workflow.state import get_jobstore, get_launchpad

    home = activate(args.home)
    with tqdm(total=6, desc="report", unit="step", file=sys.stderr) as progress:
        progress.set_postfix_str("reading the JobStore and the LaunchPad")
        stories = home_history(home, get_launchpad(read_only=True), get_jobstore(), load=True)

        def step(name: str) -> None:
            progress.update(1)
            progress.set_postfix_str(name[:40])

        page = report_html(stories, str(home), step, host_records(queue_folder(home)))
        Path(args.output).write_text(page)
        progress.update(progress.total - progress.n)
    structures, references = split_references(stories)
    print(f"report on {len(structures)} structure(s) and {len(references)} isolated-atom reference(s) written "
          f"to {args.output}")
    return 0


def webgui(args: argparse.Namespace) -> int:
    """FireWorks' web GUI on this home at http://127.0.0.1:PORT/: read-only (it takes no lock, writes nothing: it
    runs beside a coordinator), each reload showing the last saved state, failures with their reasons."""
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.webgui import serve

    serve(activate(args.home), args.port)
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
