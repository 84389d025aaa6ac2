"""RecoveryHandler: the recovery tree as data — an ordered list of corrections per error type."""

from __future__ import annotations

import math
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


LOWER_BETA = Correction(
    name="mixing_beta=0.3", changes={"electrons": {"mixing_beta": 0.3}}, restart=RestartType.FROM_CHARGE_DENSITY
)
LOCAL_TF = Correction(
    name="mixing_mode=local-TF", changes={"electrons": {"mixing_mode": "local-TF"}},
    restart=RestartType.FROM_CHARGE_DENSITY,
)
MORE_SMEARING = Correction(
    name="degauss=0.05", changes={"system": {"degauss": 0.05}}, restart=RestartType.FROM_CHARGE_DENSITY
)
CG = Correction(name="diagonalization=cg", changes={"electrons": {"diagonalization": "cg"}})
RESTART = Correction(name="restart_mode=restart", restart=RestartType.FULL, repeatable=True)
ONE_POOL = Correction(name="pools=1", changes={"run": {"pools": 1}})
RERUN = Correction(name="rerun unchanged")
# after SLURM's walltime kill (no state saved: pw.x saves only when it stops at max_seconds): from the last density
# there is, in a new job, whose time left sets max_seconds; once (a second kill: the walltime is too short)
NEW_ALLOCATION = Correction(name="rerun in a new allocation", restart=RestartType.FROM_CHARGE_DENSITY)

LADDERS: dict[DFTErrorType, list[Correction]] = {
    DFTErrorType.SCF_NOT_CONVERGED: [LOWER_BETA, LOCAL_TF, MORE_SMEARING, CG],
    DFTErrorType.BROYDEN_MIXING: [LOWER_BETA, LOCAL_TF, CG],
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


def scf_still_converging(accuracy: Sequence[float], conv_thr: float, maxstep: int) -> bool:
    """True when the accuracy trace fell steadily and would reach conv_thr within another `maxstep` steps."""
    tail = [math.log10(a) for a in accuracy[-10:] if a > 0]
    if len(tail) < 5:
        return False
    rises = sum(b > a for a, b in zip(tail, tail[1:]))
    slope = (tail[-1] - tail[0]) / (len(tail) - 1)
    if rises > len(tail) // 4 or slope >= 0:
        return False
    return (math.log10(conv_thr) - tail[-1]) / slope <= maxstep


class RecoveryHandler(Document):
    """Chooses the next correction for a failed run; never repeats one already tried or already in effect.

    A document: it travels with the workflow (subclasses too, which may override `next_correction`).
    `ladders` maps an error type's name to its corrections, tried in order.
    `read_trend`: when the SCF accuracy was still falling steadily as the steps ran out, first ask for more steps
    (from the last density) instead of walking the ladder. Off by default: on the recovery benchmark
    (benchmarks/recovery.py) it cost more pw.x CPU than lowering mixing_beta from the same density.
    """

    ladders: dict[str, list[Correction]] = Field(
        default_factory=lambda: {error.name: list(ladder) for error, ladder in LADDERS.items()}
    )
    read_trend: bool = False

    @field_validator("ladders", mode="before")
    @classmethod
    def _names_as_keys(cls, ladders: dict) -> dict:
        return {key.name if isinstance(key, DFTErrorType) else key: value for key, value in ladders.items()}

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
        """First untried correction for `error_type` that changes something in the effective `parameters`
        (namelists, and "run" for the command line, e.g. {"run": {"pools": 1}}; see changes_anything); None = give
        up."""
        electrons = parameters.get("electrons", {})
        if (
            self.read_trend
            and error_type is DFTErrorType.SCF_NOT_CONVERGED
            and output is not None
            and "more electron steps" not in tried
            and scf_still_converging(
                output.scf_accuracy, electrons.get("conv_thr", 1e-6), electrons.get("electron_maxstep", 100)
            )
        ):
            steps = 2 * int(electrons.get("electron_maxstep", 100))
            return Correction(
                name="more electron steps", changes={"electrons": {"electron_maxstep": steps}},
                restart=RestartType.FROM_CHARGE_DENSITY,
            )
        for correction in self.ladders.get(error_type.name, []):
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
