"""A user's own recovery policy, importable by worker processes (PYTHONPATH=tests) to show that a RecoveryHandler
subclass travels with the workflow."""

from __future__ import annotations

from qe_factory import DFTErrorType, RecoveryHandler
from qe_factory.engine.recovery import NEW_ALLOCATION, RESTART, Correction


class MoreStepsFirst(RecoveryHandler):
    """Any SCF failure first gets `steps` electron steps at once (from scratch); then the default ladder."""

    steps: int = 250

    def next_correction(self, error_type, parameters, tried=(), output=None):
        if error_type is DFTErrorType.SCF_NOT_CONVERGED and "more steps" not in tried:
            return Correction(name="more steps", changes={"electrons": {"electron_maxstep": self.steps}})
        return super().next_correction(error_type, parameters, tried, output)


class RestartToConverge(RecoveryHandler):
    """After pw.x stopped at max_seconds, restart (restart_mode='restart') with a reachable `conv_thr`; after SLURM
    killed the job at its time limit, rerun in a new allocation with it.

    With an unreachable conv_thr in the input, attempt 1 iterates until pw.x's max_seconds on any machine, however
    fast; the restart then converges: a walltime stop and restart that does not depend on the machine's speed.
    (Attempt 1 stalls at its unreachable conv_thr on purpose: this policy restarts it before the default handler
    would call the stall SCF_NOT_CONVERGED.)
    """

    conv_thr: float = 1e-8

    def next_correction(self, error_type, parameters, tried=(), output=None):
        if error_type is DFTErrorType.PW_WALLTIME and RESTART.name not in tried:
            return RESTART.model_copy(update={"changes": {"electrons": {"conv_thr": self.conv_thr}}})
        if error_type is DFTErrorType.SLURM_WALLTIME and NEW_ALLOCATION.name not in tried:
            return NEW_ALLOCATION.model_copy(update={"changes": {"electrons": {"conv_thr": self.conv_thr}}})
        return super().next_correction(error_type, parameters, tried, output)
