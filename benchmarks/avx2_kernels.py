"""Check netpress's AVX2 u8×s8 kernel emulation against ONNX Runtime, op by op.

Builds single-op ONNX models (``QLinearConv`` in several shapes: odd input channels, strides,
1×1, dilation, grouped, depthwise; ``QGemm`` with even and odd K) whose int8 weights have many
large same-sign neighbours and runs them on uint8 inputs near the top of the range. For each
case it reports how far ONNX Runtime's outputs are from the exact integer result and from
:func:`netpress.quant.saturation.conv2d_u8s8` / ``u8s8_matmul`` with saturation (in output
codes after requantization; 0 = identical). Run it natively and on an emulated AVX2-only CPU:

    python benchmarks/avx2_kernels.py
    qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/avx2_kernels.py --out \\
        benchmarks/results/avx2_kernels_qemu.json

On a VNNI CPU ONNX Runtime matches the exact result; on the AVX2 CPU it matches the emulation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, write_json

from netpress.quant.saturation import conv2d_u8s8, u8s8_matmul
from netpress.quant.target import cpu_flags, host_target

CONV_CASES = [  # cin, cout, kernel, stride, pad, dilation, groups
    (16, 8, 3, 1, 1, 1, 1), (3, 8, 3, 1, 1, 1, 1), (5, 6, 3, 2, 1, 1, 1),
    (16, 16, 1, 1, 0, 1, 1), (8, 8, 3, 1, 2, 2, 1), (16, 16, 3, 1, 1, 1, 4),
    (6, 12, 3, 1, 1, 1, 2), (8, 16, 3, 1, 1, 1, 8), (16, 16, 3, 1, 1, 1, 16),
    (24, 24, 5, 1, 2, 1, 24)]
GEMM_K = [64, 63, 300]


def _session(graph: Any, ms_domain: bool = False) -> Any:
    import onnxruntime as ort
    from onnx import helper

    ops = [helper.make_opsetid("", 17)]
    if ms_domain:
        ops.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=ops)
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _weights(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    w = rng.integers(-30, 31, size=shape)
    big = rng.random(shape) < 0.3
    w[big] = rng.choice([-1, 1], size=big.sum()) * rng.integers(90, 128, size=big.sum())
    return w.astype(np.int8)


def conv_case(rng: np.random.Generator, cin: int, cout: int, k: int, stride: int, pad: int,
              dil: int, groups: int, hw: int = 7) -> dict[str, Any]:
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    x = rng.integers(150, 256, size=(2, cin, hw, hw)).astype(np.uint8)
    w = _weights(rng, (cout, cin // groups, k, k))
    geo = {"stride": (stride,) * 2, "padding": (pad,) * 2, "dilation": (dil,) * 2,
           "groups": groups}
    exact = conv2d_u8s8(x, w, saturate=False, **geo)  # type: ignore[arg-type]
    emulated = conv2d_u8s8(x, w, saturate=True, **geo)  # type: ignore[arg-type]
    lo, hi = int(exact.min()), int(exact.max())
    sy = (hi - lo) / 255
    zy = int(np.clip(round(-lo / sy), 0, 255))
    inits = [nh.from_array(np.array(1.0, np.float32), "sx"),
             nh.from_array(np.array(0, np.uint8), "zx"), nh.from_array(w, "w"),
             nh.from_array(np.ones(cout, np.float32), "sw"),
             nh.from_array(np.zeros(cout, np.int8), "zw"),
             nh.from_array(np.array(sy, np.float32), "sy"),
             nh.from_array(np.array(zy, np.uint8), "zy")]
    node = helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"],
                            ["y"], pads=[pad] * 4, strides=[stride] * 2,
                            dilations=[dil] * 2, group=groups, kernel_shape=[k, k])
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    y = _session(graph).run(None, {"x": x})[0].astype(np.int64)

    def requant(acc: np.ndarray) -> np.ndarray:
        return np.clip(np.round(acc / sy) + zy, 0, 255)

    return {"op": f"QLinearConv cin={cin} cout={cout} k={k} stride={stride} pad={pad} "
                  f"dil={dil} groups={groups}",
            "vs_exact": int(np.abs(requant(exact) - y).max()),
            "vs_emulated": int(np.abs(requant(emulated) - y).max()),
            "saturated_outputs": int((emulated != exact).sum())}


def gemm_case(rng: np.random.Generator, k: int, n: int = 8) -> dict[str, Any]:
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    a = rng.integers(150, 256, size=(4, k)).astype(np.uint8)
    w = _weights(rng, (n, k))
    exact = u8s8_matmul(a, np.ascontiguousarray(w.T), saturate=False)
    emulated = u8s8_matmul(a, np.ascontiguousarray(w.T), saturate=True)
    inits = [nh.from_array(np.array(1.0, np.float32), "sa"),
             nh.from_array(np.array(0, np.uint8), "za"), nh.from_array(w, "w"),
             nh.from_array(np.ones(n, np.float32), "sw"),
             nh.from_array(np.zeros(n, np.int8), "zw")]
    node = helper.make_node("QGemm", ["a", "sa", "za", "w", "sw", "zw"], ["y"],
                            domain="com.microsoft", transB=1)
    graph = helper.make_graph(
        [node], "gemm", [helper.make_tensor_value_info("a", TensorProto.UINT8, list(a.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    y = _session(graph, ms_domain=True).run(None, {"a": a})[0].astype(np.int64)
    return {"op": f"QGemm K={k}", "vs_exact": int(np.abs(exact - y).max()),
            "vs_emulated": int(np.abs(emulated - y).max()),
            "saturated_outputs": int((emulated != exact).sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path,
                   default=Path(__file__).parent / "results/avx2_kernels.json")
    args = p.parse_args(argv)
    import onnxruntime

    rng = np.random.default_rng(0)
    rows = [conv_case(rng, *c) for c in CONV_CASES] + [gemm_case(rng, k) for k in GEMM_K]
    meta = {"cpu_target": host_target(), "cpu_flags": " ".join(sorted(cpu_flags())),
            "ort_version": onnxruntime.__version__}
    write_json(args.out, {**meta, "rows": rows})
    table = markdown_table(["op", "max |ORT − exact|", "max |ORT − AVX2 emulation|",
                            "outputs the emulation saturates"],
                           [[r["op"], r["vs_exact"], r["vs_emulated"], r["saturated_outputs"]]
                            for r in rows])
    text = (f"CPU as netpress detects it: {meta['cpu_target']} (flags: {meta['cpu_flags']}); "
            f"ONNX Runtime {meta['ort_version']}\n\n{table}\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
