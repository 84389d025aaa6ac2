"""qe_factory: trustworthy pw.x energies, forces and stresses for MLIP training, with automatic recovery.

Layers: `qe_factory.engine` (the physics and pw.x; no FireWorks, no jobflow) ← `qe_factory.workflow` (jobflow
Makers, flows, the factory home, LaunchPad and worker) ← `qe_factory.cli` (the `qe-factory` command).
"""

from qe_factory.engine.config import ConfigError, DFTConfig, ExecutionSettings, SanitizerThresholds
from qe_factory.engine.errors import DFTErrorType
from qe_factory.engine.inputs import InputError, InputGenerator
from qe_factory.engine.pseudos import PseudopotentialError
from qe_factory.engine.recovery import RecoveryHandler
from qe_factory.engine.results import DFTFatalError, DFTResult
from qe_factory.engine.runner import QERunner
from qe_factory.engine.structure import StructureError

__all__ = [
    "ConfigError", "DFTConfig", "DFTErrorType", "DFTFatalError", "DFTResult", "ExecutionSettings", "InputError",
    "InputGenerator", "PseudopotentialError", "QERunner", "RecoveryHandler", "SanitizerThresholds", "StructureError",
]
