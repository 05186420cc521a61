"""Tied output layers: one stored copy of the table, in memory, the artefact and ONNX.

Most small language models tie their output layer to the input embedding table
(``tie_word_embeddings``). When ``GPTQ`` or ``DynamicQuantize`` quantizes the output layer, the
table now reads the same codes (``GroupQuantEmbedding`` / ``QuantEmbedding.tied_to``) instead
of staying a float copy (GPTQ, before) or quantizing a second copy (DynamicQuantize, before),
and ``export_onnx`` writes an initializer that another one is the transpose or a reshape of
as a node of it (:mod:`netpress.export._tied`; the float export held the table twice too).

This script measures both side by side on a tied Qwen3-style decoder built from its config
(random weights: sizes and speed only; the fidelity columns check that both layouts compute
the same). "Earlier" is rebuilt from the same quantized model: the table replaced by a float
``nn.Embedding`` of its dequantized values (GPTQ) or by its own int8 row codes
(DynamicQuantize), exported without the copies rewrite. ONNX Runtime latency: 1 thread,
median of alternating rounds, batch 1 and 8 of 128 tokens.

    python benchmarks/tied_tables.py --out benchmarks/results/tied_tables.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import cpu_flags, markdown_table, write_json
from torch import nn

import netpress as npr
import netpress.export._tied as tied
from netpress.export import dumps_artefact
from netpress.export.onnx import ort_run, ort_session
from netpress.measure.size import parameter_count
from netpress.quant.dynamic import QuantEmbedding

RESULTS = Path(__file__).parent / "results"


def build(vocab: int, hidden: int, layers: int) -> nn.Module:
    import transformers

    cfg = transformers.Qwen3Config(vocab_size=vocab, hidden_size=hidden,
                                   intermediate_size=3 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=hidden // 64,
                                   num_key_value_heads=hidden // 128,
                                   head_dim=64, max_position_embeddings=512,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(cfg).eval()


def two_copies(model: nn.Module) -> nn.Module:
    """The earlier layout: the table as its own copy (float after GPTQ, int8 rows after
    DynamicQuantize)."""
    out = copy.deepcopy(model)
    table = out.model.embed_tokens
    float_table = nn.Embedding(table.num_embeddings, table.embedding_dim, table.padding_idx)
    with torch.no_grad():
        float_table.weight.copy_(table.dequantized_weight())
    if isinstance(table, QuantEmbedding):
        out.model.embed_tokens = QuantEmbedding.from_float(float_table)
    else:
        out.model.embed_tokens = float_table
    return out


def export(model: nn.Module, x: dict[str, torch.Tensor], path: Path, shared: bool) -> Path:
    """``export_onnx``, with (``shared``) or without the copies rewrite."""
    rewrite = tied.share_copies
    if not shared:
        tied.share_copies = lambda proto: 0  # type: ignore[assignment]
    try:
        npr.export_onnx(model, path, x)
    finally:
        tied.share_copies = rewrite  # type: ignore[assignment]
    return path


def latency(paths: dict[str, Path], x: dict[str, torch.Tensor], batch: int,
            rounds: int) -> dict[str, float]:
    """Median ms per run of each ONNX file, in alternating rounds (1 thread)."""
    sessions = {k: ort_session(p, threads=1) for k, p in paths.items()}
    feed = {k: v.repeat(batch, 1) for k, v in x.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds + 1):
        order = list(sessions.items()) if r % 2 else list(reversed(sessions.items()))
        for k, s in order:
            started = time.perf_counter()
            ort_run(s, **feed)
            if r:  # the first round warms up
                times[k].append(time.perf_counter() - started)
    return {k: round(statistics.median(v) * 1000, 1) for k, v in times.items()}


def measure(model: nn.Module, x: dict[str, torch.Tensor], ref: torch.Tensor, path: Path,
            shared: bool) -> dict[str, Any]:
    export(model, x, path, shared)
    with torch.no_grad():
        eager = model(**x).logits
    onnx_out = torch.from_numpy(ort_run(ort_session(path), **x))
    return {"parameters_reported": parameter_count(model),
            "artefact_bytes": len(dumps_artefact(model)),
            "onnx_bytes": path.stat().st_size,
            "logits_rel_err_vs_float": round(float((eager - ref).norm() / ref.norm()), 5),
            "onnx_vs_eager_rel": round(float((onnx_out - eager).norm() / eager.norm()), 6)}


def compare(name: str, now: nn.Module, earlier: nn.Module, x: dict[str, torch.Tensor],
            ref: torch.Tensor) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as d:
        paths = {"now": Path(d) / "now.onnx", "earlier": Path(d) / "earlier.onnx"}
        rows = {"now": measure(now, x, ref, paths["now"], True),
                "earlier": measure(earlier, x, ref, paths["earlier"], False)}
    return [{"variant": f"{name}, one copy (now)", **rows["now"]},
            {"variant": f"{name}, earlier", **rows["earlier"]}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--out", type=Path, default=RESULTS / "tied_tables.json")
    args = p.parse_args()
    model = build(args.vocab, args.hidden, args.layers)
    gen = torch.Generator().manual_seed(1)
    calib = [({"input_ids": torch.randint(0, args.vocab, (4, 128), generator=gen),
               "attention_mask": torch.ones(4, 128, dtype=torch.long)}, None) for _ in range(4)]
    x = {"input_ids": torch.randint(0, args.vocab, (2, 64), generator=gen),
         "attention_mask": torch.ones(2, 64, dtype=torch.long)}
    x128 = {"input_ids": torch.randint(0, args.vocab, (1, 128), generator=gen),
            "attention_mask": torch.ones(1, 128, dtype=torch.long)}
    with torch.no_grad():
        ref = model(**x).logits
    rows = []
    for name, step in [("float", None), ("GPTQ 4-bit g128", npr.GPTQ(bits=4)),
                       ("DynamicQuantize", npr.DynamicQuantize())]:
        started = time.perf_counter()
        q = model if step is None else npr.compress(model, [step], calibration=calib,
                                                     example_inputs=x, measure=False).model
        seconds = round(time.perf_counter() - started, 1)
        earlier = model if step is None else two_copies(q)
        pair = compare(name, q, earlier, x, ref)
        pair[0]["seconds"] = seconds
        # ONNX Runtime latency on 128-token inputs, batch 1 and 8
        with tempfile.TemporaryDirectory() as d:
            paths = {"now": export(q, x128, Path(d) / "n.onnx", True),
                     "earlier": export(earlier, x128, Path(d) / "e.onnx", False)}
            for batch in (1, 8):
                ms = latency(paths, x128, batch, args.rounds)
                pair[0][f"ort_ms_b{batch}"], pair[1][f"ort_ms_b{batch}"] = \
                    ms["now"], ms["earlier"]
        rows += pair
        print(*pair, sep="\n", flush=True)
    cols = ["variant", "parameters_reported", "artefact_bytes", "onnx_bytes", "ort_ms_b1",
            "ort_ms_b8", "logits_rel_err_vs_float", "onnx_vs_eager_rel"]
    table = markdown_table(cols, [[r.get(c, "") for c in cols] for r in rows])
    print(table)
    write_json(args.out, {"command": "python benchmarks/tied_tables.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "out"), "cpu_flags": cpu_flags(),
        "float_parameters": parameter_count(model), "rows": rows})
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
