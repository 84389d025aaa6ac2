"""A home's history without pw.x: refusals at submission are kept, a uid's outcome is the most advanced one it
reached, and a refusal's cause is told once."""

from __future__ import annotations

from ase import Atoms
from structures import rattled_si

from qe_factory.workflow.history import Story, cause, home_history, outcome_counts, read_refusals


def test_refusals_at_submission_are_kept_and_a_later_workflow_outranks_them(home, fast_config):
    from qe_factory.workflow.state import get_jobstore, get_launchpad
    from qe_factory.workflow.submit import submit

    overlap = Atoms("Si2", positions=[(0, 0, 0), (0.4, 0, 0)], cell=[5, 5, 5], pbc=True, info={"uid": "si-1"})
    report = submit([overlap, rattled_si(2)], fast_config)
    assert list(report.refused) == ["si-1"] and report.formulas == {"si-1": "Si2"}
    (entry,) = read_refusals(home)["si-1"]
    assert entry["formula"] == "Si2" and "apart" in entry["reason"]
    stories = {s.uid: s for s in home_history(home, get_launchpad(read_only=True), get_jobstore())}
    assert (stories["si-1"].outcome, stories["si-1"].stage) == ("refused", "submit")
    assert (stories["si-2"].outcome, stories["si-2"].formula) == ("waiting", "Si2")  # in the LaunchPad, not run

    submit([rattled_si(1)], fast_config)  # the same uid, now a good structure: its workflow is the outcome
    stories = {s.uid: s for s in home_history(home, get_launchpad(read_only=True), get_jobstore())}
    assert stories["si-1"].outcome == "waiting" and len(stories["si-1"].refusals) == 1
    assert outcome_counts(list(stories.values())) == {
        "labelled": 0, "running": 0, "waiting": 2, "failed": 0, "refused": 0, "marked": 0}


def test_the_cause_names_the_error_type_once():
    refused = Story(uid="a", outcome="refused", stage="submit", error_type="REFUSED", message="too close")
    assert cause(refused) == "at submit: too close"
    failed = Story(uid="b", outcome="failed", stage="validate", error_type="UNPHYSICAL", message="unphysical result")
    assert cause(failed) == "UNPHYSICAL at validate: unphysical result"


def test_a_home_without_labels_gets_a_report_without_figures():
    from qe_factory.workflow.report import report_html

    page = report_html([Story(uid="a", outcome="refused", stage="submit", error_type="REFUSED", message="too close")],
                       "home")
    assert "<img" not in page and "no labels yet" in page and "too close" in page
    assert '<div class="tile refused"><b>1</b>refused</div>' in page


def test_the_report_has_a_row_per_pilot_job():
    from qe_factory.workflow.host import HostRecord
    from qe_factory.workflow.report import report_html

    hosts = [HostRecord("slurm-41", 1, "node7", "41", slots=4, state="ENDED", done=23, idle_seconds=60.0,
                        started=1000.0, updated=1600.0)]
    page = report_html([], "home", hosts=hosts)
    row = page[page.index("<h2>Pilot jobs</h2>"):].split("</table>")[0]
    cells = ("<td>slurm-41</td>", "<td>node7</td>", "<td>ENDED</td>", '<td class="n">23</td>', "<td>10.0</td>",
             "<td>98%</td>")
    assert all(cell in row for cell in cells), row
    assert "no pilot jobs" in report_html([], "home")
