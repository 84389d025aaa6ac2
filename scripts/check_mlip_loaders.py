#!/usr/bin/env python
"""Feed a qe-factory export to MACE's and NequIP's own data loaders and check what they would train on.

    qe-factory export -o mace/labels.extxyz                              # + mace/labels.e0s.json
    qe-factory export -o nequip/labels.extxyz --format nequip-extxyz     # + nequip/labels.nequip.yaml
    python scripts/check_mlip_loaders.py --mace mace/labels.extxyz --nequip nequip/labels.extxyz \
        [--runs factory/runs] [--mace-python M/bin/python] [--nequip-python N/bin/python] [--train]

MACE (mace-torch 0.3.16): each `mace_run_train` command of README.md, parsed by MACE's own argument parser, loads the
file with get_dataset_from_xyz (what mace_run_train calls) and takes its E0s as mace_run_train does (the IsolatedAtom
frames, else get_atomic_energies of --E0s); each training configuration becomes MACE's AtomicData (the tensors it
trains on), and get_loss_fn says whether the stress is fitted. NequIP (0.19.1): examples/nequip.yaml, composed by
Hydra beside the export's `<name>.nequip.yaml` as `nequip-train -cp DIR -cn nequip.yaml` does, builds NequIP's
ASEDataModule (train + val + test frames) and NequIPGNNModel, whose per-type energy shifts must be the E0s. Each is
compared with the export itself (ASE's reader: REF_* keys, or the calculator results of nequip-extxyz; stress in
eV/Å³ with ASE's sign); the two exports with each other; with --runs, with each label's pw.out read by ASE's own
espresso-out reader (CODATA 2006, scaled to ase.units' CODATA 2014) and with pw.x's printed pressure. --train also
runs every README command for one epoch (mace_run_train with --batch_size=2; nequip-train with trainer.max_epochs=1).

The two packages pin different e3nn releases, so they live in two venvs: each part runs in this interpreter, or in the
one given by --mace-python / --nequip-python (this script again, with --part). Needs neither qe_factory nor a home.
Prints a table of the checks and exits 1 if any failed. Not part of the test suite (CI installs no torch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols
from ase.io import read
from ase.units import GPa, create_units

ROOT = Path(__file__).resolve().parents[1]
Row = dict[str, Any]
TOLERANCE = {"energy": 1e-6, "forces": 1e-6, "stress": 1e-9, "e0": 1e-9}  # eV, eV/Å, eV/Å³, eV
# ase.units (CODATA 2014: the factory's labels) ÷ ASE's espresso-out reader (CODATA 2006, pw.x's own constants)
CODATA = {unit: create_units("2014")[unit] / create_units("2006")[unit] for unit in ("Ry", "Bohr")}


class Label(NamedTuple):
    """One frame of an export as ASE reads it, in the factory's units: eV, eV/Å, eV/Å³ (3×3, ASE's sign)."""

    uid: str
    numbers: tuple[int, ...]
    positions: np.ndarray
    energy: float
    forces: np.ndarray
    stress: np.ndarray
    config_type: str | None


def row(part: str, check: str, ok: bool, frames: int = 0, deviation: float | None = None,
        tolerance: float | None = None, note: str = "") -> Row:
    return {"part": part, "check": check, "ok": bool(ok), "frames": frames, "deviation": deviation,
            "tolerance": tolerance, "note": note}


def compare(part: str, check: str, pairs: list[tuple[Any, Any]], tolerance: float, note: str = "") -> Row:
    """The largest |a - b| over the pairs against `tolerance` (no pair at all is a failure)."""
    deviations = [float(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float)))) for a, b in pairs]
    deviation = max(deviations, default=float("inf"))
    return row(part, check, deviation <= tolerance, len(pairs), deviation, tolerance, note or ("" if pairs else
                                                                                              "nothing to compare"))


def is_isolated(atoms: Atoms) -> bool:
    """MACE's convention (mace.data.utils.load_from_xyz): one atom and config_type=IsolatedAtom."""
    return len(atoms) == 1 and atoms.info.get("config_type") == "IsolatedAtom"


def frame_key(numbers: Any, positions: Any) -> tuple:
    """What finds a loader's frame again in the file (the loaders keep no uid)."""
    return tuple(int(z) for z in np.ravel(numbers)), tuple(np.round(np.asarray(positions, float), 6).ravel())


def read_labels(path: Path, mace_keys: bool) -> list[Label]:
    """Every frame of an export: REF_energy/REF_forces/REF_stress (mace-extxyz), else ASE's calculator results."""
    labels = []
    for atoms in read(path, index=":"):
        if mace_keys:
            energy, forces = atoms.info["REF_energy"], atoms.arrays["REF_forces"]
            stress = np.reshape(atoms.info["REF_stress"], (3, 3))
        else:
            energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
        labels.append(Label(str(atoms.info.get("uid")), tuple(int(z) for z in atoms.numbers), atoms.positions.copy(),
                            float(energy), np.asarray(forces, float), np.asarray(stress, float),
                            atoms.info.get("config_type")))
    return labels


def isolated_e0s(labels: list[Label]) -> dict[int, float]:
    return {label.numbers[0]: label.energy for label in labels if len(label.numbers) == 1
            and label.config_type == "IsolatedAtom"}


def json_e0s(export: Path) -> dict[int, float]:
    """`<name>.e0s.json` beside the export (MACE's --E0s=<file>.json form: atomic numbers as keys)."""
    path = export.with_name(f"{export.stem}.e0s.json")
    return {int(z): float(e) for z, e in json.loads(path.read_text()).items()} if path.exists() else {}


def training_labels(labels: list[Label]) -> list[Label]:
    return [label for label in labels if not (len(label.numbers) == 1 and label.config_type == "IsolatedAtom")]


def e0_pairs(found: dict[int, float], wanted: dict[int, float]) -> list[tuple[float, float]]:
    """Pairs of E0s to compare; an element only one side has is a pair that cannot match."""
    return [(found.get(z, np.inf), wanted.get(z, -np.inf)) for z in sorted(set(found) | set(wanted))]


# --- MACE ---------------------------------------------------------------------------------------------------------

def readme_commands(readme: Path, program: str) -> list[list[str]]:
    """Every `program ...` command line of the README (backslash continuations joined, `#` comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", readme.read_text())
    return [shlex.split(line.strip(), comments=True) for line in text.splitlines()
            if line.strip().startswith(f"{program} ")]


def mace_part(args: argparse.Namespace) -> list[Row]:
    export = Path(args.mace).resolve()
    labels = read_labels(export, mace_keys=True)
    frames, stored = isolated_e0s(labels), json_e0s(export)
    rows = [compare("MACE", "IsolatedAtom frames = <name>.e0s.json", e0_pairs(frames, stored), TOLERANCE["e0"])]
    if stored:
        from mace.tools.scripts_utils import get_atomic_energies

        taken = get_atomic_energies(str(export.with_name(f"{export.stem}.e0s.json")), None, None)
        rows.append(compare("MACE", "--E0s=<name>.e0s.json as MACE reads it", e0_pairs(taken, stored),
                            TOLERANCE["e0"]))
    commands = readme_commands(Path(args.readme), "mace_run_train")
    if not commands:
        rows.append(row("MACE", "README commands", False, note=f"no mace_run_train command in {args.readme}"))
    for number, command in enumerate(commands, 1):
        rows += mace_command_rows(f"MACE #{number}", command[1:], export, labels, frames or stored)
        if args.train:
            rows.append(mace_train_row(f"MACE #{number}", command[1:], export, frames or stored))
    return rows


def mace_dataset(argv: list[str], export: Path):
    """README's arguments through MACE's own parser, and the file through get_dataset_from_xyz as mace_run_train
    calls it: (args, configurations for training (train + valid), E0s from IsolatedAtom frames)."""
    from mace import data, tools
    from mace.tools.scripts_utils import get_config_type_weights, get_dataset_from_xyz

    args = tools.build_default_arg_parser().parse_args(argv)
    tools.set_default_dtype(args.default_dtype)
    keys = data.KeySpecification()
    data.update_keyspec_from_kwargs(keys, vars(args))
    with tempfile.TemporaryDirectory() as work:
        collections, from_frames = get_dataset_from_xyz(
            work_dir=work, train_path=[str(export)], valid_path=None, valid_fraction=args.valid_fraction,
            config_type_weights=get_config_type_weights(args.config_type_weights), test_path=None, seed=args.seed,
            key_specification=keys, head_name="Default", keep_isolated_atoms=args.keep_isolated_atoms,
            prefix=args.name)
    return args, [*collections.train, *collections.valid], from_frames


def mace_e0s_row(part: str, args: argparse.Namespace, export: Path, configs: list, from_frames: dict,
                 e0s: dict[int, float]) -> Row:
    """The E0s mace_run_train ends up with: the frames' when the file has them (any --E0s is then ignored), else
    get_atomic_energies(--E0s)."""
    from mace.tools import AtomicNumberTable
    from mace.tools.scripts_utils import get_atomic_energies

    if from_frames:
        found = compare(part, "E0s MACE uses", e0_pairs(from_frames, e0s), TOLERANCE["e0"], "from IsolatedAtom frames")
        if args.E0s:  # what the command says is not what MACE does
            found |= {"ok": False, "note": f"--E0s={args.E0s} ignored: the IsolatedAtom frames win"}
        return found
    option = args.E0s
    if option and option.endswith(".json"):
        option = str(export.with_name(Path(option).name))
    try:
        zs = sorted({int(z) for config in configs for z in config.atomic_numbers})
        used = get_atomic_energies(option, configs, AtomicNumberTable(zs))
    except RuntimeError as error:
        return row(part, "E0s MACE uses", False, note=str(error)[:90])
    return compare(part, "E0s MACE uses", e0_pairs({int(z): float(e) for z, e in used.items()}, e0s),
                   TOLERANCE["e0"], f"from --E0s={args.E0s}")


def mace_command_rows(part: str, argv: list[str], export: Path, labels: list[Label],
                      e0s: dict[int, float]) -> list[Row]:
    from mace import data, modules, tools
    from mace.tools.scripts_utils import get_loss_fn

    args, configs, from_frames = mace_dataset(argv, export)
    rows = [mace_e0s_row(part, args, export, configs, from_frames, e0s)]
    loss = get_loss_fn(args, False, False)
    fits_stress = isinstance(loss, modules.WeightedEnergyForcesStressLoss) and args.stress_weight > 0
    rows.append(row(part, "loss fits the stress", fits_stress, note=f"--loss={args.loss}: {type(loss).__name__}"))
    wanted = {frame_key(label.numbers, label.positions): label for label in training_labels(labels)}
    kinds = sorted({config.config_type for config in configs})
    rows.append(row(part, "training frames = labels, no IsolatedAtom", len(configs) == len(wanted)
                    and "IsolatedAtom" not in kinds, len(configs), note=f"{len(wanted)} labels; config_types {kinds}"))
    zs = sorted({int(z) for config in configs for z in config.atomic_numbers})
    pairs: dict[str, list] = {"energy": [], "forces": [], "stress": []}
    weights = []
    for config in configs:
        label = wanted.get(frame_key(config.atomic_numbers, config.positions))
        atomic = data.AtomicData.from_config(config, z_table=tools.AtomicNumberTable(zs), cutoff=float(args.r_max),
                                             heads=["Default"])
        if label is None:
            continue
        pairs["energy"].append((atomic.energy.item(), label.energy))
        pairs["forces"].append((atomic.forces.numpy(), label.forces))
        pairs["stress"].append((atomic.stress.numpy().reshape(3, 3), label.stress))
        weights.append(min(atomic.energy_weight.item(), atomic.forces_weight.item(), atomic.stress_weight.item()))
    units = {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å³ (ASE sign)"}
    rows += [compare(part, f"AtomicData {key} = export", found, TOLERANCE[key], units[key])
             for key, found in pairs.items()]
    rows.append(row(part, "energy, forces, stress weights > 0", bool(weights) and min(weights) > 0, len(weights)))
    return rows


def mace_train_row(part: str, argv: list[str], export: Path, e0s: dict[int, float]) -> Row:
    """The README command for one epoch, in a scratch copy of the export: it must finish, report the stress, and
    use the export's E0s."""
    program = Path(sys.executable).with_name("mace_run_train")
    with tempfile.TemporaryDirectory() as work:
        for made in export.parent.glob(f"{export.stem}.*"):
            shutil.copy(made, work)
        argv = [a for a in argv if not a.startswith(("--train_file", "--batch_size", "--max_num_epochs"))]
        command = [str(program), *argv, f"--train_file={export.name}", "--max_num_epochs=1", "--batch_size=2"]
        done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    log = done.stdout + done.stderr
    reported = re.search(r"following quantities will be reported: (.*)", log)
    used = re.search(r"Atomic Energies used \(z: eV\) for head Default: (\{.*\})", log)
    e0s_used = {int(z): float(e) for z, e in re.findall(r"(\d+): ([-\d.e+]+)", used.group(1))} if used else {}
    ok = done.returncode == 0 and bool(reported) and "stress" in reported.group(1) and e0s_used == e0s
    note = f"exit {done.returncode}; reports {reported.group(1) if reported else '?'}"
    return row(part, "1 epoch of the command (--batch_size=2)", ok, note=note if done.returncode == 0 else
               note + ": " + log.strip().splitlines()[-1][:60])


# --- NequIP -------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def nequip_directory(args: argparse.Namespace, export: Path):
    """A scratch directory laid out as README's recipe: the export as labels.extxyz, its E0s as labels.nequip.yaml,
    and the config as nequip.yaml (what `nequip-train -cp "$PWD" -cn nequip.yaml` reads)."""
    with tempfile.TemporaryDirectory() as work:
        shutil.copy(export, Path(work) / "labels.extxyz")
        snippet = export.with_name(f"{export.stem}.nequip.yaml")
        if snippet.exists():
            shutil.copy(snippet, Path(work) / "labels.nequip.yaml")
        shutil.copy(args.nequip_config, Path(work) / "nequip.yaml")
        with contextlib.chdir(work):
            yield Path(work)


def nequip_part(args: argparse.Namespace) -> list[Row]:
    export = Path(args.nequip).resolve()
    labels = read_labels(export, mace_keys=False)
    e0s = json_e0s(export)
    if not export.with_name(f"{export.stem}.nequip.yaml").exists():
        return [row("NequIP", "<name>.nequip.yaml beside the export", False, note="missing (an older export?)")]
    with nequip_directory(args, export) as work:
        rows = nequip_rows(work, labels, e0s)
        if args.train:
            rows.append(nequip_train_row(work))
    return rows


def nequip_rows(work: Path, labels: list[Label], e0s: dict[int, float]) -> list[Row]:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from nequip.data import AtomicDataDict
    from nequip.utils.global_state import set_global_state

    with initialize_config_dir(config_dir=str(work), version_base=None):
        config = compose(config_name="nequip.yaml")
    set_global_state()
    datamodule = instantiate(config.data, _recursive_=False)
    datamodule.setup("fit")
    datamodule.setup("test")
    frames = [dataset[i] for name in ("train_dataset", "val_dataset", "test_dataset")
              for dataset in getattr(datamodule, name) for i in range(len(dataset))]
    by_key = {frame_key(label.numbers, label.positions): label for label in labels}
    found = [by_key.get(frame_key(f[AtomicDataDict.ATOMIC_NUMBERS_KEY], f[AtomicDataDict.POSITIONS_KEY]))
             for f in frames]
    isolated = sum(1 for label in found if label is not None and label.config_type == "IsolatedAtom")
    wanted = len(training_labels(labels))
    rows = [row("NequIP", "train+val+test frames = labels, no IsolatedAtom", len(frames) == wanted and not isolated
                and None not in found, len(frames), note=f"{wanted} labels; {isolated} IsolatedAtom frames in them")]
    keys = {"energy": AtomicDataDict.TOTAL_ENERGY_KEY, "forces": AtomicDataDict.FORCE_KEY,
            "stress": AtomicDataDict.STRESS_KEY}
    for name, key in keys.items():
        pairs = [(frame[key].numpy().reshape(np.shape(getattr(label, name))), getattr(label, name))
                 for frame, label in zip(frames, found, strict=True) if label is not None]
        rows.append(compare("NequIP", f"ASEDataModule {key} = export", pairs, TOLERANCE[name]))
    return [*rows, nequip_shifts_row(config, datamodule, e0s)]


def nequip_shifts_row(config: Any, datamodule: Any, e0s: dict[int, float]) -> Row:
    """The model the config builds (NequIPGNNModel, its statistics from the training data as nequip-train computes
    them): its per-type energy shifts, by type name, must be the E0s of <name>.e0s.json."""
    from hydra.utils import instantiate
    from nequip.nn.atomwise import PerTypeScaleShift
    from omegaconf import OmegaConf

    statistics = datamodule.get_statistics(dataset="train")
    if not OmegaConf.has_resolver("training_data_stats"):
        OmegaConf.register_new_resolver("training_data_stats", lambda name: statistics[name], use_cache=True)
    model = instantiate(OmegaConf.to_container(config.training_module.model, resolve=True), _convert_="all")
    shifts = {}
    for module in model.modules():
        if isinstance(module, PerTypeScaleShift) and module.has_shifts:
            values = module.shifts.detach().reshape(-1).tolist()
            shifts = {atomic_numbers[name]: value for name, value in zip(module.type_names, values, strict=True)}
    names = ", ".join(chemical_symbols[z] for z in sorted(shifts))
    return compare("NequIP", "model per_type_energy_shifts = E0s", e0_pairs(shifts, e0s), TOLERANCE["e0"],
                   f"by name: {names}")


def nequip_train_row(work: Path) -> Row:
    program = Path(sys.executable).with_name("nequip-train")
    done = subprocess.run([str(program), "-cp", str(work), "-cn", "nequip.yaml", "trainer.max_epochs=1"],
                          cwd=work, capture_output=True, text=True)
    log = done.stdout + done.stderr
    ok = done.returncode == 0 and "test0_epoch/stress_mae" in log
    note = f"exit {done.returncode}" + ("; test stress_mae reported" if ok else ": " + log.strip()[-60:])
    return row("NequIP", "1 epoch of nequip-train (max_epochs=1)", ok, note=note)


# --- the exports against each other and against pw.x --------------------------------------------------------------

def cross_rows(mace: Path, nequip: Path) -> list[Row]:
    """The two formats of one home: the same numbers for each uid, the same E0s."""
    first = {label.uid: label for label in training_labels(read_labels(mace, True))}
    second = {label.uid: label for label in read_labels(nequip, False)}
    shared = sorted(set(first) & set(second))
    rows = [row("exports", "same uids in both formats", set(first) == set(second), len(shared))]
    for name in ("energy", "forces", "stress"):
        pairs = [(getattr(first[uid], name), getattr(second[uid], name)) for uid in shared]
        rows.append(compare("exports", f"mace-extxyz {name} = nequip-extxyz", pairs, TOLERANCE[name]))
    rows.append(compare("exports", "E0s: mace .e0s.json = nequip .e0s.json", e0_pairs(json_e0s(mace), json_e0s(nequip)),
                        TOLERANCE["e0"]))
    return rows


def last_pw_out(runs: Path, uid: str) -> Path | None:
    """The factory home's record of a structure's last attempt: runs/run_<uid>/attempt_<n>/pw.out."""
    attempts = sorted((runs / f"run_{uid}").glob("attempt_*/pw.out"), key=lambda p: int(p.parent.name.split("_")[1]))
    return attempts[-1] if attempts else None


def pw_rows(export: Path, mace_keys: bool, runs: Path) -> list[Row]:
    """Each label against its pw.out as ASE's espresso-out reader reads it (CODATA 2006, pw.x's constants) scaled
    to ase.units (CODATA 2014, the factory's), and its pressure against the one pw.x prints (kbar)."""
    ry, bohr = CODATA["Ry"], CODATA["Bohr"]
    scale = {"energy": ry, "forces": ry / bohr, "stress": ry / bohr**3}
    pairs: dict[str, list] = {name: [] for name in (*scale, "pressure", "raw energy")}
    for label in read_labels(export, mace_keys):
        out = last_pw_out(runs, label.uid)
        if out is None:
            continue
        ase_atoms = read(out, format="espresso-out")
        ase_values = {"energy": ase_atoms.get_potential_energy(), "forces": ase_atoms.get_forces(),
                      "stress": ase_atoms.get_stress(voigt=False)}
        for name, factor in scale.items():
            pairs[name].append((getattr(label, name), np.asarray(ase_values[name]) * factor))
        pairs["raw energy"].append((label.energy, ase_values["energy"]))
        printed = re.findall(r"total\s+stress\s+\(Ry/bohr\*\*3\)\s+\(kbar\)\s+P=\s*(\S+)", out.read_text())
        pairs["pressure"].append((-np.trace(label.stress) / 3 / GPa * 10, float(printed[-1])))
    rows = [compare("pw.out", f"{name} = ASE espresso-out × CODATA 2014/2006", pairs[name],
                    TOLERANCE[name] / 10) for name in scale]
    ratio = max((abs(a / b - 1) for a, b in pairs["raw energy"]), default=0.0)
    rows.append(row("pw.out", "energy ÷ ASE espresso-out − 1 (Ry: 2014/2006)", abs(ratio - (CODATA["Ry"] - 1)) < 1e-10,
                    len(pairs["raw energy"]), ratio, note=f"expected {CODATA['Ry'] - 1:.3e}"))
    rows.append(compare("pw.out", "pressure −tr(σ)/3 = pw.x's P= (kbar)", pairs["pressure"], 0.006,
                        "pw.x prints 2 decimals"))
    return rows


# --- running the parts, the table ---------------------------------------------------------------------------------

PARTS = {"mace": mace_part, "nequip": nequip_part}


def run_part(part: str, args: argparse.Namespace) -> list[Row]:
    """A part here, or in the interpreter given for it (this script again, rows back as JSON)."""
    python = getattr(args, f"{part}_python")
    try:
        if python is None:
            return PARTS[part](args)
        with tempfile.NamedTemporaryFile(suffix=".json") as rows:
            forwarded = [f"--{part}", str(Path(getattr(args, part)).resolve()), "--readme", str(args.readme),
                         "--nequip-config", str(Path(args.nequip_config).resolve())] + ["--train"] * args.train
            done = subprocess.run([python, __file__, "--part", part, "--json", rows.name, *forwarded],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                return [row(part, "ran", False, note=(done.stderr.strip().splitlines() or ["?"])[-1][:100])]
            return json.loads(Path(rows.name).read_text())
    except Exception as error:  # a loader that refuses the file is a finding, not a crash
        return [row(part, "ran", False, note=f"{type(error).__name__}: {error}"[:100])]


def table(rows: list[Row]) -> str:
    def number(value: float | None) -> str:
        return "" if value is None else f"{value:.2e}"

    lines = [f"{'part':<9} {'check':<52} {'frames':>6} {'max |Δ|':>9} {'tol':>8}  result  note"]
    for r in rows:
        lines.append(f"{r['part']:<9} {r['check']:<52} {r['frames'] or '':>6} {number(r['deviation']):>9} "
                     f"{number(r['tolerance']):>8}  {'ok' if r['ok'] else 'FAIL':<6}  {r['note']}")
    failed = sum(not r["ok"] for r in rows)
    lines.append(f"{len(rows) - failed} passed, {failed} failed")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mace", help="a mace-extxyz export (its <name>.e0s.json beside it)")
    p.add_argument("--nequip", help="a nequip-extxyz export (its <name>.nequip.yaml and .e0s.json beside it)")
    p.add_argument("--runs", help="the factory home's runs/ directory: compare with each label's pw.out")
    p.add_argument("--mace-python", help="the interpreter that has mace-torch (default: this one)")
    p.add_argument("--nequip-python", help="the interpreter that has nequip (default: this one)")
    p.add_argument("--readme", default=str(ROOT / "README.md"), help="whose mace_run_train commands are checked")
    p.add_argument("--nequip-config", default=str(ROOT / "examples" / "nequip.yaml"), help="README's NequIP config")
    p.add_argument("--train", action="store_true", help="also train each README command for one epoch")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.part:
        Path(args.json).write_text(json.dumps(PARTS[args.part](args)))
        return 0
    if not (args.mace or args.nequip):
        parser().error("give --mace and/or --nequip")
    rows = [r for part in PARTS if getattr(args, part) for r in run_part(part, args)]
    if args.mace and args.nequip:
        rows += cross_rows(Path(args.mace), Path(args.nequip))
    for part in (p for p in PARTS if args.runs and getattr(args, p)):
        rows += [r | {"part": f"pw.out/{part}"} for r in pw_rows(Path(getattr(args, part)), part == "mace",
                                                                  Path(args.runs))]
    print(table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
