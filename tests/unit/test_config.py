"""DFTConfig: defaults, YAML, environment variables, and refusal of bad keys and values."""

from __future__ import annotations

import pytest

from qe_factory import ConfigError, DFTConfig


def test_defaults_follow_the_spec():
    cfg = DFTConfig()
    assert (cfg.execution.timeout, cfg.recoverable, cfg.max_retries, cfg.mixing_beta) == (3600, True, 5, 0.7)
    assert (cfg.kpoint_spacing, cfg.smearing, cfg.degauss) == (0.15, "cold", 0.02)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("kpoint_spacing: 0.3\ntimeout: 60\nsanitizer:\n  max_force: 50\n")
    cfg = DFTConfig.from_yaml(path, timeout=90)
    assert (cfg.kpoint_spacing, cfg.execution.timeout, cfg.sanitizer.max_force) == (0.3, 90, 50)


def test_unknown_key_is_refused_by_name(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("kpoint_densty: 0.3\n")
    with pytest.raises(ConfigError, match="kpoint_densty"):
        DFTConfig.from_yaml(path)
    path.write_text("sanitizer:\n  max_forse: 3\n")
    with pytest.raises(ConfigError, match="max_forse"):
        DFTConfig.from_yaml(path)


def test_bad_values_are_refused_by_name(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("mixing_beta: 1.5\ntimeout: -3\n")
    with pytest.raises(ConfigError) as info:
        DFTConfig.from_yaml(path)
    assert "mixing_beta" in str(info.value) and "timeout" in str(info.value)
    with pytest.raises(ConfigError, match="smearing"):
        DFTConfig.create(smearing="hot")


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        DFTConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="cannot read"):
        DFTConfig.from_yaml(tmp_path / "absent.yaml")


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("QE_FACTORY_TIMEOUT", "120")
    monkeypatch.setenv("QE_FACTORY_COMMAND", "/opt/qe/bin/pw.x")
    cfg = DFTConfig()
    assert (cfg.execution.timeout, cfg.execution.command) == (120, "/opt/qe/bin/pw.x")
    monkeypatch.setenv("QE_FACTORY_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="timeout"):
        DFTConfig.create()


def test_execution_settings_stay_on_the_machine(monkeypatch):
    """Flat execution keys land in `execution`, which a serialised config (a Firework's) never carries: the
    worker that rebuilds it uses its own."""
    cfg = DFTConfig(kpoint_spacing=0.3, mpi_ranks=3, work_dir="/somewhere", command="mpirun -np 3 pw.x")
    assert (cfg.execution.mpi_ranks, str(cfg.execution.work_dir), cfg.execution.command) == (
        3, "/somewhere", "mpirun -np 3 pw.x"
    )
    document = cfg.as_dict()
    assert not set(document) & {"execution", "mpi_ranks", "work_dir", "command", "timeout"}
    monkeypatch.setenv("QE_FACTORY_MPI_RANKS", "7")
    monkeypatch.setenv("QE_FACTORY_KPOINT_SPACING", "0.9")  # the worker's physics settings do not count
    rebuilt = DFTConfig.from_dict(document)
    assert (rebuilt.kpoint_spacing, rebuilt.execution.mpi_ranks, rebuilt.execution.command) == (0.3, 7, "pw.x")
    assert cfg.with_changes(keep_files=True, degauss=0.01).execution.keep_files
    with pytest.raises(ConfigError, match="timeout.*bogus|bogus.*timeout"):
        DFTConfig.create(timeout=-1, bogus=2)


def test_kpoint_density_is_the_deprecated_name_of_kpoint_spacing(tmp_path, monkeypatch):
    """The old name still works everywhere a config comes from (keyword, YAML, environment, a stored workflow's
    document), with a DeprecationWarning; both names with different values are refused."""
    (tmp_path / "old.yaml").write_text("kpoint_density: 0.3\n")
    with pytest.warns(DeprecationWarning, match="kpoint_spacing"):
        assert DFTConfig(kpoint_density=0.3).kpoint_spacing == 0.3
    with pytest.warns(DeprecationWarning):
        assert DFTConfig.from_yaml(tmp_path / "old.yaml").kpoint_spacing == 0.3
    stored = DFTConfig(kpoint_spacing=0.4).as_dict()
    stored["kpoint_density"] = stored.pop("kpoint_spacing")
    with pytest.warns(DeprecationWarning):
        assert DFTConfig.from_dict(stored).kpoint_spacing == 0.4
    monkeypatch.setenv("QE_FACTORY_KPOINT_DENSITY", "0.5")
    with pytest.warns(DeprecationWarning):
        assert DFTConfig().kpoint_spacing == 0.5
    assert DFTConfig(kpoint_spacing=0.2).kpoint_spacing == 0.2  # the new name wins over the old environment variable
    with pytest.raises(ConfigError, match="disagree"):
        DFTConfig.create(kpoint_density=0.3, kpoint_spacing=0.2)
    with pytest.warns(DeprecationWarning):
        assert DFTConfig(kpoint_spacing=0.2).kpoint_density == 0.2
