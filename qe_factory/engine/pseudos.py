"""Pseudopotential families: tables as data files, resolution with existence, md5 and UPF-header checks, and the
installation of a family's files from a downloaded archive (md5-checked, all or nothing)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from qe_factory.engine.outcomes import CarriesOutcome, Outcome


class PseudopotentialError(CarriesOutcome, ValueError):
    """A pseudopotential is missing, corrupt or inconsistent with the structure or the family."""

    outcome = Outcome.REFUSED


@dataclass(frozen=True)
class PseudoEntry:
    """One row of a family table."""

    filename: str
    cutoff_wfc: float
    cutoff_rho: float
    md5: str | None = None


@dataclass(frozen=True)
class PseudoFamily:
    """A named set of pseudopotentials, one per element, all for one functional."""

    name: str
    functional: str | None
    directory: Path
    entries: dict[str, PseudoEntry]


@dataclass(frozen=True)
class UpfHeader:
    """What the UPF header says about itself."""

    element: str
    functional: str
    z_valence: float
    suggested_wfc: float | None
    suggested_rho: float | None
    ultrasoft: bool = False  # US or PAW: augmentation charges (pw.x's okvan)
    paw: bool = False  # PAW: one-centre occupations (pw.x's becsum) on top of the augmentation
    beta_l: tuple[int, ...] = ()  # angular momentum of each projector (beta function)

    @property
    def projectors(self) -> int:
        """Projector functions with their m components per atom (pw.x's nh): the sum of 2l+1 over the betas."""
        return sum(2 * momentum + 1 for momentum in self.beta_l)


@dataclass(frozen=True)
class ResolvedPseudo:
    """A checked pseudopotential file ready to be named in pw.in."""

    element: str
    path: Path
    md5: str
    cutoff_wfc: float
    cutoff_rho: float
    header: UpfHeader


FAMILY_FILE = "family.json"  # an installed family's table, beside its files


def bundled_families() -> list[str]:
    """Names of the families shipped with the package."""
    return sorted(p.name[:-5] for p in resources.files("qe_factory.engine.data").iterdir() if p.name.endswith(".json"))


def pseudo_root() -> Path:
    """Where `install_family` puts each family, in a folder of its name: $XDG_DATA_HOME/qe_factory/pseudos
    (default ~/.local/share/qe_factory/pseudos), outside any factory home so that every home and QERunner finds it."""
    return Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share").expanduser() / "qe_factory" / "pseudos"


def known_families() -> list[str]:
    """Families usable by name: the bundled ones and those installed in `pseudo_root()`."""
    installed = [p.parent.name for p in pseudo_root().glob(f"*/{FAMILY_FILE}")]
    return sorted({*bundled_families(), *installed})


def _read_table(name_or_path: str) -> tuple[dict, Path]:
    """A family's table as {name, functional, source, pseudopotentials} and its default directory."""
    path = Path(name_or_path).expanduser()
    installed = pseudo_root() / name_or_path
    if path.suffix == ".json" and path.is_file():
        raw, directory = json.loads(path.read_text()), path.parent
        raw = raw if "pseudopotentials" in raw else {"pseudopotentials": raw}  # a bare SSSP JSON
        raw.setdefault("name", path.stem)
    elif name_or_path in bundled_families():
        raw = json.loads(resources.files("qe_factory.engine.data").joinpath(f"{name_or_path}.json").read_text())
        directory = Path(raw.get("default_dir") or installed).expanduser()
    elif name_or_path in known_families():
        raw, directory = json.loads((installed / FAMILY_FILE).read_text()), installed
    else:
        raise PseudopotentialError(
            f"unknown pseudopotential family {name_or_path!r}: give one of {known_families()} "
            "or the path of an SSSP-style JSON file"
        )
    return raw, directory


def load_family(name_or_path: str, pseudo_dir: Path | None = None) -> PseudoFamily:
    """Load a family by name (bundled, or installed with `install_family`), or an SSSP-style JSON file
    ({El: {filename, md5, cutoff_wfc, cutoff_rho}}, optionally under "pseudopotentials" beside name/functional)."""
    raw, directory = _read_table(name_or_path)
    entries = {
        el: PseudoEntry(row["filename"], float(row["cutoff_wfc"]), float(row["cutoff_rho"]), row.get("md5"))
        for el, row in raw["pseudopotentials"].items()
    }
    return PseudoFamily(raw["name"], raw.get("functional"), Path(pseudo_dir or directory), entries)


def missing_pseudos(family: PseudoFamily, elements: Iterable[str]) -> dict[str, str]:
    """The elements this family cannot serve yet, each with the reason (not in its table, or its file absent)."""
    missing = {}
    for el in sorted(set(elements)):
        entry = family.entries.get(el)
        if entry is None:
            missing[el] = "not in the table"
        elif not (family.directory / entry.filename).is_file():
            missing[el] = f"{entry.filename} not installed"
    return missing


def install_family(name_or_path: str, source: str) -> Path:
    """Install a family's files from an archive (tar or zip; a path or an http(s)/file URL) into
    `pseudo_root()/<name>/`, with the table as `family.json`. Every file the table names must be in the archive with
    the table's md5: otherwise nothing is installed and the error names each file (and both md5s)."""
    raw, _ = _read_table(name_or_path)
    name, table = raw["name"], raw["pseudopotentials"]
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        raise PseudopotentialError(f"family name {name!r}: use letters, digits, '.', '_' and '-' only")
    if name in bundled_families() and (Path(name_or_path).suffix == ".json" or "default_dir" in raw):
        raise PseudopotentialError(f"{name!r} is a bundled family read from its own directory: nothing to install "
                                   "(a table of your own needs another name)")
    root = pseudo_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
        staging = Path(tmp) / name
        _unpack(_download(source, Path(tmp)), {row["filename"] for row in table.values()}, staging)
        problems = []
        for el, row in sorted(table.items()):
            path = staging / row["filename"]
            if not path.is_file():
                problems.append(f"{row['filename']} ({el}) is not in the archive")
            elif not row.get("md5"):
                problems.append(f"{row['filename']} ({el}) has no md5 in the table to check it against")
            elif (md5 := hashlib.md5(path.read_bytes()).hexdigest()) != row["md5"]:
                problems.append(f"{row['filename']} ({el}) has md5 {md5}, the table says {row['md5']}")
        if problems:
            raise PseudopotentialError(f"{name} not installed from {source}: {'; '.join(problems)}")
        normalised = {"name": name, "functional": raw.get("functional"), "source": raw.get("source"),
                      "pseudopotentials": table}
        (staging / FAMILY_FILE).write_text(json.dumps(normalised, indent=1) + "\n")
        target = root / name
        if target.exists():
            target.rename(Path(tmp) / "previous")  # removed with the temporary directory
        staging.rename(target)
    return target


def _download(source: str, folder: Path) -> Path:
    """The archive as a local file: `source` itself, or what its URL serves, saved in `folder`."""
    if urllib.parse.urlparse(source).scheme not in ("http", "https", "file"):
        if not Path(source).expanduser().is_file():
            raise PseudopotentialError(f"{source}: no such archive (give a file or an http(s) URL)")
        return Path(source).expanduser()
    path = folder / "download"
    try:
        with urllib.request.urlopen(source, timeout=60) as response, path.open("wb") as out:
            shutil.copyfileobj(response, out)
    except (OSError, ValueError) as exc:
        raise PseudopotentialError(f"cannot download {source}: {exc}") from None
    return path


def _unpack(archive: Path, wanted: set[str], folder: Path) -> None:
    """Copy the archive's regular files whose base name is in `wanted` into `folder` (nothing else, whatever its
    member paths say)."""
    folder.mkdir()
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.isfile() and Path(member.name).name in wanted:
                    with tar.extractfile(member) as data, (folder / Path(member.name).name).open("wb") as out:
                        shutil.copyfileobj(data, out)
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                if not info.is_dir() and Path(info.filename).name in wanted:
                    with zipped.open(info) as data, (folder / Path(info.filename).name).open("wb") as out:
                        shutil.copyfileobj(data, out)
    else:
        raise PseudopotentialError(f"{archive} is neither a tar nor a zip archive")


_FUNCTIONAL_ALIASES = {
    "PBE": "PBE", "SLA PW PBX PBC": "PBE", "SLA PW PBE PBE": "PBE", "GGA PBE": "PBE",
    "PZ": "LDA", "SLA PZ NOGX NOGC": "LDA", "LDA": "LDA",
    "PBESOL": "PBESOL", "SLA PW PSX PSC": "PBESOL",
}


def normalise_functional(text: str) -> str:
    """Map the many spellings of a functional in UPF headers to one name (PBE, LDA, PBESOL, or as given)."""
    key = " ".join(text.upper().replace("-", " ").split())
    if key in _FUNCTIONAL_ALIASES:
        return _FUNCTIONAL_ALIASES[key]
    first_four = " ".join(key.split()[:4])
    return _FUNCTIONAL_ALIASES.get(first_four, key)


def _attr(text: str, name: str) -> str | None:
    match = re.search(rf'\b{name}\s*=\s*"([^"]*)"', text, re.IGNORECASE)
    return match.group(1).strip() if match else None


def _v1_field(text: str, label: str) -> str | None:
    match = re.search(rf"^\s*(.+?)\s+{label}\s*$", text, re.MULTILINE | re.IGNORECASE)
    return match.group(1).strip() if match else None


def parse_upf_header(text: str) -> UpfHeader:
    """Read element, functional, valence and suggested cutoffs from UPF v1 or v2 text."""
    start = text.find("<PP_HEADER")
    if start < 0:
        raise PseudopotentialError("no <PP_HEADER> found: not a UPF file")
    end = text.find("</PP_HEADER>", start)
    end = text.find("/>", start) if end < 0 else end
    header = text[start:end]
    element = _attr(header, "element") or _v1_field(header, "Element")
    functional = _attr(header, "functional")
    if functional is None:
        v1 = _v1_field(header, "Exchange-Correlation functional")
        functional = " ".join(v1.split()[:4]) if v1 else None
    z_valence = _attr(header, "z_valence") or _v1_field(header, "Z valence")
    if not (element and functional and z_valence):
        raise PseudopotentialError("UPF header lacks element, functional or z_valence")
    info = text[:start]
    v1_type = re.search(r"^\s*(US|NC|PAW)\s", header, re.MULTILINE)
    pseudo_type = (_attr(header, "pseudo_type") or (v1_type.group(1) if v1_type else "")).upper()
    # v2: <PP_BETA.n ... angular_momentum="l">; v1: a "  n  l   Beta    L" line opens each beta
    beta_l = re.findall(r'<PP_BETA\.\d+\b[^>]*?\bangular_momentum\s*=\s*"\s*(\d+)', text) or re.findall(
        r"^\s*\d+\s+(\d+)\s+Beta\s+L\s*$", text, re.MULTILINE
    )
    wfc = re.search(r"Suggested minimum cutoff for wavefunctions:\s*([\d.]+)", info)
    rho = re.search(r"Suggested minimum cutoff for charge density:\s*([\d.]+)", info)
    return UpfHeader(
        element=element.strip().capitalize(),
        functional=normalise_functional(functional),
        z_valence=float(z_valence.lower().replace("d", "e")),
        suggested_wfc=float(wfc.group(1)) or None if wfc else None,
        suggested_rho=float(rho.group(1)) or None if rho else None,
        ultrasoft=pseudo_type in ("US", "USPP", "PAW"),
        paw=pseudo_type == "PAW",
        beta_l=tuple(int(momentum) for momentum in beta_l),
    )


@lru_cache(maxsize=256)
def _read_pseudo(path: Path, mtime_ns: int) -> tuple[str, UpfHeader]:
    data = path.read_bytes()
    try:
        header = parse_upf_header(data.decode("utf-8", errors="replace"))
    except PseudopotentialError as exc:
        raise PseudopotentialError(f"{path}: {exc}") from None
    return hashlib.md5(data).hexdigest(), header


def resolve_pseudos(family: PseudoFamily, elements: list[str]) -> dict[str, ResolvedPseudo]:
    """Check and return the pseudopotential of every element; all problems are reported at once."""
    missing, problems, resolved = [], [], {}
    for el in sorted(set(elements)):
        entry = family.entries.get(el)
        if entry is None:
            missing.append(f"{el} (not in family {family.name})")
            continue
        path = family.directory / entry.filename
        if not path.is_file():
            missing.append(f"{el} (expected {path})")
            continue
        md5, header = _read_pseudo(path, path.stat().st_mtime_ns)
        if entry.md5 and md5 != entry.md5:
            problems.append(f"{el}: {path} has md5 {md5}, the family table says {entry.md5}")
        if header.element != el:
            problems.append(f"{el}: {path} is a pseudopotential for {header.element}")
        if family.functional and header.functional != normalise_functional(family.functional):
            problems.append(f"{el}: {path} is for {header.functional}, the family is {family.functional}")
        resolved[el] = ResolvedPseudo(el, path, md5, entry.cutoff_wfc, entry.cutoff_rho, header)
    if missing:
        raise PseudopotentialError(f"no pseudopotential for: {', '.join(missing)}")
    functionals = {p.header.functional for p in resolved.values()}
    if len(functionals) > 1:
        problems.append(f"mixed functionals {sorted(functionals)}: all pseudopotentials must share one")
    if problems:
        raise PseudopotentialError("; ".join(problems))
    return resolved
