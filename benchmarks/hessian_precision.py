"""Does float64 accumulation of the Hessian matter? all-MiniLM-L6-v2, 512 calibration sentences.

The engine sums ``XᵀX`` over chunks in float64, each chunk's product in float32. For two
layers of the original model this builds the engine's Hessian (``collect_statistics``) and a
pure float64 one from the same inputs, and reports their relative difference and the
relative output error of SparseGPT 50% (measured on the float64 Hessian) with each.

    python benchmarks/hessian_precision.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _minilm_text import load_minilm, minilm_batches, sentences

from netpress.reconstruct.engine import collect_statistics
from netpress.reconstruct.sparsegpt import sparsegpt

LAYERS = ("encoder.encoder.layer.5.output.dense",
          "encoder.encoder.layer.0.attention.output.dense")


def main() -> None:
    torch.set_num_threads(1)
    tok, ref = load_minilm()
    calib = minilm_batches(tok, sentences(512))
    engine = collect_statistics(ref, ref, list(LAYERS), calib, mode="plain")
    for name in LAYERS:
        xs: list[torch.Tensor] = []
        hook = ref.get_submodule(name).register_forward_pre_hook(
            lambda m, a, xs=xs: xs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
        with torch.no_grad():
            for inputs, _ in calib:
                ref(**inputs)
        hook.remove()
        x = torch.cat(xs)
        h64 = x.T @ x / x.shape[0]
        h32 = engine[name].hessian
        assert h32 is not None
        w = ref.get_submodule(name).weight.detach().double()
        errors = {}
        for tag, h in (("engine", h32[0]), ("float64", h64)):
            pruned, _ = sparsegpt(w, h, sparsity=0.5)
            d = pruned - w
            errors[tag] = float(torch.einsum("rd,de,re->", d, h64, d)
                                / torch.einsum("rd,de,re->", w, h64, w))
        rel = float((h64 - h32[0]).norm() / h64.norm())
        print(f"{name}: |H64 - H_engine| / |H64| = {rel:.2e}; relative output error of "
              f"SparseGPT 50%: engine {errors['engine']:.6e}, float64 {errors['float64']:.6e}")


if __name__ == "__main__":
    main()
