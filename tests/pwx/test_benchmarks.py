"""Every benchmark script's smoke mode (`--smoke`: tiny sizes) completes and prints its figures, so that none rots.

Each script runs as a user runs it, in a subprocess. Nothing here asserts a time or a goal: the figures of the tiny
sizes are not the benchmarks' (benchmarks/README.md has those); only that each is printed, as a number.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
FACTORY_ENV = ("QE_FACTORY_HOME", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "MONGOMOCK_SERVERSTORE_FILE")
NUMBER = r"-?\d+(?:\.\d+)?"


def smoke(script: str, cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """stdout of `benchmarks/<script> --smoke ARGS`, which must succeed."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in FACTORY_ENV}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} --smoke failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def foreign_home_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment pointing at another home (as after `eval $(qe-factory env)`, or as P4 left it): a benchmark
    phase must use its own fresh home, never this one."""
    foreign = tmp_path / "foreign-home"
    env = {**os.environ, "QE_FACTORY_HOME": str(foreign), "FW_CONFIG_FILE": str(foreign / "FW_config.yaml"),
           "JOBFLOW_CONFIG_FILE": str(foreign / "jobflow.yaml"),
           "MONGOMOCK_SERVERSTORE_FILE": str(foreign / "launchpad.json")}
    return env, foreign


def line(output: str, pattern: str) -> re.Match:
    """The one line of `output` that matches `pattern` from its start."""
    found = [m for m in (re.match(pattern, text) for text in output.splitlines()) if m]
    assert len(found) == 1, f"{len(found)} lines match {pattern!r} in:\n{output}"
    return found[0]


def test_factory_smoke_prints_every_figure_and_p5_really_submits(tmp_path):
    """P1, P2, P2', P4, P5, P6; P5's structures are added to P5's own homes, none refused (they once went to P4's
    LaunchPad through inherited variables and were all refused as another structure's), and the worker's results
    are exported."""
    env, foreign = foreign_home_env(tmp_path)
    out = smoke("factory.py", tmp_path, env=env)
    assert float(line(out, rf"P1  qe-factory run ({NUMBER}) s .* = ({NUMBER}) \(goal").group(2)) > 0
    assert float(line(out, rf"P2  structures per hour.*: ({NUMBER}) \(goal").group(1)) > 0
    assert float(line(out, rf"P2' two 2-atom Si cells: .*throughput ratio ({NUMBER}) \(goal").group(1)) > 0
    p4 = line(out, rf"P4  submit 20 structures: ({NUMBER}) s \((\d+) added, (\d+) duplicates skipped, (\d+) refused")
    assert p4.group(2, 3, 4) == ("20", "0", "0")
    for submitted in (10, 20):
        for home in ("home", "home2"):
            added = line(out, rf"P4' submit {submitted} to {home}: ({NUMBER}) s, peak RSS ({NUMBER}) MB "
                              r"\((\d+) added, (\d+) duplicates skipped, (\d+) refused\)")
            assert added.group(3, 4, 5) == (str(submitted), "0", "0"), added.group(0)
        p5 = line(out, rf"P5  {submitted} submitted: 15 Fireworks in ({NUMBER}) s, 30 in ({NUMBER}) s .*: ({NUMBER}) "
                       rf"ms per Firework \(goal ≤ 20 ms\); worker peak RSS ({NUMBER}) MB")
        assert all(p5.group(i) for i in (1, 2, 3, 4))
    exports = re.findall(rf"P6  export: ({NUMBER}) s, peak RSS so far ({NUMBER}) MB", out)
    written = [int(n) for n in re.findall(r"(\d+) of \d+ results written", out)]
    assert len(exports) == 2 and len(written) == 2 and all(n > 0 for n in written), out
    assert not foreign.exists()  # no phase used the home the environment named


@pytest.mark.parametrize("held", [False, True], ids=["streamed", "held"])
def test_submit_smoke_prints_each_phase(tmp_path, held):
    env, foreign = foreign_home_env(tmp_path)
    out = smoke("submit.py", tmp_path, *(["--held"] if held else []), env=env)
    first, second = ("build_workflows", "post") if held else ("plan_workflows", "make_workflows \\+ post")
    built = line(out, rf"{first} ({NUMBER}) s \(CPU ({NUMBER}) s; (\d+) duplicates, (\d+) refused\), peak RSS "
                      rf"({NUMBER}) MB")
    assert built.group(3, 4) == ("0", "0")
    posted = line(out, rf"{second} ({NUMBER}) s \(CPU ({NUMBER}) s\), peak RSS ({NUMBER}) MB; inbox ({NUMBER}) MB "
                       r"in (\d+) file\(s\)")
    assert float(posted.group(4)) > 0 and int(posted.group(5)) > 0
    line(out, rf"total ({NUMBER}) s \(CPU ({NUMBER}) s\)")
    assert not foreign.exists()


def test_recovery_smoke_prints_the_ratios_of_every_strategy(tmp_path):
    """The structure fails at attempt 1 (else it is left out and there is nothing to measure), every strategy
    recovers it, and each has its CPU and iteration ratios, per strategy and per class."""
    out = smoke("recovery.py", tmp_path)
    assert "did not fail at attempt 1" not in out, out
    for strategy in ("ours", "peer", "ours-no-trend"):
        line(out, rf"\[ ?\d+/3\] fe2-rattled\s+{strategy}\s+OK\s+(\d+) attempt\(s\)")
        row = line(out, rf"{strategy}\s+(\d+)/(\d+)\s+(\d+)%\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+(\d+)\s+"
                        rf"({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})$")
        assert row.group(1, 2) == ("1", "1")
        line(out, rf"bulk\s+{strategy}\s+1/1\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})$")
        line(out, rf"fe2-rattled\s+{strategy}\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+")  # label consistency
    line(out, rf"elapsed ({NUMBER}) min")


def test_e0s_smoke_prints_the_box_study_and_the_element(tmp_path):
    out = smoke("e0s.py", tmp_path, "--work-dir", str(tmp_path / "runs"))
    for edge in (6, 7):
        line(out, rf"box \({edge}\.0, {edge}\.5, {edge + 1}\.0\): E0 ({NUMBER}) eV, \+?({NUMBER}) meV vs the largest; "
                  rf"({NUMBER}) s")
    element = line(out, rf"element H: converged yes, (\d+) attempt\(s\), (\d+) SCF iterations, ({NUMBER}) s, "
                        rf"25\.0/200\.0 Ry, E0 ({NUMBER}) eV, moment ({NUMBER})")
    assert float(element.group(5)) == pytest.approx(1.0)  # H's Hund moment


def test_coordinator_smoke_prints_its_figures(tmp_path):
    output = smoke("coordinator.py", tmp_path)
    for size in (10, 30):
        line(output, rf"C1 {size} submitted, {size} labelled before: \d+ Fireworks measured: coordinator CPU "
                     rf"{NUMBER} ms")
    line(output, rf"C2 3 slots, pw.x 1 s: 9 structures in {NUMBER} s \({NUMBER} structures/s.*feeds {NUMBER} cores")
