"""A user's own recovery policy, importable by worker processes (PYTHONPATH=tests) to show that a RecoveryHandler
subclass travels with the workflow."""

from __future__ import annotations

from qe_factory import DFTErrorType, RecoveryHandler
from qe_factory.engine.recovery import Correction


class MoreStepsFirst(RecoveryHandler):
    """Any SCF failure first gets `steps` electron steps at once (from scratch); then the default ladder."""

    steps: int = 250

    def next_correction(self, error_type, parameters, tried=(), output=None):
        if error_type is DFTErrorType.SCF_NOT_CONVERGED and "more steps" not in tried:
            return Correction(name="more steps", changes={"electrons": {"electron_maxstep": self.steps}})
        return super().next_correction(error_type, parameters, tried, output)
