"""Headless Chromium for tests of HTML output (Debian's `chromium`, installed when missing)."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip


def chromium() -> str:
    """Path of the chromium binary; installs Debian's package when missing and root."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True,
                       capture_output=True)  # fmt: skip
        found = shutil.which("chromium")
    if not found:
        raise RuntimeError("headless tests need Debian's chromium: apt-get install chromium")
    return found


def dump_dom(page: Path, budget_ms: int = 5000) -> str:
    """The DOM after Chromium loaded and ran `page` (a local file)."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
             "--dump-dom", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
    return result.stdout


def screenshot(page: Path, out: Path, size: str = "1200,2400") -> Path:
    """A PNG screenshot of `page`."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
             f"--screenshot={out}", page.resolve().as_uri()],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
    return out
