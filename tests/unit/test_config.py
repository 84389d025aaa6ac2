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


def test_a_misspelt_pw_key_is_refused_with_the_closest_valid_key():
    """ecutwfcc (a typo) would pass submit and fail only on a worker, as BAD_INPUT: refused here, by name."""
    with pytest.raises(ConfigError, match=r"'ecutwfcc' in namelist 'system' \(did you mean 'ecutwfc'\?\)"):
        DFTConfig.create(pw_parameters={"system": {"ecutwfcc": 30}})
    with pytest.raises(ConfigError, match="'conv_thr' in namelist 'system': 'conv_thr' belongs to namelist 'electr"):
        DFTConfig.create(pw_parameters={"system": {"conv_thr": 1e-8}})
    with pytest.raises(ConfigError, match=r"unknown pw.x key 'xyzzy' in namelist 'electrons'$"):  # nothing close
        DFTConfig.create(pw_parameters={"electrons": {"xyzzy": 1}})


def test_valid_pw_keys_are_accepted_in_any_case_and_indexed():
    given = {"system": {"input_dft": "pbesol", "Hubbard_U(1)": 3.0, "lda_plus_u": True,
                        "starting_magnetization(2)": 0.5},
             "electrons": {"mixing_ndim": 12, "diago_full_acc": True}, "control": {"verbosity": "high"}}
    assert DFTConfig.create(pw_parameters=given).pw_parameters == given


def test_an_unknown_namelist_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"namelist 'sytem' in pw_parameters \(did you mean 'system'\?\)"):
        DFTConfig.create(pw_parameters={"sytem": {"ecutwfc": 30}})
    with pytest.raises(ConfigError, match="namelist 'ions' is not written by the factory"):
        DFTConfig.create(pw_parameters={"ions": {"ion_dynamics": "bfgs"}})


def test_every_pw_key_the_engine_sets_is_a_known_one():
    """The defaults, a lone atom's and a slab's keys, and every key the recovery and the runner set pass the check
    that user keys face (a key missing from the list would refuse the factory's own settings given back, e.g. by
    benchmarks/recovery.py's direct runs)."""
    from ase.build import bulk, fcc111

    from qe_factory.engine.config import unknown_pw_key
    from qe_factory.engine.recovery import LADDERS, RESTART_PARAMETERS, more_steps
    from qe_factory.engine.references import isolated_atom
    from qe_factory.engine.runner import QERunner

    runner = QERunner(DFTConfig(ecutwfc=25, ecutrho=200, allow_low_cutoffs=True))
    iron = bulk("Fe")
    iron.set_initial_magnetic_moments([2.0])
    keys = set()
    for atoms in (bulk("Si"), iron, fcc111("Cu", (1, 1, 3), vacuum=6.0), isolated_atom("Fe"), isolated_atom("Ni")):
        pw_input, _ = runner.attempt_input(atoms, {})
        keys |= {(nl, key) for nl, values in pw_input.parameters.items() for key in values}
    corrections = [c for ladder in LADDERS.values() for c in ladder]
    corrections.append(more_steps(10))
    keys |= {(nl, key) for c in corrections for nl, values in c.changes.items() if nl != "run" for key in values}
    keys |= {(nl, key) for values in RESTART_PARAMETERS.values() for nl in values for key in values[nl]}
    assert {"conv_thr", "tot_magnetization", "max_seconds", "startingpot", "restart_mode"} <= {k for _, k in keys}
    assert [unknown_pw_key(nl, key) for nl, key in sorted(keys) if unknown_pw_key(nl, key)] == []
