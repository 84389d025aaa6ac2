"""Headless Chromium for tests that look at a page as a user would: its DOM after scripts ran, and a screenshot.

Debian's `chromium` is installed by scripts/test.sh (tests only). The flags keep it off the network (this machine's
closed network refuses Chromium's background connections) and away from any user profile.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
)


def chromium() -> str:
    """The Chromium executable; skips the test, with the reason, where it is missing."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.skip("chromium not installed (scripts/test.sh installs it)")


def _run(url: str, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", *flags, url],
            capture_output=True, text=True, timeout=timeout, check=True,
        )


def page_dom(url: str) -> str:
    """The page's DOM (HTML) after its scripts ran."""
    return _run(url, "--dump-dom").stdout


def screenshot(url: str, path: Path, width: int = 1280, height: int = 2400) -> Path:
    """A PNG of the page at `url` (a file:// or http://127.0.0.1 address), `width` × `height` pixels."""
    _run(url, f"--screenshot={path}", f"--window-size={width},{height}")
    if not path.is_file() or path.stat().st_size == 0:
        raise AssertionError(f"chromium wrote no screenshot of {url}")
    return path
