"""Failure names and the one table of patterns that recognises them in pw.x's output."""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from qe_factory.engine.parsers import PwOutput


class DFTErrorType(Enum):
    """Every outcome of a pw.x run has a name, a number and a message users can search for.

    Where aiida-quantumespresso's PwCalculation has an exit code with the same meaning, the number is its number;
    the factory's own outcomes are numbered 800-899.
    """

    OK = (0, "converged SCF with energy, forces and stress")
    OUTPUT_INCOMPLETE = (312, "the output ends early with no JOB DONE and no CRASH file")
    PW_WALLTIME = (400, "pw.x stopped at max_seconds and saved its state")
    SCF_NOT_CONVERGED = (410, "SCF did not converge within electron_maxstep")
    BROYDEN_MIXING = (468, "charge-density mixing (Broyden) broke down")
    TOO_MANY_POOLS = (481, "more k-point pools than k-points or ranks")
    WRONG_CHARGE = (531, "the number of electrons is wrong (smearing or bands)")
    DIAGONALIZATION = (800, "eigensolver failure (Cholesky, S matrix, bands or eigenvectors not converged)")
    TIMEOUT = (801, "the factory's timeout killed pw.x")
    OUT_OF_MEMORY = (802, "out of memory: a failed allocation, or the kernel's OOM killer (its message or its "
                          "cgroup counter)")
    SIGNAL = (803, "pw.x died on a signal (segmentation fault or similar)")
    MISSING_PSEUDO = (804, "a pseudopotential file could not be read")
    BAD_INPUT = (805, "pw.x refused the input")
    GEOMETRY = (806, "atoms too close: the overlap matrix is singular; only the geometry is at fault")
    KILLED = (808, "killed by SIGKILL from outside, not by the factory's timeout and with no sign of the OOM killer: "
                   "cause unknown (a scheduler, a user, a lost node)")
    DISK_FULL = (807, "a file could not be written: the disk (or quota) is full; retry once space is back")
    SLURM_CANCELLED = (820, "the SLURM job was cancelled (scancel): a person's order, not the structure's fault; "
                            "not rerun (rerun it by hand to compute it)")
    SLURM_WALLTIME = (821, "SLURM killed the job at its time limit before pw.x stopped at max_seconds; restarted in "
                           "a new allocation, whose time left sets max_seconds")
    SLURM_NODE_FAIL = (822, "the SLURM job's node failed; rerun on another node")
    UNKNOWN = (899, "pw.x failed for a reason not in the table")

    @property
    def code(self) -> int:
        return self.value[0]

    @property
    def message(self) -> str:
        return self.value[1]


def _routine(names: str) -> str:
    """A fatal error in one of `names`, as stdout prints it ('Error in routine X (N):') or CRASH ('from X : error')."""
    return rf"(?:Error in routine\s+(?:{names})\s*\(|from\s+(?:{names})\s*:\s*error)"


# Ordered: the first match wins. Applied to pw.x's error blocks, the CRASH file, stdout and stderr.
# ("some nodes have no k-points" alone is only a warning in pw.x 6.7: the run goes on and converges.)
PATTERNS: list[tuple[DFTErrorType, re.Pattern[str]]] = [
    (DFTErrorType.DISK_FULL, re.compile(
        r"No space left on device|Disk quota exceeded|error writing file|error while writing|errno\s*=?\s*28\b",
        re.IGNORECASE)),
    (DFTErrorType.TOO_MANY_POOLS, re.compile(
        rf"invalid number of pools|{_routine('mp_start_pools|divide_et_impera')}")),
    (DFTErrorType.OUT_OF_MEMORY, re.compile(
        r"oom-kill|out of memory|cannot allocate memory|error allocating|allocation failed", re.IGNORECASE)),
    # signal 9 alone says nothing of its cause: the exit code decides (KILLED, or OUT_OF_MEMORY with evidence)
    (DFTErrorType.SIGNAL, re.compile(r"segmentation fault|SIGSEGV|SIGBUS|exited on signal (?!9\b)\d+", re.I)),
    (DFTErrorType.MISSING_PSEUDO, re.compile(_routine(r"readpp|read_ps\w*|upf\w*|read_upf\w*|import_upf"), re.I)),
    (DFTErrorType.BAD_INPUT, re.compile(
        _routine(r"read_namelists|read_cards|card_\w+|iosys|cell_base_init|setup|input"), re.IGNORECASE)),
    (DFTErrorType.DIAGONALIZATION, re.compile(
        r"S matrix not positive definite|problems computing cholesky|too many bands are not converged|"
        r"eigenvectors failed to converge|zhegvd failed|dsyevd failed|\[Q, ?R\] = qr\(X, ?0\) failed|"
        + _routine(r"[cr]diaghg|[cr]diaghg_gpu|cegterg|regterg|pcegterg|prgterg"), re.IGNORECASE)),
    (DFTErrorType.BROYDEN_MIXING, re.compile(_routine("mix_rho|broyden|approx_screening"), re.IGNORECASE)),
    (DFTErrorType.WRONG_CHARGE, re.compile(r"charge is wrong", re.IGNORECASE)),
    (DFTErrorType.PW_WALLTIME, re.compile(r"Maximum CPU time exceeded")),
    (DFTErrorType.SCF_NOT_CONVERGED, re.compile(r"convergence NOT achieved")),
]

_ERROR_LINE = re.compile(
    r"Error in routine.*|.*Error allocating.*|convergence NOT achieved.*|Maximum CPU time exceeded|MPI_ABORT.*|"
    r".*signal \d+.*|.*[Ss]egmentation fault.*|.*[Kk]illed.*|.*oom.*", re.MULTILINE)


# slurmstepd's line in a job's stderr as SLURM ends the job, before it signals the job's processes (SLURM 22.05):
# "*** JOB 73 ON vm CANCELLED AT 2026-12-02T07:08:39 ***" after scancel, "... DUE TO TIME LIMIT ***" at the walltime,
# "... DUE TO NODE FAILURE ***", "... DUE TO PREEMPTION ***" (a job step's says STEP 73.0).
SLURM_END = re.compile(r"\*\*\* (?:JOB|STEP) [\d.]+ ON \S+ CANCELLED AT \S+(?: DUE TO [A-Z][^*]*?)?(?: BY \S+)? \*\*\*")
# What names the cause: slurmstepd's line, else scontrol's JobState/Reason (COMPLETING Reason=None names none).
SLURM_CAUSES = [
    (DFTErrorType.SLURM_WALLTIME, re.compile(r"DUE TO TIME LIMIT|JobState=TIMEOUT|Reason=TimeLimit")),
    (DFTErrorType.SLURM_NODE_FAIL, re.compile(r"DUE TO NODE FAIL|JobState=NODE_FAIL|Reason=NodeDown")),
    (DFTErrorType.SLURM_CANCELLED, re.compile(r"CANCELLED AT \S+ (?:BY \S+ )?\*\*\*|JobState=CANCELLED")),
]


def scheduler_error(said: str) -> DFTErrorType:
    """The error type of a run SLURM ended, from what SLURM said (scheduler.slurm_job_end); KILLED ("cause unknown")
    where that names no cause the factory knows (a preemption, or scontrol's COMPLETING with Reason=None)."""
    return next((error for error, pattern in SLURM_CAUSES if pattern.search(said)), DFTErrorType.KILLED)


def oom_kill_count() -> int | None:
    """How many processes the kernel's OOM killer has killed in this process's memory cgroup (v2 memory.events or
    v1 memory.oom_control); None where it cannot be read."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        candidates = {"": ("memory.events",), "memory": ("memory.oom_control",)}.get(controllers)
        if candidates is None:
            continue
        base = Path("/sys/fs/cgroup") / ("memory" if controllers else "") / path.lstrip("/")
        for name in candidates:
            try:
                text = (base / name).read_text()
            except OSError:
                continue
            if match := re.search(r"^oom_kill (\d+)$", text, re.MULTILINE):
                return int(match.group(1))
    return None


@dataclass(frozen=True)
class Diagnosis:
    """The error type of one run and the lines that show it."""

    error_type: DFTErrorType
    lines: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        detail = "; ".join(self.lines[:3])
        return f"{self.error_type.name} ({self.error_type.code}): {self.error_type.message}" + (
            f" — {detail}" if detail else ""
        )


def _signal_name(returncode: int) -> str | None:
    number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else None
    if number is None:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def classify(
    output: PwOutput, stdout: str = "", stderr: str = "", returncode: int | None = 0, timed_out: bool = False,
    oom_killed: bool = False, ended_by: str | None = None,
) -> Diagnosis:
    """Name the outcome of a run from its parsed output, raw texts, exit code, whether we killed it, whether the
    kernel's OOM killer struck meanwhile (its cgroup counter rose) and, when the scheduler ended the job it ran in,
    what the scheduler said (`ended_by`, see scheduler.slurm_job_ending)."""
    if timed_out:
        return Diagnosis(DFTErrorType.TIMEOUT, [f"killed after the timeout; {output.scf_iterations} SCF iterations"])
    if ended_by and not output.job_done:  # pw.x had not finished by itself
        return Diagnosis(scheduler_error(ended_by), [ended_by, f"exit code {returncode}; "
                                                                f"{output.scf_iterations} SCF iterations"])
    texts = [*output.errors, output.crash or "", stdout, stderr]
    for error_type, pattern in PATTERNS:
        for text in texts:
            if match := pattern.search(text):
                lines = list(dict.fromkeys(output.errors + _ERROR_LINE.findall(text)))
                return Diagnosis(error_type, [line.strip() for line in lines if line.strip()] or [match.group(0)])
    if returncode is not None and (signal_name := _signal_name(returncode)):
        said = list(dict.fromkeys(line.strip() for text in (stderr, stdout) for line in _ERROR_LINE.findall(text)))
        if signal_name != "SIGKILL":
            return Diagnosis(DFTErrorType.SIGNAL, [f"exit code {returncode} ({signal_name})", *said[:2]])
        if oom_killed:
            return Diagnosis(DFTErrorType.OUT_OF_MEMORY, [f"exit code {returncode} (SIGKILL); the OOM killer's "
                                                          "counter of this cgroup rose during the run", *said[:2]])
        return Diagnosis(DFTErrorType.KILLED, [f"exit code {returncode} (SIGKILL)", *said[:2]])
    if output.errors or output.crash:
        return Diagnosis(DFTErrorType.UNKNOWN, output.errors or [output.crash.strip()[:500]])
    if output.missing_results() or not output.converged:
        if not output.job_done:
            return Diagnosis(DFTErrorType.OUTPUT_INCOMPLETE, [f"exit code {returncode}; no JOB DONE, no CRASH"])
        return Diagnosis(DFTErrorType.UNKNOWN, [f"exit code {returncode}; missing {output.missing_results()}"])
    if returncode not in (0, None):
        return Diagnosis(DFTErrorType.UNKNOWN, [f"exit code {returncode} after a complete run"])
    return Diagnosis(DFTErrorType.OK)
