"""What a stored graph may call: the allowlists shared by saving and loading.

:data:`FUNCTIONS` (safe torch / functional / operator / math callables, by the name the
artefact uses), :data:`METHODS` (tensor method names) and the few tensor attributes
``getattr`` may read. Nothing else is ever resolved from a file.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["GRAPH_VERSION", "FUNCTIONS", "METHODS", "ATTRIBUTES", "OPS", "function_name"]

GRAPH_VERSION = 1

_TORCH = """abs acos add addcdiv addcmul addmm all allclose amax amin any arange argmax argmin
argsort asin atan atan2 baddbmm bmm broadcast_to cat ceil chunk clamp clamp_max clamp_min clip
clone concat concatenate conv1d conv2d conv3d conv_transpose1d conv_transpose2d cos cosh cumprod
cumsum diag diagonal div einsum empty_like eq erf erfc exp expand_copy expm1 eye flatten flip
floor floor_divide fmod full full_like gather ge gelu gt hardtanh hstack index_select isfinite
isinf isnan layer_norm le lerp log log10 log1p log2 log_softmax logical_and logical_not
logical_or logsumexp lt masked_fill matmul max maximum mean min minimum mm movedim mul narrow ne
neg norm numel ones ones_like outer permute pow prod reciprocal relu remainder repeat_interleave
reshape roll round rsqrt select sigmoid sign sin sinh softmax sort split sqrt square squeeze
stack std sub sum t take tanh tensor_split tile topk transpose tril triu true_divide trunc
unbind unflatten unsqueeze var vstack where zeros zeros_like _assert""".split()
_FUNCTIONAL = """adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d
adaptive_max_pool2d avg_pool1d avg_pool2d avg_pool3d batch_norm celu conv1d conv2d conv3d
conv_transpose1d conv_transpose2d cosine_similarity dropout dropout1d dropout2d elu embedding
fold gelu glu group_norm hardsigmoid hardswish hardtanh instance_norm interpolate layer_norm
leaky_relu linear log_softmax logsigmoid max_pool1d max_pool2d max_pool3d mish normalize
one_hot pad pixel_shuffle pixel_unshuffle prelu relu relu6 rms_norm scaled_dot_product_attention
selu sigmoid silu softmax softmin softplus softsign tanh tanhshrink unfold""".split()
_OPERATOR = """add sub mul truediv floordiv mod pow matmul neg pos abs invert getitem eq ne lt le
gt ge and_ or_ xor lshift rshift not_ iadd isub imul itruediv""".split()
_MATH = "sqrt floor ceil log exp pow".split()


def _function_table() -> Mapping[str, Callable[..., Any]]:
    table: dict[str, Callable[..., Any]] = {}
    for prefix, namespace, names in (("torch.nn.functional", F, _FUNCTIONAL),
                                     ("torch", torch, _TORCH), ("operator", operator, _OPERATOR),
                                     ("math", math, _MATH)):
        for n in names:
            fn = getattr(namespace, n, None)
            if callable(fn):
                table[f"{prefix}.{n}"] = fn
    table["getattr"] = getattr  # attribute names restricted to ATTRIBUTES
    return MappingProxyType(table)


FUNCTIONS: Mapping[str, Callable[..., Any]] = _function_table()
"""Every callable a stored graph may call, by the name the artefact uses."""
_NAMES: Mapping[Any, str] = MappingProxyType(
    {fn: name for name, fn in reversed(list(FUNCTIONS.items()))})


def function_name(fn: Any) -> str | None:
    """The artefact's name for an allowlisted callable, or None."""
    try:
        return _NAMES.get(fn)
    except TypeError:  # unhashable
        return None

METHODS: frozenset[str] = frozenset("""abs add add_ addcmul all amax amin any argmax argmin
argsort bfloat16 bmm bool chunk clamp clamp_ clamp_max clamp_min clip clone contiguous cos cumsum
detach dim div div_ double eq exp expand expand_as flatten flip float floor gather ge gelu gt half
index_select int isnan le log log_softmax long lt masked_fill masked_fill_ matmul max mean min
mul mul_ narrow ne neg new_full new_ones new_zeros norm numel permute pow prod reciprocal relu
relu_ repeat reshape reshape_as roll round rsqrt select sigmoid sigmoid_ sign sin size softmax
split sqrt square squeeze std sub sub_ sum t tanh to topk transpose tril triu type_as unbind
unflatten unsqueeze var view view_as where zero_""".split())
"""Every tensor method name a stored graph may call."""
ATTRIBUTES = frozenset("shape dtype device ndim T mT is_cuda real imag".split())

OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
