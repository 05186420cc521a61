"""Cross-layer equalization per INT8 target, measured in ONNX Runtime on the CPU this runs on.

For each pretrained CIFAR-10 ResNet depth, with the same 512 calibration JPEG train images,
side by side in one process:

* ``Quantize(target=T, equalize=False)``;
* ``Quantize(target=T)`` with the noise model of before (every weight step ``max|w| / 127``:
  :func:`netpress.quant._equalize_stats._pairs` switched off for this row);
* ``Quantize(target=T)`` as shipped (on ``x86-avx2`` the weight step of each row is also
  bounded by its largest same-sign adjacent pair, :class:`netpress.quant.equalize.Pairs`).

Every model is exported to ONNX and run by ONNX Runtime here: agreement with the FP32
PyTorch model on the 10k JPEG test images, and the PyTorch fake-quant model's agreement with
its own ONNX Runtime run (1.0 when the target matches this CPU's kernels). Run it on an
AVX2-only CPU for ``x86-avx2`` figures that mean what they say; the table names the flags.

    python benchmarks/equalize_targets.py --data ../shared/data [--depths 20 56]
        [--targets x86-avx2 x86-vnni] [--jpeg-limit N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import agreement, cpu_flags, data_dir, logits, markdown_table, write_json

import netpress as npr
from netpress import datasets as ds
from netpress.export.onnx import export_onnx, ort_session
from netpress.models.cifar_resnet import find_pretrained, load_pretrained_cifar_resnet
from netpress.quant import Quantize, _equalize_stats
from netpress.quant.target import host_target

RESULTS = Path(__file__).parent / "results"
ROWS = ("no equalization", "equalized, pair-blind noise model", "equalized (shipped)")


@contextmanager
def pair_blind() -> Any:
    """The noise model of before: no consumer gets :class:`Pairs`."""
    saved = _equalize_stats._pairs
    _equalize_stats._pairs = lambda *a, **k: None  # type: ignore[assignment]
    try:
        yield
    finally:
        _equalize_stats._pairs = saved


def ort_logits(path: Path, x: np.ndarray, batch: int = 500) -> torch.Tensor:
    session = ort_session(path, threads=1)
    name = session.get_inputs()[0].name
    return torch.from_numpy(np.concatenate(
        [session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]))


def run(depth: int, target: str, root: Path, tmp: Path, jpeg_limit: int | None
        ) -> list[dict[str, Any]]:
    ref = load_pretrained_cifar_resnet(depth, find_pretrained(depth, root))
    jpeg = ds.cifar10_jpeg_test(root, limit=jpeg_limit)
    calib_set = ds.cifar10_jpeg_train(root, limit=512)
    calib = [(calib_set.tensors[0][i:i + 64], calib_set.tensors[1][i:i + 64])
             for i in range(0, 512, 64)]
    ref_out = logits(ref, jpeg)
    x = jpeg.tensors[0].numpy()
    rows = []
    for label in ROWS:
        cfg = Quantize(target=target, equalize=label != ROWS[0])
        if label == ROWS[1]:
            with pair_blind():
                result = npr.compress(ref, cfg, calibration=calib, measure=False)
        else:
            result = npr.compress(ref, cfg, calibration=calib, measure=False)
        eq = next((s.get("equalization", {}) for s in result.report["steps"]
                   if "equalization" in s), {})
        path = export_onnx(result.model, tmp / f"r{depth}_{target}_{len(rows)}.onnx",
                           jpeg.tensors[0][:1])
        out = ort_logits(path, x)
        rows.append({"depth": depth, "target": target, "row": label,
                     "agreement_ort": agreement(out, ref_out),
                     "fake_quant_vs_ort": agreement(logits(result.model, jpeg), out),
                     "predicted_noise": [eq.get("noise_before"), eq.get("noise_after")]})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="shared data folder (default: $NETPRESS_DATA)")
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    p.add_argument("--targets", nargs="+", default=["x86-avx2"])
    p.add_argument("--jpeg-limit", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "equalize_targets.json")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    root = data_dir(args.data)
    flags = cpu_flags()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            for target in args.targets:
                rows.extend(run(depth, target, root, Path(tmp), args.jpeg_limit))
    meta = {"command": " ".join(sys.argv), "cpu_flags": flags, "host_target": host_target()}
    write_json(args.out, {**meta, "rows": rows})
    table = markdown_table(
        ["ResNet", "target", "Quantize", "agreement (ORT, this CPU)", "fake-quant vs ORT",
         "predicted noise before → after"],
        [[r["depth"], r["target"], r["row"], f"{100 * r['agreement_ort']:.2f}%",
          f"{100 * r['fake_quant_vs_ort']:.2f}%",
          "—" if r["predicted_noise"][0] is None else
          f"{r['predicted_noise'][0]:.3g} → {r['predicted_noise'][1]:.3g}"] for r in rows])
    text = f"CPU flags: {flags} (host target {host_target()})\n\n{table}\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
