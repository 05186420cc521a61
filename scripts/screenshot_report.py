"""Build a fidelity report from a small real compression and screenshot its HTML page.

Trains the digits CNN briefly on scikit-learn's bundled digits (no download), prunes it
hard without recovery so that some predictions flip, writes ``report.{json,md,html}`` and
takes a headless Chromium screenshot of ``report.html``::

    .venv/bin/python scripts/screenshot_report.py --out /tmp/report.png

or of an existing report (``--html out/report.html``).

Needs scikit-learn, matplotlib and a ``chromium`` (or ``chromium-browser`` /
``google-chrome``) binary on PATH (Debian: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """The first headless-capable Chromium binary on PATH, or ``None``."""
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def screenshot(html_path: Path, png_path: Path, *, browser: str, width: int = 1200,
               height: int = 2400, timeout: float = 120.0) -> None:
    """Render ``html_path`` in headless Chromium and save a ``width``×``height`` PNG."""
    with tempfile.TemporaryDirectory(prefix="netpress-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--hide-scrollbars", f"--screenshot={png_path}",
               f"--window-size={width},{height}", html_path.resolve().as_uri()]
        subprocess.run(cmd, check=True, timeout=timeout, capture_output=True)
    if not png_path.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot at {png_path}")


def build_report(out_dir: Path, *, epochs: int = 4, sparsity: float = 0.9, seed: int = 0) -> Path:
    """Train, compress and write the report into ``out_dir``; returns ``report.html``."""
    import torch

    import netpress as npr
    from netpress.datasets import digits, loader
    from netpress.demo import train_classifier
    from netpress.models import DigitsCNN

    train_set, test_set = digits(seed=seed)
    train_loader = loader(train_set, batch_size=64, shuffle=True, seed=seed)
    test_loader = loader(test_set, batch_size=256)
    torch.manual_seed(seed)
    model = train_classifier(DigitsCNN(), train_loader, epochs=epochs, seed=seed)
    result = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=sparsity, floor=0.02)],
                          evaluate=test_loader, seed=seed, latency_batch_size=16)
    result.save_report(out_dir)
    return out_dir / "report.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("report.png"), help="screenshot PNG")
    parser.add_argument("--report-dir", type=Path, default=None,
                        help="where report.{json,md,html} go (default: a temporary folder)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--html", type=Path, default=None,
                        help="screenshot this existing report.html instead of building one")
    args = parser.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print(f"no Chromium found (tried {', '.join(BROWSERS)}); on Debian: "
              f"apt-get install -y chromium", file=sys.stderr)
        return 2
    if args.html is not None:
        html_path = args.html
    else:
        report_dir = args.report_dir or Path(tempfile.mkdtemp(prefix="netpress-report-"))
        html_path = build_report(report_dir, sparsity=args.sparsity)
    screenshot(html_path, args.out, browser=browser, width=args.width, height=args.height)
    print(f"report: {html_path}\nscreenshot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
