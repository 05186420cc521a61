"""MACs of all-MiniLM-L6-v2 with attention counted, and FisherPrune(macs=0.5) measured by it.

Counts one forward pass at sequence length 128 (batch 1) with ``attn_implementation``
``"eager"`` (attention as matmuls, which PyTorch's FLOP counter always saw) and ``"sdpa"``
(``scaled_dot_product_attention``, whose CPU kernel it did not), then prunes to 50% MACs with
``FisherPrune`` from the calibration sentences (as ``benchmarks/transformers.py --variants
fisher50`` builds it) and reports the MACs reached under both counts, the mean-pooled
embedding cosine to the original and the retrieval agreement on the held-out sentences.

    .venv/bin/python benchmarks/macs_attention.py --calib 512 --eval 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import cpu_flags, write_json
from _minilm_text import embed, minilm

import netpress as npr
from netpress.measure.text import retrieval_agreement

RESULTS = Path(__file__).parent / "results"


def macs_by_attention(model: torch.nn.Module, x: Any) -> dict[str, int]:
    """``count_macs`` of ``model`` with each attention implementation (restored after)."""
    config = model.config  # type: ignore[attr-defined]
    was = config._attn_implementation
    out = {}
    try:
        for impl in ("eager", "sdpa"):
            config._attn_implementation = impl
            out[impl] = npr.measure.count_macs(model, x)
    finally:
        config._attn_implementation = was
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--eval", type=int, default=512)
    p.add_argument("--macs", type=float, default=0.5)
    p.add_argument("--no-prune", action="store_true", help="only count the unpruned model")
    p.add_argument("--out", default=str(RESULTS / "macs_attention.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    import transformers

    model, calib, evaluate, x = minilm(args.calib, args.eval)
    before = macs_by_attention(model, x)
    payload: dict[str, Any] = {
        "command": "python benchmarks/macs_attention.py " + " ".join(sys.argv[1:]),
        "cpu_flags": cpu_flags(), "torch": torch.__version__,
        "transformers": transformers.__version__, "seq_len": int(x["input_ids"].shape[1]),
        "attn_implementation": model.config._attn_implementation, "macs": before,
        "linear_macs": sum(npr.measure.layer_macs(model, x).values())}
    payload["attention_share_eager"] = round(1 - payload["linear_macs"] / before["eager"], 4)
    print(payload, flush=True)
    if not args.no_prune:
        started = time.perf_counter()
        recipe = [npr.FisherPrune(macs=args.macs, calibration_batches=max(1, args.calib // 32))]
        pruned = npr.compress(model, recipe, calibration=calib, example_inputs=x,
                              measure=False).model
        seconds = time.perf_counter() - started
        after = macs_by_attention(pruned, x)
        ref, emb = embed(model, evaluate), embed(pruned, evaluate)
        cos = torch.nn.functional.cosine_similarity(ref.double(), emb.double(), dim=-1)
        payload["fisher"] = {
            "target": args.macs, "seconds": round(seconds, 1),
            "macs": after, "ratio": {k: round(after[k] / before[k], 4) for k in after},
            "cosine_mean": round(float(cos.mean()), 4), "cosine_min": round(float(cos.min()), 4),
            "retrieval_agreement": round(retrieval_agreement(ref, emb), 4)}
        print(payload["fisher"], flush=True)
    write_json(Path(args.out), payload)


if __name__ == "__main__":
    main()
