"""Every structure a factory home has seen and what became of it, also after its workflow left the LaunchPad.

Sources: the JobStore (labels: finished workflows are archived from the LaunchPad), the LaunchPad (FIZZLED
Fireworks hold a failure's full report, or a refusal at the inputs stage; workflows waiting or running), the
inbox (submissions the coordinator has not taken in) and `state/refusals.jsonl` (structures refused at submission,
which never reach the LaunchPad). A uid's outcome is the first of OUTCOMES that applies.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from qe_factory.engine.certificate import certificate
from qe_factory.engine.outcomes import Outcome
from qe_factory.engine.references import REFERENCE_UID
from qe_factory.engine.results import DFTResult
from qe_factory.workflow import state
from qe_factory.workflow.inbox import stored, waiting

if TYPE_CHECKING:
    from fireworks import LaunchPad
    from jobflow import JobStore

OUTCOMES = ("labelled", "running", "waiting", "failed", "refused")
RUNNING_STATES = {"RUNNING", "RESERVED"}


class Story(BaseModel):
    """One structure's outcome and the records behind it."""

    uid: str
    outcome: str  # one of OUTCOMES
    formula: str | None = None
    marked: bool = False  # labelled with settings other than the nominal ones (label_deviations)
    result: DFTResult | None = None  # the label, or a failure's report with every attempt (when loaded)
    stage: str | None = None  # where it failed or was refused: submit, inputs, scf, validate
    error_type: str | None = None
    message: str | None = None
    files: list[str] = []  # launch and run directories of a failure or refusal
    fireworks: list[tuple[int, str, str]] = []  # (fw_id, name, state) of its workflow in the LaunchPad
    refusals: list[dict[str, str]] = []  # every refused submission of this uid: {time, reason}

    @property
    def is_reference(self) -> bool:
        """An isolated-atom reference (E0) the factory computed, not a structure the user submitted."""
        return bool(REFERENCE_UID.match(self.uid))


def split_references(stories: list[Story]) -> tuple[list[Story], list[Story]]:
    """(the user's structures, the isolated-atom references)."""
    return [s for s in stories if not s.is_reference], [s for s in stories if s.is_reference]


def refusals_file(home: Path) -> Path:
    return home / "state" / "refusals.jsonl"


def record_refusals(home: Path, refused: dict[str, str], formulas: dict[str, str]) -> None:
    """Append the structures `submit` refused (uid → reason) to the home's record, one JSON line each (a single
    O_APPEND write: safe beside other submissions)."""
    if not refused:
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    text = "".join(json.dumps({"uid": uid, "formula": formulas.get(uid), "time": stamp, "reason": why}) + "\n"
                   for uid, why in refused.items())
    path = refusals_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read_refusals(home: Path) -> dict[str, list[dict[str, str]]]:
    """uid → its refused submissions, oldest first (a line cut short by a crash is skipped)."""
    path, out = refusals_file(home), {}
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        out.setdefault(entry["uid"], []).append(entry)
    return out


def inbox_uids(home: Path) -> dict[str, str | None]:
    """uid → formula of the workflows waiting in the home's inbox."""
    uids = {}
    for path in waiting(home):
        try:
            workflows = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # taken in (deleted) while we read
            continue
        for form in map(stored, workflows):
            uids[form["workflow"]["metadata"].get("uid")] = next(
                (f for fw in form["fireworks"] if (f := state.inputs_formula(fw))), None)
    return uids


class _Stories:
    """Stories being told: a uid keeps the first of OUTCOMES told of it."""

    def __init__(self, uids: list[str] | None):
        self.uids, self.stories = uids, {}

    def tell(self, uid: str | None, outcome: str, **fields) -> Story | None:
        if uid is None or (self.uids is not None and uid not in self.uids):
            return None
        story = self.stories.get(uid)
        if story is None or OUTCOMES.index(outcome) < OUTCOMES.index(story.outcome):
            story = self.stories[uid] = Story(uid=uid, outcome=outcome, **fields)
        return story


def _tell_labels(stories: _Stories, store: JobStore, load: bool) -> None:
    for label in state.label_summaries(store, stories.uids):
        stories.tell(label["uid"], "labelled", formula=label.get("formula"),
                     marked=bool(label.get("label_deviations")))
    if load:
        for result in state.load_results(store, stories.uids):
            stories.stories[result.uid].result = result


def _tell_workflows(stories: _Stories, launchpad: LaunchPad, load: bool) -> None:
    """Failures, refusals at the inputs stage, and work waiting or running, from the LaunchPad."""
    by_uid = state.fireworks_by_uid(launchpad, stories.uids)
    fizzled = [fw["fw_id"] for fws in by_uid.values() for fw in fws if fw["state"] == "FIZZLED"]
    failed = state.fizzled_launches(launchpad, fizzled)
    for uid, fws in by_uid.items():
        states = {fw["state"] for fw in fws}
        formula = next((f for fw in fws if (f := state.inputs_formula(fw))), None)
        launches = [(fw, failed[fw["fw_id"]]) for fw in fws if fw["fw_id"] in failed]
        if launches:
            _tell_failure(stories, uid, formula, *launches[-1], load)
        elif states & RUNNING_STATES:
            stories.tell(uid, "running", formula=formula)
        elif states - {"COMPLETED"}:
            stories.tell(uid, "waiting", formula=formula)
        if uid in stories.stories:
            stories.stories[uid].fireworks = [(fw["fw_id"], fw.get("name", ""), fw["state"]) for fw in fws]


def _tell_failure(stories: _Stories, uid: str, formula: str | None, firework: dict, launch: dict, load: bool) -> None:
    failure = state.launch_failure(launch)
    details = failure.details
    files = [launch.get("launch_dir")] if launch.get("launch_dir") else []
    if attempts := details.get("attempts"):
        files.insert(0, str(Path(attempts[-1]["directory"]).parent))
    stories.tell(uid, "refused" if failure.outcome is Outcome.REFUSED else "failed", formula=formula,
                 result=DFTResult.from_dict(details) if load and details.get("uid") else None,
                 stage=firework.get("spec", {}).get("stage"), error_type=failure.error_type, message=failure.message,
                 files=files)


def home_history(
    home: Path, launchpad: LaunchPad, store: JobStore, uids: list[str] | None = None, load: bool = False,
    submissions: bool = True,
) -> list[Story]:
    """The story of every structure the home has seen (or of `uids`), in uid order. `load`: attach each label's
    DFTResult and each failure's report (every attempt); else only what status counts. `submissions`: also the inbox
    and the refusals at submission (not needed for a structure that has just finished: reading every inbox file
    for each would make a big run quadratic)."""
    stories = _Stories(uids)
    _tell_labels(stories, store, load)
    _tell_workflows(stories, launchpad, load)
    if not submissions:
        return [stories.stories[uid] for uid in sorted(stories.stories)]
    for uid, formula in inbox_uids(home).items():
        stories.tell(uid, "waiting", formula=formula, message="in the inbox: the coordinator takes it in")
    for uid, entries in read_refusals(home).items():
        last = entries[-1]
        story = stories.tell(uid, "refused", formula=last.get("formula"), stage="submit", error_type="REFUSED",
                             message=last["reason"])
        if story is not None:
            story.refusals = [{"time": e["time"], "reason": e["reason"]} for e in entries]
    return [stories.stories[uid] for uid in sorted(stories.stories)]


def outcome_counts(stories: list[Story]) -> dict[str, int]:
    """Structures per outcome (every one of OUTCOMES, zeros included) and `marked` (labelled, not nominal)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for story in stories:
        counts[story.outcome] += 1
    counts["marked"] = sum(story.marked for story in stories)
    return counts


def cause(story: Story) -> str:
    """"<error type> at <stage>: <message>", the error type said once."""
    message = story.message or ""
    said = story.error_type in (None, "REFUSED") or message.startswith(story.error_type)
    return f"{'' if said else story.error_type + ' '}at {story.stage}: {message}"


def story_lines(story: Story) -> list[str]:
    """`qe-factory show`: the outcome, the label or the cause, every attempt, the files, the Fireworks."""
    result = story.result
    marks = " (settings other than the nominal ones)" if story.marked else ""
    lines = [f"{story.uid}  {story.formula or (result.formula if result else '?')}  {story.outcome}{marks}"]
    if story.outcome in ("failed", "refused"):
        lines.append(f"  cause        {cause(story)}")
    elif story.message:
        lines.append(f"  {story.message}")
    if result is not None and story.outcome == "labelled":
        lines += _label_lines(result)
    if result is not None and result.energy is not None:  # a label, or a converged result the sanitizer refused
        lines += certificate_lines(certificate(result))
    if result is not None and result.attempts:
        wall = sum(a.wall_time for a in result.attempts)
        cpu = sum(a.cpu_time or 0.0 for a in result.attempts)
        lines.append(f"attempts: {len(result.attempts)} ({wall:.1f} s wall, {cpu:.1f} s pw.x CPU)")
        for a in result.attempts:
            how = f"correction {a.correction}, " if a.correction else ""
            accuracy = f", last SCF accuracy {a.final_scf_accuracy:.2e} Ry" if a.final_scf_accuracy is not None else ""
            cpu_time = f"{a.cpu_time:.1f} s CPU" if a.cpu_time is not None else "CPU n/a"
            lines += [f"  #{a.number}  {a.error_type} ({a.error_code})  {how}start {a.restart}, "
                      f"{a.scf_iterations} SCF iterations{accuracy}, {a.wall_time:.1f} s wall, {cpu_time}, "
                      f"{a.ranks} rank(s), {a.pools} pool(s), exit code {a.returncode}",
                      f"      {a.message}", f"      {a.directory}"]
    lines += [f"files: {path}" for path in story.files]
    if story.fireworks:
        lines.append("fireworks: " + ", ".join(f"{fw_id} {name} {state}" for fw_id, name, state in story.fireworks))
    lines += [f"refused submission ({r['time']}): {r['reason']}" for r in story.refusals]
    return lines


def certificate_lines(cert: dict[str, float | int | str], width: int = 118) -> list[str]:
    """The QC certificate (engine/certificate.py; README's table) as `key=value` lines, `width` characters at most."""
    head = "  certificate "
    lines = [head]
    for key, value in cert.items():
        item = f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}"
        if len(lines[-1]) + 1 + len(item) > width and lines[-1].strip():
            lines.append(" " * len(head))
        lines[-1] += " " + item
    return lines


def _label_lines(result: DFTResult) -> list[str]:
    import numpy as np
    from ase.units import GPa

    forces, stress = np.asarray(result.forces), np.asarray(result.stress)
    norms = np.linalg.norm(forces, axis=1)
    system = result.parameters.get("system", {})
    electrons = result.parameters.get("electrons", {})
    settings = [f"ecutwfc {result.ecutwfc} Ry", f"ecutrho {result.ecutrho} Ry",
                f"{system.get('occupations')} {system.get('smearing', '')} {system.get('degauss', '')} Ry".strip(),
                "k-points " + ("×".join(map(str, result.kpoints)) if result.kpoints else "Γ"),
                f"nspin {system.get('nspin', 1)}", f"conv_thr {electrons.get('conv_thr')} Ry",
                f"mixing_beta {electrons.get('mixing_beta')}"]
    deviations = ", ".join(f"{k}: {v[1]} instead of {v[0]}" for k, v in result.label_deviations.items())
    xml = "pw.x's XML record matches" if result.pw_xml else "no pw.x XML record"
    moment = "n/a" if result.total_magnetization is None else f"{result.total_magnetization} μB"
    return [
        f"  energy       {result.energy:.6f} eV ({result.energy / len(forces):.6f} eV/atom)",
        f"  forces       max |F| {norms.max():.4f} eV/Å (atom {int(norms.argmax())}), mean |F| {norms.mean():.4f} "
        f"eV/Å, {len(forces)} atoms",
        f"  stress       P {-np.trace(stress) / 3 / GPa:.3f} GPa; σ (eV/Å³, ASE sign) "
        + " ".join(f"{x:.5f}" for x in stress.reshape(9)),
        "  settings     " + ", ".join(settings),
        f"  deviations   {deviations or 'none: the nominal settings'}",
        "  pseudos      " + ", ".join(f"{el}: {p.get('filename')} (md5 {p.get('md5')})"
                                      for el, p in result.pseudopotentials.items()),
        f"  provenance   pw.x {result.pw_version}, {result.scf_iterations} SCF iterations, total magnetization "
        f"{moment}, {xml}, sanitizer problems: {'; '.join(result.problems) or 'none'}",
    ]
