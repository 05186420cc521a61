"""The channel graph's MACs estimate made to agree with :func:`~netpress.measure.macs.count_macs`.

The graph counts every matmul, convolution and scaled dot-product attention it traced;
``count_macs`` counts what :class:`torch.utils.flop_counter.FlopCounterMode` sees, and on
CPU that is nothing for ``scaled_dot_product_attention`` (its CPU kernel has no FLOP
formula). Scaled to the measured count, the whole estimate then weighs attention heads more
than the measurement does: a tiny BERT at a 50% target measured 50.8%. :func:`estimator`
leaves the attention terms out when that brings the estimate of the unpruned model closer to
the measured count, and scales what is left to it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from netpress.graph import ChannelGraph
from netpress.graph.groups import _Products

__all__ = ["estimator"]

_ATTENTION_OP = "op 'scaled_dot_product_attention'"


def estimator(graph: ChannelGraph, measured: float) -> Callable[[np.ndarray], float]:
    """``f(removed)``: the estimated measured MACs with the ``removed`` units cut out (a
    boolean mask over the graph's labels); ``f(nothing removed) == measured``."""
    everything = graph.spaces.macs
    apart = [t for t in everything if not t.where.startswith(_ATTENTION_OP)]
    none = np.zeros(graph.blocked.size, dtype=bool)
    full = float(graph.macs(none))
    products = _Products.of(graph, [(t.const, t.spaces) for t in apart]) \
        if len(apart) < len(everything) else None
    if products is not None and abs(products.total(none) - measured) < abs(full - measured):
        count: Callable[[np.ndarray], float] = products.total
    else:
        count = graph.macs
    base = max(1.0, float(count(none)))
    return lambda removed: measured * float(count(removed)) / base
