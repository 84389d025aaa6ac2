"""qe_factory: trustworthy pw.x energies, forces and stresses for MLIP training, with automatic recovery."""

from qe_factory.config import ConfigError, DFTConfig, SanitizerThresholds
from qe_factory.errors import DFTErrorType
from qe_factory.inputs import InputError, InputGenerator
from qe_factory.pseudos import PseudopotentialError
from qe_factory.recovery import RecoveryHandler
from qe_factory.results import DFTFatalError, DFTResult
from qe_factory.runner import QERunner
from qe_factory.structure import StructureError

__all__ = [
    "ConfigError", "DFTConfig", "DFTErrorType", "DFTFatalError", "DFTResult", "InputError", "InputGenerator",
    "PseudopotentialError", "QERunner", "RecoveryHandler", "SanitizerThresholds", "StructureError",
]
