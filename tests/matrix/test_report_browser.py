"""The report as people see it: a real run's results rendered by headless Chromium, screenshot not blank."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_sandbox.cli import main

CHROMIUM = next((p for name in ("chromium", "chromium-browser") if (p := shutil.which(name))), None)

# A cell that passes, an OOM-killed control (expected), and a crash outside expect (its detail opens).
MATRIX = """\
version: 1
pythons: ["{python}"]
memory: [64m]
backends: [cgroup]
timeout: 60
workloads:
  hold:
    command: ["-c", "import time; b = bytearray(24 << 20); b[::4096] = b'x' * 6144; time.sleep(1)"]
  bomb: {{control: alloc-bomb, args: {{step: 4m, max: 256m}}}}
  broken:
    command: ["-c", "import time; time.sleep(0.5); raise SystemExit('a deliberate failure')"]
expect:
  rules:
    - {{match: {{workload: bomb}}, expect: [oom]}}
"""


def screenshot(page: str, out: Path, height: int) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={out}",
            f"--window-size=1400,{height}",
            page,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.cgroup
@pytest.mark.usefixtures("writable_cgroups")
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package chromium)")
@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_a_real_runs_report_renders_in_chromium(tmp_path: Path) -> None:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(MATRIX.format(python=python))
    results, report = tmp_path / "results.jsonl", tmp_path / "report"
    argv = ["run", str(matrix), "--backend", "cgroup", "--results", str(results), "--report", str(report)]
    assert main(argv) == 1  # the broken cell is outside its expect, the bomb's OOM is expected

    html = (report / "index.html").read_text()
    assert html.count('class="timeline"') == 3 and 'class="oom-kill"' in html
    assert "a deliberate failure" in html and "OOM kill at" in html and "isolation (cgroup)" in html
    assert any(p.name.startswith("timeline-") and "bomb" in p.name for p in report.iterdir())

    # Headless Chromium draws a page scrolled to a #fragment blank: the whole page in one tall window
    # shows the failing cell's detail (opened, as every cell outside expect is) under the grids.
    page = (report / "index.html").as_uri()
    for name, height in (("top", 1000), ("whole-page", 2600)):
        shot = tmp_path / f"{name}.png"
        done = screenshot(page, shot, height)
        assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
        # The page has no script: any console message is a problem (a blocked resource, a parse error).
        console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
        assert console == []
        import matplotlib.image

        pixels = matplotlib.image.imread(str(shot))
        assert pixels.shape[:2] == (height, 1400)
        colours = {tuple(row) for row in pixels.reshape(-1, pixels.shape[-1])[::97].round(2)}
        assert pixels.std() > 0.05 and len(colours) > 20, "the screenshot is blank"
    # The failing detail sits in the lower half of the whole page: it must be drawn too.
    lower = pixels[1000:2000]
    assert lower.std() > 0.05, "the failing cell's detail is not drawn"
