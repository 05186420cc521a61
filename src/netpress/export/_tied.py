"""Copies of one weight written once in ONNX.

A language model whose output layer shares its weight ``W`` (vocabulary × hidden) with the
input embedding table exports, through ``F.linear``, as ``MatMul(x, Wᵀ)`` with ``Wᵀ``
constant-folded into a second initializer beside the table's ``W``: the file holds the
table twice (a tied 32k-vocabulary, 512-wide decoder: 182 MB instead of 116 MB; the same
for ``DynamicQuantize``'s int8 codes under ``MatMulInteger``). After ``GPTQ`` the output
layer's ``MatMulNBits`` weight and the table's ``GatherBlockQuantized`` data are the same
packed bytes in two shapes. :func:`share_copies` replaces every initializer (of at least
:data:`MIN_ELEMENTS`) that is exactly the transpose of another, or the same bytes in
another shape, by a ``Transpose`` or ``Reshape`` node of that one. ONNX Runtime folds such
nodes back into constants when it loads the model, so the kernels (and their speed) are
those of the folded graph; only the file is smaller. (Writing the output layer as
``Gemm(transB=1)`` on ``W`` kept one copy too, but ran 3-7% slower in ONNX Runtime on that
decoder.)
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["MIN_ELEMENTS", "share_copies"]

#: initializers smaller than this are left alone (not worth a node)
MIN_ELEMENTS = 4096


def _digest(array: Any) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()


def share_copies(model: Any) -> int:
    """Rewrite ``model`` (an ONNX ``ModelProto``, in place): each initializer equal to the
    transpose of a 2-D one, or holding another's bytes in another shape, becomes a node of
    that one; returns how many were replaced."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer
              if int(np.prod(i.dims)) >= MIN_ELEMENTS}
    digests = {name: _digest(np.ascontiguousarray(a)) for name, a in arrays.items()}
    flat: dict[tuple[str, str], str] = {}  # (dtype, bytes) -> the first holder
    shaped: dict[tuple[str, tuple[int, ...], str], str] = {}  # 2-D (dtype, shape, bytes)
    for name, a in arrays.items():
        flat.setdefault((str(a.dtype), digests[name]), name)
        if a.ndim == 2:
            shaped.setdefault((str(a.dtype), a.shape, digests[name]), name)
    nodes: list[Any] = []
    kept: set[str] = set()
    gone: set[str] = set()
    for name, a in arrays.items():
        source = flat[(str(a.dtype), digests[name])]
        if name in kept:
            continue  # another replacement reads it
        if source != name and source not in gone and arrays[source].shape != a.shape and \
                np.array_equal(arrays[source].reshape(-1), a.reshape(-1)):
            shape = numpy_helper.from_array(np.array(a.shape, dtype=np.int64),
                                            f"{name}/shared_shape")
            graph.initializer.append(shape)
            nodes.append(onnx.helper.make_node("Reshape", [source, shape.name], [name],
                                               name=f"{name}/shared_reshape"))
        elif a.ndim == 2:
            t = np.ascontiguousarray(a.T)
            source = shaped.get((str(a.dtype), t.shape, _digest(t)), name)
            if source == name or source in gone or not np.array_equal(arrays[source], t):
                continue
            nodes.append(onnx.helper.make_node("Transpose", [source], [name], perm=[1, 0],
                                               name=f"{name}/shared_transpose"))
        else:
            continue
        kept.add(source)
        gone.add(name)
    if not gone:
        return 0
    keep = [i for i in graph.initializer if i.name not in gone]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for node in reversed(nodes):  # ahead of every reader
        graph.node.insert(0, node)
    return len(gone)
