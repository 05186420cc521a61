"""Issue 15 benchmarks: activation compression, robustness-aware pruning, importance criteria.

Three subcommands, each one process run that writes ``benchmarks/results/<name>.{json,md}``:

* ``activations``: pretrained ResNet-20; ``Distill`` with and without ``act_sparsity`` on
  the residual blocks' outputs, same budget; per-image activation bytes (8/16-bit codes,
  zstd) and agreement (float, and with the maps quantized);
* ``robustness``: pretrained ResNet-56 at 90% unstructured sparsity; ``Distill`` with and
  without ``cond_reg``, same budget, 3 seeds; accuracy and agreement under Gaussian noise
  (3 levels) and FGSM;
* ``importance``: magnitude vs Taylor (loss preservation) vs gradient-norm importance at 50%
  and 70% unstructured sparsity, on the pretrained ResNet-56 and on a ResNet-20 trained here
  for a few epochs (early training); accuracy one-shot and after the same short recovery.

    python benchmarks/toolbox.py activations --data ../shared/data
    python benchmarks/toolbox.py robustness --data ../shared/data
    python benchmarks/toolbox.py importance --data ../shared/data
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import accuracy, agreement, data_dir, logits, markdown_table, write_json

import netpress as npr
from netpress import datasets as ds
from netpress.measure.activations import activation_section
from netpress.measure.robustness import robustness_section
from netpress.models import cifar_resnet, find_pretrained, load_pretrained_cifar_resnet
from netpress.recover.regularizers import condition_number

RESULTS = Path(__file__).parent / "results"
BLOCKS = ("re:layer\\d\\.\\d+",)  # post-ReLU outputs of every residual block


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _distill(steps: int, seed_lr: float = 0.01, **extra: Any) -> npr.Distill:
    return npr.Distill(max_steps=steps, lr=seed_lr, optimizer="sgd", momentum=0.9,
                       temperature=4.0, alpha=0.9, **extra)


def activations(args: argparse.Namespace) -> dict[str, Any]:
    root = data_dir(args.data)
    ref = load_pretrained_cifar_resnet(20, find_pretrained(20, root)).eval()
    train = ds.loader(ds.cifar10_jpeg_train(root, limit=args.train_images), batch_size=64,
                      shuffle=True)
    test = ds.cifar10_jpeg_test(root, limit=args.test_images)
    probe = ds.loader(ds.cifar10_jpeg_test(root, limit=args.bytes_images), batch_size=100)
    ref_out = logits(ref, test)
    rows = [{"run": "reference (no recovery)", "strength": None, "agreement": 1.0,
             **_act_summary(activation_section(ref, probe, layers=BLOCKS, reference=ref,
                                                max_batches=None))}]
    for strength in [None, *args.strengths]:
        t0 = time.perf_counter()
        extra = {} if strength is None else {"act_sparsity": strength, "act_layers": BLOCKS}
        model = npr.compress(ref, _distill(args.steps, **extra), train=train,
                             measure=False).model
        sec = activation_section(model, probe, layers=BLOCKS, reference=ref, max_batches=None)
        rows.append({"run": "Distill" if strength is None else "Distill + act_sparsity",
                     "strength": strength, "agreement": agreement(logits(model, test), ref_out),
                     "seconds": round(time.perf_counter() - t0, 1), **_act_summary(sec)})
        print(rows[-1], flush=True)
    body = [[r["run"], "-" if r["strength"] is None else f"{r['strength']:g}",
             _pct(r["agreement"]), _pct(r["agreement_8bit"]), _pct(r["mean_sparsity"]),
             f"{r['bytes_8bit']:,.0f}", f"{r['bytes_16bit']:,.0f}", f"{r['float32']:,}"]
            for r in rows]
    table = markdown_table(["run", "act_sparsity", "agreement % (JPEG)",
                            "agreement % (maps at 8 bits)", "zeros in maps", "bytes/img 8-bit",
                            "bytes/img 16-bit", "float32 bytes/img"], body)
    return {"model": "resnet20", "steps": args.steps, "train_images": args.train_images,
            "test_images": len(test), "bytes_images": args.bytes_images, "layers": BLOCKS,
            "rows": rows, "table": table}


def _act_summary(sec: dict[str, Any]) -> dict[str, Any]:
    return {"mean_sparsity": sec["mean_sparsity"], "bytes_8bit": sec["bytes_per_input_8bit"],
            "bytes_16bit": sec["bytes_per_input_16bit"],
            "float32": sec["float32_bytes_per_input"],
            "agreement_8bit": sec["agreement_quantized"]["8"], "per_layer": sec["layers"]}


def robustness(args: argparse.Namespace) -> dict[str, Any]:
    root = data_dir(args.data)
    ref = load_pretrained_cifar_resnet(56, find_pretrained(56, root)).eval()
    train = ds.cifar10_jpeg_train(root, limit=args.train_images)
    test = ds.loader(ds.cifar10_exact_test(root), batch_size=200)
    rows = []
    for seed in range(args.seeds):
        for strength in (None, args.cond_reg):
            t0 = time.perf_counter()
            extra = {} if strength is None else {"cond_reg": strength}
            recipe = [npr.GlobalMagnitudePrune(sparsity=args.sparsity),
                      _distill(args.steps, **extra)]
            model = npr.compress(ref, recipe, train=ds.loader(train, 64, shuffle=True,
                                                              seed=seed),
                                 seed=seed, measure=False).model
            sec = robustness_section(ref, model, test, noise_levels=args.noise,
                                     fgsm_eps=args.eps, seed=0)
            kappas = [condition_number(m.weight) for m in model.modules()
                      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
            finite = [k for k in kappas if k != float("inf")]
            rows.append({"seed": seed, "cond_reg": strength, "section": sec,
                         "median_condition_number": float(torch.tensor(finite).median()),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(seed, strength, sec["clean"], [r["compressed_accuracy"] for r in sec["noise"]],
                  [r["compressed_accuracy"] for r in sec["fgsm"]], flush=True)
    ref_sec = rows[0]["section"]
    names = ["clean"] + [f"noise {r['level']}" for r in ref_sec["noise"]] + \
        [f"FGSM {r['eps']}" for r in ref_sec["fgsm"]]

    def accs(sec: dict[str, Any], key: str) -> list[float]:
        return [sec["clean"][key]] + [r[key] for r in sec["noise"]] + [r[key] for r in sec["fgsm"]]

    body = [["reference (dense)", *[_pct(v) for v in accs(ref_sec, "reference_accuracy")], "-"]]
    for strength in (None, args.cond_reg):
        sel = [r for r in rows if r["cond_reg"] == strength]
        per = torch.tensor([accs(r["section"], "compressed_accuracy") for r in sel])
        agr = torch.tensor([accs(r["section"], "agreement") for r in sel])
        label = "90% + Distill" if strength is None else f"90% + Distill + cond_reg={strength:g}"
        body.append([label, *[f"{100 * m:.2f} ± {100 * s:.2f}" for m, s in
                              zip(per.mean(0).tolist(), per.std(0).tolist())],
                     f"{sum(r['median_condition_number'] for r in sel) / len(sel):.1f}"])
        body.append(["  … agreement with ref.", *[f"{100 * m:.2f}" for m in agr.mean(0).tolist()],
                     ""])
    table = markdown_table(["model", *[f"{n} acc. %" for n in names],
                            "median layer κ"], body)
    return {"model": "resnet56", "sparsity": args.sparsity, "steps": args.steps,
            "train_images": args.train_images, "seeds": args.seeds, "cond_reg": args.cond_reg,
            "noise_levels": args.noise, "fgsm_eps": args.eps, "test": "exact 1017",
            "rows": rows, "table": table}


def _train_from_scratch(root: Path, epochs: int, images: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cifar_resnet(20)
    data = ds.cifar10_jpeg_train(root, limit=images)
    steps = epochs * (images // 128)
    cfg = npr.FineTune(max_steps=steps, lr=0.1, optimizer="sgd", momentum=0.9,
                       weight_decay=5e-4, warmup_steps=20)
    return npr.compress(model, cfg, train=ds.loader(data, 128, shuffle=True),
                        measure=False).model.eval()


def importance(args: argparse.Namespace) -> dict[str, Any]:
    root = data_dir(args.data)
    exact = ds.cifar10_exact_test(root)
    y = exact.tensors[1]
    calib = ds.loader(ds.cifar10_jpeg_train(root, limit=256, seed=1), batch_size=64)
    train = ds.cifar10_jpeg_train(root, limit=args.train_images)
    t0 = time.perf_counter()
    early = _train_from_scratch(root, args.early_epochs, args.train_images)
    early_s = time.perf_counter() - t0
    models = {"resnet56 (pretrained)": load_pretrained_cifar_resnet(56, find_pretrained(56, root)),
              f"resnet20 (trained here, {args.early_epochs} epochs)": early}
    rows = []
    for name, model in models.items():
        base = accuracy(logits(model, exact), y)
        trained = name.startswith("resnet56")
        for sparsity in (0.5, 0.7):
            for crit in ("magnitude", "taylor", "grad_norm"):
                t1 = time.perf_counter()
                prune = npr.GlobalMagnitudePrune(sparsity=sparsity, importance=crit)
                one = npr.compress(model, prune, calibration=calib, measure=False).model
                rec = _distill(args.steps) if trained else npr.FineTune(
                    max_steps=args.steps, lr=0.05, optimizer="sgd", momentum=0.9)
                after = npr.compress(model, [prune, rec], calibration=calib,
                                     train=ds.loader(train, 64, shuffle=True),
                                     measure=False).model
                rows.append({"model": name, "dense_accuracy": base, "sparsity": sparsity,
                             "importance": crit, "oneshot": accuracy(logits(one, exact), y),
                             "recovered": accuracy(logits(after, exact), y),
                             "seconds": round(time.perf_counter() - t1, 1)})
                print(rows[-1], flush=True)
    body = [[r["model"], _pct(r["dense_accuracy"]), f"{100 * r['sparsity']:.0f}%",
             r["importance"], _pct(r["oneshot"]), _pct(r["recovered"])] for r in rows]
    table = markdown_table(["model", "dense acc. %", "sparsity", "importance",
                            "one-shot acc. %", "after recovery acc. %"], body)
    return {"steps": args.steps, "train_images": args.train_images,
            "early_epochs": args.early_epochs, "early_training_seconds": round(early_s, 1),
            "calibration_images": 256, "test": "exact 1017", "rows": rows, "table": table}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("activations", "robustness", "importance"))
    p.add_argument("--data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="recovery steps (batch 64)")
    p.add_argument("--train-images", type=int, default=10000)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--bytes-images", type=int, default=500)
    p.add_argument("--strengths", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--cond-reg", type=float, default=0.1)
    p.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--eps", type=float, nargs="+", default=[0.02])
    p.add_argument("--early-epochs", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    defaults = {"activations": 200, "robustness": 100, "importance": 50}
    args.steps = args.steps or defaults[args.what]
    payload = {"activations": activations, "robustness": robustness,
               "importance": importance}[args.what](args)
    payload.update(threads=args.threads, torch=torch.__version__)
    out = args.out or RESULTS / f"{args.what}.json"
    write_json(out, payload)
    out.with_suffix(".md").write_text(payload["table"] + "\n", encoding="utf-8")
    print(payload["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
