"""QERunner: run one structure through pw.x with retries, scratch handling and cleanup."""

from __future__ import annotations

import errno
import logging
import math
import re
import shutil
import socket
from pathlib import Path
from typing import Any

from ase import Atoms

from qe_factory.engine.config import DFTConfig, ExecutionSettings
from qe_factory.engine.document import Document
from qe_factory.engine.errors import DFTErrorType, Diagnosis, classify, oom_kill_count, scheduler_error
from qe_factory.engine.inputs import (
    InputError,
    InputGenerator,
    PwInput,
    high_spin_start,
    irreducible_kpoint_count,
    render,
    spin_candidates,
)
from qe_factory.engine.outcomes import DISK_FULL_ERRNOS, DiskFullError, EnvironmentFault
from qe_factory.engine.parallel import (
    UNLAUNCHABLE,
    available_ranks,
    choose_pools,
    missing_program,
    pw_command,
    pw_environment,
)
from qe_factory.engine.parsers import PwOutput, parse_pw_output, read_run_texts
from qe_factory.engine.preflight import nominal_input
from qe_factory.engine.process import STOP, ExecutableNotFoundError, Execution, Interrupted, execute
from qe_factory.engine.protocol import protocol_hash
from qe_factory.engine.pseudos import PseudopotentialError
from qe_factory.engine.pwxml import XML_NAME, XmlError, read_pw_xml, xml_path
from qe_factory.engine.recovery import (
    RESTART_PARAMETERS,
    REUSE,
    STEPS,
    Correction,
    RecoveryHandler,
    RestartType,
    apply_correction,
    attempt_parameters,
    label_deviations,
    merge_parameters,
    restart_from,
    stalled,
    worse,
)
from qe_factory.engine.results import UNPHYSICAL, Attempt, DFTFatalError, DFTResult, MagneticBranch
from qe_factory.engine.sanitize import cohesive_check, provenance_problems, sanitize, xml_problems
from qe_factory.engine.scheduler import seconds_left_in_allocation, slurm_job_ending
from qe_factory.engine.structure import StructureDoc, StructureError, check_structure, check_uid, closest_contact

log = logging.getLogger(__name__)

SCRATCH_DIR = "out"  # pw.x outdir, shared by a structure's attempts (restarts read it), removed at the end
SCRATCH_PATTERNS = ("*.wfc*", "*.mix*", "*.save", "*.restart*", "*.hub*", "*.igk*", "*.xml")
KEPT_FILES = ("pw.in", "pw.out", "pw.err", "CRASH", XML_NAME)  # what clean_scratch leaves of a run (XML: its copy)
# What `prepare` raises for input the factory refuses before pw.x runs (one structure, never the batch); InputError
# includes the known traps and the memory budget (preflight.py).
REFUSALS = (StructureError, PseudopotentialError, InputError)
SCF_ERRORS = (DFTErrorType.SCF_NOT_CONVERGED.name, DFTErrorType.BROYDEN_MIXING.name, DFTErrorType.PW_WALLTIME.name)
HIGH_SPIN = "high-spin start"  # the magnetic branch check's second run (DFTConfig.magnetic_start)
SPIN_STATE = "spin state"  # a lone atom's lower spin states, each a magnetic branch (inputs.spin_candidates)


class ScfOutcome(Document):
    """What the SCF stage hands to validation: the converged output, or why there is none."""

    attempts: list[Attempt]
    output: PwOutput | None = None
    pw_input: PwInput | None = None
    failure: str | None = None
    magnetic_branches: list[MagneticBranch] = []


class RecoveryState(Document):
    """Where a structure's retry loop stands; a document, so a workflow job can hand it to the next attempt."""

    params: dict[str, dict[str, Any]] = {}  # lasting corrections (namelists, and "run": command line, magmoms)
    tried: list[str] = []
    attempts: list[Attempt] = []
    correction: Correction | None = None  # the correction applied before the next attempt (with its restart)
    before: dict[str, dict[str, Any]] = {}  # the lasting corrections before `correction` (dropped if it made worse)
    converged_output: PwOutput | None = None  # kept while a converged run is re-done at nominal settings
    converged_input: PwInput | None = None
    branch: ScfOutcome | None = None  # the lowest-energy finished magnetic branch, while another one runs
    branch_start: int = 0  # attempts made before the current magnetic branch (each has its own recovery)
    branches: list[MagneticBranch] = []  # the records of the finished branches


def time_budget(timeout: float, allocation_left: float | None, margin: float = 30.0) -> float:
    """Seconds one pw.x run may take: the configured timeout, cut to what is left of a SLURM allocation."""
    if allocation_left is None:
        return timeout
    return max(10.0, min(timeout, allocation_left - margin))


def clean_scratch(run_dir: Path) -> None:
    """Remove pw.x's scratch (wavefunctions, mixing files, saved state) below run_dir."""
    for pattern in (SCRATCH_DIR, *SCRATCH_PATTERNS):
        for path in run_dir.rglob(pattern):
            if path.name in KEPT_FILES:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()


def read_back(output: PwOutput, attempt_dir: Path, pw_input: PwInput) -> PwOutput:
    """`output` of a converged run with pw.x's own XML record attached: its summary, and where it disagrees with the
    stdout or with the input asked for (`xml_problems`; a missing or unreadable XML is one too). The XML is first
    copied beside pw.out (in the shared scratch the next attempt would overwrite it, and the scratch is removed)."""
    kept = attempt_dir / XML_NAME
    written = xml_path(attempt_dir.parent / SCRATCH_DIR, pw_input.namelist_value("control", "prefix", "pwscf"))
    if not kept.exists() and written.exists():
        shutil.copy(written, kept)
    try:
        xml = read_pw_xml(kept)
    except FileNotFoundError:
        return output.model_copy(update={"xml_problems": [f"pw.x wrote no {XML_NAME}: the label cannot be checked"]})
    except XmlError as error:
        return output.model_copy(update={"xml_problems": [f"pw.x's {XML_NAME} is unreadable: {error}"]})
    return output.model_copy(update={"xml": xml.summary(), "xml_problems": xml_problems(xml, output, pw_input)})


def _nominal_correction(pw_input: PwInput, nominal: PwInput) -> Correction | None:
    """After convergence with label-changing settings: rerun at the nominal ones, from the converged density."""
    deviations = label_deviations(pw_input.parameters, nominal.parameters)
    if not deviations:
        return None
    changes: dict[str, dict[str, Any]] = {}
    for key, (_, nominal_value) in deviations.items():
        namelist, name = key.split(".")
        changes.setdefault(namelist, {})[name] = nominal_value
    return Correction(name="nominal settings", changes=changes, restart=REUSE, restores_nominal=True)


ENDED = "ended.json"  # written in an attempt directory when its pw.x run has ended


class RunEnded(Document):
    """How an attempt's pw.x run ended, recorded beside its output."""

    returncode: int | None
    timed_out: bool
    wall_time: float
    ranks: int
    pools: int
    oom_killed: bool = False  # the OOM killer's counter of this cgroup rose during the run
    ended_by: str | None = None  # what SLURM said as it ended the job pw.x ran in (scheduler.slurm_job_end)


def _without_time_limit(text: str) -> str:
    return re.sub(r"^\s*max_seconds\s*=.*$", "", text, flags=re.MULTILINE)


def finished_run(attempt_dir: Path, text: str) -> RunEnded | None:
    """How the pw.x run in `attempt_dir` ended, if it was a run of `text` (max_seconds aside) that pw.x itself
    finished (JOB DONE; not killed, whose outcome depends on the machine and its limits)."""
    try:
        if _without_time_limit((attempt_dir / "pw.in").read_text()) != _without_time_limit(text):
            return None
        ended = RunEnded.model_validate_json((attempt_dir / ENDED).read_text())
        finished = "JOB DONE" in (attempt_dir / "pw.out").read_text(errors="replace")
    except (OSError, ValueError):
        return None
    return ended if finished and not ended.timed_out else None


def check_environment(execution: ExecutionSettings, ranks: int, pw_input: PwInput) -> None:
    """Raise EnvironmentFault (ExecutableNotFoundError) when this machine cannot run the attempt at all: pw.x or
    the MPI launcher missing, or the pseudopotential directory absent here. Nobody's fault but the machine's."""
    if (program := missing_program(execution.command, execution.mpi_launcher, ranks)) is not None:
        raise ExecutableNotFoundError(
            f"cannot run {program!r} on {socket.gethostname()}: not found or not executable. Install Quantum "
            "ESPRESSO (apt-get install quantum-espresso) or set DFTConfig.command / QE_FACTORY_COMMAND")
    pseudo_dir = Path(pw_input.namelist_value("control", "pseudo_dir", "."))
    if missing := [name for name in pw_input.pseudopotentials.values() if not (pseudo_dir / name).is_file()]:
        raise EnvironmentFault(f"{socket.gethostname()} has no {', '.join(sorted(set(missing)))} in the "
                               f"pseudopotential directory {pseudo_dir}: install the family there (qe-factory "
                               "pseudos) or point pseudo_dir at a shared copy")


def run_pw(argv: list[str], cwd: Path, env: dict[str, str], budget: float, pilot: bool = False
           ) -> tuple[Execution, str | None]:
    """Run pw.x (process.execute) and say what SLURM said if it ended the job meanwhile (slurm_job_ending): its
    SIGTERM came as a stop request, and reached pw.x too (which may have died first). Any other stop request raises
    Interrupted: nobody's failure, nothing to record; so does a cancelled `pilot` job (the host's end, not the
    structure's)."""
    try:
        process, stopped = execute(argv, cwd, env, budget), None
    except Interrupted as stop:
        if stop.execution is None:
            raise
        process, stopped = stop.execution, stop
    if not STOP.is_set():
        return process, None
    if (ended_by := slurm_job_ending()) is None:
        raise stopped or Interrupted(f"pw.x in {cwd} ended as a stop request came")
    if pilot and scheduler_error(ended_by) is DFTErrorType.SLURM_CANCELLED:
        raise Interrupted(f"the pilot job running pw.x in {cwd} was cancelled: {ended_by}", process)
    return process, ended_by


FALLBACKS = {  # what available_restart may start an attempt with instead of the restart asked for
    RestartType.FROM_WAVE_FUNCTIONS: (RestartType.FROM_CHARGE_DENSITY, RestartType.FROM_SCRATCH),
    RestartType.FROM_CHARGE_DENSITY: (RestartType.FROM_SCRATCH,),
}


def available_restart(
    restart: RestartType, scratch: Path, pw_input: PwInput, ranks: int, pools: int, previous: Attempt | None
) -> RestartType:
    """The restart asked for, or the closest one the scratch directory holds fitting files for (its XML says how
    they were made): the wavefunctions only from the attempt just before with the same ranks, pools, cutoffs,
    k-points and spin (pw.x's files of them are per rank); the density only with the same ecutrho and spin."""
    if restart not in (RestartType.FROM_CHARGE_DENSITY, RestartType.FROM_WAVE_FUNCTIONS):
        return restart
    prefix = pw_input.namelist_value("control", "prefix", "pwscf")
    try:
        used = read_pw_xml(xml_path(scratch, prefix)).input
    except (OSError, XmlError):
        return RestartType.FROM_SCRATCH
    system = pw_input.parameters["system"]
    same_density = math.isclose(used.ecutrho, system["ecutrho"]) and used.lsda == (system.get("nspin") == 2)
    if not same_density or not any(scratch.rglob("charge-density*")):
        return RestartType.FROM_SCRATCH
    same_run = (
        previous is not None and (previous.ranks, previous.pools) == (ranks, pools)
        and math.isclose(used.ecutwfc, system["ecutwfc"]) and used.gamma_only == pw_input.isolated
        and (used.gamma_only or used.kpoints == list(pw_input.kpts))
    )
    wavefunctions = any(scratch.glob(f"{prefix}.wfc*")) or any(scratch.glob(f"{prefix}.save/wfc*"))
    if restart is RestartType.FROM_WAVE_FUNCTIONS and same_run and wavefunctions:
        return restart
    return RestartType.FROM_CHARGE_DENSITY


class QERunner:
    """Runs pw.x SCF calculations: `run(atoms, uid) -> DFTResult` with automatic recovery.

    `config` says what is computed (its `execution` part where and how pw.x runs); `recovery` chooses corrections.
    """

    def __init__(
        self,
        config: DFTConfig | None = None,
        generator: InputGenerator | None = None,
        recovery: RecoveryHandler | None = None,
    ):
        self.config = config or DFTConfig()
        self.execution = self.config.execution
        self.generator = generator or InputGenerator(self.config)
        self.recovery = recovery or RecoveryHandler()

    # -- one attempt -------------------------------------------------------------------------------------------
    def attempt_input(
        self, atoms: Atoms, params: dict[str, dict[str, Any]], restart: RestartType = RestartType.FROM_SCRATCH,
    ) -> tuple[PwInput, float]:
        """The input of an attempt with lasting corrections `params` started as `restart` says, and its time budget
        (seconds)."""
        namelists = merge_parameters({nl: v for nl, v in params.items() if nl != "run"}, RESTART_PARAMETERS[restart])
        if (start := params.get("run", {}).get("magmoms")) is not None:  # a magnetic branch's own start
            atoms = atoms.copy()
            atoms.set_initial_magnetic_moments(start)
        budget = time_budget(self.execution.timeout, seconds_left_in_allocation())
        pw_input = self.generator.generate(atoms, namelists)
        control = pw_input.parameters["control"]
        control["outdir"] = f"../{SCRATCH_DIR}"  # shared by the attempts: restarts and density reuse read it
        # pw.x stops cleanly (and can restart) before the timeout kills it; a smaller configured value stands
        control["max_seconds"] = min(control.get("max_seconds", budget), round(0.9 * budget, 1))
        return pw_input, budget

    def run_attempt(
        self, atoms: Atoms, run_dir: Path, number: int, params: dict[str, dict[str, Any]],
        correction: Correction | None = None, previous: Attempt | None = None,
    ) -> tuple[Attempt, PwOutput, PwInput]:
        """Write pw.in into run_dir/attempt_<number>, run pw.x, parse and classify.

        `params`: this attempt's corrections; the correction's restart applies to this attempt only, as far as the
        scratch allows and its files fit this run (`previous`: the attempt that left them; available_restart).
        When the directory holds a run of the same input that pw.x finished (its owner died before recording the
        outcome, or the same calculation is asked for again), that run is taken in instead.
        """
        execution = self.execution
        attempt_dir = run_dir / f"attempt_{number}"
        asked = correction.restart if correction else RestartType.FROM_SCRATCH
        ended = None
        for restart in dict.fromkeys([asked, *FALLBACKS.get(asked, ())]):  # the restart it ran with, fallbacks too
            pw_input, budget = self.attempt_input(atoms, params, restart)
            if (ended := finished_run(attempt_dir, render(atoms, pw_input))) is not None:
                break
        else:
            restart = asked
            pw_input, budget = self.attempt_input(atoms, params, restart)
        if ended is not None:
            log.warning("taking in the finished pw.x run in %s instead of running it again", attempt_dir)
        else:
            ranks = execution.mpi_ranks or available_ranks()
            spins = 2 if pw_input.namelist_value("system", "nspin") == 2 else 1
            kpoint_count = irreducible_kpoint_count(pw_input.kpts) * spins
            pools = params.get("run", {}).get("pools") or choose_pools(ranks, kpoint_count)
            available = available_restart(restart, run_dir / SCRATCH_DIR, pw_input, ranks, pools, previous)
            if available != restart:
                restart = available
                pw_input, budget = self.attempt_input(atoms, params, restart)
            check_environment(execution, ranks, pw_input)
            if attempt_dir.exists():
                shutil.rmtree(attempt_dir)
            attempt_dir.mkdir(parents=True)
            (attempt_dir / "pw.in").write_text(render(atoms, pw_input))
            argv = pw_command(execution.command, execution.mpi_launcher, ranks, pools)
            oom_before = oom_kill_count()
            process, ended_by = run_pw(argv, attempt_dir, pw_environment(execution.omp_threads), budget,
                                       execution.pilot)
            oom_after = oom_kill_count()
            ended = RunEnded(returncode=process.returncode, timed_out=process.timed_out,
                             wall_time=round(process.wall_time, 3), ranks=ranks, pools=pools,
                             oom_killed=oom_before is not None and oom_after is not None and oom_after > oom_before,
                             ended_by=ended_by)
            (attempt_dir / ENDED).write_text(ended.model_dump_json())
        stdout, stderr, crash = read_run_texts(attempt_dir)
        if (unlaunchable := UNLAUNCHABLE.search(stderr + stdout)) and "Program PWSCF" not in stdout:  # never started
            raise ExecutableNotFoundError(f"{execution.mpi_launcher} could not start {execution.command!r} on "
                                          f"{socket.gethostname()}: {' '.join(unlaunchable.group(0).split())} (see "
                                          f"{attempt_dir}/pw.err)")
        output = parse_pw_output(stdout, crash)
        diagnosis = classify(output, stdout, stderr, ended.returncode, ended.timed_out, ended.oom_killed,
                             ended.ended_by)
        diagnosis = self._blame_geometry(atoms, diagnosis)
        if diagnosis.error_type is DFTErrorType.OK:
            output = read_back(output, attempt_dir, pw_input)
        attempt = Attempt(
            number=number, correction=correction.name if correction else None, restart=restart.value,
            directory=str(attempt_dir), parameters=pw_input.parameters, ranks=ended.ranks, pools=ended.pools,
            error_type=diagnosis.error_type.name, error_code=diagnosis.error_type.code, message=diagnosis.message,
            scf_iterations=output.scf_iterations,
            final_scf_accuracy=output.scf_accuracy[-1] if output.scf_accuracy else None,
            returncode=ended.returncode, wall_time=ended.wall_time, cpu_time=output.cpu_time,
        )
        return attempt, output, pw_input

    def _blame_geometry(self, atoms: Atoms, diagnosis: Diagnosis) -> Diagnosis:
        if diagnosis.error_type is not DFTErrorType.DIAGONALIZATION:
            return diagnosis
        contact = closest_contact(atoms)
        if contact and contact[3] < self.config.blame_geometry_below:
            i, j, d, ratio = contact
            reason = f"atoms {i} and {j} are {d:.3f} Å apart ({ratio:.2f} of their covalent radii sum)"
            return Diagnosis(DFTErrorType.GEOMETRY, [reason, *diagnosis.lines])
        return diagnosis

    # -- the retry loop ----------------------------------------------------------------------------------------
    def run_dir(self, uid: str) -> Path:
        """Where the attempts of `uid` run (their shared scratch included)."""
        return Path(self.execution.work_dir).resolve() / f"run_{check_uid(uid)}"

    def prepare(self, atoms: Atoms, uid: str) -> PwInput:
        """Refuse bad input before pw.x runs (raises one of REFUSALS); return the nominal input and start a fresh
        run directory (kept when it holds a finished first attempt of this very calculation: a rerun after a
        crash takes its runs in)."""
        check_uid(uid)
        check_structure(atoms, self.config.min_distance_factor)
        nominal = nominal_input(atoms, self.generator)  # missing pseudopotentials, a relax, known traps, memory
        run_dir = self.run_dir(uid)
        first, _ = self.attempt_input(atoms, {})
        if run_dir.exists() and finished_run(run_dir / "attempt_1", render(atoms, first)) is None:
            shutil.rmtree(run_dir)  # another calculation's, or nothing worth keeping
        run_dir.mkdir(parents=True, exist_ok=True)
        return nominal

    def run(self, atoms: Atoms, uid: str, raise_on_failure: bool = True) -> DFTResult:
        """SCF energy, forces and stress of `atoms`, retrying with the recovery tree; see DFTResult.

        Bad input (uid, structure, pseudopotentials) raises before pw.x runs. Exhausted recovery raises
        DFTFatalError carrying the full report, or returns it with succeeded=False if raise_on_failure is False.
        """
        nominal = self.prepare(atoms, uid)
        state: RecoveryState | ScfOutcome = RecoveryState()
        try:
            while isinstance(state, RecoveryState):
                state = self.step(atoms, uid, nominal, state)
        finally:
            self.finish(uid)
        return deliver(self.build_result(uid, atoms, state, nominal), raise_on_failure)

    def finish(self, uid: str) -> None:
        """The SCF stage of `uid` is over: remove pw.x's scratch unless keep_files."""
        if not self.execution.keep_files:
            clean_scratch(self.run_dir(uid))

    def step(self, atoms: Atoms, uid: str, nominal: PwInput, state: RecoveryState) -> RecoveryState | ScfOutcome:
        """Run one attempt and decide: the state for the next attempt, or the outcome of the SCF stage."""
        decided = self._attempt_step(atoms, uid, nominal, state)
        if isinstance(decided, RecoveryState):  # the same magnetic branch goes on
            return decided.model_copy(update={"branch": state.branch, "branch_start": state.branch_start,
                                              "branches": state.branches})
        return self._magnetic_check(atoms, uid, nominal, state, decided)

    def _magnetic_check(
        self, atoms: Atoms, uid: str, nominal: PwInput, state: RecoveryState, outcome: ScfOutcome
    ) -> RecoveryState | ScfOutcome:
        """A magnetic branch ended: start the next one when one is due (_next_branch), else keep the lowest-energy
        converged branch, all recorded (a tie keeps the earlier)."""
        records = [*state.branches, _branch(outcome, self._branch_start(atoms, state, outcome), state.branch_start + 1,
                                            kept=False)]
        best = outcome if state.branch is None or _energy(outcome) < _energy(state.branch) else state.branch
        correction = self._next_branch(atoms, nominal, outcome, len(records))
        if correction is not None:
            log.warning("uid=%s: magnetic branch %d ended (|M|=%s μB): next, %s", uid, len(records),
                        outcome.output.absolute_magnetization if outcome.output else None, correction.name)
            start_params = apply_correction({}, correction)  # (also `before`: a rung dropped never drops the start)
            return RecoveryState(params=start_params, before=start_params, tried=[correction.name],
                                 attempts=outcome.attempts, correction=correction, branch=best,
                                 branch_start=len(outcome.attempts), branches=records)
        if len(records) == 1:
            return outcome
        kept = min(range(len(records)), key=lambda i: math.inf if records[i].energy is None else records[i].energy)
        records = [record.model_copy(update={"kept": i == kept}) for i, record in enumerate(records)]
        return ScfOutcome(attempts=outcome.attempts, output=best.output, pw_input=best.pw_input,
                          magnetic_branches=records)

    def _next_branch(self, atoms: Atoms, nominal: PwInput, outcome: ScfOutcome, ended: int) -> Correction | None:
        """The start of the magnetic branch after `ended` branches, or None. magnetic_start='hint' only, and only
        when the first branch converged: a lone atom's next spin state (inputs.spin_candidates); else, after the
        first, a high-spin start when one is due (inputs.high_spin_start)."""
        first = outcome if ended == 1 else None
        if self.config.magnetic_start != "hint" or (first is not None and first.output is None):
            return None
        candidates = spin_candidates(nominal, self.generator.pseudos(atoms)) if len(atoms) == 1 else []
        if candidates:
            if ended > len(candidates):
                return None
            moment = candidates[ended - 1]
            return Correction(name=f"{SPIN_STATE} {moment:g} μB", changes={"system": {"tot_magnetization": moment}})
        start = high_spin_start(atoms, first.output.absolute_magnetization) if first is not None else None
        return None if start is None else Correction(name=HIGH_SPIN, changes={"run": {"magmoms": start}})

    @staticmethod
    def _branch_start(atoms: Atoms, state: RecoveryState, outcome: ScfOutcome) -> list[float]:
        """The start of the branch that ended: its own moments, a lone atom's fixed total moment, or the Atoms'."""
        if (moments := state.params.get("run", {}).get("magmoms")) is not None:
            return moments
        fixed = outcome.attempts[state.branch_start].parameters.get("system", {}).get("tot_magnetization")
        return [fixed] if fixed is not None and len(atoms) == 1 else atoms.get_initial_magnetic_moments().tolist()

    def _attempt_step(
        self, atoms: Atoms, uid: str, nominal: PwInput, state: RecoveryState
    ) -> RecoveryState | ScfOutcome:
        """One attempt of the current magnetic branch: the state for its next attempt, or the branch's outcome."""
        correction = state.correction
        previous = state.attempts[-1] if state.attempts else None
        try:
            attempt, output, pw_input = self.run_attempt(
                atoms, self.run_dir(uid), len(state.attempts) + 1, attempt_parameters(state.params, correction),
                correction, previous,
            )
        except OSError as exc:  # the factory's own files in the run directory (pw.in, ended.json)
            if exc.errno not in DISK_FULL_ERRNOS or isinstance(exc, DiskFullError):
                raise
            raise DiskFullError(exc.errno, f"{uid}: no space left to write in {self.run_dir(uid)} ({exc.strerror}). "
                                "Free space there, then run it again") from exc
        attempts = [*state.attempts, attempt]
        error_type = DFTErrorType[attempt.error_type]
        if error_type is DFTErrorType.DISK_FULL:  # not the structure's failure: nothing to correct, run it later
            raise DiskFullError(errno.ENOSPC, f"{uid}: pw.x could not write in {self.run_dir(uid)} — "
                                f"{attempt.message}. Free space there, then run it again")
        finishing = correction is not None and correction.restores_nominal
        params = state.params
        if error_type is DFTErrorType.OK:
            correction = None if finishing else _nominal_correction(pw_input, nominal)
            if correction is None:
                return ScfOutcome(attempts=attempts, output=output, pw_input=pw_input)
            converged = (output, pw_input)
        elif finishing:  # the nominal-settings run failed: more steps if it was converging, else keep the converged
            converged = (state.converged_output, state.converged_input)  # result, marked with its settings
            correction, _ = self._next_correction(atoms, error_type, params, state.tried, attempts, output,
                                                  state.branch_start)
            if correction is None or correction.name != STEPS:
                return ScfOutcome(attempts=attempts, output=converged[0], pw_input=converged[1])
            correction = correction.model_copy(update={"restores_nominal": True})
        else:
            converged = (state.converged_output, state.converged_input)
            if self.recovery.drop_worse and correction is not None and correction.lasting and worse(
                attempt.final_scf_accuracy, previous.final_scf_accuracy if previous else None
            ):
                params = state.before  # the SCF ended worse after this rung: not carried into the next ones
            correction, why = self._next_correction(atoms, error_type, params, state.tried, attempts, output,
                                                     state.branch_start)
            if correction is None:
                return ScfOutcome(attempts=attempts, failure=f"{attempt.message} [gave up: {why}]")
            log.warning(
                "Retrying uid=%s attempt %d: %s after %s (%s iterations, accuracy %s Ry, restart %s)",
                uid, len(attempts) + 1, correction.name, error_type.name, attempt.scf_iterations,
                attempt.final_scf_accuracy, correction.restart.value,
            )
        return RecoveryState(
            params=apply_correction(params, correction) if correction.lasting else params, before=params,
            tried=[*state.tried, correction.name], attempts=attempts, correction=correction,
            converged_output=converged[0], converged_input=converged[1],
        )

    def _next_correction(
        self, atoms: Atoms, error_type: DFTErrorType, params: dict[str, dict[str, Any]], tried: list[str],
        attempts: list[Attempt], output: PwOutput, branch_start: int = 0,
    ) -> tuple[Correction | None, str]:
        """The recovery handler's next correction for a failed attempt (None: give up, and why), never restarting
        from a density that is not usable (restart_from). Attempts before `branch_start` belong to another magnetic
        branch: each branch has its own max_retries and trace."""
        attempts = attempts[branch_start:]
        finals = [a.final_scf_accuracy for a in attempts if a.error_type in SCF_ERRORS and a.final_scf_accuracy]
        trace = f"; SCF accuracy at the end of each attempt: {', '.join(f'{a:.1e}' for a in finals)} Ry"
        trace = trace if finals else ""
        max_attempts = self.config.max_retries if self.config.recoverable else 1
        if len(attempts) >= max_attempts:
            return None, f"{max_attempts} attempt(s) made{trace}"
        if stalled(finals, self.recovery.give_up_after):
            rungs = self.recovery.give_up_after
            return None, f"none of the last {rungs} attempts improved on the best SCF accuracy{trace}"
        lasting = self.generator.generate(atoms, {nl: v for nl, v in params.items() if nl != "run"}).parameters
        in_effect = {**lasting, "run": {"pools": attempts[-1].pools}}
        correction = self.recovery.next_correction(error_type, in_effect, tried, output)
        if correction is None:
            return None, f"no correction left{trace}"
        if (restart := restart_from(correction.restart, output.scf_accuracy)) != correction.restart:
            correction = correction.model_copy(update={"restart": restart})
        return correction, ""

    def build_result(
        self, uid: str, atoms: Atoms, outcome: ScfOutcome, nominal: PwInput, e0s: dict[str, float] | None = None,
    ) -> DFTResult:
        """Validation: the DFTResult of an SCF outcome, sanitized, with its provenance. `e0s`: isolated-atom energies
        (eV per element, computed with the data set's settings) for the cohesive-energy window; without an element's
        E0 that check is listed in `not_judged`."""
        attempts = outcome.attempts
        base = dict(
            uid=uid, formula=atoms.get_chemical_formula(), structure=StructureDoc.from_atoms(atoms),
            attempts=attempts, wall_time=round(sum(a.wall_time for a in attempts), 3),
            magnetic_branches=outcome.magnetic_branches,
            protocol_hash=protocol_hash(self.config, self.generator.family),
        )
        if outcome.failure is not None:
            last = attempts[-1]
            return DFTResult(
                **base, succeeded=False, error_message=outcome.failure, error_type=last.error_type,
                parameters=last.parameters, final_mixing_beta=last.parameters.get("electrons", {}).get("mixing_beta"),
            )
        output, pw_input = outcome.output, outcome.pw_input
        cohesive = cohesive_check(output.energy, atoms.get_chemical_symbols(), e0s, self.config.sanitizer)
        problems = sanitize(output, atoms, self.config.sanitizer) + cohesive.problems
        problems += provenance_problems(output, pw_input.pseudo_md5, pw_input.pseudopotentials)
        problems += output.xml_problems
        return DFTResult(
            **base,
            energy=output.energy, forces=output.forces, stress=output.stress,
            succeeded=not problems,
            error_message=f"unphysical result: {'; '.join(problems)}" if problems else None,
            error_type=UNPHYSICAL if problems else None,
            parameters=pw_input.parameters,
            final_mixing_beta=pw_input.namelist_value("electrons", "mixing_beta"),
            kpoints=list(pw_input.kpts),
            vacuum_axes=[axis for axis, empty in zip("abc", pw_input.vacuum_axes) if empty],
            ecutwfc=pw_input.namelist_value("system", "ecutwfc"),
            ecutrho=pw_input.namelist_value("system", "ecutrho"),
            pseudopotentials={
                el: {"filename": name, "md5": pw_input.pseudo_md5[el]} for el, name in pw_input.pseudopotentials.items()
            },
            pw_version=output.pw_version, scf_iterations=output.scf_iterations,
            total_magnetization=output.total_magnetization, absolute_magnetization=output.absolute_magnetization,
            magnetic_start=pw_input.starting_moments, pw_xml=output.xml, problems=problems,
            cohesive_energy=cohesive.cohesive_energy, not_judged=cohesive.not_judged, warnings=output.warnings,
            label_deviations=label_deviations(pw_input.parameters, nominal.parameters),
        )


def _energy(outcome: ScfOutcome) -> float:
    energy = outcome.output.energy if outcome.output is not None else None
    return math.inf if energy is None else energy


def _branch(outcome: ScfOutcome, start: list[float], first_attempt: int, kept: bool) -> MagneticBranch:
    """The record of one magnetic branch: its start, attempts and where it converged (or why not)."""
    found = {} if outcome.output is None else outcome.output.model_dump(
        include={"energy", "total_magnetization", "absolute_magnetization"})
    return MagneticBranch(start=start, attempts=list(range(first_attempt, len(outcome.attempts) + 1)), kept=kept,
                          failure=outcome.failure, **found)


def deliver(result: DFTResult, raise_on_failure: bool) -> DFTResult:
    """Log a failed result and raise DFTFatalError with it if asked to."""
    if not result.succeeded:
        log.error("uid=%s failed: %s", result.uid, result.error_message)
        if raise_on_failure:
            raise DFTFatalError(result)
    return result
