"""Regenerate the pw.x test fixtures by running the REAL pw.x (never hand-written outputs).

    .venv/bin/python tests/data/make_fixtures.py                     # every fixture
    .venv/bin/python tests/data/make_fixtures.py si_scf fe_magnetic  # only these

Each fixture is a directory tests/data/<name>/ holding pw.in, pw.out, pw.err, CRASH (when pw.x wrote one),
data-file-schema.xml (pw.x's XML record, for the fixtures made with keep_xml) and meta.json (exit code, argv, wall
time, what the fixture is for). The files are kept exactly as pw.x wrote them (including the absolute pseudo_dir);
the rest of pw.x's scratch directory is deleted. Inputs come from qe_factory's own
InputGenerator with low cutoffs and coarse k-point meshes, so the whole set costs well under a minute of pw.x time.
`si_truncated` is the one derived fixture: si_scf's real pw.out cut in the middle of the forces block.

Beyond the planned set: `si_pools_out_of_range` (the real fatal pool error; `si_too_many_pools` turned out to be only
an info message in pw.x 6.7, exit 0), `si_out_of_memory` (a real failed allocation under `prlimit --as`) and
`si_killed_sigkill` / `si_killed_sigsegv` (a rank of a real 2-rank run killed mid-SCF: mpirun's real words and exit
codes 137 / 139). Some outcomes depend on timing (where max_seconds or the signal stops the SCF, which allocation
fails first); the tests only rely on what does not. `si_verbosity_high` is si_scf with verbosity='high', whose
forces block is followed by the per-contribution force blocks (same line shape) before "Total force".
`mem_*` are pw.x runs stopped right after pw.x printed its memory estimate (tests/unit/test_memory.py).
For the sanitizer (tests/unit/test_sanitize.py): `si_pair_overlap` (two Si atoms 0.6 A apart, the distance pre-check
off), `si_wrong_pseudo` (carbon's UPF under the Si file name, in a temporary pseudo_dir named in its pw.in), and the
isolated-atom energies (E0) at the neighbouring fixtures' settings, `si_atom` and `h_atom`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule

from qe_factory.engine.config import DFTConfig
from qe_factory.engine.inputs import InputGenerator
from qe_factory.engine.parallel import pw_command, pw_environment
from qe_factory.engine.process import execute
from qe_factory.engine.pseudos import load_family
from qe_factory.engine.pwxml import XML_NAME, xml_path
from qe_factory.engine.runner import clean_scratch

HERE = Path(__file__).resolve().parent
PW_COMMAND = "pw.x"
LAUNCHER = "mpirun"
TIMEOUT = 300  # seconds per pw.x run: a safety net only, every run here takes a few seconds
KEEP = ("pw.in", "pw.out", "pw.err", "CRASH", XML_NAME, "meta.json")

SI_SETTINGS = dict(ecutwfc=25.0, ecutrho=200.0, kpoint_spacing=0.6)
SI_PSEUDO = "Si.pbe-nl-rrkjus_psl.1.0.0.UPF"


def si_crystal() -> Atoms:
    """2-atom diamond Si, slightly sheared and rattled: non-zero forces and off-diagonal stress without symmetry."""
    atoms = bulk("Si", "diamond", a=5.43)
    strain = np.array([[1.0, 0.01, 0.0], [0.01, 1.0, 0.005], [0.0, 0.005, 1.0]])
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.positions += np.array([[0.03, -0.02, 0.01], [-0.01, 0.04, -0.03]])
    return atoms


def si_input(params: dict | None = None) -> str:
    return InputGenerator(DFTConfig(**SI_SETTINGS)).create_input_string(si_crystal(), params)


_NOTABLE = re.compile(
    r"Error in routine|Message from routine|convergence (NOT )?(has been )?achieved|Maximum CPU time|"
    r"Calculation stopped|JOB DONE|^!"
)


def observed(text: str) -> list[str]:
    """The lines of a pw.x stdout worth reading first (error/info messages with their next line, outcome)."""
    lines = text.splitlines()
    found: dict[str, None] = {}
    for i, line in enumerate(lines):
        if _NOTABLE.search(line):
            found[line.strip()] = None
            if "routine" in line and i + 1 < len(lines):
                found[lines[i + 1].strip()] = None
    negative = [line.strip() for line in lines if "negative rho" in line]
    return [*found, *negative[-1:]]


def run_pw(
    name: str, text: str, purpose: str, ranks: int = 1, pools: int = 1, command: str = PW_COMMAND,
    outdir_kb: int | None = None, keep_xml: bool = False, first: str | None = None, **extra,
) -> dict:
    """Run pw.x on `text` in a fresh tests/data/<name>/, keep its outputs, delete its scratch, write meta.json.

    `outdir_kb`: pw.x's outdir (./out) is a tmpfs of that size, mounted for the run (needs root). `keep_xml`: keep
    the data-file-schema.xml pw.x wrote in its outdir beside pw.out. `first`: an input run before `text` in the same
    directory (its scratch is what `text` restarts from); only the lines worth reading of its stdout are kept, in
    meta.json.
    """
    directory = HERE / name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir()
    if first is not None:
        (directory / "pw.in").write_text(first)
        execute(pw_command(command, LAUNCHER, ranks, pools), directory, pw_environment(1), TIMEOUT)
        extra["first_run_observed"] = observed((directory / "pw.out").read_text(errors="replace"))
    (directory / "pw.in").write_text(text)
    argv = pw_command(command, LAUNCHER, ranks, pools)
    if outdir_kb:
        (directory / "out").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={outdir_kb}k", "tmpfs", directory / "out"], check=True)
    try:
        execution = execute(argv, directory, pw_environment(1), TIMEOUT)
    finally:
        if outdir_kb:
            subprocess.run(["umount", directory / "out"], check=True)
    if keep_xml:
        shutil.copy(xml_path(directory / "out", "pwscf"), directory / XML_NAME)
    clean_scratch(directory)
    leftovers = sorted(p.name for p in directory.iterdir() if p.name not in KEEP)
    for path in directory.iterdir():  # anything else pw.x left (e.g. an empty outdir) is scratch too
        if path.name not in KEEP:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    meta = {
        "name": name,
        "purpose": purpose,
        "generated_by": "tests/data/make_fixtures.py (real pw.x run)",
        "argv": argv,
        "omp_threads": 1,
        "returncode": execution.returncode,
        "timed_out": execution.timed_out,
        "wall_time_s": round(execution.wall_time, 2),
        "crash_file": (directory / "CRASH").exists(),
        "xml_file": (directory / XML_NAME).exists(),
        "removed_scratch": leftovers,
        "observed": observed((directory / "pw.out").read_text(errors="replace")),
        "stderr_head": [line.strip() for line in (directory / "pw.err").read_text(errors="replace").splitlines()
                        if line.strip() and not line.startswith(("#", "-----"))][:3],
        **extra,
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# -- the fixtures ----------------------------------------------------------------------------------------------------
def si_scf() -> dict:
    purpose = "converged 2-atom Si, sheared and rattled: forces and off-diagonal stress"
    return run_pw("si_scf", si_input(), purpose, keep_xml=True)


def fe_magnetic() -> dict:
    atoms = bulk("Fe", "bcc", a=2.83)
    config = DFTConfig(ecutwfc=30.0, ecutrho=240.0, kpoint_spacing=0.8, degauss=0.02)
    text = InputGenerator(config).create_input_string(atoms, {"electrons": {"conv_thr": 1e-8}})
    purpose = "converged spin-polarised 1-atom bcc Fe with a non-zero total magnetization"
    return run_pw("fe_magnetic", text, purpose, keep_xml=True)


def si_unconverged() -> dict:
    text = si_input({"electrons": {"electron_maxstep": 3}})
    purpose = "electron_maxstep=3: 'convergence NOT achieved', exit code 2, JOB DONE"
    return run_pw("si_unconverged", text, purpose, keep_xml=True)


def si_smeared() -> dict:
    # what a run with the MORE_SMEARING correction (degauss=0.05) really gives: replayed by the recovery tests
    text = si_input({"system": {"degauss": 0.05}})
    return run_pw("si_smeared", text, "si_scf with degauss=0.05 Ry (the recovery's larger smearing)", keep_xml=True)


def si_walltime() -> dict:
    # max_seconds is checked once per SCF iteration: a tiny limit stops the run after the first iteration(s).
    text = si_input({"control": {"max_seconds": 1.0}})
    return run_pw("si_walltime", text, "max_seconds=1: 'Maximum CPU time exceeded' (also exit code 2)")


def si_restart_noise() -> dict:
    # attempt 1 iterates toward an unreachable conv_thr until max_seconds (ethr reaches pw.x's floor, 1e-13 Ry, in
    # ~10 iterations, ~3 s here); the restart starts Davidson at that floor, which it misses by noise
    first = si_input({"control": {"max_seconds": 8.0}, "electrons": {"conv_thr": 1e-30, "electron_maxstep": 1000}})
    text = si_input({"control": {"restart_mode": "restart"}, "electrons": {"conv_thr": 1e-8}})
    purpose = ("restart_mode='restart' after a max_seconds stop at conv_thr=1e-30: converged, with Davidson's "
               "'eigenvalues not converged' in its final iteration at ethr=1e-13 (noise, not trouble)")
    return run_pw("si_restart_noise", text, purpose, first=first)


def si_missing_pseudo() -> dict:
    text = si_input().replace(SI_PSEUDO, "Si.does-not-exist.UPF")
    return run_pw("si_missing_pseudo", text, "ATOMIC_SPECIES names a UPF file that does not exist")


def si_bad_input() -> dict:
    text = re.sub(r"^&SYSTEM\n", "&SYSTEM\n   not_a_variable   = 1\n", si_input(), count=1, flags=re.MULTILINE)
    return run_pw("si_bad_input", text, "an unknown variable in &SYSTEM")


def si_too_many_pools() -> dict:
    atoms = Atoms("Si2", positions=[[2.0, 3.0, 3.0], [4.25, 3.0, 3.0]], cell=[6.0, 6.0, 6.0], pbc=True)
    config = DFTConfig(ecutwfc=25.0, ecutrho=200.0, kpoint_spacing=10.0)  # -> 1x1x1 mesh: a single k-point
    text = InputGenerator(config).create_input_string(atoms)
    purpose = "one k-point run with 2 MPI ranks and -nk 2 (pw.x 6.7 only prints an info message and converges)"
    return run_pw("si_too_many_pools", text, purpose, ranks=2, pools=2)


def si_pools_out_of_range() -> dict:
    # Added because si_too_many_pools is NOT fatal in pw.x 6.7 (only an info message): this is the real pool error.
    atoms = Atoms("Si2", positions=[[2.0, 3.0, 3.0], [4.25, 3.0, 3.0]], cell=[6.0, 6.0, 6.0], pbc=True)
    config = DFTConfig(ecutwfc=25.0, ecutrho=200.0, kpoint_spacing=10.0)
    text = InputGenerator(config).create_input_string(atoms)
    return run_pw("si_pools_out_of_range", text, "2 MPI ranks with -nk 3: more pools than ranks", ranks=2, pools=3)


def si_out_of_memory() -> dict:
    # A real allocation failure: pw.x under a 150 MB address-space limit (si_scf needs ~300 MB of address space,
    # mostly MPI and libraries). Where it fails varies from run to run; that it fails with gfortran's
    # "Error allocating ... Cannot allocate memory" on stderr and exit code 1 does not.
    limit = 150_000_000
    return run_pw(
        "si_out_of_memory", si_input(), f"si_scf input under prlimit --as={limit}: a failed allocation",
        command=f"prlimit --as={limit} {PW_COMMAND}",
    )


def _killed(name: str, signal_name: str) -> dict:
    # Rank 0 of a 2-rank run is sent a signal 0.7 s after it starts (mid-SCF): what mpirun really reports and returns
    # when the OOM killer (SIGKILL) or a crash (SIGSEGV) ends a rank. `exec` keeps the shell's PID for pw.x.
    script = (
        f'if [ "$OMPI_COMM_WORLD_RANK" = 0 ]; then (sleep 0.7; kill -{signal_name} $$) & fi; exec {PW_COMMAND} "$@"'
    )
    return run_pw(
        name, si_input(), f"2-rank si_scf run whose rank 0 gets SIG{signal_name} mid-SCF", ranks=2,
        command=f"sh -c '{script}' {PW_COMMAND}",
    )


def si_killed_sigkill() -> dict:
    return _killed("si_killed_sigkill", "KILL")


def si_killed_sigsegv() -> dict:
    return _killed("si_killed_sigsegv", "SEGV")


def h2_overlap() -> dict:
    atoms = Atoms("H2", positions=[[3.0, 3.0, 2.85], [3.0, 3.0, 3.15]], cell=[6.0, 6.0, 6.0], pbc=True)
    config = DFTConfig(ecutwfc=30.0, ecutrho=240.0, kpoint_spacing=10.0)
    text = InputGenerator(config).create_input_string(atoms)
    return run_pw("h2_overlap", text, "two H atoms 0.3 A apart in a 6 A box: what pw.x does with overlapping atoms")


def si_pair_overlap() -> dict:
    # The distance pre-check (min_distance_factor) is a first line only: with it off, pw.x converges on a Si pair
    # 0.6 A apart in the diamond cell (0.27 of the covalent radii sum) to an energy far above two free Si atoms.
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.positions[1] = atoms.positions[0] + 0.6 / np.sqrt(3)
    text = InputGenerator(DFTConfig(**SI_SETTINGS, min_distance_factor=0.0)).create_input_string(atoms)
    purpose = "two Si atoms 0.6 A apart in the diamond cell (distance pre-check off): converges, far above 2 free atoms"
    return run_pw("si_pair_overlap", text, purpose, keep_xml=True)


def si_atom() -> dict:
    # The isolated-atom reference (E0) of the si_* fixtures: same pseudopotential, cutoffs and smearing; the factory's
    # input for a lone atom in a box (Gamma, spin-polarised at its Hund's-rule moment).
    atoms = Atoms("Si", positions=[[4.0, 4.0, 4.0]], cell=[8.0, 8.0, 8.0], pbc=True)
    text = InputGenerator(DFTConfig(**SI_SETTINGS)).create_input_string(atoms)
    return run_pw("si_atom", text, "one Si atom in an 8 A box at the si_* settings: the E0 of their cohesive energy")


def h_atom() -> dict:
    atoms = Atoms("H", positions=[[3.0, 3.0, 3.0]], cell=[6.0, 6.0, 6.0], pbc=True)
    text = InputGenerator(DFTConfig(ecutwfc=30.0, ecutrho=240.0, kpoint_spacing=10.0)).create_input_string(atoms)
    return run_pw("h_atom", text, "one H atom in h2_overlap's 6 A box at its settings: the E0 of its cohesive energy")


def si_wrong_pseudo() -> dict:
    # A pseudo_dir whose Si file (the data set's name) holds carbon's UPF: pseudos.py refuses it before pw.x runs
    # (its header says C); pw.x itself reads it without complaint and computes a carbon crystal in the Si cell.
    debian = load_family("debian-pbe").directory
    with tempfile.TemporaryDirectory() as pseudo_dir:
        shutil.copy(debian / "C.pbe-rrkjus.UPF", Path(pseudo_dir) / SI_PSEUDO)
        text = si_input().replace(f"'{debian}'", f"'{pseudo_dir}'")
        assert pseudo_dir in text
        purpose = f"si_scf whose {SI_PSEUDO} is really C.pbe-rrkjus.UPF (a copy in a temporary pseudo_dir)"
        return run_pw("si_wrong_pseudo", text, purpose, keep_xml=True)


def si_verbosity_high() -> dict:
    # verbosity='high' makes pw.x print, after the total forces, the same `atom N type M force =` lines again for
    # each contribution (non-local, ionic, local, core correction, Hubbard, SCF correction) before "Total force".
    text = si_input({"control": {"verbosity": "high"}})
    purpose = "si_scf with verbosity='high': the forces block followed by its decomposition into contributions"
    return run_pw("si_verbosity_high", text, purpose)


def si_disk_full() -> dict:
    text = si_input()  # outdir ./out: a 200 KB tmpfs, too small for the charge density
    return run_pw("si_disk_full", text, "outdir on a full disk: 'write_rhog ... error writing file'", outdir_kb=200)


def si_truncated() -> dict:
    """si_scf's real pw.out cut just after the first atom's force line (as if pw.x died while writing forces)."""
    source = HERE / "si_scf"
    if not (source / "pw.out").exists():
        si_scf()
    directory = HERE / "si_truncated"
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir()
    lines = (source / "pw.out").read_text().splitlines(keepends=True)
    header = next(i for i, line in enumerate(lines) if "Forces acting on atoms" in line)
    first_atom = next(i for i in range(header, len(lines)) if re.match(r"\s*atom\s+1\s+type", lines[i]))
    (directory / "pw.out").write_text("".join(lines[: first_atom + 1]))
    for name in ("pw.in", "pw.err"):
        shutil.copy(source / name, directory / name)
    source_meta = json.loads((source / "meta.json").read_text())
    meta = {
        "name": "si_truncated",
        "purpose": "a pw.out that ends in the middle of the forces block (pw.x killed while writing)",
        "generated_by": "tests/data/make_fixtures.py: DERIVED, not a pw.x run",
        "derived_from": "si_scf",
        "derivation": f"si_scf/pw.out cut after line {first_atom + 1} of {len(lines)} (atom 1's force line); "
        "pw.in and pw.err copied",
        "argv": source_meta["argv"],
        "returncode": None,
        "timed_out": False,
        "wall_time_s": 0.0,
        "crash_file": False,
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def estimate_only(name: str, atoms: Atoms, purpose: str, params: dict | None = None, **settings) -> dict:
    """pw.x (serial) on the factory's input for `atoms`, stopped (SIGKILL) as soon as it has printed its memory
    estimate, which comes before its large allocations: pw.out ends there. For the memory estimate's calibration."""
    directory = HERE / name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir()
    (directory / "pw.in").write_text(InputGenerator(DFTConfig(**settings)).create_input_string(atoms, params))
    argv = pw_command(PW_COMMAND, LAUNCHER, 1, 1)
    started = time.monotonic()
    with open(directory / "pw.out", "w") as out, open(directory / "pw.err", "w") as err:
        process = subprocess.Popen(argv, cwd=directory, stdout=subprocess.PIPE, stderr=err, text=True,
                                   env=pw_environment(1))
        for line in process.stdout:
            out.write(line)
            if "Estimated max dynamical RAM" in line:
                break
        process.kill()
        process.wait()
    elapsed = time.monotonic() - started
    clean_scratch(directory)
    for path in directory.iterdir():
        if path.name not in KEEP:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    meta = {"name": name, "purpose": purpose, "generated_by": "tests/data/make_fixtures.py (real pw.x run, stopped "
            "after its memory estimate)", "argv": argv, "settings": settings, "omp_threads": 1,
            "returncode": process.returncode, "timed_out": False, "wall_time_s": round(elapsed, 2),
            "crash_file": False, "observed": observed((directory / "pw.out").read_text())}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def mem_si512() -> dict:
    atoms = bulk("Si", cubic=True) * (4, 4, 4)
    return estimate_only("mem_si512", atoms, "512-atom Si at the default settings: pw.x estimates 271 GB")


def mem_box60() -> dict:
    atoms = Atoms("Si", positions=[[30.0, 30.0, 30.0]], cell=[60.0, 60.0, 60.0], pbc=True)
    return estimate_only("mem_box60", atoms, "one Si atom in a 60 A box (Gamma) at the default settings, "
                         "verbosity='high': pw.x's terms overflow 32-bit integers", {"control": {"verbosity": "high"}})


def mem_fe16() -> dict:
    atoms = bulk("Fe", "bcc", a=2.87, cubic=True) * (2, 2, 2)
    return estimate_only("mem_fe16", atoms, "16-atom bcc Fe, spin-polarised, default cutoffs", kpoint_spacing=0.3)


def mem_cu4() -> dict:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    return estimate_only("mem_cu4", atoms, "4-atom fcc Cu (PAW), many k-points", kpoint_spacing=0.3)


def mem_h2o() -> dict:
    atoms = molecule("H2O", vacuum=5.0, pbc=True)
    return estimate_only("mem_h2o", atoms, "a water molecule in a box (Gamma, PAW)")


FIXTURES: dict[str, Callable[[], dict]] = {
    "si_scf": si_scf,
    "fe_magnetic": fe_magnetic,
    "si_unconverged": si_unconverged,
    "si_smeared": si_smeared,
    "si_walltime": si_walltime,
    "si_restart_noise": si_restart_noise,
    "si_missing_pseudo": si_missing_pseudo,
    "si_bad_input": si_bad_input,
    "si_too_many_pools": si_too_many_pools,
    "si_pools_out_of_range": si_pools_out_of_range,
    "si_out_of_memory": si_out_of_memory,
    "si_killed_sigkill": si_killed_sigkill,
    "si_killed_sigsegv": si_killed_sigsegv,
    "si_truncated": si_truncated,
    "h2_overlap": h2_overlap,
    "si_verbosity_high": si_verbosity_high,
    "si_disk_full": si_disk_full,
    "si_pair_overlap": si_pair_overlap,
    "si_atom": si_atom,
    "h_atom": h_atom,
    "si_wrong_pseudo": si_wrong_pseudo,
    "mem_si512": mem_si512,
    "mem_box60": mem_box60,
    "mem_fe16": mem_fe16,
    "mem_cu4": mem_cu4,
    "mem_h2o": mem_h2o,
}


def main(names: list[str]) -> int:
    unknown = [name for name in names if name not in FIXTURES]
    if unknown:
        print(f"unknown fixture(s) {unknown}; choose from {list(FIXTURES)}", file=sys.stderr)
        return 2
    total = 0.0
    started = time.monotonic()
    for name in names or list(FIXTURES):
        meta = FIXTURES[name]()
        total += meta["wall_time_s"]
        size = sum(p.stat().st_size for p in (HERE / name).iterdir()) / 1024
        crash = " CRASH" if meta["crash_file"] else ""
        print(f"{name:20s} exit {meta['returncode']!s:>4}  pw.x {meta['wall_time_s']:6.2f} s  {size:6.1f} KB{crash}")
    print(f"total pw.x wall time {total:.1f} s ({time.monotonic() - started:.1f} s elapsed)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
