"""Split computing: which context should the arithmetic coder condition each code on?

For a trained bottleneck (a stage-1 state of ``split_fm.py``, or a saved stage-2 state) the
codes of the 50,000-image head-output cache are split as ``split_fm.py`` splits them (the
first ``--held-out`` images held out, the rest train). For each candidate context (a set of
``(dc, di, dj)`` offsets of :mod:`netpress.split.context`; ``()`` is a per-channel model) a
:class:`~netpress.split.context.ContextModel` is fitted on the codes of ``--coder-fit`` train
images (20,000) and scored on the held-out codes: the honest cross-entropy (mean ``sum -log2 p``
per image, in bytes, under the integer tables both ends hold), against the per-channel coder
of :mod:`netpress.split.arith` fitted on 2,000 train images (what ``split_fm.py`` sends
with). With ``--test`` the chosen ``--context`` is also coded for real on the 10,000 JPEG
test images (mean and p95 bytes, exact round trip of the first 200).

    python benchmarks/split_context.py --data ../shared/data --channels 8 --bits 2 \
        --work /tmp/netpress-split-fm --test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json
from _split_coder import CONTEXTS
from split_curve import _codes, common_options, prepare
from split_small import latent_options

from netpress.split import arith_bytes, fit_code_model
from netpress.split.bottleneck import build_bottleneck
from netpress.split.context import (
    context_bytes,
    decode_with_context,
    encode_with_context,
    fit_context_model,
)

RESULTS = Path(__file__).parent / "results" / "split_fm"
def screen(train: np.ndarray, held: np.ndarray, bits: int,
           names: list[str]) -> list[dict[str, Any]]:
    """Held-out cross-entropy (bytes per image) and model bytes of each candidate."""
    rows = []
    for name in names:
        t = time.process_time()
        model = fit_context_model(train, bits, CONTEXTS[name])
        per_image = model.code_bits(held).sum(axis=(1, 2, 3)) / 8
        per_channel = model.code_bits(held).sum(axis=(2, 3)).mean(axis=0) / 8
        rows.append({"context": name, "offsets": [list(o) for o in CONTEXTS[name]],
                     "strength": model.strength, "model_bytes": model.nbytes,
                     "ideal_bytes_held": float(per_image.mean()),
                     "ideal_bytes_held_p95": float(np.percentile(per_image, 95)),
                     "ideal_bytes_per_channel": [round(float(v), 2) for v in per_channel],
                     "cpu_seconds": round(time.process_time() - t, 1)})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_options(p)
    latent_options(p, channels=8, stride=2, depth=2, stage1=800, stage2=0)
    p.add_argument("--held-out", type=int, default=2000)
    p.add_argument("--state", type=Path, default=None,
                   help="a stage-2 state of split_fm.py (default: the stage-1 state)")
    p.add_argument("--candidates", default=",".join(CONTEXTS))
    p.add_argument("--test", action="store_true")
    p.add_argument("--work", type=Path, default=Path("/tmp/netpress-split-fm"))
    p.add_argument("--out", type=Path, default=RESULTS / "context.json")
    args = p.parse_args(argv)
    args.train_images = 50000
    cpu0 = time.process_time()
    _, _, jpeg, (cache, test, _), _, _ = prepare(args)
    k = args.held_out
    b = build_bottleneck(tuple(cache.h[:2].shape), args.channels, args.bits,
                         stride=args.stride, hidden=args.hidden, depth=args.depth)
    path = args.state or args.work / (f"stage1_{args.at}_c{args.channels}_s{args.stride}_"
                                      f"d{args.depth}_b{args.bits}_{args.stage1}_held{k}.pt")
    state = torch.load(path)
    b.load_state_dict(state["bottleneck"] if "bottleneck" in state else state)
    train = np.stack(_codes(b, cache.h[k:k + (args.coder_fit or 20000)].float()))
    held = np.stack(_codes(b, cache.h[:k].float()))
    per_channel = fit_code_model(list(train[:2000]), args.bits)
    base = {"per_channel_coder_bytes_held": float(arith_bytes(list(held), per_channel).mean()),
            "per_channel_ideal_bytes_held": float(np.mean(
                [per_channel.ideal_bits(c) / 8 for c in held])),
            "per_channel_model_bytes": per_channel.nbytes}
    print(base, flush=True)
    rows = screen(train, held, args.bits, args.candidates.split(","))
    payload: dict[str, Any] = {"state": str(path), "code_shape": list(train.shape[1:]),
                               "bits": args.bits, "fit_images": len(train), **base,
                               "rows": rows}
    if args.test:
        codes = _codes(b, test.h.float())
        model = fit_context_model(train, args.bits, CONTEXTS[args.context])
        sent, flat = context_bytes(codes, model), arith_bytes(codes, per_channel)
        ideal = np.array([model.ideal_bits(c) for c in codes])
        payload["test"] = {
            "offsets": [list(o) for o in CONTEXTS[args.context]], "model_bytes": model.nbytes,
            "strength": model.strength,
            "bytes_context_mean": float(sent.mean()),
            "bytes_context_p95": float(np.percentile(sent, 95)),
            "bytes_per_channel_mean": float(flat.mean()),
            "bytes_per_channel_p95": float(np.percentile(flat, 95)),
            "coded_minus_ideal_bits_max": float((sent * 8 - ideal).max()),
            "coded_minus_ideal_bits_mean": float((sent * 8 - ideal).mean()),
            "reduction_vs_jpeg": float(jpeg.mean() / sent.mean()),
            "round_trip_200": all(np.array_equal(
                decode_with_context(encode_with_context(c, model), model), c)
                for c in codes[:200])}
        print(payload["test"], flush=True)
    payload["process_cpu_seconds"] = round(time.process_time() - cpu0)
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
