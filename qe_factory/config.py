"""Configuration of the factory: one pydantic model, loadable from YAML and environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

NAMELISTS = ("control", "system", "electrons")


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


class DFTConfig(BaseSettings):
    """How every pw.x calculation is set up and run.

    Values come from (highest priority first) keyword arguments, `QE_FACTORY_<KEY>` environment
    variables, then the defaults below. `DFTConfig.from_yaml(path)` reads a YAML mapping.
    """

    model_config = SettingsConfigDict(env_prefix="QE_FACTORY_", extra="forbid", validate_default=True)

    # execution
    command: str = Field("pw.x", description="pw.x executable; may start with a launcher (mpirun/srun ...)")
    mpi_launcher: str = Field("mpirun", description="MPI launcher used when more than one rank runs")
    mpi_ranks: PositiveInt | None = Field(None, description="MPI ranks; None = SLURM allocation or all cores")
    omp_threads: PositiveInt = 1
    timeout: PositiveInt = Field(3600, description="wall-clock limit of one pw.x run, seconds")
    work_dir: Path = Path("qe_runs")
    keep_files: bool = Field(False, description="keep wavefunctions and the scratch dir after a run")
    recoverable: bool = True
    max_retries: PositiveInt = 5

    # physics
    pseudo_family: str = Field("debian-pbe", description="bundled family name or path to an SSSP-style JSON")
    pseudo_dir: Path | None = Field(None, description="directory of the UPF files; None = the family's default")
    kpoint_density: PositiveFloat = Field(0.15, description="max reciprocal-space spacing, 1/Å, 2π included")
    smearing: Literal["cold", "mv", "gaussian", "mp", "fd"] = "cold"
    degauss: PositiveFloat = Field(0.02, description="Ry")
    mixing_beta: float = Field(0.7, gt=0, le=1)
    electron_maxstep: PositiveInt = 100
    conv_thr_per_atom: PositiveFloat = Field(2e-10, description="Ry per atom")
    ecutwfc: PositiveFloat | None = Field(None, description="Ry; None = max over the elements' advice")
    ecutrho: PositiveFloat | None = Field(None, description="Ry; None = max over the elements' advice")
    min_distance_factor: float = Field(
        0.5, ge=0, description="refuse atoms closer than this fraction of their covalent radii sum"
    )
    sanitizer: SanitizerThresholds = Field(default_factory=SanitizerThresholds)
    pw_parameters: dict[Literal["control", "system", "electrons"], dict[str, Any]] = Field(
        default_factory=dict, description="extra pw.x namelist settings, e.g. {'electrons': {'electron_maxstep': 5}}"
    )

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
    def create(cls, _source: str = "settings", **values: Any) -> DFTConfig:
        """Build a config, turning pydantic's errors into one ConfigError naming each bad key."""
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '?'}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"invalid {_source}: {problems}") from None
