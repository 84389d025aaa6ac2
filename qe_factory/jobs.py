"""jobflow Jobs: input generation, one SCF attempt per job (recovery by replacement), validation.

Each job reuses QERunner's pieces (prepare, step, build_result): no step of the pipeline is re-implemented here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobflow import CURRENT_JOB, Response, job

from qe_factory.config import DFTConfig
from qe_factory.inputs import PwInput
from qe_factory.results import DFTFatalError
from qe_factory.runner import QERunner, RecoveryState, ScfOutcome, clean_scratch, deliver
from qe_factory.structure import atoms_from_dict

PRIORITY = {"inputs": 1, "scf": 2, "validate": 3}  # depth-first: a worker finishes one structure before the next


def _runner(setup: dict[str, Any]) -> QERunner:
    return QERunner(DFTConfig.create(**setup["config"]))


@job
def make_inputs(structure: dict, uid: str, config: dict[str, Any]) -> dict[str, Any]:
    """Refuse bad input (raises: the Firework FIZZLES with the reason) and fix the nominal pw.x parameters."""
    runner = QERunner(DFTConfig.create(**config))
    nominal, run_dir = runner.prepare(atoms_from_dict(structure), uid)
    return {
        "uid": uid, "structure": structure, "config": config, "run_dir": str(run_dir),
        "nominal": nominal.model_dump(mode="json"),
    }


@job
def run_scf(setup: dict[str, Any], state: dict[str, Any] | None = None) -> dict[str, Any] | Response:
    """One pw.x attempt. A recoverable failure returns Response(replace=<next attempt>): FireWorks adds it as a
    detour Firework carrying the new parameters. Exhausted recovery raises DFTFatalError with the full report."""
    runner, uid = _runner(setup), setup["uid"]
    atoms, run_dir = atoms_from_dict(setup["structure"]), Path(setup["run_dir"])
    nominal = PwInput(**setup["nominal"])
    outcome = runner.step(atoms, uid, run_dir, nominal, RecoveryState(**(state or {})))
    if isinstance(outcome, RecoveryState):
        attempt = len(outcome.attempts) + 1
        retry = run_scf(setup, outcome.model_dump(mode="json"))
        retry.name = f"scf {uid} attempt {attempt}"
        correction = outcome.correction or {}
        retry.metadata = {"uid": uid, "attempt": attempt, "correction": correction.get("name"), **outcome.params}
        retry.update_config({"manager_config": CURRENT_JOB.job.config.manager_config})
        last = outcome.attempts[-1]
        return Response(replace=retry, stored_data={"attempt": last.number, "error": last.message})
    if not runner.config.keep_files:
        clean_scratch(run_dir)
    if outcome.failure is not None:
        deliver(runner.build_result(uid, atoms, outcome, nominal), raise_on_failure=True)
    return outcome.model_dump(mode="json")


@job
def validate(setup: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
    """Sanitize the converged output and write the final DFTResult (raises DFTFatalError if unphysical)."""
    runner = _runner(setup)
    result = runner.build_result(
        setup["uid"], atoms_from_dict(setup["structure"]), ScfOutcome(**outcome), PwInput(**setup["nominal"])
    )
    if not result.succeeded:
        raise DFTFatalError(result)
    return result.model_dump(mode="json")
