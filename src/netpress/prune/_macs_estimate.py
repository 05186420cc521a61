"""The channel graph's MACs estimate scaled to :func:`~netpress.measure.macs.count_macs`.

The graph counts every matmul, convolution and scaled dot-product attention it traced, and
``count_macs`` counts the same ops (attention included on every device, see
:mod:`netpress.measure.macs`), so the two agree up to what the graph could not trace
(a matmul in code the tracer does not see, the fast paths ``count_macs`` switches off).
:func:`estimator` scales the estimate to the measured count of the unpruned model so that a
MACs target is met in the measured units.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from netpress.graph import ChannelGraph

__all__ = ["estimator"]


def estimator(graph: ChannelGraph, measured: float) -> Callable[[np.ndarray], float]:
    """``f(removed)``: the estimated measured MACs with the ``removed`` units cut out (a
    boolean mask over the graph's labels); ``f(nothing removed) == measured``."""
    none = np.zeros(graph.blocked.size, dtype=bool)
    base = max(1.0, float(graph.macs(none)))
    return lambda removed: measured * float(graph.macs(removed)) / base
