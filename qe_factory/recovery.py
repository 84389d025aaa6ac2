"""RecoveryHandler: the recovery tree as data — an ordered list of corrections per error type."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qe_factory.errors import DFTErrorType, classify
from qe_factory.parsers import PwOutput, parse_pw_output


@dataclass(frozen=True)
class Correction:
    """A named change to the run parameters ("run" holds command-line settings such as pools)."""

    name: str
    changes: dict[str, dict[str, Any]]
    reuse_density: bool = False  # start from the failed attempt's charge density (startingpot='file')
    repeatable: bool = False  # may be applied again (restarts make progress each time)
    changes_labels: bool = False  # energies/forces depend on it: finish at nominal settings


LOWER_BETA = Correction("mixing_beta=0.3", {"electrons": {"mixing_beta": 0.3}}, reuse_density=True)
LOCAL_TF = Correction("mixing_mode=local-TF", {"electrons": {"mixing_mode": "local-TF"}}, reuse_density=True)
MORE_SMEARING = Correction("degauss=0.05", {"system": {"degauss": 0.05}}, reuse_density=True, changes_labels=True)
CG = Correction("diagonalization=cg", {"electrons": {"diagonalization": "cg"}})
RESTART = Correction("restart_mode=restart", {"control": {"restart_mode": "restart"}}, repeatable=True)
ONE_POOL = Correction("pools=1", {"run": {"pools": 1}})
RERUN = Correction("rerun unchanged", {})

LADDERS: dict[DFTErrorType, list[Correction]] = {
    DFTErrorType.SCF_NOT_CONVERGED: [LOWER_BETA, LOCAL_TF, MORE_SMEARING, CG],
    DFTErrorType.BROYDEN_MIXING: [LOWER_BETA, LOCAL_TF, CG],
    DFTErrorType.DIAGONALIZATION: [CG],
    DFTErrorType.WRONG_CHARGE: [MORE_SMEARING],
    DFTErrorType.PW_WALLTIME: [RESTART],
    DFTErrorType.TOO_MANY_POOLS: [ONE_POOL],
    DFTErrorType.OUT_OF_MEMORY: [ONE_POOL],
    DFTErrorType.SIGNAL: [RERUN],
    DFTErrorType.OUTPUT_INCOMPLETE: [RERUN],
}

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


@dataclass
class RecoveryHandler:
    """Chooses the next correction for a failed run; never repeats one already tried.

    `read_trend`: when the SCF accuracy was still falling steadily as the steps ran out, first ask for more steps
    (from the last density) instead of walking the ladder. Off by default: on the recovery benchmark
    (benchmarks/recovery.py) it cost more pw.x CPU than lowering mixing_beta from the same density.
    """

    ladders: dict[DFTErrorType, list[Correction]] = field(default_factory=lambda: dict(LADDERS))
    read_trend: bool = False

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
        """First untried correction for `error_type` that changes the effective `parameters`; None = give up."""
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
            return Correction("more electron steps", {"electrons": {"electron_maxstep": steps}}, reuse_density=True)
        for correction in self.ladders.get(error_type, []):
            if correction.name in tried and not correction.repeatable:
                continue
            in_effect = all(
                parameters.get(namelist, {}).get(key) == value
                for namelist, values in correction.changes.items()
                for key, value in values.items()
            )
            if correction.changes and in_effect and not correction.repeatable:
                continue
            return correction
        return None

    def get_strategy(
        self, error_type: DFTErrorType, current_params: dict[str, dict[str, Any]], tried: Sequence[str] = ()
    ) -> dict[str, dict[str, Any]] | None:
        """The spec's entry point: `current_params` with the next correction applied, or None to give up."""
        correction = self.next_correction(error_type, current_params, tried)
        return None if correction is None else apply_correction(current_params, correction)


def apply_correction(params: dict[str, dict[str, Any]], correction: Correction) -> dict[str, dict[str, Any]]:
    """A copy of `params` with the correction's changes merged in."""
    merged = {namelist: dict(values) for namelist, values in params.items()}
    for namelist, values in correction.changes.items():
        merged.setdefault(namelist, {}).update(values)
    return merged


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
