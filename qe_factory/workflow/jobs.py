"""LabelMaker: one structure's jobflow Flow — inputs → scf (one pw.x attempt per job, recovery by replacement) →
validate — with the physics settings and the recovery policy as its fields, serialised with the Flow.

Each job calls QERunner's pieces (prepare, step, finish, build_result): no step of the pipeline is re-implemented
here. Where and how pw.x runs (ExecutionSettings) is the worker's: `home.worker_execution()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ase import Atoms
from jobflow import CURRENT_JOB, Flow, Job, Maker, Response, job

from qe_factory.engine.config import DFTConfig
from qe_factory.engine.document import Document
from qe_factory.engine.inputs import PwInput
from qe_factory.engine.outcomes import named_outcomes
from qe_factory.engine.recovery import RecoveryHandler
from qe_factory.engine.results import DFTFatalError, DFTResult
from qe_factory.engine.runner import QERunner, RecoveryState, ScfOutcome, deliver
from qe_factory.engine.structure import StructureDoc
from qe_factory.workflow.home import worker_execution

PRIORITY = {"inputs": 1, "scf": 2, "validate": 3}  # depth-first: a worker finishes one structure before the next
REFERENCE_PRIORITY = 10  # added to an isolated-atom reference's (E0) stages: they run before the structures


class ScfSetup(Document):
    """What the inputs job hands to the SCF and validation jobs."""

    uid: str
    structure: StructureDoc
    nominal: PwInput


@dataclass
class LabelMaker(Maker):
    """Makes the Flow that labels one structure.

    `config` (what is computed) and `recovery` (the policy, a RecoveryHandler or a subclass of it) are serialised
    with the Flow, so every job and every retry of it runs with them on whichever worker picks it up.
    """

    name: str = "qe_factory"
    config: DFTConfig = field(default_factory=DFTConfig)
    recovery: RecoveryHandler = field(default_factory=RecoveryHandler)

    def __deepcopy__(self, memo: dict) -> LabelMaker:
        """A new maker sharing `config` and `recovery` (never changed in place). jobflow deep-copies the maker into
        every job it makes: sharing keeps a bulk submission's memory and time to the structures."""
        return replace(self)

    def make(
        self, atoms: Atoms, uid: str, resources: dict[str, Any] | None = None, key: str | None = None,
        priority: int = 0,
    ) -> Flow:
        """inputs → scf → validate for `atoms`. `resources` (e.g. {"ntasks": 4, "walltime": "02:00:00"}) go to the
        SCF job's `_queueadapter` (qlaunch -r); `key` (the calculation's identity) to every job's metadata;
        `priority` is added to every stage's FireWorks `_priority` (REFERENCE_PRIORITY: before the structures)."""
        inputs = self.inputs(StructureDoc.from_atoms(atoms), uid)
        scf = self.scf(inputs.output)
        check = self.validate(inputs.output, scf.output)
        for stage, step in (("inputs", inputs), ("scf", scf), ("validate", check)):
            step.name = f"{stage} {uid}" if stage != "scf" else f"scf {uid} attempt 1"
            step.metadata = {"uid": uid, "stage": stage, "qe_factory_key": key}
            manager_config: dict[str, Any] = {"_priority": PRIORITY[stage] + priority}
            if resources and stage == "scf":
                manager_config["_queueadapter"] = dict(resources)
            # the validation reads the E0s from the JobStore: jobflow hands a job the store only when asked
            step.update_config({"manager_config": manager_config, "expose_store": stage == "validate"})
        return Flow([inputs, scf, check], name=uid)  # the workflow is named by its uid (lpad, web GUI)

    def runner(self) -> QERunner:
        """A QERunner with this Flow's config and policy and this worker's execution settings."""
        config = self.config.model_copy(update={"execution": worker_execution()})
        return QERunner(config, recovery=self.recovery)

    @job
    def inputs(self, structure: StructureDoc, uid: str) -> ScfSetup:
        """Refuse bad input (raises: the Firework FIZZLES with the reason) and fix the nominal pw.x parameters."""
        with named_outcomes():
            nominal = self.runner().prepare(structure.to_atoms(), uid)
        return ScfSetup(uid=uid, structure=structure, nominal=nominal)

    @job
    def scf(self, setup: ScfSetup, state: RecoveryState | None = None) -> ScfOutcome | Response:
        """One pw.x attempt. A recoverable failure returns Response(replace=<next attempt>): FireWorks adds it as a
        detour Firework carrying the correction and the new parameters. Exhausted recovery raises DFTFatalError
        with the full report."""
        runner, atoms = self.runner(), setup.structure.to_atoms()
        with named_outcomes():
            outcome = runner.step(atoms, setup.uid, setup.nominal, state or RecoveryState())
        if isinstance(outcome, RecoveryState):
            return Response(replace=self._retry(setup, outcome), stored_data={
                "attempt": outcome.attempts[-1].number, "error": outcome.attempts[-1].message,
            })
        runner.finish(setup.uid)
        if outcome.failure is not None:
            deliver(runner.build_result(setup.uid, atoms, outcome, setup.nominal), raise_on_failure=True)
        return outcome

    def _retry(self, setup: ScfSetup, state: RecoveryState) -> Job:
        """The next SCF attempt as a job that keeps this one's stage, metadata and FireWorks settings."""
        attempt = len(state.attempts) + 1
        retry = self.scf(setup, state)
        retry.name = f"scf {setup.uid} attempt {attempt}"
        correction = state.correction.name if state.correction else None
        retry.metadata = {**CURRENT_JOB.job.metadata, "attempt": attempt, "correction": correction, **state.params}
        retry.update_config({"manager_config": CURRENT_JOB.job.config.manager_config})
        return retry

    @job
    def validate(self, setup: ScfSetup, outcome: ScfOutcome) -> DFTResult:
        """Sanitize the converged output and write the final DFTResult (raises DFTFatalError if unphysical). The
        cohesive energy is judged against the isolated-atom energies (E0s) in the JobStore made with this label's
        settings; without them it is `not_judged` here, and `export` judges it once they exist."""
        from qe_factory.workflow.state import structure_e0s

        atoms = setup.structure.to_atoms()
        with named_outcomes():
            e0s = structure_e0s(CURRENT_JOB.store, atoms, self.config) if CURRENT_JOB.store is not None else {}
            result = self.runner().build_result(setup.uid, atoms, outcome, setup.nominal, e0s)
        if not result.succeeded:
            raise DFTFatalError(result)
        return result
