"""The protocols pinned in a home: `<home>/state/protocols/<data set>.json`, one per data set (engine/protocol.py).

The first submission of a data set pins its protocol; every later one is settled against it (the same settings, new
elements only within its cutoff pair) under a lock, so two submissions at once never pin two protocols or lose an
element the other added.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from ase import Atoms

from qe_factory.engine.config import ConfigError, DFTConfig
from qe_factory.engine.protocol import Protocol, settle
from qe_factory.engine.pseudos import PseudopotentialError, load_family, resolve_pseudos
from qe_factory.engine.results import DFTResult
from qe_factory.workflow.offline import write_json

DEFAULT_DATASET = "default"
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def protocols_folder(home: Path) -> Path:
    return home / "state" / "protocols"


def protocol_file(home: Path, dataset: str = DEFAULT_DATASET) -> Path:
    if not DATASET_NAME.match(dataset):
        raise ConfigError(f"data set name {dataset!r}: use letters, digits, '_', '.', '-' (at most 64, no '/')")
    return protocols_folder(home) / f"{dataset}.json"


def pinned_protocol(home: Path, dataset: str = DEFAULT_DATASET) -> Protocol | None:
    """The protocol pinned for `dataset` in the home, or None before its first submission."""
    path = protocol_file(home, dataset)
    return Protocol.model_validate_json(path.read_text()) if path.is_file() else None


def home_protocols(home: Path) -> list[Protocol]:
    """Every data set's protocol in the home, by name."""
    return [Protocol.model_validate_json(path.read_text()) for path in sorted(protocols_folder(home).glob("*.json"))]


@contextlib.contextmanager
def protocols_locked(home: Path) -> Iterator[None]:
    folder = protocols_folder(home)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pin_protocol(home: Path, config: DFTConfig, elements: Iterable[str], dataset: str = DEFAULT_DATASET) -> Protocol:
    """Settle a submission of `elements` with `config` against the data set's protocol (pinning it at the first
    submission, adding elements that fit) and return it; raises protocol.ProtocolError for one that would mix
    settings. `protocol.config(config)` is what the submission's workflows run with."""
    path = protocol_file(home, dataset)
    with protocols_locked(home):
        pinned = pinned_protocol(home, dataset)
        protocol = settle(pinned, config, elements, dataset)
        if protocol != pinned:
            write_json(path, protocol.model_dump(mode="json"))
    return protocol


def servable_elements(config: DFTConfig, structures: Iterable[Atoms]) -> set[str]:
    """The structures' elements the config's family can serve (a structure with another is refused on its own,
    by submit)."""
    family = load_family(config.pseudo_family, config.pseudo_dir)
    elements = {symbol for atoms in structures for symbol in atoms.get_chemical_symbols()}
    return {el for el in elements if resolves(family, el)}


def resolves(family, element: str) -> bool:
    """Whether the family has the element's file and it passes the checks (md5, element, functional): else its
    structures are refused one by one, and the data set is not pinned with it."""
    try:
        resolve_pseudos(family, [element])
    except PseudopotentialError:
        return False
    return True


def settle_submission(home: Path, config: DFTConfig, structures: Iterable[Atoms],
                      dataset: str = DEFAULT_DATASET) -> Protocol | None:
    """The protocol of data set `dataset` after settling the structures' elements against it (pin_protocol); None
    while it is unpinned and the structures have no element to serve. `protocol.config(config)` runs them."""
    elements = servable_elements(config, structures)
    return pin_protocol(home, config, elements, dataset) if elements else pinned_protocol(home, dataset)


def in_data_set(results: Iterable[DFTResult], protocol: Protocol | None) -> tuple[list[DFTResult], int]:
    """The results of data set `protocol` (all of them when None: a home from before protocols), and how many were
    left out. Isolated-atom references are all kept (one E0 serves every data set with its settings: export matches
    them to the labels by settings). A label from before protocols (no hash) is kept when its cutoffs, smearing,
    degauss and pseudopotential files are the protocol's."""
    from qe_factory.engine.references import is_reference

    results = list(results)
    if protocol is None:
        return results, 0
    kept = [result for result in results if result.protocol_hash == protocol.hash or is_reference(result)
            or (result.protocol_hash is None and made_as(result, protocol))]
    return kept, len(results) - len(kept)


def made_as(result: DFTResult, protocol: Protocol) -> bool:
    """Whether a label without a protocol hash was made with the protocol's label settings (export.label_settings:
    the pseudopotential file, cutoffs, smearing and degauss of each of its elements)."""
    from qe_factory.engine.export import label_settings

    shared = (*protocol.cutoffs, protocol.settings["smearing"], protocol.settings["degauss"])
    return bool(result.pseudopotentials) and all(
        label_settings(result, el) == (protocol.pseudopotentials.get(el, {}).get("md5"), *shared)
        for el in result.pseudopotentials)
