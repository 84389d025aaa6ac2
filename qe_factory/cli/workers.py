"""Running the work: worker (a local coordinator), qlaunch (SLURM jobs), launch-offline (inside a job), rerun-lost."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from qe_factory.cli.options import config_from


def worker(args: argparse.Namespace) -> int:
    """Run READY Fireworks in this process (what the SLURM template launches)."""
    from qe_factory.workflow.coordinator import run_coordinator
    from qe_factory.workflow.home import activate

    home = activate(args.home)
    execution = config_from(args).execution if args.config else None
    launched = run_coordinator(
        max_structures=args.structures, nlaunches=args.nlaunches, launch_root=home / "launches", execution=execution,
        log=None if args.verbose else home / "logs" / "worker.log", parallel=args.parallel,
    )
    print(f"worker ran {launched} Firework(s)")
    return 0


def qlaunch(args: argparse.Namespace) -> int:
    """SLURM jobs for this home. Embedded LaunchPad (or --offline): this process is the home's coordinator; it keeps
    up to -m pilot jobs queued or running while work waits, each a `qe-factory host` running launch after launch
    for its whole allocation (--single: one SCF Firework per job), and takes their results in; no job touches the
    LaunchPad or the JobStore. MongoDB: stock qlaunch with the home's config."""
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
    from qe_factory.workflow.host import PilotJobs, SlurmHosts, job_cores, queue_folder
    from qe_factory.workflow.workers import QueueWorkers

    qadapter = load_object_from_file(QUEUEADAPTER_LOC)
    if options.single:
        jobs = QueueWorkers(qadapter, options.maxjobs_queue, options.sleep, options.nlaunches)
    else:  # pilot jobs: many launches per job, --slots at once (default: one per core of the job)
        slots = options.slots or job_cores(qadapter)
        hosts = SlurmHosts(qadapter, home, options.slots, options.idle_exit)
        jobs = PilotJobs(queue_folder(home), hosts, options.maxjobs_queue, slots, options.sleep, options.nlaunches)
    launched = run_coordinator(launch_root=home / "launches", workers=jobs, timeout=options.timeout,
                               log=None if args.verbose else home / "logs" / "worker.log")
    waiting = len(jobs.running())
    print(f"qlaunch: {jobs.submitted} SLURM job(s) submitted, {launched} Firework(s) finished"
          + (f"; {waiting} launch(es) still queued or running: the next `qe-factory qlaunch` (or run/worker) takes "
             "them in" if waiting else ""))
    return 0


def qlaunch_options(argv: list[str]) -> argparse.Namespace:
    """The qlaunch options the offline coordinator understands (as stock qlaunch spells them, plus pilot jobs')."""
    parser = argparse.ArgumentParser(prog="qe-factory qlaunch")
    parser.add_argument("--offline", action="store_true", help="offline jobs also with MongoDB")
    parser.add_argument("mode", choices=["rapidfire", "singleshot"], nargs="?", default="rapidfire")
    parser.add_argument("-m", "--maxjobs_queue", type=int, default=1, help="jobs queued or running at once")
    parser.add_argument("--nlaunches", type=int, default=0, help="jobs to submit in all (0: until done)")
    parser.add_argument("--timeout", type=float, help="seconds after which no new job is submitted")
    parser.add_argument("--sleep", type=float, default=10, help="seconds between looks at the queue")
    parser.add_argument("--single", action="store_true", help="one SCF Firework per job (no pilot jobs)")
    parser.add_argument("--slots", type=int, default=0,
                        help="launches a pilot job runs at once (default: one per core of the job, its ntasks)")
    parser.add_argument("--idle-exit", type=float, default=60,
                        help="seconds a pilot job waits for work before it ends")
    options = parser.parse_args(argv)
    if options.mode == "singleshot":
        options.maxjobs_queue, options.nlaunches = 1, 1
    return options


def host(args: argparse.Namespace) -> int:
    """Be a pilot host (what a pilot job runs): claim launches from the home's queue and run them, --slots at once,
    until none has waited for --idle-exit seconds or the allocation's time runs short."""
    from qe_factory.engine.config import ExecutionSettings
    from qe_factory.engine.parallel import available_ranks
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.host import queue_folder, run_host

    home = activate(args.home)
    execution = config_from(args).execution if args.config else ExecutionSettings()
    ranks = execution.mpi_ranks or available_ranks()
    slots = args.slots or ranks
    execution = execution.model_copy(update={"mpi_ranks": max(1, ranks // slots)})
    record = run_host(queue_folder(home), slots, execution, None if args.verbose else home / "logs" / "worker.log",
                      idle_exit=args.idle_exit)
    print(f"host {record.host_id}: {record.done} launch(es) run, busy {record.busy_fraction():.0%} of "
          f"{record.slots} slot(s)")
    return 0


def launch_offline(args: argparse.Namespace) -> int:
    """Run the Firework reserved in a launch directory, with no LaunchPad or JobStore access (a SLURM job)."""
    import faulthandler
    import signal
    import sys
    import time

    from qe_factory.engine.process import STOP
    from qe_factory.workflow.home import activate
    from qe_factory.workflow.offline import run_offline

    activate(args.home)
    faulthandler.enable()  # a crash leaves its Python stacks in the job's stderr

    def stop(signum: int, frame) -> None:
        STOP.set()
        print(f"launch-offline: {signal.Signals(signum).name} at {time.strftime('%H:%M:%S')}: stopping pw.x",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback_later(10)  # still here 10 s later: where it waits, in the job's stderr

    signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # the time limit is near: pw.x's max_seconds acts
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    state = run_offline(Path(args.launch_dir).resolve())
    print(f"launch-offline: {state}")
    return 0


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
