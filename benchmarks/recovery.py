"""Short recovery after structured 50% MACs on the pretrained ResNet-56: which Distill recipe
recovers agreement with the original fastest, and the budget curve of the best one.

The pruned start is ``StructuredPrune(macs=0.5)`` with 512 calibration JPEG train images (the
one-shot default: stem protected, least-squares refit); every recipe distils from that same
start (cached under ``--cache``). Train data: the 50k JPEG train images (or ``--train-images``
class-balanced), batches shuffled per epoch; with ``aug`` each batch gets a random crop
(zero padding 4) and a horizontal flip, drawn from a seeded generator. Agreement is with the
uncompressed model on the first ``--eval-images`` JPEG test images; accuracy on the lossless
subset (1,017 images).

    python benchmarks/recovery.py --data ../shared/data --recipes kd_aug --steps 200,500
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    Timer,
    accuracy,
    agreement,
    cpu_flags,
    data_dir,
    logits,
    parse_value,
    write_json,
)

import netpress as npr
from netpress import datasets as ds
from netpress.models import find_pretrained, load_pretrained_cifar_resnet

RESULTS = Path(__file__).parent / "results"


class Batches:
    """Shuffled ``(x, y)`` batches of a tensor set, a new order (and augmentation) per epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, augment: bool,
                 seed: int = 0) -> None:
        self.x, self.y, self.batch, self.augment = x, y, batch, augment
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.x) // self.batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=self.gen)
        for i in range(len(self)):
            idx = order[i * self.batch:(i + 1) * self.batch]
            x = self.x[idx]
            yield (crop_flip(x, self.gen) if self.augment else x), self.y[idx]


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop of each image from its zero-padded copy, and a horizontal flip of half."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, x.shape[1], h, w)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, x.shape[1], h, w)
    out = padded[torch.arange(n)[:, None, None, None],
                 torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


#: the residual blocks of a CIFAR ResNet (their outputs keep their shape: streams kept whole)
BLOCKS = ("re:layer\\d\\.\\d+$",)

#: recipe name -> (Distill keyword arguments, augment)
RECIPES: dict[str, tuple[dict[str, Any], bool]] = {
    "old": ({"optimizer": "sgd", "lr": 0.01, "temperature": 4.0, "alpha": 0.9}, False),
    "old_aug": ({"optimizer": "sgd", "lr": 0.01, "temperature": 4.0, "alpha": 0.9}, True),
    "kd_t4_sgd": ({"optimizer": "sgd", "lr": 0.01, "temperature": 4.0, "alpha": 1.0}, True),
    "kd_t1_sgd": ({"optimizer": "sgd", "lr": 0.01, "temperature": 1.0, "alpha": 1.0}, True),
    "kd_t4_sgd05": ({"optimizer": "sgd", "lr": 0.05, "temperature": 4.0, "alpha": 1.0}, True),
    "kd_t4_adam": ({"optimizer": "adam", "lr": 1e-3, "temperature": 4.0, "alpha": 1.0}, True),
    "kd_t4_adam_frozen": ({"optimizer": "adam", "lr": 1e-3, "temperature": 4.0, "alpha": 1.0,
                           "bn": "frozen"}, True),
    "feat_sgd": ({"optimizer": "sgd", "lr": 0.01, "temperature": 4.0, "alpha": 1.0,
                  "features": BLOCKS}, True),
    "feat_adam": ({"optimizer": "adam", "lr": 1e-3, "temperature": 4.0, "alpha": 1.0,
                   "features": BLOCKS}, True),
    "feat_sgd_frozen": ({"optimizer": "sgd", "lr": 0.01, "temperature": 4.0, "alpha": 1.0,
                         "features": BLOCKS, "bn": "frozen", "grad_clip": 5.0}, True),
    "kd_t4_sgd_frozen": ({"optimizer": "sgd", "lr": 0.01, "temperature": 4.0, "alpha": 1.0,
                          "bn": "frozen", "grad_clip": 5.0}, True),
}


def pruned_start(root: Path, cache: Path) -> tuple[Any, Any]:
    ref = load_pretrained_cifar_resnet(56, find_pretrained(56, root))
    if cache.exists():
        return ref, torch.load(cache, weights_only=False)
    x, y = ds.cifar10_jpeg_train(root, limit=512, seed=0).tensors
    calib = [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)]
    res = npr.compress(ref, [npr.StructuredPrune(macs=0.5)], calibration=calib, measure=False,
                       example_inputs=x[:1], seed=0)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(res.model, cache)
    return ref, res.model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=None)
    p.add_argument("--recipes", default="old,kd_t4_sgd")
    p.add_argument("--steps", default="200")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-images", type=int, default=None)
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=str(RESULTS / "cache" / "recovery_pruned56.pt"),
                   help="where the one-shot pruned start is kept (built on first use)")
    p.add_argument("--tag", default="explore")
    p.add_argument("--extra", default="", help="key=value,... added to every Distill")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = data_dir(args.data)
    ref, start = pruned_start(root, Path(args.cache))
    x, y = ds.cifar10_jpeg_train(root, limit=args.train_images, seed=0).tensors
    sets = {"exact": ds.cifar10_exact_test(root),
            "jpeg": ds.cifar10_jpeg_test(root, limit=args.eval_images)}
    base = {k: logits(ref, v) for k, v in sets.items()}
    got0 = {k: logits(start, v) for k, v in sets.items()}
    results: list[dict[str, Any]] = [{
        "recipe": "one shot", "steps": 0,
        "accuracy": accuracy(got0["exact"], sets["exact"].tensors[1]),
        "agreement": agreement(base["jpeg"], got0["jpeg"])}]
    print(results[-1], flush=True)
    extra = dict(kv.split("=") for kv in args.extra.split(",") if kv)
    for name in args.recipes.split(","):
        kwargs, aug = RECIPES[name]
        kwargs = {**kwargs, **{k: parse_value(v) for k, v in extra.items()}}
        for steps in [int(s) for s in args.steps.split(",")]:
            cfg = npr.Distill(max_steps=steps, **kwargs)
            train = Batches(x, y, args.batch, aug)
            with Timer() as t:
                res = npr.compress(start, [cfg], train=train, reference=ref, measure=False,
                                   example_inputs=x[:1], seed=0)
            got = {k: logits(res.model, v) for k, v in sets.items()}
            results.append({"recipe": name, "steps": steps, "augment": aug,
                            "distill": cfg.to_dict(), "batch": args.batch,
                            "accuracy": accuracy(got["exact"], sets["exact"].tensors[1]),
                            "agreement": agreement(base["jpeg"], got["jpeg"]),
                            "seconds": round(t.seconds, 1)})
            print({k: results[-1][k] for k in ("recipe", "steps", "accuracy", "agreement",
                                               "seconds")}, flush=True)
            write_json(RESULTS / f"recovery_{args.tag}.json",
                       {"args": vars(args), "cpu_flags": cpu_flags(),
                        "train_images": len(x), "results": results})


if __name__ == "__main__":
    main()
