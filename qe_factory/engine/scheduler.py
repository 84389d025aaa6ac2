"""Every question the factory asks SLURM (squeue, scontrol), and the answers parsed: time left in this job's
allocation, whether a job is still queued or running, what SLURM said as it ended a job. sbatch itself goes
through FireWorks' queue adapter (workflow/workers.py)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from qe_factory.engine.errors import SLURM_END


def parse_slurm_time(text: str) -> int | None:
    """Seconds in a SLURM time ('M:SS', 'H:MM:SS', 'D-HH:MM:SS', 'MM'); None for UNLIMITED/unparseable."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        return None
    days, *parts = match.groups()
    numbers = [int(p) for p in parts if p is not None]
    if "-" in text:  # D-H, D-H:M, D-H:M:S
        numbers += [0] * (3 - len(numbers))
        hours, minutes, seconds = numbers
    elif len(numbers) == 1:  # minutes
        hours, minutes, seconds = 0, numbers[0], 0
    elif len(numbers) == 2:  # M:S
        hours, (minutes, seconds) = 0, numbers
    else:
        hours, minutes, seconds = numbers
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def seconds_left_in_allocation(environ: dict[str, str] | None = None) -> int | None:
    """Wall-clock seconds left in the SLURM job this process runs in (squeue's %L); None outside SLURM."""
    environ = os.environ if environ is None else environ
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    try:
        left = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_slurm_time(left) if left.strip() else None


def slurm_job(job_id: str, timeout: float = 10) -> str | None:
    """`scontrol show job -o` of a job (one line of Key=Value fields); None when SLURM does not answer in `timeout`
    seconds (a controller that is down keeps scontrol trying for ~18 s) or no longer knows the job (MinJobAge)."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 and "JobState=" in proc.stdout else None


def slurm_job_end(job_id: str, stderr: Path | None = None, timeout: float = 10) -> str | None:
    """What SLURM said as it ended (or while it ends) job `job_id`: slurmstepd's line in the job's stderr file
    `stderr` (written before it signals the job), e.g. "*** JOB 73 ON vm CANCELLED AT 2026-12-02T07:08:39 ***";
    else scontrol's "JobState=… Reason=…" once the job no longer runs. None while it runs (a SIGTERM then came from
    someone else) or when neither says anything."""
    try:
        with open(stderr or "", "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 65536))
            tail = handle.read().decode(errors="replace")
    except OSError:
        tail = ""
    if said := [line for line in SLURM_END.findall(tail) if re.search(rf"(?:JOB|STEP) {re.escape(job_id)}\b", line)]:
        return said[-1]
    state = re.search(r"\bJobState=(\S+) Reason=(\S+)", slurm_job(job_id, timeout) or "")
    if state is None or state.group(1) in ("RUNNING", "SUSPENDED"):
        return None
    return f"SLURM job {job_id}: {state.group(0)}"


def slurm_job_ending(environ: dict[str, str] | None = None) -> str | None:
    """Why SLURM ends the job this process runs in (slurm_job_end, with this process's stderr: the job's), asked
    when a stop request (SIGTERM) came; None outside SLURM, or when SLURM is not ending the job. Quick (scontrol
    gets 3 s): SLURM's SIGKILL follows its SIGTERM after KillWait."""
    job_id = (os.environ if environ is None else environ).get("SLURM_JOB_ID")
    if not job_id:
        return None
    try:
        stderr = Path(os.readlink("/proc/self/fd/2"))
    except OSError:
        stderr = None
    return slurm_job_end(job_id, stderr, timeout=3)


def queue_job_alive(job_id: str) -> bool:
    """Whether a SLURM job is still pending or running (squeue knows it in a live state)."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return True  # cannot tell: never take a live job's Firework away
    if proc.returncode != 0:  # SLURM forgot the job (MinJobAge), or did not answer (a busy slurmctld): cannot tell
        return "Invalid job id" not in proc.stderr
    return proc.stdout.strip() in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
                                   "RESIZING")
