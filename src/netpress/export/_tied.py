"""Transposed copies of one weight written once in ONNX.

A language model whose output layer shares its weight ``W`` (vocabulary × hidden) with the
input embedding table exports, through ``F.linear``, as ``MatMul(x, Wᵀ)`` with ``Wᵀ``
constant-folded into a second initializer beside the table's ``W``: the file holds the
table twice (a tied 32k-vocabulary, 512-wide decoder: 182 MB instead of 116 MB; the same
for ``DynamicQuantize``'s int8 codes under ``MatMulInteger``). :func:`share_transposed`
finds every 2-D initializer that is exactly the transpose of another and replaces it by a
``Transpose`` node of that one. ONNX Runtime folds the node back into a constant when it
loads the model, so the kernels (and their speed) are those of the folded graph; only the
file is smaller. (Writing the output layer as ``Gemm(transB=1)`` on ``W`` kept one copy
too, but ran 3-7% slower in ONNX Runtime on that decoder.)
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["share_transposed"]

#: 2-D initializers smaller than this are left alone (not worth a node)
MIN_ELEMENTS = 4096


def _digest(array: Any) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()


def share_transposed(model: Any) -> int:
    """Rewrite ``model`` (an ONNX ``ModelProto``, in place): each 2-D initializer equal to the
    transpose of another becomes ``Transpose(other)``; returns how many were replaced."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer
              if len(i.dims) == 2 and int(np.prod(i.dims)) >= MIN_ELEMENTS}
    by_key: dict[tuple[str, tuple[int, ...], str], str] = {}
    for name, a in arrays.items():
        by_key.setdefault((str(a.dtype), a.shape, _digest(np.ascontiguousarray(a))), name)
    replaced: dict[str, str] = {}
    for name, a in arrays.items():
        if name in replaced.values():
            continue  # the source of another replacement stays
        t = np.ascontiguousarray(a.T)
        source = by_key.get((str(a.dtype), t.shape, _digest(t)))
        if source is None or source == name or source in replaced or \
                not np.array_equal(arrays[source], t):
            continue
        replaced[name] = source
    if not replaced:
        return 0
    keep = [i for i in graph.initializer if i.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = [onnx.helper.make_node("Transpose", [source], [name], perm=[1, 0],
                                   name=f"{name}/shared_transpose")
             for name, source in replaced.items()]
    for node in reversed(nodes):  # ahead of every reader
        graph.node.insert(0, node)
    return len(replaced)
