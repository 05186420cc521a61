"""Markdown for the optional report sections: split, activations, robustness
(:mod:`netpress.measure.sections`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["toolbox_markdown"]


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def _split(s: Mapping[str, Any]) -> list[str]:
    sent = s["bytes_per_input"]
    lines = ["", "## Split computing", "",
             f"Cut after `{s['at']}`; the device sends {s['code_values']} codes of "
             f"{s['bits']} bits ({'×'.join(map(str, s['code_shape']))}) per input, coded "
             f"with zstd, one frame per input ({s['inputs']} inputs).", ""]
    body = [["bytes sent per input (zstd)", f"{sent['mean']:.1f}", f"{sent['median']:.0f}",
             f"{sent['p95']:.0f}"]]
    if "bytes_per_input_with_dictionary" in s:
        d = s["bytes_per_input_with_dictionary"]
        body.append([f"… with a {s['dictionary_bytes']:,}-byte zstd dictionary",
                     f"{d['mean']:.1f}", f"{d['median']:.0f}", f"{d['p95']:.0f}"])
    if "bytes_per_input_arithmetic" in s:
        a = s["bytes_per_input_arithmetic"]
        body.append([f"… arithmetic-coded ({s['code_model_bytes']:,}-byte per-channel model)",
                     f"{a['mean']:.1f}", f"{a['median']:.0f}", f"{a['p95']:.0f}"])
    if "bytes_per_input_context" in s:
        a = s["bytes_per_input_context"]
        body.append([f"… context-coded ({s['context_model_bytes']:,}-byte context model)",
                     f"{a['mean']:.1f}", f"{a['median']:.0f}", f"{a['p95']:.0f}"])
    if "input_png_bytes" in s:
        p = s["input_png_bytes"]
        body.append(["input image as PNG", f"{p['mean']:.1f}", f"{p['median']:.0f}",
                     f"{p['p95']:.0f}"])
    lines += _table(["", "mean", "median", "p95"], body)
    if s.get("reduction_vs_png"):
        lines += ["", f"**{s['reduction_vs_png']:.1f}× fewer bytes than the PNG input.**"]
    if "device_macs" in s:
        lines += ["", f"Device part: {s['device_macs']:,} MACs "
                  f"({_pct(s['device_macs_fraction'])} of the original's {s['reference_macs']:,}); "
                  f"latency {s['device_latency_ms']:.3f} ms vs {s['reference_latency_ms']:.3f} ms "
                  f"for the whole original (batch 1, interleaved rounds)."]
    return lines


def _activations(a: Mapping[str, Any]) -> list[str]:
    if "skipped" in a:
        return ["", "## Activation maps", "", f"Not measured: {a['skipped']}"]
    ref, cmp = a["reference"], a["compressed"]
    bits = cmp["bits"]
    lines = ["", "## Activation maps", "",
             f"Per input, over {cmp['inputs']} inputs: share of exact zeros and bytes after "
             f"per-map quantization and zstd (the working memory of an edge runtime).", ""]
    body = []
    for r, c in zip(ref["layers"], cmp["layers"]):
        body.append([f"`{c['layer']}`", _pct(r["sparsity"]), _pct(c["sparsity"]),
                     *[f"{r[f'bytes_{b}bit']:.0f} → {c[f'bytes_{b}bit']:.0f}" for b in bits]])
    body.append(["**total**", _pct(ref["mean_sparsity"]), _pct(cmp["mean_sparsity"]),
                 *[f"{ref[f'bytes_per_input_{b}bit']:,.0f} → "
                   f"{cmp[f'bytes_per_input_{b}bit']:,.0f}" for b in bits]])
    lines += _table(["layer", "zeros (ref.)", "zeros (comp.)",
                     *[f"bytes {b}-bit (ref. → comp.)" for b in bits]], body)
    q = cmp.get("agreement_quantized")
    if q:
        lines += ["", "Agreement with the reference when these maps are quantized: "
                  + ", ".join(f"{b} bits {_pct(v)}" for b, v in q.items())
                  + f" (unquantized {_pct(cmp.get('agreement'))})."]
    return lines


def _robustness(r: Mapping[str, Any]) -> list[str]:
    lines = ["", "## Robustness", "",
             f"Perturbations in multiples of the inputs' standard deviation "
             f"({r['input_std']:.4g}); FGSM attacks each model with its own gradient.", ""]
    rows = [("clean", r["clean"])] + [(f"Gaussian noise σ={x['level']}", x) for x in r["noise"]]
    rows += [(f"FGSM ε={x['eps']}", x) for x in r["fgsm"]]
    body = [[name, _pct(x["reference_accuracy"]), _pct(x["compressed_accuracy"]),
             _pct(x["agreement"])] for name, x in rows]
    return lines + _table(["condition", "ref. accuracy", "comp. accuracy", "agreement"], body)


def toolbox_markdown(r: Mapping[str, Any]) -> list[str]:
    """Markdown lines for whichever optional sections ``r`` holds."""
    lines: list[str] = []
    if r.get("split"):
        lines += _split(r["split"])
    if r.get("activations"):
        lines += _activations(r["activations"])
    if r.get("robustness"):
        lines += _robustness(r["robustness"])
    return lines
