import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from madlens.circuits.discovery import discover_ioi
from madlens.circuits.report import render_report, write_outputs

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


def chromium():
    """Debian's chromium; installed here when missing and we are root, else a clear failure."""
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, check=False
        )
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("the report test needs headless Chromium: run `apt-get install -y chromium`")
    return found


def dump_dom(page):
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=3000",
             "--dump-dom", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
    return done.stdout


@pytest.fixture(scope="module")
def result(planted, planted_data):
    return discover_ioi(planted, data=planted_data, max_heads=2, cache=False, progress=False)


def test_report_renders_in_headless_chromium(result, tmp_path):
    paths = write_outputs(result, tmp_path / "out")
    page = paths["html"].read_text()
    assert json.loads(paths["json"].read_text())["heads"]["name_mover"] == [[0, 0]]
    # Self-contained: nothing is fetched (the only URL is the SVG namespace).
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<link" not in page and "<script src" not in page
    assert {u for u in re.findall(r"https?://[^\s\"'<>]+", page)} == {"http://www.w3.org/2000/svg"}
    dom = dump_dom(paths["html"])
    # The inline script ran in the browser and counted what the page drew.
    cells = len(re.findall(r'<rect class="cell"', page))
    maps = page.count('class="heatmap"')
    assert f'data-cells="{cells}"' in dom and f'data-maps="{maps}"' in dom
    # 13 layer x head maps (5 patching, 8 attention) of 1 x 4 cells, 2 layer x position maps
    # of 1 x 5, and the key heads' attention on the example prompt, T x T each.
    width = len(result.example["tokens"])
    assert maps == 13 + 2 + 2
    assert cells == 13 * 4 + 2 * 5 + 2 * width * width
    assert 'data-class="name_mover"' in dom and "0.0" in dom
    assert "Indirect object identification circuit" in dom


def test_report_marks_missing_experiments_and_empty_classes(result):
    page = render_report(result)
    assert "none found" in page  # empty classes are drawn greyed with this label
    assert page.count('<g class="class-box"') == 8  # seven classes and the logits
    assert "n/a" in page  # the path maps of a 1-layer model have no senders: NaN cells
