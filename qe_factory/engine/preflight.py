"""Refusals of a structure's nominal pw.x input before pw.x runs: known traps and the memory budget.

Each raises an InputError (one of runner.REFUSALS: the structure is refused alone, with the reason and the numbers).
"""

from __future__ import annotations

from ase import Atoms

from qe_factory.engine.inputs import InputError, InputGenerator, PwInput
from qe_factory.engine.memory import check_memory, estimate_memory
from qe_factory.engine.pseudos import ResolvedPseudo

# Elements that are not metals in their elemental form (non-metals, noble gases, and the semiconducting metalloids).
NON_METALS = frozenset({
    "H", "He", "B", "C", "N", "O", "F", "Ne", "Si", "P", "S", "Cl", "Ar",
    "Ge", "Se", "Br", "Kr", "Te", "I", "Xe", "At", "Rn",
})


def check_cutoffs(pw_input: PwInput, pseudos: dict[str, ResolvedPseudo]) -> None:
    """Refuse cutoffs below the family's value for any element (the pseudopotential's suggested minimum): such a
    label is off by an unknown amount (bcc Fe at 25/200 Ry instead of 65/785: ~0.4 eV/atom), and the SCF failures it
    causes are not the mixing's to repair."""
    system = pw_input.parameters["system"]
    low = [
        f"{name}={system[name]:g} < {value:g} for {el}"
        for el, p in sorted(pseudos.items())
        for name, value in (("ecutwfc", p.cutoff_wfc), ("ecutrho", p.cutoff_rho))
        if float(system[name]) < value
    ]
    if low:
        raise InputError(
            f"cutoffs below the pseudopotential family's suggested minimum ({'; '.join(low)} Ry): the labels would "
            "be unconverged; raise them, or set allow_low_cutoffs: true for a quick test"
        )


def metallic_reason(atoms: Atoms, pw_input: PwInput, pseudos: dict[str, ResolvedPseudo]) -> str | None:
    """Why the structure is (likely) a metal, or None. Two cheap rules: an odd number of valence electrons with no
    fixed tot_magnetization (a band left half filled), or, for a periodic solid (not a molecule in a box), only
    elements that are metals in their elemental form (a metal or an alloy: no non-metal to open a gap). Oxides and
    other compounds of metals with non-metals pass."""
    electrons = sum(pseudos[s].header.z_valence for s in atoms.get_chemical_symbols())
    if round(electrons) % 2 == 1 and pw_input.namelist_value("system", "tot_magnetization") is None:
        return f"{electrons:g} valence electrons per cell: an odd count leaves a band half filled"
    elements = sorted(set(atoms.get_chemical_symbols()))
    if not pw_input.isolated and not NON_METALS.intersection(elements):
        return f"{'-'.join(elements)} holds only elements that are metals in their elemental form"
    return None


def check_occupations(atoms: Atoms, pw_input: PwInput, pseudos: dict[str, ResolvedPseudo]) -> None:
    """Refuse non-smeared occupations (e.g. pw_parameters' occupations='fixed') for a likely metal: its SCF
    oscillates at the Fermi level, and no recovery step can smear it (the degauss rung has no effect then)."""
    occupations = pw_input.namelist_value("system", "occupations", "fixed")
    if occupations == "smearing":
        return
    reason = metallic_reason(atoms, pw_input, pseudos)
    if reason is not None:
        raise InputError(f"occupations={occupations!r} refused for {atoms.get_chemical_formula()}: {reason}; "
                         "metals need occupations='smearing' (the default)")


def nominal_input(atoms: Atoms, generator: InputGenerator) -> PwInput:
    """The structure's nominal pw.x input, refused (InputError) when it falls in a known trap or would need more
    memory than the configured budget."""
    config = generator.config
    pw_input = generator.generate(atoms)
    pseudos = generator.pseudos(atoms)
    if not config.allow_low_cutoffs:
        check_cutoffs(pw_input, pseudos)
    check_occupations(atoms, pw_input, pseudos)
    check_memory(estimate_memory(atoms, pw_input, pseudos), config.memory_budget_gb)
    return pw_input
