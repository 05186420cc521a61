"""Split computing, rate-free long stage 1 then the rate in stage 2: bytes vs agreement.

The pretrained CIFAR-10 ResNet-56 cut after ``--at`` (head frozen at the original's weights),
a ``CH``-channel stride-``S`` 8-bit bottleneck with a learned factorized entropy model
(``netpress.split``), trained from cached head outputs (``netpress.split.cached``):

1. **stage 1, rate-free**: ``--stage1`` steps of feature MSE to the head's output (the tail's
   input), bottleneck only; shared by every operating point (saved to ``--work``);
2. per ``λ`` in ``--rates``: the entropy model fitted alone to the stage-1 codes
   (``fit_prior``, ``--prior-steps``), then ``--stage2`` steps of pure logit distillation
   (T=2) + ``λ`` · rate of encoder, decoder, entropy model and tail (tail at ``--tail-lr``);
3. optionally, per ``λ`` in ``--rates1b``, a stage 1b from the rate-free state: feature MSE +
   ``λ`` · rate, bottleneck only (``--stage1b`` steps); with ``--chain`` stage 2 starts from
   the last stage-1b state instead.

Measured on all ``--test-images`` JPEG test images (head outputs cached in float32, so the
codes are those the device part sends): agreement with the original, the arithmetic-coded
bytes with the learned model (first 200 decoded back), the JPEG files' bytes; accuracy on
the 1,017 lossless test images.

    python benchmarks/split_curve.py --data ../shared/data --rates 1e-3 2e-3
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import data_dir, markdown_table, write_json

from netpress import datasets as ds
from netpress.models import find_pretrained, load_pretrained_cifar_resnet
from netpress.recover.losses import distillation_loss, feature_mse
from netpress.split import arith_bytes, decode_codes, encode_codes
from netpress.split.bottleneck import Bottleneck, build_bottleneck
from netpress.split.cached import HeadCache, build_cache, fit_cached, fit_prior
from netpress.split.cut import cut_model
from netpress.split.frozen_head import Back

RESULTS = Path(__file__).parent / "results"


def _caches(args: argparse.Namespace, root: Path, cut: Any) -> tuple[HeadCache, ...]:
    path = args.work / f"cache_{args.at}_{args.train_images}_{args.test_images}.pt"
    if path.exists():
        return tuple(torch.load(path, weights_only=False))
    cpu = torch.device("cpu")
    train = build_cache(ds.loader(ds.cifar10_jpeg_train(root, limit=args.train_images), 64,
                                  shuffle=True), cut.head, cut.tail, cpu)
    test = build_cache(ds.loader(ds.cifar10_jpeg_test(root, limit=args.test_images), 250),
                       cut.head, cut.tail, cpu, dtype=torch.float32)
    exact = build_cache(ds.loader(ds.cifar10_exact_test(root), 250), cut.head, cut.tail, cpu,
                        dtype=torch.float32)
    caches = (train, test, exact)
    torch.save(caches, path)
    return caches


def prepare(args: argparse.Namespace) -> tuple[nn.Module, Any, np.ndarray,
                                               tuple[HeadCache, ...], float, float]:
    """What every split benchmark run starts from: the pretrained ResNet-56 and its cut at
    ``args.at``, the JPEG bytes of the test images, and the head-output caches (built or
    reused in ``args.work``); with the start time and the caches' seconds."""
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    root = data_dir(args.data)
    ref = load_pretrained_cifar_resnet(56, find_pretrained(56, root)).eval()
    cut = cut_model(ref, args.at)
    jpeg = np.diff(np.load(root / "cifar10" / "cifar10_jpeg_bytes.npz")["test_offsets"])
    jpeg = jpeg[:args.test_images]
    t0 = time.perf_counter()
    caches = _caches(args, root, cut)
    return ref, cut, jpeg, caches, t0, time.perf_counter() - t0


def _outputs(b: nn.Module, tail: nn.Module, h: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        b.eval()
        tail.eval()
        return torch.cat([tail(b(h[i:i + 250].float())) for i in range(0, len(h), 250)])


def _codes(b: Bottleneck, h: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        b.eval()
        q = torch.cat([b.codes(h[i:i + 250]) for i in range(0, len(h), 250)])
    return [np.ascontiguousarray(c) for c in q.to(torch.uint8).numpy()]


def _measure(b: Bottleneck, tail: nn.Module, test: HeadCache, exact: HeadCache,
             jpeg: np.ndarray, code: bool = True) -> dict[str, Any]:
    """Agreement, accuracy and bytes; ``code=False``: the ideal rate only, not coded."""
    ref = test.logits.argmax(1)
    row: dict[str, Any] = {
        "agreement_jpeg": float((_outputs(b, tail, test.h).argmax(1) == ref).float().mean()),
        "accuracy_exact": float((_outputs(b, tail, exact.h).argmax(1) == exact.labels)
                                .float().mean()) if exact.labels is not None else None}
    if b.prior is not None:
        codes = _codes(b, test.h)
        model = b.prior.code_model()
        if not code:
            row["bytes_rate_mean"] = float(np.mean([model.ideal_bits(c) / 8 for c in codes]))
            return row
        sent = arith_bytes(codes, model)
        row.update(bytes_arith_mean=float(sent.mean()),
                   bytes_arith_p95=float(np.percentile(sent, 95)),
                   bytes_rate_mean=float(np.mean([model.ideal_bits(c) / 8 for c in codes])),
                   reduction_vs_jpeg=float(jpeg.mean() / sent.mean()),
                   arith_round_trip_200=all(
                       np.array_equal(decode_codes(encode_codes(c, model), model, c.shape), c)
                       for c in codes[:200]),
                   code_shape=list(codes[0].shape))
    return row


def _stage1(args: argparse.Namespace, train: HeadCache) -> Bottleneck:
    torch.manual_seed(0)
    b = build_bottleneck(tuple(train.h[:2].shape), args.channels, 8, stride=args.stride,
                         entropy="factorized")
    path = args.work / (f"stage1_{args.at}_{args.channels}_{args.stride}_{args.stage1}_"
                        f"{args.train_images}.pt")
    if path.exists():
        b.load_state_dict(torch.load(path))
        return b

    def mse(o: torch.Tensor, r: torch.Tensor | None, _l: Any) -> torch.Tensor:
        assert r is not None
        b.take_rate()  # rate-free: the entropy model's rate is computed but not used
        return feature_mse(o, r)

    params = [*b.encoder.parameters(), *b.decoder.parameters()]
    fit_cached(b, train, mse, "head", steps=args.stage1, groups=[(params, args.lr)],
               optimizer="adam")
    torch.save(b.state_dict(), path)
    return b


def _stage2(b0: Bottleneck, tail0: nn.Module, train: HeadCache, rate: float,
            args: argparse.Namespace) -> tuple[Bottleneck, nn.Module, dict[str, Any]]:
    b, tail = copy.deepcopy(b0), copy.deepcopy(tail0)
    prior = fit_prior(b, train, steps=args.prior_steps, lr=args.lr)

    def loss(o: torch.Tensor, r: torch.Tensor | None, _l: Any) -> torch.Tensor:
        assert r is not None
        bits = b.take_rate()
        kd = distillation_loss(o, r, None, args.temperature, 1.0)
        return kd if bits is None else kd + rate * bits

    out = fit_cached(Back(b, tail), train, loss, "output", steps=args.stage2,
                     groups=[(list(b.parameters()), args.lr),
                             (list(tail.parameters()), args.tail_lr)],
                     optimizer="adam", seed=1)
    return b, tail, {"prior_fit": prior, "stage2": out}


def _stage1b(b0: Bottleneck, train: HeadCache, rate: float, args: argparse.Namespace
             ) -> tuple[Bottleneck, dict[str, Any]]:
    """From the rate-free state: the density fitted, then ``--stage1b`` steps of feature MSE
    + ``rate`` · bits, bottleneck only (the original tail stays)."""
    b = copy.deepcopy(b0)
    prior = fit_prior(b, train, steps=args.prior_steps, lr=args.lr)

    def loss(o: torch.Tensor, r: torch.Tensor | None, _l: Any) -> torch.Tensor:
        assert r is not None
        bits = b.take_rate()
        mse = feature_mse(o, r)
        return mse if bits is None else mse + rate * bits

    out = fit_cached(b, train, loss, "head", steps=args.stage1b,
                     groups=[(list(b.parameters()), args.lr)], optimizer="adam", seed=3)
    return b, {"prior_fit": prior, "stage1b": out}


def common_options(p: argparse.ArgumentParser) -> None:
    """The options every split benchmark takes: data, cut, learning rate, distillation
    temperature, test images and threads."""
    p.add_argument("--data")
    p.add_argument("--at", default="layer2")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--threads", type=int, default=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_options(p)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--rates", type=float, nargs="*", default=[1e-3])
    p.add_argument("--stage1b", type=int, default=0, help="steps of MSE + rate (per λ)")
    p.add_argument("--rates1b", type=float, nargs="*", default=[],
                   help="λ of stage 1b runs (bottleneck only, original tail)")
    p.add_argument("--chain", action="store_true",
                   help="stage 2 starts from the last stage-1b state, not the rate-free one")
    p.add_argument("--stage1", type=int, default=6000)
    p.add_argument("--prior-steps", type=int, default=300)
    p.add_argument("--stage2", type=int, default=1200)
    p.add_argument("--tail-lr", type=float, default=1e-4)
    p.add_argument("--train-images", type=int, default=50000)
    p.add_argument("--work", type=Path, default=Path("/tmp/netpress-split-curve"),
                   help="cache and stage-1 checkpoint, reused by later runs")
    p.add_argument("--out", type=Path, default=RESULTS / "split_curve.json")
    args = p.parse_args(argv)
    ref, cut, jpeg, (train, test, exact), t0, t_cache = prepare(args)
    b = _stage1(args, train)
    t_s1 = time.perf_counter() - t0 - t_cache
    print(f"cache {t_cache:.0f} s, stage 1 {t_s1:.0f} s", flush=True)
    b1 = copy.deepcopy(b)  # the stage-1 codes' cost: the entropy model fitted to them
    fitted = fit_prior(b1, train, steps=args.prior_steps, lr=args.lr)
    rows: list[dict[str, Any]] = [{"rate": 0.0, "after": "stage 1", "prior_fit": fitted,
                                   **_measure(b1, cut.tail, test, exact, jpeg, code=False)}]
    print(rows[0], flush=True)
    start = b
    for rate in args.rates1b:
        t1 = time.perf_counter()
        bb, info = _stage1b(b, train, rate, args)
        start = bb if args.chain else b
        rows.append({"rate": rate, "after": "stage 1b", **info,
                     "seconds": round(time.perf_counter() - t1),
                     **_measure(bb, cut.tail, test, exact, jpeg)})
        print(rows[-1], flush=True)
    for rate in args.rates:
        t1 = time.perf_counter()
        bb, tail, info = _stage2(start, cut.tail, train, rate, args)
        rows.append({"rate": rate, "after": "stage 2", **info,
                     "seconds": round(time.perf_counter() - t1),
                     **_measure(bb, tail, test, exact, jpeg)})
        print(rows[-1], flush=True)
    payload = {"model": "resnet56 (akamaster)", **{k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(args).items()},
               "jpeg_mean_bytes": float(jpeg.mean()), "cache_seconds": round(t_cache),
               "stage1_seconds": round(t_s1), "rows": rows}
    body = [[r["after"], f"{r['rate']:g}", f"{r['bytes_rate_mean']:.1f}",
             f"{r.get('bytes_arith_mean', 0):.1f}", f"{r.get('reduction_vs_jpeg', 0):.1f}×",
             f"{100 * r['agreement_jpeg']:.2f}",
             f"{100 * (r['accuracy_exact'] or 0):.2f}"] for r in rows]
    payload["table"] = table = markdown_table(
        ["after", "λ", "ideal bytes", "bytes (arith)", "fewer than JPEG", "agreement % (JPEG)",
         "accuracy % (lossless)"], body)
    write_json(args.out, payload)
    args.out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
