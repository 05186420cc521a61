"""Split computing with a small latent: C×4×4 codes, stage 2 on the tail's logits.

The pretrained CIFAR-10 ResNet-56 cut after ``--at`` (head frozen at the original's weights,
its outputs cached: ``netpress.split.cached``). The bottleneck (``build_bottleneck``) reaches a
``CH × (H/S) × (W/S)`` latent through ``log2 S`` strided 3×3 convolutions of width
``--hidden`` (``--depth`` extra stride-1 ones per stage), with fixed-grid ``--bits``-bit codes
(no rate term: the alphabet and the latent's size bound the bytes), and the decoder rebuilds
the cut tensor for the original tail:

1. **stage 1**: ``--stage1`` steps of feature MSE to the head's output, bottleneck only (a
   warm start: a 4×4 latent cannot rebuild the 16×16 tensor closely);
2. **stage 2**: ``--stage2`` steps of logit distillation of bottleneck *and* tail (tail at
   ``--tail-lr``): KL at temperature ``--temperature`` plus ``--logit-mse`` × the squared
   error of the logits (``Split(logit_mse=...)``'s stage-2 loss).

Measured on all ``--test-images`` JPEG test images: agreement with the original, the
arithmetic-coded bytes of the codes (a per-channel frequency model fitted on the codes of
2,000 train images, or with ``--coder context`` a context model fitted on 20,000, held by
both ends; first 200 decoded back), the JPEG files' bytes;
accuracy on the 1,017 lossless test images; head + encoder MACs against the full model's.

    python benchmarks/split_small.py --data ../shared/data --channels 16 --bits 3
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, write_json
from _split_coder import coded_bytes, coder_options, decodes_back, fit_coder, fit_count, ideal_bytes
from split_curve import _codes, _outputs, common_options, prepare

from netpress.measure.macs import count_macs
from netpress.recover.losses import distillation_loss, feature_mse
from netpress.split.bottleneck import Bottleneck, build_bottleneck
from netpress.split.cached import HeadCache, fit_cached
from netpress.split.frozen_head import Back

RESULTS = Path(__file__).parent / "results"


def _measure(b: Bottleneck, tail: nn.Module, train: HeadCache, test: HeadCache,
             exact: HeadCache, jpeg: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    ref = test.logits.argmax(1)
    out = _outputs(b, tail, test.h)
    model = fit_coder(_codes(b, train.h[:fit_count(args)].float()), args)
    codes = _codes(b, test.h)
    sent = coded_bytes(codes, model)
    return {
        "agreement_jpeg": float((out.argmax(1) == ref).float().mean()),
        "accuracy_exact": float((_outputs(b, tail, exact.h).argmax(1) == exact.labels)
                                .float().mean()) if exact.labels is not None else None,
        "coder": args.coder, **({"context": args.context} if args.coder == "context" else {}),
        "coder_fit_images": min(fit_count(args), len(train)),
        "bytes_arith_mean": float(sent.mean()),
        "bytes_arith_p95": float(np.percentile(sent, 95)),
        "bytes_ideal_mean": ideal_bytes(codes, model),
        "bytes_raw": int(codes[0].size * args.bits / 8),
        "code_model_bytes": model.nbytes,
        "reduction_vs_jpeg": float(jpeg.mean() / sent.mean()),
        "arith_round_trip_200": decodes_back(codes[:200], model),
        "code_shape": list(codes[0].shape)}


def fit_stage1(b: Bottleneck, train: HeadCache, args: argparse.Namespace) -> dict[str, Any]:
    """``--stage1`` steps of feature MSE to the cached head outputs, bottleneck only."""

    def mse(o: torch.Tensor, r: torch.Tensor | None, _l: Any) -> torch.Tensor:
        assert r is not None
        return feature_mse(o, r)

    return fit_cached(b, train, mse, "head", steps=args.stage1,
                      groups=[(list(b.parameters()), args.lr)], optimizer="adam")


def stage2_loss(args: argparse.Namespace) -> Callable[..., torch.Tensor]:
    """Stage 2's loss on (student logits, teacher logits, labels): KL at ``--temperature``
    plus ``--logit-mse`` × the logits' squared error."""

    def kd(o: torch.Tensor, r: torch.Tensor | None, _l: Any) -> torch.Tensor:
        assert r is not None
        return (distillation_loss(o, r, None, args.temperature, 1.0)
                + args.logit_mse * feature_mse(o, r))

    return kd


def fit_stage2(b: Bottleneck, tail: nn.Module, train: HeadCache, args: argparse.Namespace,
               steps: int, after_step: Callable[[nn.Module], None] | None = None
               ) -> dict[str, Any]:
    """``steps`` of stage 2 on ``train`` (a cache, or a subclass with its own ``batches``):
    bottleneck at ``--lr``, tail at ``--tail-lr``, Adam, one cosine cycle."""
    return fit_cached(Back(b, tail), train, stage2_loss(args), "output", steps=steps,
                      groups=[(list(b.parameters()), args.lr),
                              (list(tail.parameters()), args.tail_lr)],
                      optimizer="adam", after_step=after_step, seed=1)


def _stage2(b: Bottleneck, tail: nn.Module, train: HeadCache, test: HeadCache,
            exact: HeadCache, jpeg: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Logit distillation of bottleneck and tail; the row of its measurements."""
    t2 = time.perf_counter()
    s2 = fit_stage2(b, tail, train, args, args.stage2)
    seen = train.h[:2000].float()
    row = {"after": "stage 2", "steps": args.stage2, "seconds": round(time.perf_counter() - t2),
           **s2, **_measure(b, tail, train, test, exact, jpeg, args),
           "agreement_train_2000": float((_outputs(b, tail, seen).argmax(1)
                                          == train.logits[:2000].argmax(1)).float().mean())}
    print(row, flush=True)
    return row


def latent_options(p: argparse.ArgumentParser, *, channels: int, stride: int, depth: int,
                   stage1: int, stage2: int) -> None:
    """The small latent's and the two stages' options (shared with ``split_fm.py``, each
    script with its own defaults for the shape and the step counts)."""
    p.add_argument("--channels", type=int, default=channels)
    p.add_argument("--stride", type=int, default=stride)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=depth)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--stage1", type=int, default=stage1)
    p.add_argument("--stage2", type=int, default=stage2)
    p.add_argument("--tail-lr", type=float, default=2e-4)
    p.add_argument("--logit-mse", type=float, default=0.1)
    coder_options(p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_options(p)
    latent_options(p, channels=16, stride=4, depth=1, stage1=1000, stage2=3000)
    p.add_argument("--train-images", type=int, default=12000)
    p.add_argument("--work", type=Path, default=Path("/tmp/netpress-split-curve"),
                   help="the head-output cache (split_curve.py's), reused")
    p.add_argument("--resume", type=Path, default=None,
                   help="a saved stage-2 state (bottleneck and tail): no stage 1, stage 2 "
                        "continues from it")
    p.add_argument("--out", type=Path, default=RESULTS / "split_small.json")
    args = p.parse_args(argv)
    ref, cut, jpeg, (train, test, exact), t0, t_cache = prepare(args)
    torch.manual_seed(0)
    b = build_bottleneck(tuple(train.h[:2].shape), args.channels, args.bits,
                         stride=args.stride, hidden=args.hidden, depth=args.depth)
    x = torch.zeros(1, 3, 32, 32)
    macs: dict[str, float] = {"full": count_macs(ref, x), "head": count_macs(cut.head, x),
                              "encoder": count_macs(b.encoder, test.h[:1])}
    macs["device_fraction"] = (macs["head"] + macs["encoder"]) / macs["full"]
    print(f"cache {t_cache:.0f} s; MACs {macs}", flush=True)

    tail = copy.deepcopy(cut.tail)
    rows: list[dict[str, Any]] = []
    if args.resume is not None:  # a saved stage-2 state: stage 2 again, a new cosine cycle
        state = torch.load(args.resume)
        b.load_state_dict(state["bottleneck"])
        tail.load_state_dict(state["tail"])
    else:
        t1 = time.perf_counter()
        s1 = fit_stage1(b, train, args)
        rows.append({"after": "stage 1", "steps": args.stage1,
                     "seconds": round(time.perf_counter() - t1), **s1,
                     **_measure(b, cut.tail, train, test, exact, jpeg, args)})
        print(rows[-1], flush=True)
    if args.stage2:
        rows.append(_stage2(b, tail, train, test, exact, jpeg, args))
        if args.resume is not None:
            rows[-1].update(after="stage 2, resumed", resumed_from=str(args.resume))
        torch.save({"bottleneck": b.state_dict(), "tail": tail.state_dict()},
                   args.work / f"{args.out.stem}.pt")
    payload = {"model": "resnet56 (akamaster)", **{k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(args).items()},
               "jpeg_mean_bytes": float(jpeg.mean()), "macs": macs, "rows": rows}
    body = [[r["after"], str(r["steps"]), "×".join(map(str, r["code_shape"])),
             f"{r['bytes_arith_mean']:.1f}", f"{r['reduction_vs_jpeg']:.1f}×",
             f"{100 * r['agreement_jpeg']:.2f}", f"{100 * (r['accuracy_exact'] or 0):.2f}"]
            for r in rows]
    payload["table"] = table = markdown_table(
        ["after", "steps", "codes", "bytes (arith)", "fewer than JPEG", "agreement % (JPEG)",
         "accuracy % (lossless)"], body)
    write_json(args.out, payload)
    args.out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
