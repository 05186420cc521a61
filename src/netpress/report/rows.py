"""The summary table of a report dict: ``(metric, reference, compressed, change)`` rows.

One table serves the terminal, ``report.md`` and ``report.html``. Each figure says what it
is: parameters are counted whatever their storage and storage is given apart (bits per
parameter, bytes); MACs say which count dense kernels execute; latency names the runtime
that was timed; task metrics other than classification (cosine for embeddings, a user
task's numbers) get their own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["difficulty_labels", "get", "notes", "pct", "rows", "step_details"]

Row = tuple[str, str, str, str]


def get(d: Mapping[str, Any], path: str) -> Any:
    """``d["a"]["b"]`` for ``path="a.b"``; ``None`` when any part is missing."""
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def pct(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _num(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, int) and abs(x) >= 10_000:
        return f"{x:,}"
    return str(x)


def _ms(x: Any) -> str:
    return "—" if x is None else f"{x:.3f} ms"


def _fewer(a: Any, b: Any, word: str = "fewer") -> str:
    if not a or not b:
        return ""
    if a == b:
        return "same"
    if isinstance(a, int) and isinstance(b, int) and max(a, b) / min(a, b) < 1.05:
        return f"{a - b:,} {word}" if a > b else f"{b - a:,} more"
    return f"{a / b:.2f}× {word}" if a > b else f"{b / a:.2f}× more"


def _speed(ref_ms: Any, cmp_ms: Any) -> str:
    if not ref_ms or not cmp_ms:
        return ""
    ratio = ref_ms / cmp_ms
    return f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"


def _classification_rows(g: Callable[[str], Any]) -> list[Row]:
    out: list[Row] = []
    if g("agreement") is not None:
        out.append(("agreement with reference", "100.00%", pct(g("agreement")), ""))
    if g("onnx.fidelity.agreement") is not None:
        out.append(("  … exported, in ONNX Runtime", "100.00%",
                    pct(g("onnx.fidelity.agreement")), ""))
    n = g("fidelity.n")
    if g("fidelity.mismatches") is not None:
        out.append(("mismatches", "0", f"{g('fidelity.mismatches')} of {n}", ""))
    if g("fidelity.mismatches_on_reference_correct") is not None:
        out.append(("  … where reference was right", "0",
                    str(g("fidelity.mismatches_on_reference_correct")), ""))
    if g("fidelity.worst_class_agreement") is not None:
        out.append(("worst per-class agreement", "100.00%",
                    pct(g("fidelity.worst_class_agreement")), ""))
    if g("fidelity.kl_mean") is not None:
        out.append(("mean KL(ref ‖ compressed)", "0", f"{g('fidelity.kl_mean'):.4g}", ""))
    return out


def _cos(x: Any) -> str:
    return "—" if x is None else f"{x:.4f}"


def _embedding_rows(g: Callable[[str], Any]) -> list[Row]:
    q = g("fidelity.cosine.quantiles") or {}
    out: list[Row] = [("cosine similarity to reference, mean", "1", _cos(g("fidelity.cosine_mean")),
                       "")]
    if q:
        out.append(("  … min / p01 / p05 / median", "1 / 1 / 1 / 1",
                    " / ".join(_cos(q.get(k)) for k in ("min", "p01", "p05", "median")), ""))
    threshold = g("fidelity.threshold")
    shares = g("fidelity.cosine.share_at_least") or {}
    if threshold is not None:
        out.append((f"rows with cosine ≥ {threshold:g} (your threshold)", "100.00%",
                    pct(g("fidelity.agreement")), ""))
    others = [(float(t), v) for t, v in shares.items() if threshold is None
              or float(t) != float(threshold)]
    if others:
        out.append(("rows with cosine ≥ " + " / ".join(f"{t:g}" for t, _ in others),
                    " / ".join("100%" for _ in others),
                    " / ".join(f"{100 * v:.1f}%" for _, v in others), ""))
    if g("fidelity.relative_mean_abs_error") is not None:
        out.append(("mean |error| / mean |reference output|", "0",
                    f"{g('fidelity.relative_mean_abs_error'):.4g}", ""))
    onnx_cos = g("onnx.fidelity.headline.cosine_mean")
    if onnx_cos is not None:
        out.append(("  … mean, exported, in ONNX Runtime", "1", _cos(onnx_cos), ""))
    return out


def _shown(key: str, value: Any) -> str:
    return pct(value) if "agreement" in key or key.startswith("share") else _num(value)


def _headline_rows(g: Callable[[str], Any], skip: tuple[str, ...] = ()) -> list[Row]:
    """A task's headline numbers, one row each; ``x_reference``/``x_compressed`` pairs (a
    language model's perplexity) share one row."""
    head = {k: v for k, v in (g("headline") or {}).items() if k not in skip}
    out: list[Row] = []
    for key, value in head.items():
        stem, _, side = key.rpartition("_")
        if side == "compressed" and f"{stem}_reference" in head:
            continue
        if side == "reference" and f"{stem}_compressed" in head:
            other = head[f"{stem}_compressed"]
            out.append((stem.replace("_", " "), _shown(stem, value), _shown(stem, other),
                        ""))
            continue
        out.append((key.replace("_", " "), "", _shown(key, value), ""))
    return out


def _fidelity_rows(r: Mapping[str, Any], g: Callable[[str], Any]) -> list[Row]:
    fid = r.get("fidelity")
    if not isinstance(fid, Mapping):
        return []
    if "cosine_mean" in fid:
        shown = ("cosine_mean", "agreement") + (
            ("cosine_min", "cosine_p05") if isinstance(fid.get("cosine"), Mapping) else ())
        return _embedding_rows(g) + _headline_rows(g, skip=shown)
    if "mismatches" in fid:
        return _classification_rows(g)
    return _headline_rows(g)


def _formats(storage: Any) -> str:
    formats = storage.get("formats") if isinstance(storage, Mapping) else None
    if not formats:
        return "—"
    return ", ".join(f"{k} {_num(v)}" for k, v in formats.items())


def _size_rows(g: Callable[[str], Any]) -> list[Row]:
    out: list[Row] = []
    rp, cp = g("reference.params"), g("compressed.params")
    if rp is not None:
        out.append(("parameters", _num(rp), _num(cp), _fewer(rp, cp)))
        rn, cn = g("reference.nonzero_params"), g("compressed.nonzero_params")
        out.append(("non-zero parameters", _num(rn), _num(cn), _fewer(rn, cn)))
    rs, cs = g("reference.storage.bits_per_param"), g("compressed.storage.bits_per_param")
    if rs is not None and cs is not None:
        out.append(("bits / parameter, memory", f"{rs:.2f}", f"{cs:.2f}",
                    _fewer(rs, cs)))
        out.append(("  … storage formats", _formats(g("reference.storage")),
                    _formats(g("compressed.storage")), ""))
    rb, cb = g("size.reference_bytes"), g("size.compressed_bytes")
    if rb is not None:
        out.append(("bytes on disk", _num(rb), _num(cb),
                    _fewer(rb, cb, "smaller")))
        rbp, cbp = g("size.reference_bits_per_param"), g("size.compressed_bits_per_param")
        if rbp is not None and cbp is not None:
            out.append(("bits / parameter, disk", f"{rbp:.2f}", f"{cbp:.2f}", ""))
    return out


def _macs_rows(g: Callable[[str], Any]) -> list[Row]:
    rm, cm = g("macs.reference"), g("macs.compressed")
    if rm is None:
        return []
    out: list[Row] = [("MACs, dense kernels", _num(rm), _num(cm), _fewer(rm, cm))]
    sparse = g("macs.compressed_sparse")
    if sparse is not None:
        ref_nz = g("macs.reference_nonzero")
        out.append(("MACs, non-zero weights only",
                    _num(rm if ref_nz is None else ref_nz), _num(sparse),
                    _fewer(rm if ref_nz is None else ref_nz, sparse)))
    return out


def _latency_rows(g: Callable[[str], Any], prefix: str, runtime: str) -> list[Row]:
    if g(f"{prefix}.reference_ms") is None:
        return []
    small = g(f"{prefix}.small_batch_size") or 1
    out: list[Row] = [(f"latency {runtime}, batch {small}",
                       _ms(g(f"{prefix}.reference_ms")), _ms(g(f"{prefix}.compressed_ms")),
                       _speed(g(f"{prefix}.reference_ms"), g(f"{prefix}.compressed_ms")))]
    bs = g(f"{prefix}.batch_size")
    if bs and bs != small and g(f"{prefix}.reference_batch_ms") is not None:
        out.append((f"latency {runtime}, batch {bs}", _ms(g(f"{prefix}.reference_batch_ms")),
                    _ms(g(f"{prefix}.compressed_batch_ms")),
                    _speed(g(f"{prefix}.reference_batch_ms"), g(f"{prefix}.compressed_batch_ms"))))
    return out


def rows(r: Mapping[str, Any]) -> list[Row]:
    """``(metric, reference, compressed, change)`` rows for the summary table."""
    def g(path: str) -> Any:
        return get(r, path)

    out: list[Row] = []
    ra, ca = g("reference.accuracy"), g("compressed.accuracy")
    if ra is not None or ca is not None:
        delta = "" if ra is None or ca is None else f"{100 * (ca - ra):+.2f} pts"
        out.append(("top-1 accuracy", pct(ra), pct(ca), delta))
    if g("onnx.fidelity.accuracy") is not None:
        out.append(("  … exported, in ONNX Runtime", "", pct(g("onnx.fidelity.accuracy")),
                    "" if ra is None else f"{100 * (g('onnx.fidelity.accuracy') - ra):+.2f} pts"))
    out += _fidelity_rows(r, g)
    out += _size_rows(g) + _macs_rows(g)
    out += _latency_rows(g, "latency", "eager")
    out += _latency_rows(g, "onnx.latency", "ONNX Runtime")
    return out


def notes(r: Mapping[str, Any]) -> list[str]:
    """Sentences that explain the table's figures (printed under it)."""
    out = []
    if get(r, "reference.params") is not None:
        out.append("Parameters are counted whatever their storage (a quantized weight is still "
                   "one parameter); storage is given apart, in bits per parameter and bytes. "
                   "Bytes on disk: the reference's torch.save(state_dict) against the "
                   "compressed " + ("artefact." if get(r, "size.compressed_source") == "artefact"
                                    else "model's state_dict."))
    if get(r, "macs.note"):
        out.append(str(get(r, "macs.note")))
    threads = get(r, "latency.threads")
    if threads is not None:
        out.append(f"Latency: median after warm-up, {threads} thread(s); reference and "
                   f"compressed timed in alternating rounds on the same machine, so compare "
                   f"the ratios (absolute figures are noisy on a shared machine). 'eager' is "
                   f"PyTorch as the model runs in Python.")
    onnx = r.get("onnx")
    if isinstance(onnx, Mapping):
        if onnx.get("skipped"):
            out.append(f"ONNX Runtime figures skipped: {onnx['skipped']}.")
        elif onnx.get("error"):
            out.append(f"ONNX Runtime figures missing: {onnx['error']}")
        else:
            integer = onnx.get("integer_kernels")
            kernels = ("" if integer is None else " with integer kernels" if integer else
                       " (weight-only: it dequantizes the weights once and runs float kernels)")
            out.append("A quantized model runs fake quantization in eager PyTorch, slower than "
                       f"FP32. Deployed, ONNX Runtime runs its exported QDQ graph{kernels}: "
                       "the 'ONNX Runtime' rows compare that export with the reference's FP32 "
                       "export, and '… exported, in ONNX Runtime' is that export's fidelity "
                       "on the evaluation data.")
    return out


def _spans(pairs: Sequence[tuple[float, float]]) -> list[str]:
    """``a–b`` labels, all with the fewest significant digits (2 to 6) that keep every
    bin's ends apart."""
    for digits in range(2, 7):
        labels = [(f"{a:.{digits}g}", f"{b:.{digits}g}") for a, b in pairs]
        if all(left != right for (left, right), (a, b) in zip(labels, pairs) if a != b):
            break
    return [left if left == right else f"{left}–{right}" for left, right in labels]


def difficulty_labels(long_tail: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The unit of the long-tail bins and each bin's range in that unit, easiest first.

    For the margin proxy the bins are stored as difficulty ``-margin``; they are shown as
    the reference's margin (top-1 minus top-2 probability, 0 to 1), which people read.
    """
    bins = long_tail["bins"]
    proxy = str(long_tail.get("proxy", "difficulty"))
    sign = -1.0 if proxy == "margin" else 1.0
    pairs = [(min(sign * lo, sign * hi), max(sign * lo, sign * hi))
             for lo, hi in zip(bins["low"], bins["high"])]
    unit = {"margin": "reference margin (top-1 − top-2 probability)",
            "loss": "reference loss (cross-entropy on the label)",
            "memorization": "memorization estimate"}.get(proxy, proxy)
    return unit, _spans(pairs)


#: A step's dict or list value with more entries than this is summarised, not listed.
MAX_LISTED_ENTRIES = 8


def _brief(value: Any) -> str:
    if isinstance(value, Mapping) and len(value) > MAX_LISTED_ENTRIES:
        counts: dict[str, int] = {}
        for v in value.values():
            counts[str(v)] = counts.get(str(v), 0) + 1
        shown = ", ".join(f"{v} ×{n}" for v, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return f"{{{len(value)} entries: {shown if len(counts) <= 4 else f'{len(counts)} values'}}}"
    if isinstance(value, (list, tuple)) and len(value) > MAX_LISTED_ENTRIES:
        return f"[{len(value)} entries]"
    return str(value)


def step_details(step: Mapping[str, Any]) -> str:
    """``key=value, ...`` of what a recipe step recorded, long per-layer tables summarised
    (``{37 entries: 8 ×37}``; ``report.json`` keeps them whole)."""
    info = {k: v for k, v in step.items() if k not in ("step", "per_layer_sparsity")}
    return ", ".join(f"{k}={_brief(v)}" for k, v in info.items())
