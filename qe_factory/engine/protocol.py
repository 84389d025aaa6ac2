"""A data set's protocol: everything that changes a label's physics, one set for every label and every E0 of it.

An MLIP learns one energy surface from all its labels, so they must all come from the same settings: one
pseudopotential family (its files' md5s), ONE cutoff pair for the whole data set (the largest any of its elements
asks for), the same smearing, k-point spacing, spin policy and SCF threshold. `protocol_settings` lists them and
`protocol_hash` names them; every label carries that hash (DFTResult.protocol_hash). A home pins its data set's
Protocol at the first submission (workflow.protocols); `settle` decides what a later submission may add (an element
whose cutoffs fit the pair) and refuses what would mix settings (ProtocolError, with the reason and the ways out).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from qe_factory.engine.config import ConfigError, DFTConfig
from qe_factory.engine.document import Document
from qe_factory.engine.outcomes import CarriesOutcome, Outcome
from qe_factory.engine.pseudos import PseudoFamily, load_family, resolve_pseudos

# DFTConfig fields that change a label's physics (the rest: recovery, mixing, memory — how it converges or runs)
PHYSICS_FIELDS = ("smearing", "degauss", "kpoint_spacing", "vacuum_threshold", "conv_thr_per_atom", "magnetic_start")
# extra pw.x settings that do not change the converged answer (how pw.x gets there)
CONVERGENCE_ONLY = {"electrons": {"electron_maxstep", "mixing_beta", "mixing_mode", "mixing_ndim", "diagonalization",
                                  "startingwfc", "startingpot", "scf_must_converge"}}


class ProtocolError(CarriesOutcome, ConfigError):
    """A submission that would mix settings in a data set (or the data set's elements cannot be served)."""

    outcome = Outcome.REFUSED


def physics_parameters(config: DFTConfig) -> dict[str, dict[str, Any]]:
    """The config's extra pw.x settings that change the physics (every `system` key, `electrons` keys but
    CONVERGENCE_ONLY, every other namelist's)."""
    kept = {namelist: {key: value for key, value in sorted(values.items())
                       if key not in CONVERGENCE_ONLY.get(namelist, set())}
            for namelist, values in sorted(config.pw_parameters.items())}
    return {namelist: values for namelist, values in kept.items() if values}


def protocol_settings(config: DFTConfig, family: PseudoFamily | None = None) -> dict[str, Any]:
    """What a label's physics depends on, as plain data: family (name, functional, the md5 of each file its table
    names), the cutoffs (None: each structure's elements' largest — no protocol pinned them), smearing, degauss,
    k-point spacing, vacuum threshold, SCF threshold, spin policy and the physics of the extra pw.x settings."""
    family = family or load_family(config.pseudo_family, config.pseudo_dir)
    return {
        "family": family.name, "functional": family.functional,
        "family_md5": {element: entry.md5 for element, entry in sorted(family.entries.items()) if entry.md5},
        "ecutwfc": config.ecutwfc, "ecutrho": config.ecutrho, "occupations": "smearing",
        **{name: getattr(config, name) for name in PHYSICS_FIELDS},
        "pw_parameters": physics_parameters(config),
    }


def protocol_hash(config: DFTConfig, family: PseudoFamily | None = None) -> str:
    """sha256 of protocol_settings: equal hashes, labels of one energy surface."""
    return settings_hash(protocol_settings(config, family))


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class Protocol(Document):
    """A data set's pinned settings: what is hashed, the elements it covers, and their pseudopotential files."""

    name: str  # the data set's name in its home
    hash: str  # settings_hash(settings)
    settings: dict[str, Any]
    elements: list[str]  # its cutoff pair is the largest any of these asks for
    elements_from: str  # where the elements came from: declared, the first submission, later submissions
    pseudopotentials: dict[str, dict[str, Any]]  # element → filename, md5, cutoff_wfc, cutoff_rho (md5 pinned)

    @property
    def cutoffs(self) -> tuple[float, float]:
        return self.settings["ecutwfc"], self.settings["ecutrho"]

    def config(self, config: DFTConfig) -> DFTConfig:
        """`config` with the protocol's cutoff pair: what every workflow of the data set runs with."""
        ecutwfc, ecutrho = self.cutoffs
        return config.with_changes(ecutwfc=ecutwfc, ecutrho=ecutrho)


def protocol_for(config: DFTConfig, elements: Iterable[str], name: str = "default",
                 elements_from: str = "the first submission") -> Protocol:
    """The protocol `config` gives a data set of `elements`: the cutoff pair is the config's, else the largest the
    elements' pseudopotentials ask for. Raises PseudopotentialError for an element the family cannot serve."""
    family = load_family(config.pseudo_family, config.pseudo_dir)
    elements = sorted(set(elements) | set(config.elements))
    if not elements:
        raise ProtocolError("a protocol needs at least one element (no structures, no declared elements)")
    pseudos = resolve_pseudos(family, elements)
    fixed = config.with_changes(ecutwfc=config.ecutwfc or max(p.cutoff_wfc for p in pseudos.values()),
                                ecutrho=config.ecutrho or max(p.cutoff_rho for p in pseudos.values()))
    settings = protocol_settings(fixed, family)
    return Protocol(
        name=name, hash=settings_hash(settings), settings=settings, elements=elements,
        elements_from="declared" if config.elements else elements_from,
        pseudopotentials={el: {"filename": p.path.name, "md5": p.md5, "cutoff_wfc": p.cutoff_wfc,
                               "cutoff_rho": p.cutoff_rho} for el, p in pseudos.items()},
    )


WAYS_OUT = ("Ways out: label it as another data set (`--dataset NAME`, or another home), or, to change this data "
            "set's protocol, relabel all of it in a new home with the new settings (declare every element up front "
            "with `elements:` in the config so one cutoff pair covers them all).")


def settle(pinned: Protocol | None, config: DFTConfig, elements: Iterable[str], name: str = "default") -> Protocol:
    """The protocol a submission of `elements` with `config` runs under: a new one when none is pinned; else the
    pinned one, with new elements added when their cutoffs fit its pair. Raises ProtocolError, with the reason and
    the ways out, for a changed setting, a changed pseudopotential file, or an element that needs higher cutoffs."""
    elements = set(elements)
    if pinned is None:
        return cutoffs_served(protocol_for(config, elements, name), config)
    ecutwfc, ecutrho = pinned.cutoffs
    asked = config.with_changes(ecutwfc=config.ecutwfc or ecutwfc, ecutrho=config.ecutrho or ecutrho, elements=[])
    wanted = protocol_for(asked, elements | set(config.elements) | set(pinned.elements), name)
    problems = [_difference(key, wanted.settings.get(key), value)
                for key, value in pinned.settings.items() if wanted.settings.get(key) != value]
    problems += [f"{el}'s pseudopotential {entry['filename']} has md5 {entry['md5']}, the data set's "
                 f"{pinned.pseudopotentials[el]['filename']} had {pinned.pseudopotentials[el]['md5']}"
                 for el, entry in wanted.pseudopotentials.items()
                 if el in pinned.pseudopotentials and entry["md5"] != pinned.pseudopotentials[el]["md5"]]
    added = sorted(set(wanted.elements) - set(pinned.elements))
    if not config.allow_low_cutoffs:
        problems += [f"{el} asks for ecutwfc/ecutrho {entry['cutoff_wfc']:g}/{entry['cutoff_rho']:g} Ry, above the "
                     f"data set's {ecutwfc:g}/{ecutrho:g} Ry"
                     for el, entry in wanted.pseudopotentials.items()
                     if el in added and (entry["cutoff_wfc"] > ecutwfc or entry["cutoff_rho"] > ecutrho)]
    if problems:
        raise ProtocolError(f"refused: this submission would mix settings in data set {name!r} (protocol "
                            f"{pinned.hash[:12]}, elements {', '.join(pinned.elements)}): {'; '.join(problems)}. "
                            + WAYS_OUT)
    if not added:
        return pinned
    return pinned.model_copy(update={
        "elements": sorted({*pinned.elements, *added}),
        "elements_from": f"{pinned.elements_from}; {', '.join(added)} added by a later submission",
        "pseudopotentials": {**pinned.pseudopotentials, **{el: wanted.pseudopotentials[el] for el in added}},
    })


def cutoffs_served(protocol: Protocol, config: DFTConfig) -> Protocol:
    """The protocol, unless its pair (the config's own) is below what one of its elements asks for and the config
    does not allow that: refused before it is pinned (a pinned pair no structure may run at is a dead end)."""
    ecutwfc, ecutrho = protocol.cutoffs
    low = [f"{el} {entry['cutoff_wfc']:g}/{entry['cutoff_rho']:g}" for el, entry in protocol.pseudopotentials.items()
           if entry["cutoff_wfc"] > ecutwfc or entry["cutoff_rho"] > ecutrho]
    if low and not config.allow_low_cutoffs:
        raise ProtocolError(f"refused: ecutwfc/ecutrho {ecutwfc:g}/{ecutrho:g} Ry is below what the family asks "
                            f"for ({'; '.join(low)} Ry): raise them, or set allow_low_cutoffs for a quick test")
    return protocol


def _difference(key: str, asked: Any, pinned: Any) -> str:
    if key == "family_md5":  # the family's table changed: name the files
        changed = sorted(el for el in {*asked, *pinned} if asked.get(el) != pinned.get(el))
        return f"the family's table names other files (md5) for {', '.join(changed)}"
    return f"{key} is {_shown(asked)}, the data set's is {_shown(pinned)}"


def _shown(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list)) else str(value)
