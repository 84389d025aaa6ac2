"""RecoveryHandler: the recovery tree as data — an ordered list of corrections per error type."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from pydantic import ConfigDict, Field, field_validator

from qe_factory.engine.document import Document
from qe_factory.engine.errors import DFTErrorType, classify
from qe_factory.engine.parsers import PwOutput, parse_pw_output


class RestartType(StrEnum):
    """How an attempt starts from the one before it (aiida-quantumespresso's RestartType).

    The restart is not a parameter that sticks: it applies to the attempt right after the correction that asks for
    it, and falls back to FROM_SCRATCH when the previous attempt left nothing to start from.
    """

    FROM_SCRATCH = "from_scratch"  # nothing read from earlier attempts
    FROM_CHARGE_DENSITY = "from_charge_density"  # startingpot='file': the last attempt's charge density
    FROM_WAVE_FUNCTIONS = "from_wave_functions"  # the last attempt's density and wavefunctions
    FULL = "full"  # restart_mode='restart': pw.x continues from the state it saved when it stopped at max_seconds


RESTART_PARAMETERS: dict[RestartType, dict[str, dict[str, Any]]] = {
    RestartType.FROM_SCRATCH: {},
    RestartType.FROM_CHARGE_DENSITY: {"electrons": {"startingpot": "file"}},
    RestartType.FROM_WAVE_FUNCTIONS: {"electrons": {"startingpot": "file", "startingwfc": "file"}},
    RestartType.FULL: {"control": {"restart_mode": "restart"}},
}
RESTART_KEYS = {
    (namelist, key) for values in RESTART_PARAMETERS.values() for namelist in values for key in values[namelist]
}


def without_restart(params: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`params` without the keys a restart sets (they never carry over to a later attempt)."""
    return {nl: {k: v for k, v in values.items() if (nl, k) not in RESTART_KEYS} for nl, values in params.items()}


class Correction(Document):
    """A named change to the run parameters ("run" holds command-line settings such as pools) and how the next
    attempt starts."""

    model_config = ConfigDict(frozen=True)

    name: str
    changes: dict[str, dict[str, Any]] = {}
    restart: RestartType = RestartType.FROM_SCRATCH
    repeatable: bool = False  # may be applied again (restarts make progress each time)
    restores_nominal: bool = False  # re-runs a converged label at the data set's nominal settings
    lasting: bool = True  # False: the changes apply to the attempt right after it only (e.g. more steps)


# Density rungs ask for the wavefunctions too: the runner falls back to the density alone, or to a start from
# scratch, when the scratch lacks them or they do not fit the next run (available_restart, restart_from).
REUSE = RestartType.FROM_WAVE_FUNCTIONS
LOWER_BETA = Correction(name="mixing_beta=0.3", changes={"electrons": {"mixing_beta": 0.3}}, restart=REUSE)
LOCAL_TF = Correction(name="mixing_mode=local-TF", changes={"electrons": {"mixing_mode": "local-TF"}}, restart=REUSE)
# charge sloshing across vacuum (slabs, clusters start at mixing_beta 0.3 with local-TF): gentler, longer history
DAMPED = Correction(
    name="mixing_beta=0.1, mixing_ndim=16", changes={"electrons": {"mixing_beta": 0.1, "mixing_ndim": 16}},
    restart=REUSE,
)
MORE_SMEARING = Correction(name="degauss=0.05", changes={"system": {"degauss": 0.05}}, restart=REUSE)
CG = Correction(name="diagonalization=cg", changes={"electrons": {"diagonalization": "cg"}})  # after a crash in it
CG_SCF = CG.model_copy(update={"restart": REUSE})  # an SCF rung: from the last density like the rungs above it
RESTART = Correction(name="restart_mode=restart", restart=RestartType.FULL, repeatable=True)
ONE_POOL = Correction(name="pools=1", changes={"run": {"pools": 1}})
RERUN = Correction(name="rerun unchanged")
# after SLURM's walltime kill (no state saved: pw.x saves only when it stops at max_seconds): from the last density
# there is, in a new job, whose time left sets max_seconds; once (a second kill: the walltime is too short)
NEW_ALLOCATION = Correction(name="rerun in a new allocation", restart=RestartType.FROM_CHARGE_DENSITY)

LADDERS: dict[DFTErrorType, list[Correction]] = {
    DFTErrorType.SCF_NOT_CONVERGED: [LOWER_BETA, LOCAL_TF, DAMPED, MORE_SMEARING, CG_SCF],
    DFTErrorType.BROYDEN_MIXING: [LOWER_BETA, LOCAL_TF, DAMPED, CG_SCF],
    DFTErrorType.DIAGONALIZATION: [CG],
    DFTErrorType.WRONG_CHARGE: [MORE_SMEARING],
    DFTErrorType.PW_WALLTIME: [RESTART],
    DFTErrorType.TOO_MANY_POOLS: [ONE_POOL],
    DFTErrorType.OUT_OF_MEMORY: [ONE_POOL],
    DFTErrorType.SIGNAL: [RERUN],
    DFTErrorType.KILLED: [RERUN],
    DFTErrorType.SLURM_WALLTIME: [NEW_ALLOCATION],
    DFTErrorType.SLURM_NODE_FAIL: [RERUN],  # in a new job, on whichever node SLURM gives it
    # SLURM_CANCELLED: none. scancel is a person's order; a rerun would undo it (the coordinator would submit the
    # structure again at once). It stops with the cause; `lpad rerun_fws` runs it again when wanted.
    DFTErrorType.OUTPUT_INCOMPLETE: [RERUN],
}

# Settings that act only while another has a given value (smearing keys need smeared occupations).
ACTS_ONLY_WITH: dict[tuple[str, str], tuple[str, str, Any]] = {
    ("system", "degauss"): ("system", "occupations", "smearing"),
    ("system", "smearing"): ("system", "occupations", "smearing"),
}


def changes_anything(correction: Correction, parameters: dict[str, dict[str, Any]]) -> bool:
    """Whether the correction changes a setting that acts under `parameters`: not one already in effect, nor one
    that acts only with another value set (e.g. degauss while occupations are fixed) — never spend an attempt on it."""
    for namelist, values in correction.changes.items():
        for key, value in values.items():
            if parameters.get(namelist, {}).get(key) == value:
                continue
            needs = ACTS_ONLY_WITH.get((namelist, key))
            if needs and parameters.get(needs[0], {}).get(needs[1], needs[2]) != needs[2]:
                continue
            return True
    return False


# Settings that change energies and forces (a label made with other values is not comparable).
LABEL_KEYS = (("system", "degauss"), ("system", "smearing"), ("system", "ecutwfc"), ("system", "ecutrho"))


NEAR = 100.0  # an SCF whose last iterations got within NEAR × conv_thr is nearly converged
SANE_ACCURACY = 0.1  # Ry: a density whose estimated accuracy ended above this is not worth restarting from


def _log_tail(accuracy: Sequence[float], count: int) -> list[float]:
    return [math.log10(a) for a in accuracy[-count:] if a > 0]


def _reaches(logs: Sequence[float], conv_thr: float, maxstep: int) -> bool:
    """Whether the least-squares line through `logs` (log10 accuracy per iteration) falls and reaches conv_thr
    within `maxstep` more steps from the last iteration."""
    mean_x, mean_y = (len(logs) - 1) / 2, statistics.fmean(logs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(logs)) / sum(
        (x - mean_x) ** 2 for x in range(len(logs))
    )
    return slope < 0 and (math.log10(conv_thr) - logs[-1]) / slope <= maxstep


def scf_converging(accuracy: Sequence[float], conv_thr: float, maxstep: int) -> bool:
    """True when the SCF is worth more steps from its own state: its last 3 iterations got within NEAR × conv_thr,
    or it fell to the end at a least-squares slope that reaches conv_thr within another `maxstep` steps — over its
    last 6 iterations (the last is their minimum, at most one rise among them), or over the whole attempt when the
    last iteration is the attempt's minimum (a steady fall with small rises on the way is progress; a bounce ends
    above its minimum)."""
    if any(a <= NEAR * conv_thr for a in accuracy[-3:]):
        return True
    tail, whole = _log_tail(accuracy, 6), _log_tail(accuracy, len(accuracy))
    if len(tail) < 4 or tail[-1] > min(tail):
        return False
    if sum(b > a for a, b in zip(tail, tail[1:])) <= 1 and _reaches(tail, conv_thr, maxstep):
        return True
    return whole[-1] <= min(whole) and _reaches(whole, conv_thr, maxstep)


def density_usable(accuracy: Sequence[float]) -> bool:
    """Whether the density an attempt left is a better start than scratch: it ended no worse than it started and
    below SANE_ACCURACY (a diverged density is never reused)."""
    return bool(accuracy) and accuracy[-1] <= min(accuracy[0], SANE_ACCURACY)


def restart_from(restart: RestartType, accuracy: Sequence[float]) -> RestartType:
    """The restart asked for, or FROM_SCRATCH when it would start from a density that is not usable."""
    if restart in (RestartType.FROM_CHARGE_DENSITY, RestartType.FROM_WAVE_FUNCTIONS) and not density_usable(accuracy):
        return RestartType.FROM_SCRATCH
    return restart


def still_progressing(accuracy: Sequence[float], factor: float = 10.0) -> bool:
    """After pw.x stopped at max_seconds: whether the SCF made progress worth a full restart — its best accuracy in
    this run fell `factor` below its first (a restarted run's first is about where the run it continued stopped).
    Too short a trace to judge counts as progress (max_retries and `stalled` bound the restarts)."""
    return len(accuracy) < 2 or min(accuracy) < accuracy[0] / factor


def worse(after: float | None, before: float | None) -> bool:
    """Whether an attempt ended at a worse SCF accuracy than the attempt before it (unknown: not worse)."""
    return after is not None and before is not None and after > before


def stalled(finals: Sequence[float], rungs: int) -> bool:
    """No progress: none of the last `rungs` attempts ended below the best accuracy of the attempts before them."""
    if rungs <= 0 or len(finals) <= rungs:
        return False
    return min(finals[-rungs:]) >= min(finals[:-rungs])


def attempt_parameters(params: dict[str, dict[str, Any]], correction: Correction | None) -> dict[str, dict[str, Any]]:
    """The parameters of the attempt after `correction`: the lasting ones, with a one-attempt correction's changes."""
    if correction is None or correction.lasting:
        return params
    return merge_parameters(params, correction.changes)


STEPS = "more electron steps"


def more_steps(maxstep: int) -> Correction:
    """`maxstep` more electron steps from the attempt's own density and wavefunctions, for that attempt only."""
    return Correction(
        name=STEPS, changes={"electrons": {"electron_maxstep": 2 * maxstep}}, restart=REUSE, repeatable=True,
        lasting=False,
    )


class RecoveryHandler(Document):
    """Chooses the next correction for a failed run; never repeats one already tried or already in effect.

    A document: it travels with the workflow (subclasses too, which may override `next_correction`).
    `ladders` maps an error type's name to its corrections, tried in order.
    `read_trend`: when the SCF got within NEAR × conv_thr or was still falling to the end as the steps ran out
    (scf_converging), first ask for more steps from its own state (at most `more_steps` times; for that attempt
    only) before a rung that changes the mixing or the physics.
    `drop_worse`: a correction after which the SCF ended worse than before it is not carried into later attempts.
    `give_up_after`: the runner stops early when none of this many consecutive attempts improved the SCF accuracy
    over the best so far (0: never; max_retries still bounds the attempts).
    """

    ladders: dict[str, list[Correction]] = Field(
        default_factory=lambda: {error.name: list(ladder) for error, ladder in LADDERS.items()}
    )
    read_trend: bool = True
    more_steps: int = 2
    drop_worse: bool = True
    give_up_after: int = 2

    @field_validator("ladders", mode="before")
    @classmethod
    def _names_as_keys(cls, ladders: dict) -> dict:
        return {key.name if isinstance(key, DFTErrorType) else key: value for key, value in ladders.items()}

    def as_dict(self) -> dict:
        """As stored in every Firework: the default ladders are left out (half of each Firework's document, copied
        and written at every step of the LaunchPad), and come back as the defaults."""
        data = super().as_dict()
        if self.ladders == type(self).model_fields["ladders"].default_factory():
            del data["ladders"]
        return data

    @staticmethod
    def analyze(stdout: str, stderr: str = "", crash: str | None = None, returncode: int | None = None) -> DFTErrorType:
        """The spec's entry point: name the failure in raw pw.x texts."""
        return classify(parse_pw_output(stdout, crash), stdout, stderr, returncode).error_type

    def next_correction(
        self,
        error_type: DFTErrorType,
        parameters: dict[str, dict[str, Any]],
        tried: Sequence[str] = (),
        output: PwOutput | None = None,
    ) -> Correction | None:
        """First untried correction for `error_type` below the last one tried in its ladder that changes something
        in the effective `parameters` (namelists, and "run" for the command line, e.g. {"run": {"pools": 1}}; see
        changes_anything); None = give up. `output`: the failed run's.

        A run that pw.x stopped at max_seconds is restarted only while its SCF still progresses (still_progressing);
        a stalled one would stall again, so it gets the SCF_NOT_CONVERGED ladder."""
        if (
            error_type is DFTErrorType.PW_WALLTIME
            and output is not None
            and not still_progressing(output.scf_accuracy)
        ):
            error_type = DFTErrorType.SCF_NOT_CONVERGED
        electrons = parameters.get("electrons", {})
        maxstep = int(electrons.get("electron_maxstep", 100))
        if (
            self.read_trend
            and error_type is DFTErrorType.SCF_NOT_CONVERGED
            and output is not None
            and tried.count(STEPS) < self.more_steps
            and scf_converging(output.scf_accuracy, electrons.get("conv_thr", 1e-6), maxstep)
        ):
            return more_steps(maxstep)
        ladder = self.ladders.get(error_type.name, [])
        reached = max((i + 1 for i, c in enumerate(ladder) if c.name in tried and not c.repeatable), default=0)
        for correction in ladder[reached:]:  # a ladder only goes down: never back to a rung above one tried
            if correction.name in tried and not correction.repeatable:
                continue
            if correction.changes and not changes_anything(correction, parameters) and not correction.repeatable:
                continue
            return correction
        return None

    def get_strategy(
        self, error_type: DFTErrorType, current_params: dict[str, dict[str, Any]], tried: Sequence[str] = ()
    ) -> dict[str, dict[str, Any]] | None:
        """The spec's entry point: the parameters of the next attempt (`current_params` with the next correction
        and its restart applied), or None to give up."""
        correction = self.next_correction(error_type, current_params, tried)
        if correction is None:
            return None
        lasting = apply_correction(without_restart(current_params), correction)
        return merge_parameters(lasting, RESTART_PARAMETERS[correction.restart])


def merge_parameters(
    params: dict[str, dict[str, Any]], changes: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """A copy of `params` with `changes` merged in, namelist by namelist."""
    merged = {namelist: dict(values) for namelist, values in params.items()}
    for namelist, values in changes.items():
        merged.setdefault(namelist, {}).update(values)
    return merged


def apply_correction(params: dict[str, dict[str, Any]], correction: Correction) -> dict[str, dict[str, Any]]:
    """A copy of `params` with the correction's lasting changes merged in (its restart is not one)."""
    return merge_parameters(params, correction.changes)


def label_deviations(
    final: dict[str, dict[str, Any]], nominal: dict[str, dict[str, Any]]
) -> dict[str, tuple[Any, Any]]:
    """Label-changing settings whose final value differs from the data set's nominal one: key → (final, nominal)."""
    deviations = {}
    for namelist, key in LABEL_KEYS:
        final_value, nominal_value = final.get(namelist, {}).get(key), nominal.get(namelist, {}).get(key)
        if final_value != nominal_value:
            deviations[f"{namelist}.{key}"] = (final_value, nominal_value)
    return deviations
