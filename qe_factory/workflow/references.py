"""Isolated-atom references (E0s) in the factory home: an E0 is the DFTResult of its isolated-atom uid
(`engine.references.e0_uid`) in the JobStore, computed once per element and settings by an ordinary workflow that
runs before the structures (jobs.REFERENCE_PRIORITY)."""

from __future__ import annotations

from collections.abc import Iterable

from ase import Atoms

from qe_factory.engine.config import DFTConfig
from qe_factory.engine.recovery import RecoveryHandler
from qe_factory.engine.references import E0, Reference, element_references, isolated_atom, references_for
from qe_factory.engine.runner import REFUSALS
from qe_factory.workflow.flows import SubmitReport, submit
from qe_factory.workflow.jobs import REFERENCE_PRIORITY
from qe_factory.workflow.launchpad import load_results


def stored_e0s(store, references: Iterable[Reference]) -> dict[str, E0]:
    """uid → E0 of the references whose result is in the JobStore (failed ones are absent)."""
    wanted = {ref.uid: ref for ref in references}
    return {r.uid: E0.from_result(r, wanted[r.uid].key) for r in load_results(store, list(wanted)) if r.succeeded}


def reference_energies(store, config: DFTConfig, elements: Iterable[str]) -> dict[str, float]:
    """{element: E0 eV} of the elements whose isolated atom was computed with `config`'s settings (its cutoffs, or
    the element's own when the config leaves them to the family); elements without one are absent."""
    return {e0.element: e0.energy for e0 in stored_e0s(store, element_references(elements, config)).values()}


def structure_e0s(store, atoms: Atoms, config: DFTConfig) -> dict[str, float]:
    """{element: E0 eV} of the structure's elements computed with exactly its label's settings (its cutoffs: the
    largest of its elements' when the config leaves them to the family); elements without one yet are absent."""
    try:
        references = references_for([atoms], config)
    except (*REFUSALS, ValueError):
        return {}
    return {e0.element: e0.energy for e0 in stored_e0s(store, references.values()).values()}


def submit_references(
    references: Iterable[Reference], launchpad=None, store=None, resources=None,
    recovery: RecoveryHandler | None = None,
) -> list[SubmitReport]:
    """Submit the isolated-atom workflows of `references` that have no result yet (one per uid: element and
    settings), ahead of the structures (REFERENCE_PRIORITY); one `submit` per distinct config."""
    from qe_factory.workflow.launchpad import get_jobstore

    store = store if store is not None else get_jobstore()
    references = list(references)
    done = stored_e0s(store, references)
    groups: dict[str, tuple[DFTConfig, list[Atoms]]] = {}
    for ref in references:
        if ref.uid in done:
            continue
        atoms = isolated_atom(ref.element, ref.config)
        atoms.info["uid"] = ref.uid
        groups.setdefault(ref.config.model_dump_json(), (ref.config, []))[1].append(atoms)
    return [submit(atoms, config, launchpad=launchpad, store=store, resources=resources, recovery=recovery,
                   priority=REFERENCE_PRIORITY) for config, atoms in groups.values()]


def structure_references(structures: Iterable[Atoms], config: DFTConfig) -> dict[str, Reference]:
    """The references of the structures (one look per distinct set of elements); a set the factory refuses (e.g. an
    element without a pseudopotential) needs none: submit reports its structures."""
    references: dict[str, Reference] = {}
    for elements in {frozenset(atoms.get_chemical_symbols()) for atoms in structures}:
        try:
            references.update(references_for([Atoms(sorted(elements))], config))
        except (*REFUSALS, ValueError):
            continue
    return references
