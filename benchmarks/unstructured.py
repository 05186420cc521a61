"""Unstructured pruning of the pretrained CIFAR-10 ResNet-56, side by side in one run.

Compares, at 50/70/90% sparsity of all conv and linear weights, without recovery and with a
short distillation recovery (the same budget for all):

* netpress global magnitude with a per-layer floor (``GlobalMagnitudePrune``),
* netpress layer-wise uniform magnitude (``LayerwiseMagnitudePrune``),
* ``torch.nn.utils.prune.global_unstructured`` with L1 (no floor).

Reports accuracy on the lossless CIFAR-10 test subset (1,017 images), agreement with the
unpruned model on the 10k JPEG test set, the smallest per-layer density, and file size: the
netpress artefact and ``torch.save(state_dict)``.

    python benchmarks/unstructured.py --data ../shared/data [--quick]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as tprune

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, accuracy, agreement, data_dir, logits, markdown_table, write_json

import netpress as npr
from netpress import datasets as ds
from netpress.export import dumps_artefact
from netpress.models import find_pretrained, load_pretrained_cifar_resnet

METHODS = ("netpress-global-floor", "netpress-layerwise", "torch-global_unstructured")


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def torch_global(model: nn.Module, sparsity: float) -> nn.Module:
    """The peer: torch's global L1 unstructured pruning (reparametrised, hooks active)."""
    import copy

    m = copy.deepcopy(model)
    tprune.global_unstructured(prunable(m), pruning_method=tprune.L1Unstructured,
                               amount=sparsity)
    return m


def torch_finalize(model: nn.Module) -> nn.Module:
    for module, name in prunable(model):
        if tprune.is_pruned(module):
            tprune.remove(module, name)
    return model


def run_one(method: str, sparsity: float, recover: bool, ref: nn.Module, train: Any,
            cfg: npr.Distill, floor: float) -> nn.Module:
    steps: list[Any] = [cfg] if recover else []
    if method == "netpress-global-floor":
        recipe = [npr.GlobalMagnitudePrune(sparsity=sparsity, floor=floor)] + steps
        return npr.compress(ref, recipe, train=train, measure=False).model
    if method == "netpress-layerwise":
        recipe = [npr.LayerwiseMagnitudePrune(sparsity=sparsity)] + steps
        return npr.compress(ref, recipe, train=train, measure=False).model
    m = torch_finalize(torch_global(ref, sparsity))
    if recover:
        # Keep torch's exact masks during recovery: pruning each layer by magnitude to the
        # sparsity torch gave it selects exactly the zeros torch left.
        per_layer = {n: float((mod.weight == 0).float().mean()) for n, mod in m.named_modules()
                     if isinstance(mod, (nn.Conv2d, nn.Linear))}
        keep = npr.LayerwiseMagnitudePrune(sparsity=0.0, per_layer=per_layer)
        m = npr.compress(m, [keep, *steps], train=train, reference=ref, measure=False).model
    return m


def layer_density(model: nn.Module) -> float:
    return min(float((m.weight != 0).float().mean()) for m, _ in prunable(model))


def state_dict_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="shared data folder (default: $NETPRESS_DATA)")
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--recover-images", type=int, default=5000,
                   help="JPEG train images for the distillation recovery")
    p.add_argument("--recover-epochs", type=float, default=1.0)
    p.add_argument("--floor", type=float, default=0.02)
    p.add_argument("--jpeg-limit", type=int, default=None, help="JPEG test images (10k)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/unstructured.json")
    args = p.parse_args(argv)
    if args.quick:
        args.sparsities, args.recover_images, args.jpeg_limit = [0.7], 256, 500
    torch.set_num_threads(args.threads)
    root = data_dir(args.data)
    ref = load_pretrained_cifar_resnet(args.depth, find_pretrained(args.depth, root))
    exact = ds.cifar10_exact_test(root)
    jpeg = ds.cifar10_jpeg_test(root, limit=args.jpeg_limit)
    train = ds.loader(ds.cifar10_jpeg_train(root, limit=args.recover_images), batch_size=64,
                      shuffle=True)
    cfg = npr.Distill(epochs=args.recover_epochs, lr=0.01, optimizer="sgd", momentum=0.9,
                      temperature=4.0, alpha=0.9)
    ref_exact, ref_jpeg = logits(ref, exact), logits(ref, jpeg)
    y_exact = exact.tensors[1]
    rows: list[dict[str, Any]] = []
    header = {"model": f"resnet{args.depth}", "reference_accuracy": accuracy(ref_exact, y_exact),
              "reference_state_dict_bytes": state_dict_bytes(ref),
              "recovery": {"method": "Distill", **cfg.to_dict(),
                           "train_images": args.recover_images, "batch_size": 64},
              "floor": args.floor, "jpeg_test_images": len(jpeg), "rows": rows}
    print(f"reference resnet{args.depth}: {100 * header['reference_accuracy']:.2f}% on the "
          f"lossless subset", flush=True)
    for recover in (False, True):
        for sparsity in args.sparsities:
            for method in METHODS:
                with Timer() as t:
                    m = run_one(method, sparsity, recover, ref, train, cfg, args.floor)
                out_exact, out_jpeg = logits(m, exact), logits(m, jpeg)
                row = {"method": method, "sparsity": sparsity, "recovery": recover,
                       "accuracy": accuracy(out_exact, y_exact),
                       "agreement_jpeg": agreement(out_jpeg, ref_jpeg),
                       "min_layer_density": layer_density(m),
                       "artefact_bytes": len(dumps_artefact(m)),
                       "state_dict_bytes": state_dict_bytes(m), "seconds": round(t.seconds, 1)}
                rows.append(row)
                write_json(args.out, header)
                print(f"{method:27s} s={sparsity:.2f} recover={recover!s:5s} "
                      f"acc={100 * row['accuracy']:.2f}% agree={100 * row['agreement_jpeg']:.2f}% "
                      f"minlayer={row['min_layer_density']:.3f} file={row['artefact_bytes']:,}B "
                      f"({t.seconds:.0f}s)", flush=True)
    print(render(header))
    return 0


def render(h: dict[str, Any]) -> str:
    body = [[r["method"], f"{100 * r['sparsity']:.0f}%", "distill" if r["recovery"] else "none",
             f"{100 * r['accuracy']:.2f}", f"{100 * r['agreement_jpeg']:.2f}",
             f"{r['min_layer_density']:.3f}", f"{r['artefact_bytes']:,}",
             f"{r['state_dict_bytes']:,}"] for r in h["rows"]]
    return markdown_table(["method", "sparsity", "recovery", "accuracy % (lossless 1017)",
                           "agreement % (JPEG 10k)", "min layer density", ".npress bytes",
                           "torch.save bytes"], body)


if __name__ == "__main__":
    sys.exit(main())
