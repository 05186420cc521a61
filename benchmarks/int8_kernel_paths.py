"""Which integer kernel ONNX Runtime runs for ``QLinearConv`` here, and what AMX would give.

ONNX Runtime's ``QLinearConv`` takes one of two x86 paths (``qlinearconv.cc``): weights that
are int8 with zero point 0 ("symmetric", what netpress exports) go to MLAS's direct
``ConvSym`` kernel (indirection buffer, requantization fused; AVX2 / AVX-VNNI / AVX-512 VNNI
variants), whenever the input channels are a multiple of 4 and there are >= 16 output
channels; any other weights go to im2col + the general u8×s8 GEMM, the only path that MLAS
runs on AMX (``MlasGemmU8S8DispatchAmx``) when the CPU has ``amx_int8`` and Linux grants the
tile state. No session option chooses between them.

This script checks whether ONNX Runtime asked Linux for the AMX tile state
(``arch_prctl(ARCH_GET_XCOMP_PERM)`` before and after ``import onnxruntime``), then times
stacks of four 3×3 convolutions (ResNet stage shapes, batch 64, one thread, interleaved
rounds) in three forms: FP32 ``Conv`` (ONNX Runtime's NCHWc kernels), ``QLinearConv`` with
symmetric int8 weights (the ``ConvSym`` path) and the same with weight zero point 1 (the
im2col + GEMM path, AMX where available). Random weights and inputs: only speed is measured.

    python benchmarks/int8_kernel_paths.py [--rounds 5 --repeats 20]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, write_json

from netpress.export.onnx import OrtModule
from netpress.measure import measure_latency_interleaved
from netpress.quant.target import cpu_flags

SHAPES = ((16, 32), (32, 16), (64, 8))  # (channels, spatial size) of ResNet-20's stages
LAYERS = 4
_XFEATURE_XTILEDATA = 18


def amx_granted() -> bool | None:
    """Whether this process holds the AMX tile-data permission (Linux x86-64 only)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    perm = ctypes.c_uint64(0)
    if libc.syscall(158, 0x1022, ctypes.byref(perm)) != 0:  # arch_prctl(ARCH_GET_XCOMP_PERM)
        return None
    return bool(perm.value >> _XFEATURE_XTILEDATA & 1)


def conv_stack(channels: int, size: int, form: str) -> bytes:
    """Four 3×3 convolutions as ONNX: ``fp32``, ``symmetric`` int8 or ``zp1`` int8 weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "zp")]
    nodes = [] if form == "fp32" else [helper.make_node("QuantizeLinear", ["x", "s", "zp"],
                                                        ["q"])]
    prev = "x" if form == "fp32" else "q"
    for i in range(LAYERS):
        w = rng.integers(-60, 60, (channels, channels, 3, 3))
        if form == "fp32":
            inits.append(numpy_helper.from_array((w * 0.01).astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"y{i}"], pads=[1] * 4))
        else:
            inits += [numpy_helper.from_array(w.astype(np.int8), f"w{i}"),
                      numpy_helper.from_array(np.full(channels, 0.01, np.float32), f"ws{i}"),
                      numpy_helper.from_array(np.full(channels, int(form == "zp1"), np.int8),
                                              f"wz{i}")]
            nodes.append(helper.make_node(
                "QLinearConv", [prev, "s", "zp", f"w{i}", f"ws{i}", f"wz{i}", "s", "zp"],
                [f"y{i}"], pads=[1] * 4))
        prev = f"y{i}"
    if form != "fp32":
        nodes.append(helper.make_node("DequantizeLinear", [prev, "s", "zp"], ["out"]))
        prev = "out"
    graph = helper.make_graph(
        nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                       ["n", channels, size, size])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]
                             ).SerializeToString()


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    before = amx_granted()
    import onnxruntime

    out: dict[str, Any] = {"amx_granted_before_import": before,
                           "amx_granted_after_import": amx_granted(),
                           "ort_version": onnxruntime.__version__,
                           "cpu_flags": " ".join(sorted(cpu_flags())),
                           "rows": []}
    for channels, size in SHAPES:
        mods = []
        for form in ("fp32", "symmetric", "zp1"):
            path = tmp / f"{channels}_{form}.onnx"
            path.write_bytes(conv_stack(channels, size, form))
            mods.append(OrtModule(path))
        x = torch.rand(1, channels, size, size) * 4
        stats = measure_latency_interleaved(mods, x, batch_sizes=(64,), threads=1, warmup=3,
                                            repeats=args.repeats, rounds=args.rounds)
        fp32, sym, zp1 = (s[64].median_ms for s in stats)
        out["rows"].append({"channels": channels, "size": size, "fp32_ms": fp32,
                            "convsym_ms": sym, "gemm_ms": zp1})
        print(out["rows"][-1], flush=True)
    return out


def render(res: dict[str, Any]) -> str:
    rows = [[f"{r['channels']} ch, {r['size']}×{r['size']}", f"{r['fp32_ms']:.2f}",
             f"{r['convsym_ms']:.2f} ({r['fp32_ms'] / r['convsym_ms']:.2f}×)",
             f"{r['gemm_ms']:.2f} ({r['fp32_ms'] / r['gemm_ms']:.2f}×)"] for r in res["rows"]]
    return (f"CPU flags: {res['cpu_flags']}; ONNX Runtime {res['ort_version']}; AMX tile "
            f"state granted before / after `import onnxruntime`: "
            f"{res['amx_granted_before_import']} / {res['amx_granted_after_import']}. "
            f"{LAYERS} stacked 3×3 convolutions, batch 64, 1 thread, median ms per run "
            "(interleaved rounds; speed-up over FP32 in brackets).\n\n"
            + markdown_table(["shape", "FP32 Conv ms", "QLinearConv symmetric (ConvSym) ms",
                              "QLinearConv weight zp 1 (im2col + GEMM, AMX) ms"], rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path,
                   default=Path(__file__).parent / "results/int8_kernel_paths.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        res = run(args, Path(tmp))
    write_json(args.out, res)
    args.out.with_suffix(".md").write_text(render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
