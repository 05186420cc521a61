"""Split computing diagnostics: agreement after each training stage, on cached head outputs.

Cuts the pretrained CIFAR-10 ResNet-56 after ``layer2``, caches the head's outputs and the
original's outputs (``netpress.split.cached``) for ``--train-images`` JPEG train images and
``--test-images`` JPEG test images, then trains bottlenecks by hand with ``fit_cached``:

* ``stage1`` mode: fixed-grid 8-bit bottlenecks (``CH:STRIDE`` per ``--configs``), stage 1
  only (feature MSE), agreement of ``tail(bottleneck(h))`` with the original after 300 and
  1,000 steps: can the bottleneck rebuild the cut tensor well enough for the original tail?
* ``stages`` mode: a 32-channel stride-2 learned-entropy bottleneck, stage 1 (MSE +
  ``λ`` · rate) then, from the same state, stage 2 (pure distillation, T=2) of decoder +
  tail (tail at 1e-4) or of the decoder alone; agreement and ideal bytes after each.

    python benchmarks/split_stages.py --data ../shared/data --mode stage1
    python benchmarks/split_stages.py --data ../shared/data --mode stages --rate 1e-3
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import data_dir, write_json

from netpress import datasets as ds
from netpress.models import find_pretrained, load_pretrained_cifar_resnet
from netpress.recover.losses import distillation_loss, feature_mse
from netpress.split.bottleneck import Bottleneck, build_bottleneck
from netpress.split.cached import HeadCache, build_cache, fit_cached
from netpress.split.cut import cut_model
from netpress.split.frozen_head import Back

RESULTS = Path(__file__).parent / "results" / "split_explore"


def _measure(b: nn.Module, tail: nn.Module, test: HeadCache) -> dict[str, float]:
    with torch.no_grad():
        b.eval()
        tail.eval()
        out = torch.cat([tail(b(test.h[i:i + 250].float())) for i in range(0, len(test), 250)])
        row = {"agreement": float((out.argmax(1) == test.logits.argmax(1)).float().mean())}
        if isinstance(b, Bottleneck) and b.prior is not None:
            row["ideal_bytes"] = float(b.prior.rate(b.codes(test.h.float()))) / 8
    return row


def _mse(o: torch.Tensor, r: torch.Tensor | None, _l: Any) -> torch.Tensor:
    assert r is not None
    return feature_mse(o, r)


def _kd(o: torch.Tensor, r: torch.Tensor | None, _l: Any) -> torch.Tensor:
    assert r is not None
    return distillation_loss(o, r, None, 2.0, 1.0)


def _stage1(train: HeadCache, test: HeadCache, tail: nn.Module, configs: list[str]
            ) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for spec in configs:
        ch, stride = (int(v) for v in spec.split(":"))
        torch.manual_seed(0)
        b = build_bottleneck(tuple(train.h[:2].shape), ch, 8, stride=stride)
        for steps in (300, 700):  # two cosine cycles: 300 then 1,000 steps in all
            fit_cached(b, train, _mse, "head", steps=steps,
                       groups=[(list(b.parameters()), 1e-3)], optimizer="adam")
            rows[f"{spec}@{300 if steps == 300 else 1000}"] = row = _measure(b, tail, test)
            print(spec, row, flush=True)
    return rows


def _stages(train: HeadCache, test: HeadCache, tail: nn.Module, args: argparse.Namespace
            ) -> dict[str, Any]:
    torch.manual_seed(0)
    b = build_bottleneck(tuple(train.h[:2].shape), 32, 8, stride=2, entropy="factorized")

    def s1loss(o: torch.Tensor, r: torch.Tensor | None, _l: Any) -> torch.Tensor:
        assert r is not None
        rate = b.take_rate()
        return feature_mse(o, r) + args.rate * (rate if rate is not None else 0.0)

    fit_cached(b, train, s1loss, "head", steps=args.stage1,
               groups=[(list(b.parameters()), 1e-3)], optimizer="adam")
    rows = {"stage1": _measure(b, tail, test)}
    print("stage1", rows["stage1"], flush=True)
    for name, tail_lr in (("decoder+tail", 1e-4), ("decoder", None)):
        bb, tt = copy.deepcopy(b), copy.deepcopy(tail)
        for p in [*bb.parameters(), *tt.parameters()]:
            p.requires_grad_(False)
        groups = [(list(bb.decoder.parameters()), 1e-3)]
        if tail_lr:
            groups.append((list(tt.parameters()), tail_lr))
        for ps, _ in groups:
            for p in ps:
                p.requires_grad_(True)
        back = Back(bb, tt)
        back.frozen = ("bottleneck.encoder", "bottleneck.prior") + (() if tail_lr else ("tail",))
        fit_cached(back, train, _kd, "output", steps=args.stage2, groups=groups, optimizer="adam")
        rows[name] = _measure(bb, tt, test)
        print(name, rows[name], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data")
    p.add_argument("--mode", choices=("stage1", "stages"), default="stage1")
    p.add_argument("--configs", nargs="+", default=["32:1", "32:2", "8:1"], help="CH:STRIDE")
    p.add_argument("--rate", type=float, default=1e-3, help="stages: λ of stage 1")
    p.add_argument("--stage1", type=int, default=2000)
    p.add_argument("--stage2", type=int, default=300)
    p.add_argument("--train-images", type=int, default=5000)
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = data_dir(args.data)
    ref = load_pretrained_cifar_resnet(56, find_pretrained(56, root)).eval()
    cut = cut_model(ref, "layer2")
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    train = build_cache(ds.loader(ds.cifar10_jpeg_train(root, limit=args.train_images), 64,
                                  shuffle=True), cut.head, cut.tail, cpu)
    test = build_cache(ds.loader(ds.cifar10_jpeg_test(root, limit=args.test_images), 250),
                       cut.head, cut.tail, cpu)
    rows = (_stage1(train, test, cut.tail, args.configs) if args.mode == "stage1"
            else _stages(train, test, cut.tail, args))
    payload = {"mode": args.mode, "train_images": args.train_images,
               "test_images": args.test_images, "rate": args.rate, "stage1": args.stage1,
               "stage2": args.stage2, "seconds": round(time.perf_counter() - t0), "rows": rows}
    write_json(args.out or RESULTS / f"stages_{args.mode}.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
