"""The report as one self-contained HTML page, and thumbnails of flipped image inputs.

The page needs no network and no JavaScript: CSS is inline and images (plots and
thumbnails) are base64 ``data:`` URIs. Every piece of text from the report is escaped.
Plots come from :mod:`netpress.report.plots` (matplotlib, the ``report`` extra); without
matplotlib the page has every table and a note instead of the plots.
"""

from __future__ import annotations

import base64
import html
import json
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from netpress.report.rows import get, notes, pct, rows, step_details

__all__ = ["MAX_CLASS_ROWS", "encode_png", "thumbnails_for", "to_html"]

#: Above this many classes the per-class table lists only the lowest-agreement classes.
MAX_CLASS_ROWS = 100

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d232a;
  max-width:1100px;margin:24px auto;padding:0 20px;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:32px 0 10px;
  border-bottom:2px solid #e3e7ec;padding-bottom:4px}
.meta{color:#5b6673;margin:0 0 16px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{border:1px solid #d8dee5;border-radius:8px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:22px}.card span{color:#5b6673;font-size:13px}
table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{border:1px solid #d8dee5;padding:4px 10px;text-align:right}
th{background:#f3f5f8}td:first-child,th:first-child{text-align:left}
tr.bad td{background:#fff1ea}
figure{margin:14px 0}figure img{max-width:100%;border:1px solid #e3e7ec}
figcaption{color:#5b6673;font-size:13px}
.flips{display:flex;flex-wrap:wrap;gap:8px}
.flip{border:1px solid #d8dee5;border-radius:6px;padding:6px;width:108px;font-size:13px;
  text-align:center}
.flip img{width:72px;height:72px;image-rendering:pixelated;display:block;margin:0 auto 4px}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:13px}
.note{color:#8a5a00}
.warning{border:2px solid #c0392b;background:#fdecea;color:#7b1d12;border-radius:8px;
  padding:10px 14px;margin:12px 0;font-weight:600}
.notes{color:#5b6673;font-size:13px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(data: bytes, alt: str, mime: str = "image/png") -> str:
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _table(header: Sequence[str], body: Iterable[Sequence[Any]],
           bad: Sequence[bool] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    lines = [f"<table><thead><tr>{head}</tr></thead><tbody>"]
    for i, row in enumerate(body):
        cls = ' class="bad"' if bad is not None and bad[i] else ""
        lines.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _cards(r: Mapping[str, Any]) -> str:
    if isinstance(get(r, "fidelity.cosine"), Mapping):
        threshold = get(r, "fidelity.threshold")
        picks: list[tuple[str, Any]] = [
            ("mean cosine similarity to the reference", _cos(get(r, "fidelity.cosine_mean"))),
            ("5th-percentile cosine", _cos(get(r, "fidelity.cosine.quantiles.p05"))),
            (f"rows with cosine ≥ {threshold:g}", pct(get(r, "fidelity.agreement")))]
    else:
        picks = [("agreement", pct(get(r, "agreement"))),
                 ("agreement of the ONNX export in ONNX Runtime",
                  pct(get(r, "onnx.fidelity.agreement"))),
                 ("mismatches where the reference was right",
                  get(r, "fidelity.mismatches_on_reference_correct")),
                 ("worst per-class agreement", pct(get(r, "fidelity.worst_class_agreement"))),
                 ("flips / difficulty Spearman ρ", get(r, "fidelity.long_tail.spearman"))]
    out = []
    for label, value in picks:
        if value is None or value == "—":
            continue
        shown = f"{value:+.3f}" if isinstance(value, float) else value
        out.append(f'<div class="card"><b>{_e(shown)}</b><span>{_e(label)}</span></div>')
    return f'<div class="cards">{"".join(out)}</div>' if out else ""


def _cos(x: Any) -> str:
    return "—" if x is None else f"{x:.4f}"


def _warnings(r: Mapping[str, Any]) -> str:
    return "".join(f'<div class="warning">⚠ {_e(w)}</div>' for w in r.get("warnings") or [])


def _notes(r: Mapping[str, Any]) -> str:
    items = notes(r)
    return ('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in items) + "</ul>"
            if items else "")


def _cosine_section(fid: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    dist = fid.get("cosine")
    if not isinstance(dist, Mapping):
        return ""
    keys = ("min", "p01", "p05", "p25", "median", "p75", "max")
    q = dist["quantiles"]
    shares = dist["share_at_least"]
    return "\n".join([
        "<h2>Cosine similarity to the reference</h2>",
        f"<p>Over {_e(fid.get('n'))} output rows (one per input, or per token). The share "
        f"of rows at or above a threshold depends steeply on the threshold: read it from the "
        f"distribution, not from one number.</p>",
        _table(list(keys), [[f"{q[k]:.5f}" for k in keys]]),
        _table(["rows with cosine ≥", *shares], [["share", *(pct(v) for v in shares.values())]]),
        _figure(plots, "cosine", _CAPTIONS["cosine"])])


def _class_section(fid: Mapping[str, Any]) -> str:
    per_class = list(fid.get("per_class") or [])
    if not per_class:
        return ""
    churn = fid.get("class_churn") or {}
    note = ""
    if len(per_class) > MAX_CLASS_ROWS:
        per_class = sorted(per_class, key=lambda c: (c.get("agreement") is None,
                                                     c.get("agreement") or 0.0))[:MAX_CLASS_ROWS]
        note = f'<p class="note">The {MAX_CLASS_ROWS} classes with the lowest agreement.</p>'
    body, bad = [], []
    for c in per_class:
        k = c.get("class")
        flips = [churn[key][k] if isinstance(k, int) and key in churn else "—"
                 for key in ("flips_out", "flips_in")]
        body.append([k, c.get("support"), pct(c.get("agreement")),
                     pct(c.get("reference_accuracy")), pct(c.get("compressed_accuracy")),
                     *flips])
        bad.append(c.get("agreement") is not None and c["agreement"] < 1.0)
    table = _table(["class", "support", "agreement", "ref. accuracy", "comp. accuracy",
                    "flips out", "flips in"], body, bad)
    return "<h2>Per-class fidelity</h2>" + note + table


def _figure(plots: Mapping[str, bytes], key: str, caption: str) -> str:
    if key not in plots:
        return ""
    return f"<figure>{_img(plots[key], caption)}<figcaption>{_e(caption)}</figcaption></figure>"


_CAPTIONS = {
    "classes": "Agreement per true class, and inputs whose prediction moved out of or into "
               "each class.",
    "matrix": "Rows: reference prediction; columns: compressed prediction. Off-diagonal "
              "cells are flips.",
    "confidence": "Change in the probability the compressed model gives the reference's "
                  "top-1 class.",
    "long_tail": "Inputs binned by the reference's difficulty (equal-count bins); the bar is "
                 "the share of inputs whose top-1 prediction flipped.",
    "cosine": "Cosine similarity of each output row to the reference's; the dashed line is "
              "the threshold the task was given.",
}


def _long_tail_section(fid: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    lt, shift = fid.get("long_tail"), fid.get("confidence_shift")
    parts = []
    if lt:
        rho = lt.get("spearman")
        parts += ["<h2>Long tail: are the flips on hard inputs?</h2>",
                  f"<p>Difficulty proxy: <b>{_e(lt.get('proxy'))}</b> "
                  f"({_e(lt.get('difficulty'))}). Spearman correlation between difficulty "
                  f"and flipping: <b>{_e('n/a' if rho is None else f'{rho:+.3f}')}</b>; "
                  f"mismatch rate in the easiest bin {_e(pct(lt.get('mismatch_rate_easiest')))}"
                  f", in the hardest {_e(pct(lt.get('mismatch_rate_hardest')))}.</p>",
                  _figure(plots, "long_tail", _CAPTIONS["long_tail"])]
    if shift:
        parts += ["<h2>Confidence shift</h2>",
                  _table(["mean", "mean |shift|", "p05", "median", "p95", "less confident"],
                         [[f"{shift['mean']:+.4f}", f"{shift['mean_abs']:.4f}",
                           f"{shift['p05']:+.4f}", f"{shift['median']:+.4f}",
                           f"{shift['p95']:+.4f}", pct(shift['share_decreased'])]]),
                  _figure(plots, "confidence", _CAPTIONS["confidence"])]
    return "\n".join(parts)


def _flipped_section(fid: Mapping[str, Any], thumbnails: Mapping[int, bytes]) -> str:
    flipped = fid.get("flipped")
    if not flipped:
        return ""
    count, indices = flipped.get("count", 0), list(flipped.get("indices") or [])
    head = f"<h2>Flipped inputs ({_e(count)})</h2>"
    if not indices:
        return head + "<p>No input changed its top-1 prediction.</p>"
    labels = flipped.get("labels") or [None] * len(indices)
    cards = []
    for i, ref, cmp, label in zip(indices, flipped["reference_pred"],
                                  flipped["compressed_pred"], labels):
        thumb = _img(thumbnails[i], f"input {i}") if i in thumbnails else ""
        label_text = "" if label is None else f"<br>label {_e(label)}"
        cards.append(f'<div class="flip">{thumb}#{_e(i)}{label_text}<br>'
                     f"{_e(ref)} → {_e(cmp)}</div>")
    shown = "" if len(indices) == count else f" (the first {len(indices)}, in data order)"
    return (head + f"<p>Index in the evaluation data, true label, reference → compressed "
            f"prediction{_e(shown)}.</p>" + f'<div class="flips">{"".join(cards)}</div>')


def _steps_section(r: Mapping[str, Any]) -> str:
    parts = []
    steps = r.get("steps") or []
    if steps:
        items = []
        for s in steps:
            detail = step_details(s)
            items.append(f"<li><b>{_e(s.get('step'))}</b>: {_e(detail)}</li>")
        parts.append("<h2>Steps</h2><ul>" + "".join(items) + "</ul>")
    if r.get("recipe"):
        parts.append(f"<h2>Recipe</h2><pre>{_e(json.dumps(r['recipe'], indent=2))}</pre>")
    return "\n".join(parts)


def to_html(report: Mapping[str, Any], *, thumbnails: Mapping[int, bytes] | None = None,
            plots: Mapping[str, bytes] | None = None) -> str:
    """The whole report as one self-contained HTML page.

    ``thumbnails`` maps flipped input indices to PNG bytes (see :func:`thumbnails_for`);
    ``plots`` replaces the drawn plots (default: :func:`~netpress.report.plots.report_plots`).
    """
    from netpress.report.plots import have_matplotlib, report_plots

    plots = report_plots(report) if plots is None else plots
    fid = report.get("fidelity") if isinstance(report.get("fidelity"), Mapping) else None
    version = report.get("netpress_version", "")
    body = ["<h1>netpress compression report</h1>",
            f'<p class="meta">netpress {_e(version)} · task {_e(report.get("task", "—"))}</p>',
            _warnings(report), _cards(report), "<h2>Summary</h2>",
            _table(["metric", "reference", "compressed", "change"], rows(report)),
            _notes(report)]
    if fid is not None:
        if not plots and not have_matplotlib():
            body.append('<p class="note">Plots need matplotlib: '
                        "<code>pip install 'netpress[report]'</code>.</p>")
        body += [_cosine_section(fid, plots), _class_section(fid),
                 _figure(plots, "classes", _CAPTIONS["classes"])]
        if "matrix" in plots:
            body += ["<h2>Reference → compressed predictions</h2>",
                     _figure(plots, "matrix", _CAPTIONS["matrix"])]
        body += [_long_tail_section(fid, plots), _flipped_section(fid, thumbnails or {})]
    body.append(_steps_section(report))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>netpress compression report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(p for p in body if p)
            + "\n</body></html>\n")


def encode_png(pixels: Any) -> bytes:
    """PNG bytes of a ``uint8`` array ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB), stdlib only."""
    import numpy as np

    arr = np.ascontiguousarray(pixels, dtype=np.uint8)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"encode_png takes [H, W] or [H, W, 3] pixels, got {arr.shape}")
    h, w = arr.shape[:2]

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if arr.ndim == 2 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def _image_batch(inputs: Any) -> torch.Tensor | None:
    """``inputs`` as ``[N, H, W]`` or ``[N, H, W, 3]`` float, or ``None`` if not image-like."""
    if not isinstance(inputs, torch.Tensor):
        try:
            import numpy as np

            if not isinstance(inputs, np.ndarray):
                return None
            inputs = torch.from_numpy(inputs)
        except (ImportError, TypeError):
            return None
    x = inputs.detach().cpu()
    if x.is_complex() or x.dtype == torch.bool:
        return None
    if x.dim() == 4 and x.shape[1] in (1, 3):
        x = x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)
    elif x.dim() != 3:
        return None
    return x.float() if min(x.shape[1], x.shape[2]) >= 4 else None


def _to_pixels(image: torch.Tensor) -> Any:
    lo, hi = float(image.min()), float(image.max())
    scaled = (image - lo) / (hi - lo) * 255.0 if hi > lo else torch.zeros_like(image)
    return scaled.round().clamp(0, 255).to(torch.uint8).numpy()


def thumbnails_for(data: Iterable[Any], indices: Iterable[int], *, max_n: int = 48
                   ) -> dict[int, bytes]:
    """PNG thumbnails of the inputs at ``indices`` (data order), for image data.

    Walks ``data`` (``(inputs, labels)`` batches) once, stopping after the last wanted
    index; takes the first ``max_n`` indices. Inputs must be ``N×C×H×W`` with C in {1, 3}
    or ``N×H×W``; each image is min-max scaled to 0..255. Returns ``{}`` for other inputs
    (tuples, dicts, token ids, flat features). The data must yield the same order as the
    pass that found the indices (no shuffling).
    """
    wanted = sorted({int(i) for i in indices})[:max_n]
    out: dict[int, bytes] = {}
    if not wanted:
        return out
    start, last = 0, wanted[-1]
    for batch in data:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        images = _image_batch(inputs)
        if images is None:
            return {}
        n = int(images.shape[0])
        for i in wanted:
            if start <= i < start + n:
                out[i] = encode_png(_to_pixels(images[i - start]))
        start += n
        if start > last:
            break
    return out
