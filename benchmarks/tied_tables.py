"""Tied output layers under GPTQ and DynamicQuantize: one stored copy of the table.

Most small language models tie their output layer to the input embedding table
(``tie_word_embeddings``). When ``GPTQ`` or ``DynamicQuantize`` quantizes the output layer, the
table now reads the same codes (``GroupQuantEmbedding`` / ``QuantEmbedding.tied_to``) instead
of staying a float copy (GPTQ, before) or quantizing a second copy (DynamicQuantize, before).
This script measures both layouts side by side on a tied Qwen3-style decoder built from its
config (random weights: sizes only; the fidelity columns check that the two layouts compute
the same). "Two copies" is the earlier layout, rebuilt from the same quantized model: the
table replaced by a float ``nn.Embedding`` of its dequantized values (GPTQ) or by its own
int8 row codes (DynamicQuantize).

    python benchmarks/tied_tables.py --out benchmarks/results/tied_tables.json
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import cpu_flags, markdown_table, write_json
from torch import nn

import netpress as npr
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


def measure(model: nn.Module, x: dict[str, torch.Tensor], ref: torch.Tensor,
            work: Path, tag: str) -> dict[str, Any]:
    path = work / f"{tag}.onnx"
    npr.export_onnx(model, path, x)
    with torch.no_grad():
        eager = model(**x).logits
    onnx_out = torch.from_numpy(ort_run(ort_session(path), **x))
    return {"parameters_reported": parameter_count(model),
            "artefact_bytes": len(dumps_artefact(model)),
            "onnx_bytes": path.stat().st_size,
            "logits_rel_err_vs_float": round(float((eager - ref).norm() / ref.norm()), 5),
            "onnx_vs_eager_rel": round(float((onnx_out - eager).norm() / eager.norm()), 6)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", type=Path, default=RESULTS / "tied_tables.json")
    args = p.parse_args()
    model = build(args.vocab, args.hidden, args.layers)
    gen = torch.Generator().manual_seed(1)
    calib = [({"input_ids": torch.randint(0, args.vocab, (4, 128), generator=gen),
               "attention_mask": torch.ones(4, 128, dtype=torch.long)}, None) for _ in range(4)]
    x = {"input_ids": torch.randint(0, args.vocab, (2, 64), generator=gen),
         "attention_mask": torch.ones(2, 64, dtype=torch.long)}
    with torch.no_grad():
        ref = model(**x).logits
    with tempfile.TemporaryDirectory() as d:
        rows = [{"variant": "float", **measure(model, x, ref, Path(d), "float")}]
    for name, step in [("GPTQ 4-bit g128", npr.GPTQ(bits=4)),
                       ("DynamicQuantize", npr.DynamicQuantize())]:
        started = time.perf_counter()
        q = npr.compress(model, [step], calibration=calib, example_inputs=x, measure=False).model
        seconds = round(time.perf_counter() - started, 1)
        with tempfile.TemporaryDirectory() as d:
            one = measure(q, x, ref, Path(d), "one")
            two = measure(two_copies(q), x, ref, Path(d), "two")
        rows.append({"variant": f"{name}, one copy (tied)", "seconds": seconds, **one})
        rows.append({"variant": f"{name}, two copies (earlier)", **two})
        print(rows[-2], rows[-1], sep="\n", flush=True)
    cols = ["variant", "parameters_reported", "artefact_bytes", "onnx_bytes",
            "logits_rel_err_vs_float", "onnx_vs_eager_rel"]
    table = markdown_table(cols, [[r.get(c, "") for c in cols] for r in rows])
    print(table)
    write_json(args.out, {"command": "python benchmarks/tied_tables.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "out"), "cpu_flags": cpu_flags(),
        "float_parameters": parameter_count(model), "rows": rows})
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
