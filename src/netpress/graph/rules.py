"""How each recorded op couples the elements of its inputs' and outputs' dimensions.

A rule relates the dimensions of an op's tensors in a :class:`~netpress.graph.spaces.Spaces`:
identity maps (elementwise ops, the batch dimensions of a matmul), index maps (concat,
split, chunk, constant padding), block maps (a reshape that splits or merges dimensions: the
outermost factor carries the channel, e.g. heads; inner factors are fixed), and fixed
elements (normalised or reduced dimensions, constant slices). Rules never guess: an op
without a rule is reported by :func:`apply_rule` returning False.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from netpress.graph._helpers import _arg, _dims_of, _elementwise, _ins, _opaque
from netpress.graph._layout import (
    _cat,
    _expand,
    _getitem,
    _index_select,
    _narrow_select,
    _pad,
    _permute,
    _repeat,
    _repeat_interleave,
    _reshape,
    _split,
    _stack,
    reshape_map,
    resolve_products,
)
from netpress.graph._matmul import addmm, einsum, grouped_mm, linear, matmul, sdpa
from netpress.graph._norms import group_norm, layer_norm, normalize, per_channel_norm
from netpress.graph.spaces import Spaces
from netpress.graph.trace import OpRecord

__all__ = ["apply_rule", "resolve_products", "reshape_map", "RULES"]

Rule = Callable[[Spaces, OpRecord], None]

_ELEMENTWISE = set("""
add sub mul div true_divide floor_divide remainder fmod pow neg abs exp expm1 log log1p log2 sqrt
rsqrt reciprocal sign sin cos tanh sigmoid relu relu6 gelu silu mish elu selu celu leaky_relu
hardswish hardsigmoid hardtanh softplus softsign logsigmoid tanhshrink hardshrink softshrink
threshold erf erfc clamp clamp_min clamp_max clip maximum minimum where masked_fill lerp addcmul
addcdiv dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout eq ne lt le gt
ge logical_and logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_not isnan isinf
isfinite nan_to_num round floor ceil trunc frac square prelu rrelu contiguous clone detach to
type type_as float half double bfloat16 int long bool cpu cuda requires_grad_ zeros_like ones_like
full_like empty_like rand_like randn_like copy_ fill_ zero_ abs_ square_ sub_ xlogy
__add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__
__rtruediv__ __itruediv__ __floordiv__ __rfloordiv__ __mod__ __neg__ __pow__ __rpow__ __and__
__or__ __xor__ __invert__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ __abs__ __iand__ __ior__
multiply divide subtract negative absolute greater less greater_equal less_equal not_equal
positive fix square_ exp2 sinc hypot atan2 copysign float_power logaddexp silu_ gelu_ erfinv
polar complex real imag angle conj conj_physical resolve_conj resolve_neg __rdiv__ __div__
__idiv__ log_sigmoid
""".split())
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
            "reshape_as", "_unsafe_view", "ravel"}
_PERMUTE = {"permute", "transpose", "t", "movedim", "moveaxis", "swapaxes", "swapdims",
            "__get__", "adjoint"}
_EXPAND = {"expand", "expand_as", "broadcast_to"}
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod",
           "argmax", "argmin", "all", "any", "nansum", "nanmean", "median", "count_nonzero",
           "var_mean", "std_mean", "norm", "linalg_vector_norm", "vector_norm"}
# reductions that compute a statistic of their dims (removing an element moves it a little);
# the others (argmax, prod, all, ...) depend on every element's index or value: fixed
_STATISTICS = {"sum", "mean", "amax", "amin", "max", "min", "std", "var", "logsumexp",
               "nansum", "nanmean", "var_mean", "std_mean", "norm", "linalg_vector_norm",
               "vector_norm"}
# ops acting along one dimension: (positional index of dim, keyword name, default)
_DIM_LOCAL: dict[str, tuple[int, str, Any]] = {
    "softmax": (1, "dim", None), "log_softmax": (1, "dim", None), "softmin": (1, "dim", None),
    "_softmax": (1, "dim", None), "cumsum": (1, "dim", None), "cumprod": (1, "dim", None),
    "logcumsumexp": (1, "dim", None), "glu": (1, "dim", -1),
    "sort": (1, "dim", -1), "argsort": (1, "dim", -1), "topk": (2, "dim", -1),
    "flip": (1, "dims", None), "roll": (2, "dims", None), "cummax": (1, "dim", None),
}
_POOLS = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
          "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
          "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
          "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
          "_max_pool1d", "_max_pool2d", "_max_pool3d", "lp_pool1d", "lp_pool2d",
          "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
          "fractional_max_pool2d", "_adaptive_max_pool2d", "_adaptive_max_pool1d"}
# functions whose channels netpress does not prune through (yet): every dim is kept whole
_OPAQUE = {"multi_head_attention_forward", "_native_multi_head_attention", "pixel_shuffle",
           "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle", "__setitem__",
           "gather", "scatter", "index_put_", "take", "unfold",
           "fold", "one_hot", "diag", "diagonal", "outer", "kron", "cross", "cdist",
           "cosine_similarity", "pairwise_distance", "bilinear", "local_response_norm",
           "masked_select", "nonzero", "unique", "embedding_bag", "rotate_half", "as_strided"}
_FILLED = {"zeros", "ones", "full", "empty", "new_zeros", "new_ones", "new_full", "new_empty"}
_CREATION = {"arange", "zeros", "ones", "full", "empty", "rand", "randn", "randint", "tensor",
             "as_tensor", "linspace", "logspace", "eye", "new_zeros", "new_ones", "new_full",
             "new_empty", "new_tensor", "triu_indices", "tril_indices", "scalar_tensor"}


def _conv(S: Spaces, rec: OpRecord) -> None:
    x, w = rec.args[0], _arg(rec, 1, "weight")
    b = _arg(rec, 2, "bias")
    groups = int(_arg(rec, 6, "groups", 1))
    out = rec.outputs[0]
    cdim = 1 if x.dim() == w.dim() else 0  # batched or not
    for d in range(cdim):
        S.union_dims(x, d, out, d)
    for d in range(cdim + 1, x.dim()):
        S.fix(S.ids(x, d))
        S.fix(S.ids(out, d))
    for d in range(2, w.dim()):
        S.fix(S.ids(w, d))
    S.union_dims(out, cdim, w, 0)
    if b is not None:
        S.union_dims(b, 0, w, 0)
    if groups == 1:
        S.union_dims(x, cdim, w, 1)
    else:  # whole groups are the unit: a group's input and output channels go together
        S.fix(S.ids(w, 1))
        xi, oi = S.ids(x, cdim), S.ids(out, cdim)
        ci, co = xi.size // groups, oi.size // groups
        for g in range(groups):
            S.union_all(np.concatenate([xi[g * ci:(g + 1) * ci], oi[g * co:(g + 1) * co]]))
    taps = math.prod(int(s) for s in w.shape[2:])
    S.add_macs(taps, [S.key(out, d) for d in range(out.dim())] + [S.key(w, 1)], rec.where())


def _conv_transpose(S: Spaces, rec: OpRecord) -> None:
    x, w = rec.args[0], _arg(rec, 1, "weight")
    b = _arg(rec, 2, "bias")
    groups = int(_arg(rec, 6, "groups", 1))
    out = rec.outputs[0]
    if groups != 1 or x.dim() != w.dim():
        for t in _ins(rec) + [out]:
            S.fix_tensor(t)
        return
    S.union_dims(x, 0, out, 0)
    for d in range(2, x.dim()):
        S.fix(S.ids(x, d))
        S.fix(S.ids(out, d))
    for d in range(2, w.dim()):
        S.fix(S.ids(w, d))
    S.union_dims(x, 1, w, 0)
    S.union_dims(out, 1, w, 1)
    if b is not None:
        S.union_dims(b, 0, w, 1)
    taps = math.prod(int(s) for s in w.shape[2:])
    S.add_macs(taps, [S.key(x, d) for d in range(x.dim())] + [S.key(w, 1)], rec.where())


def _embedding(S: Spaces, rec: OpRecord) -> None:
    idx, w, out = rec.args[0], _arg(rec, 1, "weight"), rec.outputs[0]
    S.fix(S.ids(w, 0))
    S.union_dims(out, -1, w, 1)
    for d in range(idx.dim()):
        S.union_dims(idx, d, out, d)


def _reduce(S: Spaces, rec: OpRecord) -> None:
    x = rec.args[0]
    if rec.name in ("max", "min") and len(rec.args) > 1 and isinstance(rec.args[1], torch.Tensor):
        _elementwise(S, rec)
        return
    pos = 2 if rec.name in ("norm", "linalg_vector_norm", "vector_norm") else 1
    dims = _dims_of(_arg(rec, pos, "dim"), max(1, x.dim()))
    keep = bool(_arg(rec, pos + 1, "keepdim", False))
    if dims is None:
        S.fix_tensor(x)
        for o in rec.outputs:
            S.fix_tensor(o)
        return
    if rec.name in _STATISTICS:
        S.soften_tensor(x, dims)
    else:
        S.fix_tensor(x, dims)
    for o in rec.outputs:
        j = 0
        for d in range(x.dim()):
            if d in dims:
                j += keep
                continue
            if j < o.dim():
                S.union_dims(x, d, o, j)
            j += 1


def _dim_local(S: Spaces, rec: OpRecord) -> None:
    x = rec.args[0]
    pos, kw, default = _DIM_LOCAL[rec.name]
    dims = _dims_of(_arg(rec, pos, kw, default), max(1, x.dim()))
    for o in rec.outputs:
        if dims is None or o.dim() != x.dim():
            S.fix_tensor(x)
            S.fix_tensor(o)
            continue
        S.couple_except(x, o, set(dims))


def _triangle(S: Spaces, rec: OpRecord) -> None:
    x, out = rec.args[0], rec.outputs[0]
    S.couple_except(x, out, range(max(0, x.dim() - 2), x.dim()))


def _pool(S: Spaces, rec: OpRecord) -> None:
    x = rec.args[0]
    digits = [c for c in rec.name if c.isdigit()]
    spatial = int(digits[0]) if digits else max(1, x.dim() - 2)
    lead = x.dim() - spatial
    for o in rec.outputs:
        for d in range(x.dim()):
            if d < lead and o.dim() == x.dim():
                S.union_dims(x, d, o, d)
            else:
                S.fix(S.ids(x, d))
                if d < o.dim():
                    S.fix(S.ids(o, d))


def _index_add(S: Spaces, rec: OpRecord) -> None:
    """``x.index_add(dim, index, source)``: ``source``'s slices added at ``index`` positions
    along ``dim`` (fixed); every other dim maps elementwise."""
    x, out = rec.args[0], rec.outputs[0]
    dim = int(_arg(rec, 1, "dim")) % x.dim()
    index, source = _arg(rec, 2, "index"), _arg(rec, 3, "source")
    S.couple_except(x, out, {dim})
    if isinstance(index, torch.Tensor):
        S.fix_tensor(index)
    if isinstance(source, torch.Tensor) and source.dim() == x.dim():
        S.couple_except(source, x, {dim})
    elif isinstance(source, torch.Tensor):
        S.fix_tensor(source)


def _fft(S: Spaces, rec: OpRecord) -> None:
    """``torch.fft.*``: the transformed dims mix their elements (fixed); the others map."""
    x, out = rec.args[0], rec.outputs[0]
    default = None if rec.name.endswith("n") or rec.name.endswith("2") else -1
    dims = _dims_of(_arg(rec, 2, "dim", default), max(1, x.dim()))
    if dims is None or out.dim() != x.dim():
        _opaque(S, rec)
        return
    S.couple_except(x, out, set(dims))


def _complex_view(S: Spaces, rec: OpRecord) -> None:
    """``view_as_complex`` ([..., 2] real -> [...] complex) and ``view_as_real`` (back): the
    pair dim is fixed, the others map."""
    x, out = rec.args[0], rec.outputs[0]
    real, cplx = (x, out) if rec.name == "view_as_complex" else (out, x)
    S.fix(S.ids(real, -1))
    for d in range(cplx.dim()):
        S.union_dims(cplx, d, real, d)


RULES: dict[str, Rule] = {}
for _n in _ELEMENTWISE:
    RULES[_n] = _elementwise
    RULES[_n + "_"] = _elementwise
for _n in _RESHAPE:
    RULES[_n] = _reshape
for _n in _EXPAND:
    RULES[_n] = _expand
for _n in _REDUCE:
    RULES[_n] = _reduce
for _n in _DIM_LOCAL:
    RULES[_n] = _dim_local
for _n in _POOLS:
    RULES[_n] = _pool
for _n in _OPAQUE:
    RULES[_n] = _opaque
RULES.update({
    "repeat": _repeat, "repeat_interleave": _repeat_interleave,
    "cat": _cat, "concat": _cat, "concatenate": _cat, "stack": _stack,
    "split": _split, "chunk": _split, "tensor_split": _split, "unbind": _split,
    "split_with_sizes": _split,
    "__getitem__": _getitem, "index_select": _index_select, "narrow": _narrow_select,
    "select": _narrow_select,
    "pad": _pad, "_pad": _pad,
    "matmul": matmul, "mm": matmul, "bmm": matmul, "__matmul__": matmul,
    "__rmatmul__": matmul, "addmm": addmm, "baddbmm": addmm, "linear": linear,
    "conv1d": _conv, "conv2d": _conv, "conv3d": _conv,
    "conv_transpose1d": _conv_transpose, "conv_transpose2d": _conv_transpose,
    "conv_transpose3d": _conv_transpose,
    "batch_norm": per_channel_norm, "instance_norm": per_channel_norm,
    "layer_norm": layer_norm, "rms_norm": layer_norm, "group_norm": group_norm,
    "embedding": _embedding, "scaled_dot_product_attention": sdpa, "einsum": einsum,
    "triu": _triangle, "tril": _triangle, "normalize": normalize,
    "view_as_complex": _complex_view, "view_as_real": _complex_view,
    **{f"fft_{n}": _fft for n in ("fft", "ifft", "fft2", "ifft2", "fftn", "ifftn", "rfft",
                                  "irfft", "rfftn", "irfftn", "hfft", "ihfft")},
    "_grouped_mm": grouped_mm, "grouped_mm": grouped_mm, "index_add": _index_add,
    "index_add_": _index_add,
})


def apply_rule(S: Spaces, rec: OpRecord, func: Callable[..., Any] | None = None) -> bool:
    """Apply the rule of ``rec``; False when netpress has none for it (and it has tensor inputs).

    Ops with no tensor inputs (``arange``, ``zeros``) create constants: their dims are fixed,
    except where a filled tensor (``zeros``, ``new_full``) takes a size from an attribute or
    another tensor's shape: its values do not depend on the index, and surgery keeps its size.
    """
    ins = _ins(rec)
    if rec.name in _CREATION or not ins:
        free = {(u.out, u.dim) for u in rec.sizes if u.expr[0] != "const"} \
            if rec.name in _FILLED else set()
        for i, o in enumerate(rec.outputs):
            S.fix_tensor(o, [d for d in range(o.dim()) if (i, d) not in free])
        return True
    if rec.name in _PERMUTE:
        _permute(S, rec, func)
        return True
    rule = RULES.get(rec.name)
    if rule is None:
        return False
    rule(S, rec)
    return True
