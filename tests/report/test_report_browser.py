"""The HTML report renders in a real browser (headless Chromium), plots included."""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from netpress.measure import compare
from netpress.report import Report
from netpress.report.html import thumbnails_for
from netpress.testing import TinyMLP, toy_batches

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((p for p in map(shutil.which, BROWSERS) if p), None)

pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason=f"no Chromium binary on PATH (tried {', '.join(BROWSERS)}); "
           f"install it with `apt-get install -y chromium` to run the browser test",
)


def _screenshot(html: Path, png: Path, width: int, height: int) -> None:
    assert BROWSER is not None
    profile = png.parent / "chromium-profile"
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={profile}", "--hide-scrollbars",
           f"--screenshot={png}", f"--window-size={width},{height}", html.as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    image_mod = pytest.importorskip("PIL.Image")
    torch.manual_seed(0)
    reference = TinyMLP(classes=4).eval()
    compressed = copy.deepcopy(reference)
    with torch.no_grad():
        compressed.fc1.weight.add_(0.15 * torch.randn_like(compressed.fc1.weight))
    data = toy_batches(n=96, batch=32)
    report = compare(reference, compressed, data=data, latency_batch_sizes=())
    flipped = report["fidelity"]["flipped"]["indices"]
    Report(report, thumbnails_for(data, flipped)).write(tmp_path)
    png = tmp_path / "shot.png"
    _screenshot(tmp_path / "report.html", png, 1200, 2400)
    assert png.stat().st_size > 50_000
    shot = image_mod.open(io.BytesIO(png.read_bytes())).convert("RGB")
    assert shot.size == (1200, 2400)
    colours = shot.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # text, tables and plots, not blank
    # the plots' blue bars (#1f77b4) are painted: the images loaded from their data: URIs
    blue = sum(n for n, (r, g, b) in colours if abs(r - 0x1F) < 8 and abs(g - 0x77) < 8
               and abs(b - 0xB4) < 8)
    assert blue > 5_000
