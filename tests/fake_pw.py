#!/usr/bin/env python3
"""A stand-in for pw.x, for failures real pw.x cannot produce cheaply and for the spec's mocked scenarios.

FAKE_PW_PLAN is a comma-separated list of actions, one per call (the last one repeats); FAKE_PW_COUNTER names a
file that counts the calls; FAKE_PW_PIDFILE, if set, gets this process's pid. Actions:
  replay:<fixture>  print tests/data/<fixture>/pw.out (real pw.x output), its pw.err and CRASH, exit with its code;
                    when the run had SCF iterations, leave a charge-density file in ../out/pwscf.save as pw.x does,
                    and the fixture's data-file-schema.xml there when it has one (its <input> is the fixture's:
                    the runner's check flags a replay under other settings)
  cholesky          si_scf's output up to its first SCF iteration, then the error block and CRASH file pw.x writes
                    when the Cholesky factorisation fails (real pw.x 6.7 did not fail so on any cheap input)
  segfault          die on SIGSEGV        oom      die on SIGKILL after printing the OOM killer's words to stderr
  sigkill           die on SIGKILL without a word (as a scheduler or a user kills it)
  hang              sleep until killed    garbage  print bytes that are no pw.x output and exit 0
"""

import fcntl
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

DATA = Path(__file__).parent / "data"


def count_call(counter: Path) -> int:
    """The calls counted before this one; counts this one. Under a lock: packed runs start stand-ins at once, and
    one reading the file while another rewrites it read '' (a replay that failed for the test's own reason)."""
    with open(counter, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        calls = int(handle.read() or 0)
        handle.seek(0)
        handle.truncate()
        handle.write(str(calls + 1))
        return calls


def main() -> int:
    plan = os.environ["FAKE_PW_PLAN"].split(",")
    calls = count_call(Path(os.environ["FAKE_PW_COUNTER"]))
    if os.environ.get("FAKE_PW_PIDFILE"):
        Path(os.environ["FAKE_PW_PIDFILE"]).write_text(str(os.getpid()))
    action = plan[min(calls, len(plan) - 1)]
    if action.startswith("replay:"):
        fixture = DATA / action.split(":", 1)[1]
        sys.stdout.write((fixture / "pw.out").read_text())
        if (fixture / "pw.err").exists():
            sys.stderr.write((fixture / "pw.err").read_text())
        if (fixture / "CRASH").exists():
            shutil.copy(fixture / "CRASH", "CRASH")
        if "iteration #" in (fixture / "pw.out").read_text():
            density = Path("..", "out", "pwscf.save", "charge-density.dat")
            density.parent.mkdir(parents=True, exist_ok=True)
            density.write_bytes(b"")
            if (fixture / "data-file-schema.xml").exists():
                shutil.copy(fixture / "data-file-schema.xml", density.parent / "data-file-schema.xml")
        return json.loads((fixture / "meta.json").read_text())["returncode"]
    if action == "cholesky":
        head = (DATA / "si_scf" / "pw.out").read_text().split("     iteration #  2")[0]
        block = (
            " " + "%" * 78 + "\n     Error in routine  cdiaghg (1):\n      problems computing cholesky\n "
            + "%" * 78 + "\n"
        )
        sys.stdout.write(head + block + "\n     stopping ...\n")
        Path("CRASH").write_text(block)
        return 1
    sys.stdout.write("     Program PWSCF v.6.7MaX starts on  1Jan2026 at  0: 0: 0\n")
    sys.stdout.flush()
    if action == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if action == "oom":
        sys.stderr.write("Out of memory: Killed process (pw.x)\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "hang":
        time.sleep(3600)
    if action == "garbage":
        sys.stdout.write("\x00\x01 no pw.x here \ufffd\n" * 10)
        return 0
    raise SystemExit(f"fake pw.x: unknown action {action!r}")


if __name__ == "__main__":
    sys.exit(main())
