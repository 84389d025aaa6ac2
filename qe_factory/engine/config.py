"""Configuration of the factory: one pydantic model, loadable from YAML and environment variables."""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from ase.io.espresso import pw_keys
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from qe_factory.engine.document import MSONProtocol

NAMELISTS = ("control", "system", "electrons")
DEPRECATED_KPOINT_KEY = "kpoint_density"  # the old name of DFTConfig.kpoint_spacing
# pw.x keys the factory sets itself: given in pw_parameters they would make the recorded provenance untrue
OWNED_KEYS = {
    "control": ("calculation", "pseudo_dir", "outdir", "prefix", "wfcdir", "restart_mode", "tstress", "tprnfor"),
    "system": ("nat", "ntyp", "ibrav", "celldm", "a", "b", "c", "cosab", "cosac", "cosbc"),
    "electrons": ("startingpot", "startingwfc"),
}

# The pw.x keys a namelist of pw_parameters may hold: ASE's list (ase.io.espresso.pw_keys, as QE 7.x documents them,
# as quacc checks them) and the pw.x 6.7 keys it no longer has, each found accepted by the installed pw.x 6.7's
# namelist reader (DFT+U in the 6.x form, FCP in the 6.x form, la2F). Matched case-insensitively and without an
# index: Hubbard_U(1) is hubbard_u. Keys only QE 7.x knows (e.g. exx_maxstep, nbnd_cond, lfcp) pass here and are
# still refused by a pw.x 6.7 (BAD_INPUT): the check is against typos, not against the pw.x version.
PW_6_7_KEYS = {
    "control": ("lfcpopt", "lfcpdyn"),
    "system": (
        "lda_plus_u", "lda_plus_u_kind", "hubbard_u", "hubbard_j0", "hubbard_j", "hubbard_v", "hubbard_u_back",
        "hubbard_alpha_back", "hubbard_parameters", "u_projection_type", "backall", "lback", "l1back", "la2f",
        "fcp_mu",
    ),
    "electrons": (),
}
PW_KEYS = {nl: frozenset(pw_keys[nl]) | frozenset(PW_6_7_KEYS[nl]) for nl in NAMELISTS}
PW_NAMELISTS_NOT_WRITTEN = tuple(nl for nl in pw_keys if nl not in NAMELISTS)  # ions, cell, ...: not for an scf


def unknown_pw_key(namelist: str, key: str) -> str | None:
    """Why `key` cannot be given in pw.x's namelist `namelist` (None when it can): the message names the key, its
    namelist and the closest valid key (or the namelist the key belongs to)."""
    base = re.sub(r"\(.*\)$", "", str(key)).strip().lower()
    if base in PW_KEYS[namelist]:
        return None
    message = f"unknown pw.x key {key!r} in namelist {namelist!r}"
    elsewhere = [nl for nl in pw_keys if nl != namelist and base in pw_keys[nl]]
    if elsewhere:
        return f"{message}: {key!r} belongs to namelist {elsewhere[0]!r}"
    close = difflib.get_close_matches(base, sorted(PW_KEYS[namelist]), n=1)
    return f"{message} (did you mean {close[0]!r}?)" if close else message


def unknown_pw_namelist(namelist: Any) -> str | None:
    """Why `namelist` cannot be a key of pw_parameters (None when it can)."""
    if namelist in NAMELISTS:
        return None
    if isinstance(namelist, str) and namelist.lower() in PW_NAMELISTS_NOT_WRITTEN:
        return (f"pw.x namelist {namelist!r} is not written by the factory (it runs only calculation='scf'): "
                f"pw_parameters takes {', '.join(NAMELISTS)}")
    close = difflib.get_close_matches(str(namelist).lower(), NAMELISTS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown pw.x namelist {namelist!r} in pw_parameters{hint}: use one of {', '.join(NAMELISTS)}"


class ConfigError(ValueError):
    """A configuration file or value was refused; the message names the key."""


class SanitizerThresholds(BaseModel):
    """Limits beyond which a result is not physical enough to become a training label."""

    model_config = ConfigDict(extra="forbid")

    max_force: PositiveFloat = Field(1000.0, description="eV/Å, largest |F| of any atom")
    max_stress: PositiveFloat = Field(1000.0, description="GPa, largest |stress component|")
    max_stress_asymmetry: PositiveFloat = Field(0.5, description="GPa, largest |s_ij - s_ji|")
    min_energy_per_atom: float = Field(-1.0e5, description="eV per atom")
    max_energy_per_atom: float = Field(0.0, description="eV per atom; bound pseudo-atoms have negative energies")
    max_negative_rho: PositiveFloat = Field(0.1, description="electrons of negative charge in the final density")
    # cohesive energy (E - sum of the isolated-atom energies E0) / N: why these bounds, in sanitize.cohesive_check
    min_cohesive_energy: float = Field(-10.0, description="eV/atom; no known solid is bound more strongly")
    max_cohesive_energy: float = Field(2.0, description="eV/atom above the free atoms")
    # chemistry-based force bound of an atom, from its closest contact (sanitize.contact_force_bound)
    contact_force: PositiveFloat = Field(15.0, description="eV/Å allowed at (or beyond) the covalent radii sum")
    contact_force_growth: float = Field(
        5.0, ge=0, description="the bound grows as exp(growth × (1 − d / covalent radii sum)) as the contact shortens"
    )
    min_contact_ratio: float = Field(
        0.7, ge=0, le=1, description="fraction of the covalent radii sum below which the bound grows no further"
    )
    davidson_noise: PositiveFloat = Field(
        1e-13, description="Ry: 'eigenvalues not converged' in the final SCF iteration is a note, not trouble, when "
        "that iteration's diagonalization threshold (ethr) was at most this (1e-13: pw.x's floor, reached after a "
        "restart or with a very tight conv_thr, where Davidson misses by numerical noise)"
    )
    davidson_fraction: float = Field(
        0.01, ge=0, le=1, description="and when at most this fraction of the Kohn-Sham eigenvalues (states × k-points) "
        "was left unconverged (pw.x's user guide: trouble when they are a significant part of the total)"
    )


class ExecutionSettings(BaseSettings):
    """Where and how pw.x runs on this machine. They belong to the worker, never to a workflow: a Firework
    carries only what is computed (DFTConfig); the worker that runs it supplies these (its own
    `QE_FACTORY_<KEY>` environment variables, or the settings the `qe-factory` command was given)."""

    model_config = SettingsConfigDict(env_prefix="QE_FACTORY_", extra="forbid", validate_default=True)

    command: str = Field("pw.x", description="pw.x executable; may start with a launcher (mpirun/srun ...)")
    mpi_launcher: str = Field("mpirun", description="MPI launcher used when more than one rank runs")
    mpi_ranks: PositiveInt | None = Field(None, description="MPI ranks; None = SLURM allocation or all cores")
    omp_threads: PositiveInt = 1
    timeout: PositiveInt = Field(3600, description="wall-clock limit of one pw.x run, seconds")
    work_dir: Path = Field(Path("qe_runs"), description="each structure runs in work_dir/run_<uid>/")
    keep_files: bool = Field(False, description="keep wavefunctions and the scratch dir after a run")
    pilot: bool = Field(False, description="runs in a pilot host (many launches per SLURM job): a cancelled job "
                        "ends the host, not the structure, whose run then goes back to READY")


EXECUTION_KEYS = tuple(ExecutionSettings.model_fields)

# Named presets of a data set's settings (`protocol: NAME` in a config file, `--protocol NAME`), under what is given
PRESETS: dict[str, dict[str, Any]] = {
    # a quick try of the whole pipeline (seconds per small cell): low cutoffs, coarse k-points — never a data set
    "fast-test": {"ecutwfc": 25.0, "ecutrho": 200.0, "allow_low_cutoffs": True, "kpoint_spacing": 0.5},
    # SSSP efficiency 1.3's files and cutoffs (`qe-factory pseudos install sssp-efficiency-1.3 ARCHIVE` first)
    "sssp-efficiency": {"pseudo_family": "sssp-efficiency-1.3"},
}


class DFTConfig(MSONProtocol, BaseSettings):
    """What is computed, identically for every structure of a data set, and how hard recovery tries.

    Values come from (highest priority first) keyword arguments, `QE_FACTORY_<KEY>` environment
    variables, then the defaults below. `DFTConfig.from_yaml(path)` reads a YAML mapping. The execution keys
    (command, mpi_launcher, mpi_ranks, omp_threads, timeout, work_dir, keep_files) may be given here too, flat as
    the spec has them; they land in `execution`, which is left out when the config is serialised with a workflow.
    """

    model_config = SettingsConfigDict(env_prefix="QE_FACTORY_", extra="forbid", validate_default=True)

    execution: ExecutionSettings = Field(default_factory=ExecutionSettings, exclude=True)
    # recovery policy
    recoverable: bool = True
    max_retries: PositiveInt = 5

    # physics
    pseudo_family: str = Field(
        "debian-pbe", description="family name (bundled, or installed by `qe-factory pseudos install`) or SSSP JSON"
    )
    pseudo_dir: Path | None = Field(None, description="directory of the UPF files; None = the family's default")
    kpoint_spacing: PositiveFloat = Field(
        0.15, description="largest reciprocal-space spacing between k-points, 1/Å, 2π included (smaller: denser); "
        "was kpoint_density, still accepted with a DeprecationWarning"
    )
    vacuum_threshold: PositiveFloat = Field(
        6.0, description="Å; along an axis where the atoms leave a wider gap (vacuum), 1 k-point; all three: Γ"
    )
    smearing: Literal["cold", "mv", "gaussian", "mp", "fd"] = "cold"
    degauss: PositiveFloat = Field(0.02, description="Ry")
    mixing_beta: float = Field(0.7, gt=0, le=1)
    electron_maxstep: PositiveInt = 100
    conv_thr_per_atom: PositiveFloat = Field(2e-10, description="Ry per atom")
    elements: list[str] = Field(
        default_factory=list, description="the elements the data set may hold: its one cutoff pair is the largest "
        "any of them asks for (engine/protocol.py); empty: the elements of the home's first submission"
    )
    ecutwfc: PositiveFloat | None = Field(None, description="Ry; None = max over the elements' advice")
    ecutrho: PositiveFloat | None = Field(None, description="Ry; None = max over the elements' advice")
    allow_low_cutoffs: bool = Field(
        False, description="accept ecutwfc/ecutrho below the family's values (quick tests); refused by default"
    )
    memory_budget_gb: PositiveFloat = Field(
        16.0, description="GB one structure's pw.x run may need (all its ranks); a structure whose estimate "
        "exceeds it is refused before pw.x runs"
    )
    min_distance_factor: float = Field(
        0.5, ge=0, description="refuse atoms closer than this fraction of their covalent radii sum; a "
        "diagonalization failure below 1.5 times it is blamed on the geometry (not retried)"
    )
    magnetic_start: Literal["hint", "given"] = Field(
        "hint", description="the Atoms' initial moments: 'given' = run as given; 'hint' = also try a high-spin start "
        "(same signs) when a start below the element's default moment or a collapsed moment suggests another "
        "magnetic branch, and keep the lower-energy solution"
    )
    sanitizer: SanitizerThresholds = Field(default_factory=SanitizerThresholds)
    pw_parameters: dict[Literal["control", "system", "electrons"], dict[str, Any]] = Field(
        default_factory=dict, description="extra pw.x namelist settings, e.g. {'electrons': {'electron_maxstep': 5}}"
    )

    @field_validator("elements")
    @classmethod
    def _chemical_symbols(cls, value: list[str]) -> list[str]:
        from ase.data import atomic_numbers

        unknown = [element for element in value if atomic_numbers.get(element, 0) == 0]
        if unknown:
            raise ValueError(f"unknown element(s) {unknown}: give chemical symbols such as Fe")
        return sorted(set(value))

    @field_validator("pw_parameters", mode="before")
    @classmethod
    def _known_pw_keys(cls, value: Any) -> Any:
        """A namelist or key pw.x does not know (a typo: ecutwfcc) is refused here, by name, rather than on a
        worker as BAD_INPUT; the types are checked afterwards."""
        if not isinstance(value, dict):
            return value
        problems = [problem for problem in map(unknown_pw_namelist, value) if problem]
        problems += [
            problem for namelist, values in value.items() if namelist in NAMELISTS and isinstance(values, dict)
            for problem in (unknown_pw_key(namelist, key) for key in values) if problem
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("pw_parameters")
    @classmethod
    def _no_owned_keys(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Keys the factory owns would make its provenance lie (another pseudo_dir, another scratch, a relax)."""
        owned = sorted(f"{nl}.{key}" for nl, values in value.items() for key in values if key in OWNED_KEYS.get(nl, ()))
        if owned:
            raise ValueError(
                f"{', '.join(owned)} are set by the factory (pseudopotentials: pseudo_family/pseudo_dir; scratch: "
                "work_dir; calculation is always 'scf'; restarts: the recovery) and cannot be given in pw_parameters"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _renamed_kpoint_density(cls, values: Any) -> Any:
        """`kpoint_density` (keyword, YAML, a stored workflow, QE_FACTORY_KPOINT_DENSITY) was a spacing under a name
        that said the opposite: it is read as `kpoint_spacing`, with a DeprecationWarning."""
        if not isinstance(values, dict):
            return values
        old = values.get(DEPRECATED_KPOINT_KEY)
        if old is None and "kpoint_spacing" not in values:
            old = os.environ.get(f"QE_FACTORY_{DEPRECATED_KPOINT_KEY.upper()}")
        if old is None:
            return values
        values = {key: value for key, value in values.items() if key != DEPRECATED_KPOINT_KEY}
        if "kpoint_spacing" in values and float(values["kpoint_spacing"]) != float(old):
            raise ValueError(f"kpoint_density={old} and kpoint_spacing={values['kpoint_spacing']} disagree: give "
                             "kpoint_spacing only (kpoint_density is its old name)")
        warnings.warn("kpoint_density is deprecated: it is a spacing (1/Å, smaller is denser); call it "
                      "kpoint_spacing", DeprecationWarning, stacklevel=2)
        values.setdefault("kpoint_spacing", old)
        return values

    @property
    def kpoint_density(self) -> float:
        """Deprecated name of kpoint_spacing."""
        warnings.warn("kpoint_density is deprecated: use kpoint_spacing", DeprecationWarning, stacklevel=2)
        return self.kpoint_spacing

    @model_validator(mode="before")
    @classmethod
    def _gather_execution(cls, values: Any) -> Any:
        """Flat execution keys (the spec's `DFTConfig(command=..., timeout=...)`) go into `execution`."""
        if not isinstance(values, dict) or not any(key in values for key in EXECUTION_KEYS):
            return values
        values = dict(values)
        given = values.pop("execution", None)
        flat = {key: values.pop(key) for key in EXECUTION_KEYS if key in values}
        base = given.model_dump() if isinstance(given, ExecutionSettings) else dict(given or {})
        values["execution"] = ExecutionSettings(**{**base, **flat})
        return values

    @property
    def blame_geometry_below(self) -> float:
        """Closest contact (fraction of the covalent radii sum) below which a diagonalization failure is the
        geometry's fault: 1.5 × min_distance_factor (0.75 by default)."""
        return 1.5 * self.min_distance_factor

    def with_changes(self, **changes: Any) -> DFTConfig:
        """A validated copy with some fields changed (execution keys included)."""
        values = {**self.model_dump(), "execution": self.execution.model_dump(), **changes}
        return self.create(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> DFTConfig:
        """Read a YAML mapping of the fields above; unknown keys and bad values raise ConfigError."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        return cls.create(**{**data, **overrides}, _source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DFTConfig:
        """The config a workflow document holds. FireWorks rebuilds it at every look at a Firework, and a settings
        model reads the environment each time it is built (~1 ms): each distinct document is built once per
        process, and a copy handed out."""
        return _config_from_json(cls, json.dumps(data, sort_keys=True, default=str)).model_copy()

    @classmethod
    def create(cls, _source: str = "settings", **values: Any) -> DFTConfig:
        """Build a config, turning pydantic's errors into one ConfigError naming each bad key. `protocol=NAME`:
        a named preset (PRESETS) under the other values."""
        if (preset := values.pop("protocol", None)) is not None:
            if preset not in PRESETS:
                raise ConfigError(f"unknown protocol preset {preset!r}: choose one of {', '.join(PRESETS)}")
            values = {**PRESETS[preset], **values}
        flat = {key: values.pop(key) for key in EXECUTION_KEYS if key in values}
        errors, execution = [], values.pop("execution", None)
        if flat or execution is not None:
            try:
                base = execution.model_dump() if isinstance(execution, ExecutionSettings) else dict(execution or {})
                values["execution"] = ExecutionSettings(**{**base, **flat})
            except ValidationError as exc:
                errors += exc.errors()
        try:
            config = cls(**values)
        except ValidationError as exc:
            errors += exc.errors()
        if errors:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '?'}: {err['msg']}" for err in errors)
            raise ConfigError(f"invalid {_source}: {problems}") from None
        return config


@functools.lru_cache(maxsize=32)
def _config_from_json(cls: type[DFTConfig], text: str) -> DFTConfig:
    return MSONProtocol.from_dict.__func__(cls, json.loads(text))  # type: ignore[attr-defined]
