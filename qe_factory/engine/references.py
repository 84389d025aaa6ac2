"""Isolated-atom reference energies (E0s): the per-element energies an MLIP subtracts (MACE's `--E0s`).

An E0 is an ordinary SCF of one atom in a periodic box wide enough that the factory's vacuum detection runs it at Γ
(`inputs.vacuum_axes`), with exactly the data set's settings: the same pseudopotential file, cutoffs, smearing and
degauss. `settings_key` identifies those settings, so an element's E0 is computed once per element and settings and
found again by its uid (`e0_uid`). The atom is held at its Hund's-rule moment; where that is cheap, its lower spin
states run too and the lowest energy is the E0 (inputs.spin_candidates; `E0.spin_states` records each).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import NamedTuple

from ase import Atoms
from ase.data import atomic_numbers

from qe_factory.engine.config import DFTConfig
from qe_factory.engine.document import Document
from qe_factory.engine.inputs import InputGenerator
from qe_factory.engine.pseudos import resolve_pseudos
from qe_factory.engine.results import DFTResult

# Box edges (Å). Slightly orthorhombic: no cubic symmetry holds an open shell's degenerate orbitals together.
# Si E0 vs the 14 Å box (benchmarks/e0s.py box): 8 Å +14.7 meV, 10 Å +1.6 meV, 12 Å +0.2 meV; 10 Å costs 1.7x less
# than 12 Å at the same cutoff, and 1.6 meV per atom is far below an MLIP's energy error.
ATOM_BOX = (10.0, 10.5, 11.0)
BOX_MARGIN = 2.0  # Å beyond the vacuum threshold when a config asks for a wider one than the box gives


class E0(Document):
    """One element's isolated-atom energy and where it comes from."""

    element: str
    uid: str
    energy: float  # eV
    magnetization: float | None  # μB, the atom's total moment
    pseudo_md5: str
    pseudo_file: str
    settings_key: str
    attempts: int
    scf_iterations: int | None
    wall_time: float  # s, all attempts
    spin_states: dict[str, float | None] = {}  # total moment tried (μB) → energy (eV); the E0 is the lowest

    @property
    def atomic_number(self) -> int:
        return atomic_numbers[self.element]

    @classmethod
    def from_result(cls, result: DFTResult, key: str) -> E0:
        """The E0 of a successful isolated-atom result (its uid's element and key)."""
        if not result.succeeded or result.energy is None:
            raise ValueError(f"{result.uid}: no E0 from a failed calculation ({result.error_message})")
        (element, pseudo), = result.pseudopotentials.items()
        return cls(
            element=element, uid=result.uid, energy=result.energy, magnetization=result.total_magnetization,
            pseudo_md5=pseudo["md5"], pseudo_file=pseudo["filename"], settings_key=key,
            attempts=len(result.attempts), scf_iterations=sum(a.scf_iterations or 0 for a in result.attempts),
            wall_time=result.wall_time,
            spin_states={f"{branch.start[0]:g}": branch.energy for branch in result.magnetic_branches},
        )


def _element(element: str) -> str:
    if element not in atomic_numbers or atomic_numbers[element] == 0:
        raise ValueError(f"unknown element {element!r}: give a chemical symbol such as Fe")
    return element


def atom_box(config: DFTConfig) -> tuple[float, float, float]:
    """ATOM_BOX, widened when the config's vacuum threshold would not see it as vacuum on every axis."""
    grow = max(0.0, config.vacuum_threshold + BOX_MARGIN - min(ATOM_BOX))
    return tuple(edge + grow for edge in ATOM_BOX)  # type: ignore[return-value]


def isolated_atom(element: str, config: DFTConfig | None = None) -> Atoms:
    """A lone atom at the centre of a periodic box that the factory runs at Γ (vacuum along every axis)."""
    box = atom_box(config or DFTConfig())
    return Atoms(_element(element), positions=[[edge / 2 for edge in box]], cell=box, pbc=True)


# Settings that change an isolated atom's energy (mixing, conv_thr and the like only change how it converges).
KEY_SETTINGS = {"system": ("ecutwfc", "ecutrho", "occupations", "smearing", "degauss", "nspin", "tot_magnetization")}


def settings_key(element: str, config: DFTConfig | None = None, generator: InputGenerator | None = None) -> str:
    """sha256 of what fixes an element's E0: family, its pseudopotential file and md5, cutoffs, smearing, degauss,
    spin treatment, every extra `system` setting of the config (e.g. input_dft), and the box."""
    generator = generator or InputGenerator(config)
    atoms = isolated_atom(element, generator.config)
    pw_input = generator.generate(atoms)
    system = pw_input.parameters["system"]
    data = {
        "family": generator.family.name, "functional": generator.family.functional,
        "pseudo": [pw_input.pseudopotentials[element], pw_input.pseudo_md5[element]],
        "system": {key: value for key, value in sorted(system.items())
                   if key in KEY_SETTINGS["system"] or key in generator.config.pw_parameters.get("system", {})},
        "starting_magnetization": pw_input.starting_magnetization,
        "box": [round(x, 6) for x in atoms.cell.lengths()],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def e0_uid(element: str, key: str) -> str:
    """The uid of an element's E0 calculation under settings `key` (a valid check_uid name)."""
    return f"e0-{_element(element)}-{key[:12]}"


def compute_e0s(elements: Iterable[str], config: DFTConfig | None = None, runner=None) -> dict[str, E0]:
    """Run each element's isolated atom with QERunner (recovery included); raises DFTFatalError on a failure.
    `runner` defaults to QERunner(config)."""
    from qe_factory.engine.runner import QERunner

    runner = runner or QERunner(config)
    e0s = {}
    for element in dict.fromkeys(elements):
        key = settings_key(element, generator=runner.generator)
        result = runner.run(isolated_atom(element, runner.config), uid=e0_uid(element, key))
        e0s[element] = E0.from_result(result, key)
    return e0s


class Reference(NamedTuple):
    """An E0 calculation a data set needs: the element, the config it runs with (the data set's, cutoffs fixed to
    those of the structures it is referenced by), its settings key and uid."""

    element: str
    config: DFTConfig
    key: str
    uid: str


def element_references(elements: Iterable[str], config: DFTConfig) -> list[Reference]:
    """The Reference of each element with `config` as it is (its cutoffs, or each element's own)."""
    keys = {element: settings_key(element, config) for element in dict.fromkeys(elements)}
    return [Reference(element, config, key, e0_uid(element, key)) for element, key in keys.items()]


def references_for(structures: Iterable[Atoms], config: DFTConfig) -> dict[str, Reference]:
    """uid → Reference of every E0 the structures' labels need. With cutoffs left to the family (the default), a
    structure's cutoffs are the largest of its elements', so an element gets one E0 per distinct cutoff pair among
    the structures holding it (O in FeO is referenced at Fe's cutoffs)."""
    generator = InputGenerator(config)
    references: dict[str, Reference] = {}
    for elements in {frozenset(atoms.get_chemical_symbols()) for atoms in structures}:
        pseudos = resolve_pseudos(generator.family, sorted(elements))
        cutoffs = dict(ecutwfc=config.ecutwfc or max(p.cutoff_wfc for p in pseudos.values()),
                       ecutrho=config.ecutrho or max(p.cutoff_rho for p in pseudos.values()))
        fixed = config.with_changes(**cutoffs)
        for element in sorted(elements):
            key = settings_key(element, fixed)
            references.setdefault(e0_uid(element, key), Reference(element, fixed, key, e0_uid(element, key)))
    return references


REFERENCE_UID = re.compile(r"^e0-([A-Z][a-z]?)-[0-9a-f]{12}$")


def is_reference(result: DFTResult) -> bool:
    """Whether a result is an isolated-atom reference (by its uid, e0_uid's form)."""
    return bool(REFERENCE_UID.match(result.uid)) and len(result.structure.numbers) == 1
