"""Stock FireWorks command-line tools (`lpad`, `qlaunch`) on a factory home, following the coordinator's rules."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from qe_factory.workflow.fireworks_adapter import replace_keeping_previous
from qe_factory.workflow.home import config_environment, embedded_file


def qlaunch_command(args: list[str], home: Path) -> tuple[list[str], dict[str, str]]:
    """argv and environment for stock `qlaunch` on a MongoDB home (an embedded home's qlaunch is the offline
    coordinator: `qe-factory qlaunch`)."""
    qlaunch = Path(sys.executable).with_name("qlaunch")
    return [str(qlaunch), "-c", str(home / "fw_config"), *args], {**os.environ, **config_environment(home)}


# lpad subcommands that only read (everything else may write)
READING_LPAD_COMMANDS = {
    "get_wflows", "get_fws", "get_fw_ids", "get_wf_ids", "get_launchdir", "get_qids", "get_tracker", "report",
    "introspect", "version", "get_fw_ids_from_launch_dir",
}


def run_lpad(args: list[str], home: Path) -> int:
    """Stock `lpad` on this home. With the embedded LaunchPad it works on a copy of the file (its exit-time write
    lands there): a reading command on a snapshot, beside anything; any other as the home's coordinator (refused
    while one runs), the copy then replacing the file atomically when lpad succeeded."""
    import shutil
    import subprocess

    from qe_factory.workflow.lock import command_line, coordinate

    lpad = [str(Path(sys.executable).with_name("lpad")), "-c", str(home / "fw_config"), *args]
    env = {**os.environ, **config_environment(home)}
    file = embedded_file(home)
    if file is None:
        return subprocess.run(lpad, env=env).returncode
    command = next((a for a in args if not a.startswith("-")), "")
    if command == "webgui":  # stock webgui would show the copy, never refreshed
        print("qe-factory: on an embedded home use `qe-factory webgui [--port N]` (read-only, fresh on each "
              "reload, 127.0.0.1 only)", file=sys.stderr)
        return 2
    copy = file.with_name(f"lpad-{os.getpid()}.json")
    env["MONGOMOCK_SERVERSTORE_FILE"] = str(copy)
    try:
        if command in READING_LPAD_COMMANDS or not command:
            shutil.copyfile(file, copy)
            return subprocess.run(lpad, env=env).returncode
        with coordinate(home, command_line()):
            shutil.copyfile(file, copy)
            returncode = subprocess.run(lpad, env=env).returncode
            if returncode == 0:
                import bson.json_util

                bson.json_util.loads(copy.read_text())  # lpad left a readable file
                replace_keeping_previous(copy, file)
            return returncode
    finally:
        copy.unlink(missing_ok=True)
