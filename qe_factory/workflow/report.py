"""The home's report: one self-contained HTML page (figures embedded as PNG data: URIs) of what the factory made of
every structure it has seen — outcomes, the labels' energies, forces and pressures per composition and element,
what recovery did and what it cost, every failure and refusal with its cause and files, and the settings and
pseudopotentials used. Pure: stories (history.home_history with load=True) in, HTML out."""

from __future__ import annotations

import base64
import html
import io
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from ase.formula import Formula
from ase.units import GPa

from qe_factory.engine.references import REFERENCE_UID
from qe_factory.engine.results import Attempt, DFTResult
from qe_factory.workflow.history import Story, cause, outcome_counts, split_references

MAX_GROUPS = 30  # compositions or elements per figure (the most frequent)
MAX_POINTS = 3000  # points drawn per group (the box uses all)
# the label's settings the report lists (namelist, key); conv_thr is shown per atom, as DFTConfig sets it
SETTINGS = [("system", "ecutwfc", "ecutwfc (Ry)"), ("system", "ecutrho", "ecutrho (Ry)"),
            ("system", "occupations", "occupations"), ("system", "smearing", "smearing"),
            ("system", "degauss", "degauss (Ry)"), ("system", "nspin", "nspin"), ("system", "input_dft", "input_dft"),
            ("control", "pseudo_dir", "pseudo_dir")]


def composition(result: DFTResult) -> str:
    """The reduced formula (Si8 → Si): structures of one composition share an energy scale."""
    return str(Formula(result.formula).reduce()[0])


def pressure(result: DFTResult) -> float:
    """GPa, positive = compressed (ASE's stress sign: P = -trace/3)."""
    return float(-np.trace(result.stress) / 3 / GPa)


def force_norms(result: DFTResult) -> np.ndarray:
    return np.linalg.norm(np.asarray(result.forces), axis=1)


def composition_rows(results: list[DFTResult]) -> list[list[Any]]:
    """Per composition: structures, atoms, E/atom min/median/max (eV), |F| median/max (eV/Å), P min/median/max."""
    groups: dict[str, list[DFTResult]] = {}
    for result in results:
        groups.setdefault(composition(result), []).append(result)
    rows = []
    for name, members in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        energies = [r.energy / len(r.forces) for r in members]
        forces = np.concatenate([force_norms(r) for r in members])
        pressures = [pressure(r) for r in members]
        rows.append([name, len(members), len(forces), min(energies), statistics.median(energies), max(energies),
                     float(np.median(forces)), float(forces.max()), min(pressures), statistics.median(pressures),
                     max(pressures)])
    return rows


def recovery_rows(stories: list[Story]) -> list[list[Any]]:
    """What fixed what: per (error seen, correction applied next): times tried, times the next attempt succeeded,
    structures finally labelled after it."""
    tried: Counter = Counter()
    fixed: Counter = Counter()
    labelled: Counter = Counter()
    for story in stories:
        attempts = story.result.attempts if story.result else []
        for before, after in zip(attempts, attempts[1:]):
            key = (before.error_type, after.correction or "rerun")
            tried[key] += 1
            fixed[key] += after.error_type == "OK"
            labelled[key] += story.outcome == "labelled"
    return [[error, correction, n, fixed[(error, correction)], labelled[(error, correction)]]
            for (error, correction), n in tried.most_common()]


def attempts_rows(stories: list[Story]) -> list[list[int]]:
    """Per number of pw.x attempts: structures labelled and structures failed with that many."""
    counts: Counter = Counter()
    for story in stories:
        if story.result and story.result.attempts:
            counts[(len(story.result.attempts), story.outcome)] += 1
    return [[n, counts[(n, "labelled")], counts[(n, "failed")]] for n in sorted({n for n, _ in counts})]


def _hours(attempts: Iterable[Attempt]) -> tuple[int, float, float]:
    """(pw.x runs, core-hours as wall time × MPI ranks, CPU hours as pw.x reports them × ranks)."""
    attempts = list(attempts)
    core = sum(a.wall_time * a.ranks for a in attempts) / 3600
    cpu = sum((a.cpu_time or 0.0) * a.ranks for a in attempts) / 3600
    return len(attempts), core, cpu


def cost_rows(stories: list[Story], references: Iterable[Story] = ()) -> list[list[Any]]:
    """pw.x runs and hours: the attempts that made labels, failed attempts that recovery got past, the attempts
    of structures that failed (all wasted), those of the isolated-atom references (E0s), and the total."""
    good, recovered, lost = [], [], []
    for story in stories:
        attempts = story.result.attempts if story.result else []
        if story.outcome == "labelled":
            good += [a for a in attempts if a.error_type == "OK"]
            recovered += [a for a in attempts if a.error_type != "OK"]
        else:
            lost += attempts
    e0s = [a for story in references if story.result for a in story.result.attempts]
    return [[name, *_hours(group)] for name, group in (
        ("attempts that made labels", good), ("failed attempts before a label", recovered),
        ("attempts of structures that failed (wasted)", lost), ("isolated-atom references (E0s)", e0s),
        ("all pw.x runs", good + recovered + lost + e0s))]


def settings_rows(results: list[DFTResult]) -> list[list[Any]]:
    """Each setting of the labels and how many labels have each value (more than one value: look closer)."""
    rows = []
    columns: list[tuple[str, Callable[[DFTResult], Any]]] = [
        (label, lambda r, n=namelist, k=key: r.parameters.get(n, {}).get(k)) for namelist, key, label in SETTINGS
    ] + [
        ("conv_thr per atom (Ry)", lambda r: _per_atom(r)),
        ("k-point mesh", lambda r: "×".join(map(str, r.kpoints)) if r.kpoints else "Γ"),
        ("vacuum axes (1 k-point)", lambda r: ",".join(r.vacuum_axes) or "none"),
        ("pw.x version", lambda r: r.pw_version),
        ("settings other than the nominal", lambda r: ", ".join(sorted(r.label_deviations)) or "none"),
    ]
    for name, value in columns:
        counts = Counter(str(v) for r in results if (v := value(r)) is not None)
        if counts:
            rows.append([name, "; ".join(f"{v} ({n})" for v, n in counts.most_common())])
    return rows


def _per_atom(result: DFTResult) -> float | None:
    conv_thr = result.parameters.get("electrons", {}).get("conv_thr")
    return None if conv_thr is None else float(f"{conv_thr / len(result.structure.numbers):.3g}")


def pseudo_rows(results: list[DFTResult]) -> list[list[Any]]:
    """Element, pseudopotential file, md5, labels that used it."""
    counts: Counter = Counter()
    for result in results:
        for element, pseudo in result.pseudopotentials.items():
            counts[(element, pseudo.get("filename"), pseudo.get("md5"))] += 1
    return [[*key, n] for key, n in sorted(counts.items())]


def problem_rows(stories: list[Story]) -> list[list[Any]]:
    """Every failure and refusal: uid, formula, outcome, stage, error type, cause, attempts, files."""
    rows = []
    for story in stories:
        if story.outcome in ("failed", "refused"):
            attempts = len(story.result.attempts) if story.result else 0
            rows.append([story.uid, story.formula or "", story.outcome, story.stage or "", story.error_type or "",
                         story.message or "", attempts, story.files or "none: pw.x never ran"])
    return rows


# ---------------------------------------------------------------------------------------------------- figures


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def distribution_figure(groups: dict[str, list[float]], xlabel: str, title: str) -> str:
    """Horizontal box plots with the points on top, one row per group (the MAX_GROUPS largest); a PNG as base64."""
    from matplotlib.figure import Figure

    names = sorted(groups, key=lambda g: (-len(groups[g]), g))[:MAX_GROUPS][::-1]
    figure = Figure(figsize=(7.5, 1.1 + 0.42 * len(names)))
    axes = figure.add_subplot()
    data = [np.asarray(groups[name]) for name in names]
    axes.boxplot(data, vert=False, widths=0.55, showfliers=False, medianprops={"color": "#c0392b"},
                 boxprops={"color": "#555"}, whiskerprops={"color": "#555"}, capprops={"color": "#555"})
    generator = np.random.default_rng(0)
    for row, values in enumerate(data, start=1):
        shown = values if len(values) <= MAX_POINTS else generator.choice(values, MAX_POINTS, replace=False)
        jitter = generator.uniform(-0.18, 0.18, len(shown))
        axes.scatter(shown, row + jitter, s=22 if len(shown) < 200 else 6, alpha=0.75 if len(shown) < 200 else 0.3,
                     color="#2471a3", lw=0, zorder=3)
    axes.set_yticks(range(1, len(names) + 1), [f"{name} (n={len(groups[name])})" for name in names])
    axes.set_xlabel(xlabel)
    axes.set_title(title + (f" — the {MAX_GROUPS} largest groups" if len(groups) > MAX_GROUPS else ""),
                   fontsize=10, loc="left")
    axes.grid(axis="x", alpha=0.3)
    return _png(figure)


def label_figures(results: list[DFTResult]) -> Iterator[tuple[str, Callable[[], str]]]:
    """(caption, a function making its PNG as base64) of the energy per atom, |F| per element and pressure per
    composition."""
    energy: dict[str, list[float]] = {}
    for result in results:
        energy.setdefault(composition(result), []).append(result.energy / len(result.forces))
    relative = {name: [(e - min(values)) * 1000 for e in values] for name, values in energy.items()}
    forces: dict[str, list[float]] = {}
    for result in results:
        for symbol, norm in zip(result.structure.to_atoms().get_chemical_symbols(), force_norms(result)):
            forces.setdefault(symbol, []).append(float(norm))
    pressures: dict[str, list[float]] = {}
    for result in results:
        pressures.setdefault(composition(result), []).append(pressure(result))
    yield ("Each point is one structure, its energy per atom above the lowest of its composition (absolute values "
           "in the table above). Boxes: quartiles and median (red); whiskers: 1.5 × the interquartile range.",
           lambda: distribution_figure(relative, "E/atom − lowest E/atom of the composition (meV/atom)",
                                       "Energy per atom, per composition"))
    yield ("Each point is one atom: the norm of the force on it, grouped by element.",
           lambda: distribution_figure(forces, "|F| (eV/Å)", "Force on each atom, per element"))
    yield ("Each point is one structure: its pressure −trace(σ)/3 (positive: compressed), grouped by composition.",
           lambda: distribution_figure(pressures, "P (GPa)", "Pressure, per composition"))


# ---------------------------------------------------------------------------------------------------- HTML

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0; background: #f4f5f7; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 32px 0 8px; border-bottom: 2px solid #e3e6ea;
padding-bottom: 4px; } .meta { color: #666; margin: 0 0 16px; } .note { color: #555; margin: 4px 0 10px; }
.tiles { display: flex; gap: 12px; flex-wrap: wrap; } .tile { padding: 10px 16px; border-radius: 6px; min-width: 110px;
background: #eef1f4; border-left: 5px solid #999; } .tile b { display: block; font-size: 26px; }
.labelled { border-color: #27ae60; } .marked { border-color: #e6a700; } .failed { border-color: #c0392b; }
.refused { border-color: #7f8c8d; } .waiting, .running { border-color: #2980b9; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; } th, td { padding: 4px 10px;
border-bottom: 1px solid #e3e6ea; text-align: left; vertical-align: top; } th { background: #f0f2f5; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fafbfc; } code { font-size: 12px; word-break: break-all; }
td { max-width: 460px; } figure { margin: 8px 0 16px; } figcaption { color: #555; font-size: 13px; }
img { max-width: 100%; }
"""


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{html.escape(str(value or ''))}</td>"
    if isinstance(value, int):
        return f'<td class="n">{value}</td>'
    if isinstance(value, float):
        return f'<td class="n">{value:.2e}</td>' if 0 < abs(value) < 1e-3 else f'<td class="n">{value:.4f}</td>'
    if isinstance(value, list):  # paths
        return "<td>" + "<br>".join(f"<code>{html.escape(str(v))}</code>" for v in value) + "</td>"
    return f"<td>{html.escape(str(value))}</td>"


def reference_rows(references: list[Story]) -> list[list[Any]]:
    """element, outcome, energy (eV) or cause, and uid of each isolated-atom reference."""
    rows = []
    for story in references:
        labelled = story.outcome == "labelled" and story.result is not None
        what = story.result.energy if labelled else cause(story) if story.outcome == "failed" else ""
        rows.append([REFERENCE_UID.match(story.uid).group(1), story.outcome, what, story.uid])
    return rows


def table(header: list[str], rows: list[list[Any]], empty: str = "none") -> str:
    if not rows:
        return f'<p class="note">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def host_rows(hosts: Iterable[Any]) -> list[list[Any]]:
    """A row per pilot job (host.HostRecord): what it ran and how busy it kept its slots."""
    return [[h.host_id, h.hostname, h.state, h.slots, h.done, h.running,
             time.strftime("%Y-%m-%d %H:%M", time.localtime(h.started)), f"{(h.updated - h.started) / 60:.1f}",
             f"{h.busy_fraction():.0%}"] for h in hosts]


def report_html(stories: list[Story], home: str, progress: Callable[[str], None] = lambda step: None,
                hosts: Iterable[Any] = ()) -> str:
    """The report page of a home's stories (with their results loaded) and its pilot jobs (`hosts`, host.py's
    records); `progress(step)` is called before each slow step."""
    structures, references = split_references(stories)
    counts = outcome_counts(structures)
    results = [s.result for s in structures if s.outcome == "labelled" and s.result is not None]
    tiles = "".join(f'<div class="tile {name}"><b>{counts[name]}</b>{label}</div>' for name, label in (
        ("labelled", "labelled"), ("marked", "of them non-nominal"), ("failed", "failed"), ("refused", "refused"),
        ("waiting", "waiting"), ("running", "running")))
    parts = [
        f"<h1>qe_factory report</h1><p class='meta'>factory home <code>{html.escape(home)}</code> · "
        f"{len(structures)} structures seen · made {time.strftime('%Y-%m-%d %H:%M')}</p>",
        f'<div class="tiles">{tiles}</div>',
        '<p class="note">non-nominal: labelled with settings other than the data set\'s (e.g. a larger smearing '
        "that recovery needed); <code>qe-factory export</code> leaves them out unless "
        "<code>--include-marked</code>.</p>",
        "<h2>Labels per composition</h2>",
        table(["composition", "structures", "atoms", "E/atom min (eV)", "median", "max", "|F| median (eV/Å)",
               "|F| max", "P min (GPa)", "median", "max"], composition_rows(results), "no labels yet"),
    ]
    if results:
        for caption, make in label_figures(results):
            progress(caption)
            png = make()
            parts.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    progress("recovery")
    parts += [
        "<h2>What recovery did</h2>",
        '<p class="note">Each row: an error pw.x ended with, the correction applied for the next attempt, and how '
        "often that attempt then succeeded.</p>",
        table(["error seen", "correction applied next", "tried", "next attempt succeeded", "structures then labelled"],
              recovery_rows(structures), "no structure needed a second attempt"),
        table(["pw.x attempts", "structures labelled", "structures failed"], attempts_rows(structures),
              "no pw.x runs"),
        '<p class="note">Core-hours: wall time × MPI ranks; CPU hours: pw.x\'s own CPU time × ranks.</p>',
        table(["pw.x runs", "runs", "core-hours", "CPU hours"], cost_rows(structures, references)),
        "<h2>Pilot jobs</h2>",
        '<p class="note">Each SLURM job (or local host) that ran launches from the home\'s queue: launches done, and '
        "the share of its slot-time spent running them.</p>",
        table(["job", "node", "state", "slots", "launches done", "running", "started", "minutes", "busy"],
              host_rows(hosts), "no pilot jobs"),
        f"<h2>Failures and refusals ({counts['failed']} failed, {counts['refused']} refused)</h2>",
        table(["uid", "formula", "outcome", "stage", "error type", "cause", "attempts", "files"],
              problem_rows(structures), "none"),
        "<h2>Isolated-atom references (E0s)</h2>",
        '<p class="note">Each element\'s lone-atom energy at the data set\'s settings (computed by the factory; '
        "not counted above); the sanitizer judges cohesive energies against them and the export writes them.</p>",
        table(["element", "outcome", "E0 (eV), or the cause", "uid"], reference_rows(references), "none computed"),
        "<h2>Settings of the labels</h2>",
        '<p class="note">Every value and how many labels have it.</p>',
        table(["setting", "values (labels)"], settings_rows(results), "no labels yet"),
        "<h2>Pseudopotentials</h2>",
        table(["element", "file", "md5", "labels"], pseudo_rows(results), "no labels yet"),
    ]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>qe_factory report</title>'
            f"<style>{STYLE}</style></head><body><main>{body}</main></body></html>\n")
