"""Faithful recovery: four recoveries of one compressed model on the same budget (issue 5).

Two real tasks:

* **Fashion-MNIST**: an ``MNISTNet`` reference trained here (seeded; its weights are cached
  in ``$TMPDIR/netpress-bench/``), accuracy and agreement on the 10k test images;
* **CIFAR-10 ResNet-20**: the pretrained akamaster model, accuracy on the 1,017 lossless test
  images, agreement on the 10k JPEG test images, recovery on JPEG train images.

Each reference is pruned one-shot (``GlobalMagnitudePrune``), then recovered four ways with
the same steps, batches (same shuffling per seed), optimizer and learning-rate schedule:

(a) ``FineTune``: cross-entropy on the true labels;
(b) ``Distill``: soft targets (T=4) plus 10% true-label cross-entropy;
(c) ``LabelPreserve``: CE on the reference's labels + distillation + a top-1 margin hinge,
    its weights chosen automatically on held-out train batches (the trials are extra steps,
    reported);
(d) ``LC``: Condensa's learning-compression (augmented Lagrangian, distillation L-steps).

Per method and seed: accuracy, mismatches with the reference, mismatches on inputs the
reference gets right, and the worst per-class agreement; then mean ± std over seeds and the
(a)/(c) mismatch ratio. Writes ``benchmarks/results/fidelity.json`` and ``fidelity.md``, and
the full fidelity report (JSON, markdown, HTML with plots) of the ResNet-20 (c) model of the
first seed to ``benchmarks/results/fidelity_report_resnet20/``.

    nice -n 10 python benchmarks/fidelity.py --data ../shared/data [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, accuracy, data_dir, logits, markdown_table, write_json

import netpress as npr
from netpress import datasets as ds
from netpress.measure.fidelity import classification_fidelity
from netpress.models import MNISTNet, find_pretrained, load_pretrained_cifar_resnet

METHODS = ("finetune", "distill", "label_preserve", "lc")
LABELS = {"finetune": "(a) FineTune (true-label CE)", "distill": "(b) Distill",
          "label_preserve": "(c) LabelPreserve", "lc": "(d) LC", "none": "no recovery"}
RESULTS = Path(__file__).parent / "results"


@dataclass
class Task:
    """One compressed model to recover, and the data to recover and measure it on."""

    name: str
    reference: nn.Module
    train: Any  # TensorDataset the recovery batches come from
    acc_set: Any  # TensorDataset for accuracy
    agree_set: Any  # TensorDataset for agreement / mismatches
    prune: npr.MethodConfig
    steps: int
    batch: int
    lr: float


# ----------------------------------------------------------------------------- references
def train_fmnist_reference(train: Any, epochs: int, seed: int) -> nn.Module:
    """``MNISTNet`` trained with Adam on Fashion-MNIST, cached by seed and epochs."""
    cache = Path(tempfile.gettempdir()) / "netpress-bench" / f"fmnist_mnistnet_s{seed}_e{epochs}.pt"
    torch.manual_seed(seed)
    model = MNISTNet()
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = ds.loader(train, batch_size=128, shuffle=True, seed=seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model.eval()


def subset(dataset: Any, n: int, seed: int) -> Any:
    """A fixed random subset of ``n`` items (all when ``n`` covers the dataset)."""
    if n >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n].sort().values
    return torch.utils.data.TensorDataset(*(t[idx] for t in dataset.tensors))


def build_tasks(args: argparse.Namespace, root: Path) -> list[Task]:
    tasks: list[Task] = []
    if "fmnist" in args.tasks:
        train = ds.fashion_mnist(root, "train")
        test = ds.fashion_mnist(root, "test")
        if args.quick:
            test = subset(test, 1000, 0)
        with Timer() as t:
            ref = train_fmnist_reference(train, args.fmnist_epochs, 0)
        print(f"fmnist reference: {args.fmnist_epochs} epochs ({t.seconds:.0f}s incl. cache)",
              flush=True)
        tasks.append(Task("fashion-mnist", ref, subset(train, args.fmnist_train, 1), test, test,
                          npr.GlobalMagnitudePrune(sparsity=args.fmnist_sparsity),
                          args.fmnist_steps, 64, args.lr))
    if "resnet20" in args.tasks:
        ref = load_pretrained_cifar_resnet(20, find_pretrained(20, root))
        tasks.append(Task("cifar10-resnet20", ref,
                          ds.cifar10_jpeg_train(root, limit=args.resnet_train),
                          ds.cifar10_exact_test(root),
                          ds.cifar10_jpeg_test(root, limit=args.jpeg_limit),
                          npr.GlobalMagnitudePrune(sparsity=args.resnet_sparsity),
                          args.resnet_steps, 64, args.lr))
    return tasks


# ----------------------------------------------------------------------------- recovery
def recovery(method: str, steps: int, lr: float, quick: bool) -> npr.MethodConfig:
    """The recovery config of ``method``; every one shares the optimisation settings."""
    common: dict[str, Any] = dict(max_steps=steps, lr=lr, optimizer="sgd", momentum=0.9,
                                  lr_schedule="cosine", warmup_steps=max(1, steps // 20))
    if method == "finetune":
        return npr.FineTune(**common)
    if method == "distill":
        return npr.Distill(**common, temperature=4.0, alpha=0.9)
    if method == "label_preserve":
        if quick:
            return npr.LabelPreserve(**common, candidates=((0.0, 1.0, 0.0), (1.0, 1.0, 1.0)))
        return npr.LabelPreserve(**common)
    if method == "lc":
        return npr.LC(**common, iterations=4 if quick else 8)
    raise ValueError(method)


def measure(task: Task, model: nn.Module, ref_out: dict[str, torch.Tensor]) -> dict[str, Any]:
    out_agree = logits(model, task.agree_set)
    same = task.acc_set is task.agree_set
    out_acc = out_agree if same else logits(model, task.acc_set)
    fid = classification_fidelity(ref_out["agree"], out_agree, task.agree_set.tensors[1])
    return {"accuracy": accuracy(out_acc, task.acc_set.tensors[1]),
            "agreement": fid["agreement"], "mismatches": fid["mismatches"],
            "mismatches_on_reference_correct": fid["mismatches_on_reference_correct"],
            "worst_class_agreement": fid["worst_class_agreement"],
            "accuracy_on_agreement_set": fid["compressed_accuracy"]}


def run(task: Task, method: str, seed: int, args: argparse.Namespace,
        ref_out: dict[str, torch.Tensor], report_dir: Path | None) -> dict[str, Any]:
    train = ds.loader(task.train, batch_size=task.batch, shuffle=True, seed=seed)
    steps: list[npr.MethodConfig] = [task.prune]
    if method != "none":
        steps.append(recovery(method, task.steps, task.lr, args.quick))
    evaluate = ds.loader(task.acc_set, batch_size=500) if report_dir else None
    with Timer() as t:
        result = npr.compress(task.reference, steps, train=train, seed=seed,
                              evaluate=evaluate, measure=report_dir is not None)
    row = {"task": task.name, "method": method, "seed": seed, "seconds": round(t.seconds, 1),
           **measure(task, result.model, ref_out)}
    record = result.report["steps"][-1]
    row["train_steps"] = record.get("steps", 0)
    if method == "label_preserve":
        row["weights"] = record["weights"]
        row["tuning_steps"] = len(record["trials"]) * max(1, int(task.steps * 0.25))
    if report_dir is not None:
        result.save_report(report_dir)
    return row


# ----------------------------------------------------------------------------- summary
def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


KEYS = ("accuracy", "agreement", "mismatches", "mismatches_on_reference_correct",
        "worst_class_agreement", "seconds")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        per: dict[str, Any] = {}
        for method in dict.fromkeys(r["method"] for r in rows if r["task"] == task):
            mine = [r for r in rows if r["task"] == task and r["method"] == method]
            per[method] = {k: spread([float(r[k]) for r in mine]) for k in KEYS}
            per[method]["seeds"] = len(mine)
        if "finetune" in per and "label_preserve" in per:
            per["ratio_finetune_over_label_preserve"] = _ratios(rows, task)
        out[task] = per
    return out


def _ratios(rows: list[dict[str, Any]], task: str) -> dict[str, Any]:
    def by_seed(method: str, key: str) -> dict[int, float]:
        return {r["seed"]: float(r[key]) for r in rows
                if r["task"] == task and r["method"] == method}

    res: dict[str, Any] = {}
    for key in ("mismatches", "mismatches_on_reference_correct"):
        a, c = by_seed("finetune", key), by_seed("label_preserve", key)
        paired = [a[s] / max(c[s], 1.0) for s in a if s in c]
        res[key] = {"of_means": statistics.fmean(a.values()) / max(statistics.fmean(c.values()),
                                                                    1.0),
                    "per_seed_min": min(paired), "per_seed_max": max(paired)}
    acc_a = statistics.fmean(by_seed("finetune", "accuracy").values())
    acc_c = statistics.fmean(by_seed("label_preserve", "accuracy").values())
    res["accuracy_c_minus_a"] = acc_c - acc_a
    res["goal_met"] = res["mismatches"]["of_means"] >= 5.0 and acc_c >= acc_a
    return res


def fmt(s: dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    return (f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f} "
            f"({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f})")


def render(payload: dict[str, Any]) -> str:
    body = []
    for task, per in payload["summary"].items():
        for method in ("none", *METHODS):
            if method not in per:
                continue
            s = per[method]
            body.append([task, LABELS[method], fmt(s["accuracy"], 100),
                         fmt(s["mismatches"], digits=0),
                         fmt(s["mismatches_on_reference_correct"], digits=0),
                         fmt(s["worst_class_agreement"], 100), f"{s['seconds']['mean']:.0f}"])
    table = markdown_table(["task", "recovery", "accuracy %", "mismatches",
                            "mismatches on ref-correct", "worst class agreement %",
                            "seconds"], body)
    lines = [table, ""]
    for task, per in payload["summary"].items():
        r = per.get("ratio_finetune_over_label_preserve")
        if r:
            m, mc = r["mismatches"], r["mismatches_on_reference_correct"]
            lines.append(f"- {task}: (a)/(c) mismatches {m['of_means']:.2f}× (per seed "
                         f"{m['per_seed_min']:.2f}–{m['per_seed_max']:.2f}×), on "
                         f"reference-correct inputs {mc['of_means']:.2f}× "
                         f"({mc['per_seed_min']:.2f}–{mc['per_seed_max']:.2f}×); accuracy "
                         f"(c)−(a) {100 * r['accuracy_c_minus_a']:+.2f} points; goal (≥5× and "
                         f"accuracy ≥ (a)) {'met' if r['goal_met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="shared data folder (default: $NETPRESS_DATA)")
    p.add_argument("--tasks", nargs="+", default=["fmnist", "resnet20"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--lr", type=float, default=0.01, help="one SGD lr for every recovery")
    p.add_argument("--fmnist-epochs", type=int, default=1)
    p.add_argument("--fmnist-sparsity", type=float, default=0.9)
    p.add_argument("--fmnist-steps", type=int, default=100)
    p.add_argument("--fmnist-train", type=int, default=12800)
    p.add_argument("--resnet-sparsity", type=float, default=0.5)
    p.add_argument("--resnet-steps", type=int, default=40)
    p.add_argument("--resnet-train", type=int, default=5120)
    p.add_argument("--jpeg-limit", type=int, default=None, help="JPEG test images (10k)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-report", action="store_true", help="skip the HTML fidelity report")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--merge", type=Path, nargs="+",
                   help="combine the JSON of runs made with different --tasks into --out")
    p.add_argument("--out", type=Path, default=RESULTS / "fidelity.json")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.fmnist_epochs, args.fmnist_steps, args.fmnist_train = [0], 1, 10, 640
        args.resnet_steps, args.resnet_train, args.jpeg_limit = 8, 512, 500
        if args.out == RESULTS / "fidelity.json":
            args.out = Path(tempfile.gettempdir()) / "netpress-bench" / "fidelity-quick.json"
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(args.threads)
    root = data_dir(args.data)
    rows: list[dict[str, Any]] = []
    payload: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v)
                                            for k, v in vars(args).items()},
                               "references": {}, "rows": rows}
    for task in build_tasks(args, root):
        ref_out = {"agree": logits(task.reference, task.agree_set)}
        ref_acc = accuracy(logits(task.reference, task.acc_set), task.acc_set.tensors[1])
        payload["references"][task.name] = {
            "accuracy": ref_acc, "accuracy_set": len(task.acc_set),
            "agreement_set": len(task.agree_set), "prune": task.prune.to_dict(),
            "recovery": {m: recovery(m, task.steps, task.lr, args.quick).to_dict()
                         for m in args.methods},
            "train_images": len(task.train), "batch_size": task.batch}
        print(f"{task.name}: reference accuracy {100 * ref_acc:.2f}% on {len(task.acc_set)}",
              flush=True)
        for seed in args.seeds:
            for method in ("none", *args.methods) if seed == args.seeds[0] else args.methods:
                wants_report = (not args.no_report and task.name == "cifar10-resnet20"
                                and method == "label_preserve" and seed == args.seeds[0])
                report_dir = (args.out.parent / "fidelity_report_resnet20") if wants_report \
                    else None
                row = run(task, method, seed, args, ref_out, report_dir)
                rows.append(row)
                payload["summary"] = summarise(rows)
                write_json(args.out, payload)
                print(f"{task.name:17s} {method:15s} seed={seed} "
                      f"acc={100 * row['accuracy']:.2f}% mism={row['mismatches']} "
                      f"(ref-correct {row['mismatches_on_reference_correct']}) "
                      f"worst-class={100 * row['worst_class_agreement']:.1f}% "
                      f"{row.get('weights', '')} ({row['seconds']:.0f}s)", flush=True)
    finish(payload, args.out)
    return 0


def finish(payload: dict[str, Any], out: Path) -> None:
    payload["summary"] = summarise(payload["rows"])
    write_json(out, payload)
    text = render(payload)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)


def merge(parts: list[Path], out: Path) -> int:
    """One results file from runs of separate tasks (e.g. run side by side on two cores)."""
    loaded = [json.loads(path.read_text()) for path in parts]
    payload: dict[str, Any] = {"settings": [d["settings"] for d in loaded], "references": {},
                               "rows": []}
    for d in loaded:
        payload["references"].update(d["references"])
        payload["rows"].extend(d["rows"])
    finish(payload, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
