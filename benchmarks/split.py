"""Split computing on the pretrained CIFAR-10 ResNet-56: bytes sent per image vs the JPEG.

Each configuration ``AT:CHANNELS:STRIDE:BITS[:RATE]`` runs netpress's ``Split`` (BottleFit's
two stages: head distillation, then output distillation with the device side frozen) on
JPEG train images, then measures on the JPEG test images:

* bytes the device sends per image: its uint8 codes, one zstd frame per image, without and
  with a zstd dictionary trained on codes of 2,000 train images (shipped once, not per image),
  and arithmetic-coded with a per-channel frequency model fitted on the same train codes
  (``netpress.split.arith``; shipped once too; the first 200 test images are decoded back);
* the image's own JPEG file bytes (the files the data set ships) and PNG bytes of its pixels;
* agreement of the split model with the original on the JPEG test images, accuracy on the
  1,017 lossless test images;
* MACs of the device part vs the whole original, and their latency at batch 1 (1 thread,
  interleaved rounds; the machine is shared, so timings are noisy).

With ``--entropy factorized`` the bottleneck learns a per-channel density of its codes
trained with the rate term (``RATE`` in the spec is its weight λ per bit), and the arithmetic
coder codes with that density (``bytes_arith``; ``bytes_rate`` is its ideal
``sum -log2 p / 8``; ``bytes_arith_fitted`` the coder with a model fitted on train codes).

    python benchmarks/split.py --data ../shared/data
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
from _common import accuracy, agreement, data_dir, logits, markdown_table, write_json

import netpress as npr
from netpress import datasets as ds
from netpress.measure import count_macs, measure_latency_interleaved
from netpress.models import find_pretrained, load_pretrained_cifar_resnet
from netpress.report.html import encode_png
from netpress.split import (
    arith_bytes,
    coded_codes,
    codes_of,
    decode_codes,
    encode_codes,
    fit_code_model,
    save_split,
    train_dictionary,
    transmitted_bytes,
)

RESULTS = Path(__file__).parent / "results"


class Augmented(torch.utils.data.Dataset):
    """Random crop (4-pixel zero padding) and horizontal flip of a tensor image data set."""

    def __init__(self, base: torch.utils.data.TensorDataset, seed: int = 0) -> None:
        self.x, self.y = base.tensors[0], base.tensors[1]
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        dy, dx, flip = torch.randint(0, 9, (3,), generator=self.gen).tolist()
        img = torch.nn.functional.pad(self.x[i], (4, 4, 4, 4))[:, dy:dy + 32, dx:dx + 32]
        return (img.flip(-1) if flip % 2 else img), self.y[i]


def _jpeg_test_bytes(root: Path, n: int) -> np.ndarray:
    arrays = np.load(root / "cifar10" / "cifar10_jpeg_bytes.npz")
    return np.diff(arrays["test_offsets"])[:n]


def _png_bytes(root: Path, n: int) -> np.ndarray:
    x = np.load(root / "cifar10" / "cifar10_jpeg_test.npz")["x_test"][:n]
    return np.array([len(encode_png(img)) for img in x])


def _parse(spec: str) -> dict[str, Any]:
    parts = spec.split(":")
    at, channels, stride, bits = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
    rate = float(parts[4]) if len(parts) > 4 else 0.0
    return {"at": at, "channels": channels, "stride": stride, "bits": bits, "rate": rate}


def run(spec: str, args: argparse.Namespace, ref: torch.nn.Module, train: Any, test: Any,
        exact: Any, ref_out: torch.Tensor, jpeg: np.ndarray) -> dict[str, Any]:
    cfg = npr.Split(**_parse(spec), stage1_steps=args.stage1, stage2_steps=args.stage2,
                    lr=args.lr, optimizer=args.optimizer, train_head=not args.frozen_head,
                    alpha=args.alpha, temperature=args.temperature, hidden=args.hidden,
                    stage2_trains=tuple(args.stage2_trains.split(",")), entropy=args.entropy,
                    cache_head=args.cache_head, tail_lr=args.tail_lr,
                    stage1_rate=args.stage1_rate)
    data = Augmented(train) if args.augment else train
    t0 = time.perf_counter()
    split = npr.compress(ref, cfg, train=ds.loader(data, 64, shuffle=True),
                         measure=False).model
    train_s = time.perf_counter() - t0
    codes = codes_of(split, ds.loader(test, 500))
    train_codes = codes_of(split, ds.loader(train, 500), 4)
    dictionary = train_dictionary(train_codes)
    plain, with_dict = transmitted_bytes(codes), transmitted_bytes(codes, dictionary)
    fitted = fit_code_model(train_codes, cfg.bits)
    fitted_arith = arith_bytes(codes, fitted)
    model, arith = (coded_codes(split, codes) if cfg.entropy == "factorized"
                    else (fitted, fitted_arith))
    rate = np.array([model.ideal_bits(c) / 8 for c in codes])
    decoded = all(np.array_equal(decode_codes(encode_codes(c, model), model, c.shape), c)
                  for c in codes[:200])
    x1 = test.tensors[0][:1]
    device = split.device_part().eval()
    dev_t, ref_t = measure_latency_interleaved([device, ref], x1, batch_sizes=(1,),
                                               repeats=30)
    folder = RESULTS / "split_models" / spec.replace(":", "_")
    paths = {} if args.no_save else save_split(split, folder, x1,
                                               recipe=npr.Recipe((cfg,)).to_dict())
    row = {"config": cfg.to_dict(), "spec": spec, "train_seconds": round(train_s, 1),
           "agreement_jpeg": agreement(logits(split, test), ref_out),
           "accuracy_exact": accuracy(logits(split, exact), exact.tensors[1]),
           "code_values": int(codes[0].size), "code_shape": list(codes[0].shape),
           "bytes_mean": float(plain.mean()), "bytes_dict_mean": float(with_dict.mean()),
           "bytes_dict_p95": float(np.percentile(with_dict, 95)),
           "dictionary_bytes": len(dictionary), "jpeg_mean": float(jpeg.mean()),
           "bytes_arith_mean": float(arith.mean()), "bytes_rate_mean": float(rate.mean()),
           "bytes_arith_fitted_mean": float(fitted_arith.mean()),
           "bytes_arith_p95": float(np.percentile(arith, 95)),
           "code_model_bytes": model.nbytes, "arith_round_trip_200": decoded,
           "reduction_vs_jpeg_arith": float(jpeg.mean() / arith.mean()),
           "reduction_vs_jpeg": float(jpeg.mean() / with_dict.mean()),
           "reduction_vs_jpeg_no_dict": float(jpeg.mean() / plain.mean()),
           "device_macs": count_macs(device, x1), "reference_macs": count_macs(ref, x1),
           "device_ms": dev_t[1].median_ms, "reference_ms": ref_t[1].median_ms,
           "artefact_bytes": {k: Path(v).stat().st_size for k, v in paths.items()}}
    print({k: v for k, v in row.items() if k != "config"}, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data")
    p.add_argument("--configs", nargs="+", default=["layer2:8:2:4:0.01", "layer2:4:2:4:0.03"],
                   help="AT:CHANNELS:STRIDE:BITS[:RATE] per run")
    p.add_argument("--stage1", type=int, default=400)
    p.add_argument("--stage2", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--alpha", type=float, default=0.9, help="stage 2: weight of distillation")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--hidden", type=int, default=None, help="bottleneck width")
    p.add_argument("--stage2-trains", default="decoder,tail",
                   help="parts stage 2 trains (head,encoder,decoder,tail)")
    p.add_argument("--entropy", default="none", choices=("none", "factorized"),
                   help="learned entropy model of the codes (RATE: its weight per bit)")
    p.add_argument("--cache-head", action="store_true",
                   help="train both stages from cached head/original outputs (frozen head)")
    p.add_argument("--tail-lr", type=float, default=None,
                   help="stage 2: the tail's own learning rate (needs --cache-head)")
    p.add_argument("--stage1-rate", type=float, default=None,
                   help="stage 1's own rate weight (0: rate-free; needs --cache-head)")
    p.add_argument("--augment", action="store_true", help="random crop + flip of train images")
    p.add_argument("--no-save", action="store_true", help="skip writing the artefacts")
    p.add_argument("--frozen-head", action="store_true", help="stage 1 trains only the encoder")
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "split.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = data_dir(args.data)
    ref = load_pretrained_cifar_resnet(56, find_pretrained(56, root)).eval()
    train = ds.cifar10_jpeg_train(root, limit=args.train_images)
    test = ds.cifar10_jpeg_test(root, limit=args.test_images)
    exact = ds.cifar10_exact_test(root)
    ref_out = logits(ref, test)
    jpeg = _jpeg_test_bytes(root, len(test))
    png = _png_bytes(root, len(test))
    rows = [run(s, args, ref, train, test, exact, ref_out, jpeg) for s in args.configs]
    payload = {"model": "resnet56 (akamaster)", "train_images": args.train_images,
               "test_images": len(test), "stage1_steps": args.stage1,
               "stage2_steps": args.stage2, "batch": 64, "lr": args.lr,
               "train_head": not args.frozen_head, "optimizer": args.optimizer,
               "alpha": args.alpha, "temperature": args.temperature,
               "stage2_trains": args.stage2_trains, "augment": args.augment,
               "entropy": args.entropy, "cache_head": args.cache_head,
               "tail_lr": args.tail_lr, "stage1_rate": args.stage1_rate,
               "jpeg_mean_bytes": float(jpeg.mean()),
               "png_mean_bytes": float(png.mean()),
               "reference_accuracy_exact": accuracy(logits(ref, exact), exact.tensors[1]),
               "threads": args.threads, "rows": rows}
    body = [[r["spec"], "×".join(map(str, r["code_shape"])), f"{r['bytes_mean']:.1f}",
             f"{r['bytes_dict_mean']:.1f}", f"{r['bytes_arith_mean']:.1f}",
             f"{r['reduction_vs_jpeg']:.1f}× / {r['reduction_vs_jpeg_arith']:.1f}×",
             f"{100 * r['agreement_jpeg']:.2f}", f"{100 * r['accuracy_exact']:.2f}",
             f"{100 * r['device_macs'] / r['reference_macs']:.1f}%",
             f"{r['device_ms']:.2f} / {r['reference_ms']:.2f}", f"{r['train_seconds']:.0f}"]
            for r in rows]
    table = markdown_table(["config (at:ch:stride:bits:rate)", "codes", "bytes/img",
                            "bytes/img (dict)", "bytes/img (arith)",
                            "fewer than JPEG (dict / arith)", "agreement % (JPEG)",
                            "accuracy % (lossless)", "device MACs", "device / full ms (b1)",
                            "train s"], body)
    payload["table"] = table
    write_json(args.out, payload)
    args.out.with_suffix(".md").write_text(
        f"JPEG test images: {jpeg.mean():.1f} bytes on average; PNG: {png.mean():.1f}\n\n"
        + table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
