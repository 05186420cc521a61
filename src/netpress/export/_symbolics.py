"""ONNX symbolics for ATen ops the TorchScript exporter lacks, registered only while
:func:`netpress.export.onnx.export_onnx` runs.

``aten::diff``: every ``transformers`` decoder called without an ``attention_mask`` (the
usual export, ``{"input_ids": ...}``) looks for packed sequences in its position ids with
``torch.diff(position_ids, prepend=...)`` (``masking_utils.find_packed_sequence_indices``),
and the exporter refused the whole model with ``UnsupportedOperatorError``. ``diff`` is a
concatenation of ``prepend``/``append`` and ``n`` differences of neighbouring slices.
``aten::cumsum`` of the bool tensor that follows (``(diff != 1).cumsum(-1)``) is cast to
int64 first, as PyTorch counts it (ONNX ``CumSum`` takes no bool). ``aten::expm1`` (the
xIELU activation of Apertus) is ``Exp(x) - 1``.

``aten::repeat_interleave`` by a constant count along one axis (the interleaved rotary
embeddings of Cohere, Glm, Glm4, Ernie 4.5, Helium, DeepSeek-V4:
``cos[..., :d // 2].repeat_interleave(2, dim=-1)``): torch's own form (Tile + a flatten)
records a wrong rank for its output, so a later ``cat`` refused the model ("All tensors
must have the same rank") or a later ``Reshape`` failed in ONNX Runtime. Here it is
``Unsqueeze`` + ``Expand`` + ``Reshape`` to a shape computed in the graph, so batch and
sequence stay free; other forms (a tensor of counts, no ``dim``) go to torch's symbolic.
``aten::permute`` with negative dims (Falcon-H1's Mamba mixer, ``permute(0, -2, -1, 1)``)
is a ``Transpose`` whose ``perm`` is counted from the front, as ONNX requires. ``aten::rms_norm``
(``F.rms_norm``, DiffLlama) is ``x / sqrt(mean(x², normalized dims) + eps) * weight``,
with torch's default ``eps`` (the dtype's machine epsilon) when none is given; a
``normalized_shape`` read from traced sizes (``(x.shape[-1],)``, Ergo) gives its length.
``aten::linalg_solve_triangular`` for a lower-triangular system solved from the left (the
chunked gated-delta-rule attention of Qwen3-Next, Qwen3.5, LaraMini:
``solve_triangular(L, B, upper=False, unitriangular=True)``) of a size ``n`` fixed in the
graph: with ``L = D (I - N)`` (``D`` its diagonal, ``N`` strictly lower, so ``N^n = 0``),
``L⁻¹ = (I + N)(I + N²)(I + N⁴)…(I + N^(2^(m-1))) D⁻¹`` for ``2^m >= n``: ``2·m``
matrix products instead of ``n`` dependent steps (``n`` at most 65536 where the graph leaves
it free: powers past ``n`` are exactly zero).
``aten::tensor_split`` at a list of indices that the trace records as values (Qwen3.5 and
Qwen3-Next in ``transformers`` 5.25 split their linear-attention inputs at
``[seq_len - kept states]``): torch's symbolic reads a one-element list as a count of
sections and builds a Tile whose 'repeats' ONNX Runtime refuses at run time. Here the pieces
are ``Slice``s between consecutive indices, as ``x[:i1], x[i1:i2], ..., x[ik:]``, kept as an
ONNX sequence where the trace keeps the list. (Handing the pieces back as a list that the
exporter unpacks, or slicing in Python while tracing, froze Qwen4-Exp's token count into its
experts' graph: the unpacked pieces then carry the traced sizes, and a ``zeros_like``
downstream was folded into a constant. A sequence's pieces can instead carry a wrong rank,
which ``_pad.py`` guards against.)
``aten::index_add`` sums repeated indices (``ScatterElements`` with ``reduction="add"``,
opset 16 or newer); torch's form keeps one source per row (it warns, and the warning is
easy to miss), which made JetMoE's experts, whose rows list each token once per chosen
expert, export silently wrong; ``aten::index_put(accumulate=True)`` likewise
(``ScatterND`` with ``reduction="add"``).
``aten::scaled_dot_product_attention``: a leaner form for float32 (``_sdpa.py``).
``aten::scatter_reduce`` with ``include_self=False`` or ``reduce="mean"`` (TAPAS):
``_scatter_reduce.py``. ``aten::_upsample_{bilinear,bicubic}2d_aa`` (antialiased
``F.interpolate``, DINOv2 with registers): ``Resize(antialias=1)`` at opset 18
(``_resize_aa.py``). ``aten::constant_pad_nd`` / ``aten::pad`` (constant mode): pads
built from the input's rank in the graph, not its recorded type (``_pad.py``).
``aten::col2im`` (``F.fold``) to a traced ``output_size`` (MobileViT-V2): ``_col2im.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from netpress.export._col2im import col2im
from netpress.export._graph_ints import int64_1d
from netpress.export._pad import constant_pad_nd, pad
from netpress.export._resize_aa import upsample_bicubic2d_aa, upsample_bilinear2d_aa
from netpress.export._scatter_reduce import scatter_reduce
from netpress.export._sdpa import scaled_dot_product_attention

__all__ = ["extra_symbolics"]


def _diff(g: Any, x: Any, n: Any, dim: Any, prepend: Any, append: Any) -> Any:
    """``torch.diff(x, n, dim, prepend, append)`` as ONNX Concat + Slice + Sub."""
    from torch.onnx import symbolic_helper as sh

    steps = sh._parse_arg(n, "i")
    axis = sh._parse_arg(dim, "i")
    parts = [t for t in (prepend, x, append) if not sh._is_none(t)]
    out = g.op("Concat", *parts, axis_i=axis) if len(parts) > 1 else x
    for _ in range(steps):
        after = sh._slice_helper(g, out, axes=[axis], starts=[1], ends=[sys.maxsize])
        before = sh._slice_helper(g, out, axes=[axis], starts=[0], ends=[-1])
        out = g.op("Sub", after, before)
    return out


def _cumsum(g: Any, x: Any, dim: Any, dtype: Any = None) -> Any:
    """``torch.cumsum``, counting a bool tensor in int64 as PyTorch does (ONNX CumSum takes
    no bool)."""
    from torch.onnx import symbolic_opset11

    scalar = getattr(x.type(), "scalarType", lambda: None)()
    if scalar == "Bool":
        x = g.op("Cast", x, to_i=7)  # onnx.TensorProto.INT64
    return symbolic_opset11.cumsum(g, x, dim, dtype)


def _expm1(g: Any, x: Any) -> Any:
    """``torch.expm1`` as ``Exp(x) - 1`` (xIELU activations, e.g. Apertus)."""
    import torch

    one = g.op("Constant", value_t=torch.tensor(1.0))
    return g.op("Sub", g.op("Exp", x), g.op("CastLike", one, x))


def _repeat_interleave(g: Any, x: Any, repeats: Any, dim: Any = None,
                       output_size: Any = None) -> Any:
    """``x.repeat_interleave(r, dim)`` for a constant int ``r``: each slice along ``dim``
    repeated ``r`` times in a row, as ``Unsqueeze(dim + 1)``, ``Expand`` by ``r`` there, and
    ``Reshape`` to ``x``'s shape (read in the graph) with ``dim`` times ``r``."""
    import torch
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset13

    rank = sh._get_tensor_rank(x)
    count = sh._maybe_get_const(repeats, "i") if sh._is_constant(repeats) else None
    if isinstance(count, torch.Tensor):
        count = int(count) if count.numel() == 1 else None
    if rank is None or not isinstance(count, int) or sh._is_none(dim):
        return symbolic_opset13.repeat_interleave(g, x, repeats, dim, output_size)
    axis = sh._get_const(dim, "i", "dim")
    axis = axis + rank if axis < 0 else axis
    shape = g.op("Shape", x)
    before = sh._slice_helper(g, shape, axes=[0], starts=[0], ends=[axis])
    size = sh._slice_helper(g, shape, axes=[0], starts=[axis], ends=[axis + 1])
    after = sh._slice_helper(g, shape, axes=[0], starts=[axis + 1], ends=[sys.maxsize])
    times = g.op("Constant", value_t=torch.tensor([count], dtype=torch.int64))
    grown = g.op("Unsqueeze", x, g.op("Constant", value_t=torch.tensor([axis + 1])))
    wide = g.op("Expand", grown, g.op("Concat", before, size, times, after, axis_i=0))
    out_shape = g.op("Concat", before, g.op("Mul", size, times), after, axis_i=0)
    return g.op("Reshape", wide, out_shape)


def _tensor_split(g: Any, x: Any, indices: Any, dim: Any, _outputs: int | None = None) -> Any:
    """``torch.tensor_split(x, [i1, ..., ik], dim)`` for a list of (traced) indices: the
    ``k + 1`` slices between them (Python slicing: negative indices count from the end), as
    separate outputs or, where the trace keeps the list, one ONNX sequence; other forms go
    to torch's symbolic."""
    import torch
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset13

    if not sh._is_packed_list(indices):
        return symbolic_opset13.tensor_split(g, x, indices, dim, _outputs)
    points = sh._unpack_list(indices)
    if _outputs is not None and len(points) + 1 != _outputs:
        return symbolic_opset13.tensor_split(g, x, indices, dim, _outputs)
    axis = sh._get_const(dim, "i", "dim")
    axes = g.op("Constant", value_t=torch.tensor([axis], dtype=torch.int64))
    bounds = [g.op("Constant", value_t=torch.tensor([0], dtype=torch.int64))]
    bounds += [int64_1d(g, v) for v in points]
    bounds.append(g.op("Constant", value_t=torch.tensor([sys.maxsize], dtype=torch.int64)))
    pieces = [g.op("Slice", x, start, end, axes) for start, end in zip(bounds, bounds[1:])]
    return pieces if _outputs is not None else g.op("SequenceConstruct", *pieces)


def _permute(g: Any, x: Any, dims: Any) -> Any:
    """``x.permute(dims)`` with negative dims counted from the front (``Transpose``)."""
    from torch.onnx import symbolic_helper as sh

    perm = [int(d) for d in sh._get_const(dims, "is", "dims")]
    rank = len(perm)
    perm = [d + rank if d < 0 else d for d in perm]
    if perm == list(range(rank)):
        return x
    return g.op("Transpose", x, perm_i=perm)


def _rms_norm(g: Any, x: Any, shape: Any, weight: Any, eps: Any) -> Any:
    """``F.rms_norm(x, shape, weight, eps)``: ``x * rsqrt(mean(x², last len(shape) dims) +
    eps)``, times ``weight`` when given; ``eps`` defaults to the dtype's epsilon as in torch."""
    import torch
    from torch.onnx import symbolic_helper as sh

    # a list built from traced sizes (``(x.shape[-1],)``, Ergo) counts its entries
    dims = (len(sh._unpack_list(shape)) if sh._is_packed_list(shape)
            else len(sh._get_const(shape, "is", "normalized_shape")))
    if sh._is_none(eps):
        scalar = getattr(x.type(), "scalarType", lambda: None)()
        dtype = {"Half": torch.float16, "BFloat16": torch.bfloat16,
                 "Double": torch.float64}.get(str(scalar), torch.float32)
        value = torch.finfo(dtype).eps
    else:
        value = float(sh._get_const(eps, "f", "eps"))
    axes = g.op("Constant", value_t=torch.tensor(list(range(-dims, 0)), dtype=torch.int64))
    square = g.op("Mul", x, x)
    mean = g.op("ReduceMean", square, axes, keepdims_i=1) if g.opset >= 18 else \
        g.op("ReduceMean", square, axes_i=list(range(-dims, 0)), keepdims_i=1)
    shift = g.op("CastLike", g.op("Constant", value_t=torch.tensor(value)), x)
    out = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, shift)))
    return out if sh._is_none(weight) else g.op("Mul", out, weight)


def _index_add(g: Any, x: Any, dim: Any, index: Any, source: Any, alpha: Any = None) -> Any:
    """``x.index_add(dim, index, source, alpha=alpha)`` with repeated indices summed, as in
    PyTorch: ``ScatterElements(reduction="add")`` with ``index`` spread over ``source``'s
    shape. torch's own form scatters without a reduction, so a row listed twice kept only
    one of its sources (a silently wrong graph)."""
    import torch
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset9

    rank = sh._get_tensor_rank(x)
    axis = sh._maybe_get_const(dim, "i")
    if g.opset < 16 or rank is None or sh._get_tensor_rank(source) != rank \
            or not isinstance(axis, int):
        return symbolic_opset9.index_add(g, x, dim, index, source, alpha)
    axis = axis + rank if axis < 0 else axis
    if not sh._is_none(alpha):
        scale = sh._maybe_get_const(alpha, "f")
        if not (isinstance(scale, (int, float)) and float(scale) == 1.0):
            source = g.op("Mul", source, g.op("CastLike", alpha, source))
    spread = [d for d in range(rank) if d != axis]
    where = g.op("Reshape", index, g.op("Constant", value_t=torch.tensor([-1])))
    if spread:
        where = g.op("Unsqueeze", where,
                     g.op("Constant", value_t=torch.tensor(spread, dtype=torch.int64)))
    where = g.op("Expand", where, g.op("Shape", source))
    return g.op("ScatterElements", x, where, source, axis_i=axis, reduction_s="add")


def _index_put(g: Any, x: Any, indices: Any, values: Any, accumulate: Any = False) -> Any:
    """``x.index_put(indices, values, accumulate=True)`` with repeated indices summed, as in
    PyTorch (opset 16 or newer): torch's own form, built without accumulation, whose
    ``ScatterND`` then gets ``reduction="add"`` (torch's accumulating form scatters into
    zeros without a reduction, so a repeated index kept one value). Other forms: torch's."""
    from torch.onnx import symbolic_helper as sh
    from torch.onnx._internal.torchscript_exporter import symbolic_opset11

    summed = not sh._is_none(accumulate) and bool(sh._parse_arg(accumulate, "b"))
    if not summed or g.opset < 16:
        return symbolic_opset11.index_put(g, x, indices, values, accumulate)
    out = symbolic_opset11.index_put(g, x, indices, values, False)
    node = out.node()
    if node.kind() != "onnx::ScatterND" or node.hasAttribute("reduction"):
        # some other form (e.g. a boolean mask): torch's accumulating one
        return symbolic_opset11.index_put(g, x, indices, values, accumulate)
    node.s_("reduction", "add")
    return out


_SOLVE_MAX = 1 << 16  # a solve of a size the graph leaves free: at most 65536 unknowns


def _solve_triangular(g: Any, a: Any, b: Any, upper: Any, left: Any,
                      unitriangular: Any) -> Any:
    """``torch.linalg.solve_triangular(a, b, upper=False, left=True, unitriangular=...)``
    for ``a`` of a known size ``n``: the product of ``I + N^(2^k)`` (see the module docs)."""
    import torch
    from torch.onnx import errors
    from torch.onnx import symbolic_helper as sh

    is_upper, is_left = sh._parse_arg(upper, "b"), sh._parse_arg(left, "b")
    unit = sh._parse_arg(unitriangular, "b")
    rank = sh._get_tensor_rank(a)
    if is_upper or not is_left or rank is None:
        raise errors.SymbolicValueError(
            "netpress exports linalg_solve_triangular only for a lower-triangular system "
            "solved from the left (upper=False, left=True)", a)
    # n: fixed in the graph, else (a size left free) the most it can be: N^(2^k) is then
    # exactly zero (a strictly lower matrix's power keeps its structural zeros) and the
    # extra factors are I.
    n = sh._get_tensor_dim_size(a, -1) or _SOLVE_MAX
    size = g.op("Slice", g.op("Shape", a), g.op("Constant", value_t=torch.tensor([-1])),
                g.op("Constant", value_t=torch.tensor([sys.maxsize])))
    eye = g.op("CastLike", g.op("EyeLike", g.op("ConstantOfShape", g.op(
        "Concat", size, size, axis_i=0), value_t=torch.tensor([0.0]))), a)
    below = g.op("Trilu", a, g.op("Constant", value_t=torch.tensor(-1)), upper_i=0)
    if not unit:
        diag = g.op("ReduceSum", g.op("Mul", a, eye),
                    g.op("Constant", value_t=torch.tensor([-1])), keepdims_i=1)
        below = g.op("Div", below, diag)
        b = g.op("Div", b, diag)
    power = g.op("Neg", below)  # N, then N², N⁴, ...
    out = g.op("MatMul", g.op("Add", eye, power), b)
    reach = 2
    while reach < n:
        power = g.op("MatMul", power, power)
        out = g.op("MatMul", g.op("Add", eye, power), out)
        reach *= 2
    return out


_SYMBOLICS: dict[str, Callable[..., Any]] = {
    "aten::diff": _diff, "aten::cumsum": _cumsum, "aten::expm1": _expm1,
    "aten::repeat_interleave": _repeat_interleave, "aten::permute": _permute,
    "aten::rms_norm": _rms_norm, "aten::linalg_solve_triangular": _solve_triangular,
    "aten::tensor_split": _tensor_split, "aten::index_add": _index_add,
    "aten::index_put": _index_put,
    "aten::scaled_dot_product_attention": scaled_dot_product_attention,
    "aten::scatter_reduce": scatter_reduce,
    "aten::_upsample_bicubic2d_aa": upsample_bicubic2d_aa,
    "aten::_upsample_bilinear2d_aa": upsample_bilinear2d_aa,
    "aten::constant_pad_nd": constant_pad_nd, "aten::pad": pad, "aten::col2im": col2im}


# ops whose ONNX form needs a newer opset: below it torch's own refusal names that opset
# (and netpress's refusal finds the module that uses the op)
_MIN_OPSET = {"aten::col2im": 18}


def forget_new_ops(names: list[str], before: set[str]) -> None:
    """Drop the exporter registry's entries for those of ``names`` (ops netpress registered
    and has unregistered) that had none in ``before``: unregistering leaves an empty entry
    behind, on which the exporter's next look-up of that op fails with ``ValueError: min()
    arg is an empty sequence`` instead of naming the op as unsupported (the registry is
    private to torch; skipped where it is absent)."""
    table = _registry_table()
    if table is None:
        return
    for name in names:
        if name not in before and name in table:
            del table[name]


def _load_torch_symbolics() -> None:
    """Import torch's own symbolic modules, which fill the exporter's registry. torch imports
    them lazily, during its first export: a snapshot of the registry taken before that (the
    first ``export_onnx`` of a process) missed torch's entries, and ``forget_new_ops`` then
    deleted torch's own forms of the ops netpress overrides (after one opset-18 export,
    ``col2im`` at opset 17 was refused without naming opset 18)."""
    import importlib

    for version in range(7, 25):
        try:
            importlib.import_module(
                f"torch.onnx._internal.torchscript_exporter.symbolic_opset{version}")
        except ImportError:
            continue


def known_ops() -> set[str]:
    """The op names the exporter's registry has entries for (empty where it is absent),
    torch's own included."""
    _load_torch_symbolics()
    table = _registry_table()
    return set(table) if table is not None else set()


def _registry_table() -> dict[str, Any] | None:
    try:
        from torch.onnx._internal.torchscript_exporter import registration
    except ImportError:  # pragma: no cover - another torch layout
        return None
    table = getattr(registration.registry, "_registry", None)
    return table if isinstance(table, dict) else None


@contextmanager
def extra_symbolics(opset: int) -> Iterator[None]:
    """Register the symbolics above for ``opset`` (15 or newer: Slice with inputs,
    CastLike; ``_MIN_OPSET`` for some), and unregister them on leaving."""
    import torch.onnx

    names = [n for n in _SYMBOLICS if opset >= max(15, _MIN_OPSET.get(n, 15))]
    before = known_ops()
    for name in names:
        torch.onnx.register_custom_op_symbolic(name, _SYMBOLICS[name], opset)
    try:
        yield
    finally:
        for name in names:
            torch.onnx.unregister_custom_op_symbolic(name, opset)
        forget_new_ops(names, before)
