"""Parallel flags: MPI ranks from the allocation, k-point pools from the k-point count, the command line."""

from __future__ import annotations

import os
import re
import shlex

LAUNCHERS = ("mpirun", "mpiexec", "srun", "aprun")


def available_ranks(environ: dict[str, str] | None = None) -> int:
    """MPI ranks to use: SLURM's task count inside an allocation, else every core of this machine."""
    environ = os.environ if environ is None else environ
    for key in ("SLURM_NTASKS", "SLURM_NPROCS"):
        if environ.get(key, "").isdigit() and int(environ[key]) > 0:
            return int(environ[key])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_pools(ranks: int, kpoint_count: int) -> int:
    """Largest number of pools that divides the ranks and leaves every pool at least one k-point."""
    return max(n for n in range(1, ranks + 1) if ranks % n == 0 and n <= max(1, kpoint_count))


def pw_command(command: str, launcher: str, ranks: int, pools: int, input_name: str = "pw.in") -> list[str]:
    """Argument list (never a shell string) that runs pw.x on `input_name` with the given ranks and pools."""
    argv = shlex.split(command)
    if ranks > 1 and os.path.basename(argv[0]) not in LAUNCHERS:
        argv = [*shlex.split(launcher), "-np", str(ranks), *argv]
    if pools > 1:
        argv += ["-nk", str(pools)]
    return [*argv, "-in", input_name]


# mpirun (OpenMPI) when it cannot start the program it was given: a fault of the machine, not of the structure
UNLAUNCHABLE = re.compile(r"mpirun was unable to (?:launch|start|find) the specified \w+"
                          r"|tried to fork a new process via the \"execve\" system call but\s+failed"
                          r"|(?:srun|mpiexec): error: .*(?:No such file|cannot execute|execve)")


def missing_program(command: str, launcher: str, ranks: int) -> str | None:
    """The program of `command` (pw.x), or the MPI launcher pw_command puts before it, that is not on PATH or not
    executable here; None when they are."""
    import shutil

    programs = [shlex.split(command)[0]]
    if ranks > 1 and os.path.basename(programs[0]) not in LAUNCHERS:
        programs.append(shlex.split(launcher)[0])
    return next((p for p in programs if shutil.which(p) is None), None)


def pw_environment(omp_threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for pw.x: fixed thread count, unbuffered Fortran output, OpenMPI allowed to run as root."""
    env = dict(os.environ if base is None else base)
    env["OMP_NUM_THREADS"] = str(omp_threads)
    env["GFORTRAN_UNBUFFERED_ALL"] = "y"  # keeps the error block when pw.x aborts
    if os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env
