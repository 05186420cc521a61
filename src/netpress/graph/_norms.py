"""Rules of the normalisations: statistics per channel (batch/instance norm), per group
(group norm) or over the normalised dims (layer/RMS norm, ``F.normalize``). Elements that feed
a statistic are *softened* (see :mod:`netpress.graph.spaces`): removable, but inexactly."""

from __future__ import annotations

import torch

from netpress.graph._helpers import _arg, _dims_of, _ins
from netpress.graph.spaces import Spaces
from netpress.graph.trace import OpRecord

__all__ = ["per_channel_norm", "layer_norm", "group_norm", "normalize"]


def per_channel_norm(S: Spaces, rec: OpRecord) -> None:
    """batch_norm / instance_norm: statistics per channel (dim 1). With batch statistics
    (training, no running stats, or instance_norm) every other dim is reduced over, so its
    elements feed the statistics: e.g. a standardised conv weight (BiT), whose input channels
    the statistics span."""
    x, out = rec.args[0], rec.outputs[0]
    batch_stats = rec.name == "instance_norm" or bool(_arg(rec, 5, "training", False)) \
        or _arg(rec, 1, "running_mean") is None
    for d in range(x.dim()):
        S.union_dims(x, d, out, d)
        if batch_stats and d != 1:
            S.soften(S.ids(x, d))
    for t in _ins(rec)[1:]:
        if t.dim() == 1:
            S.union_dims(t, 0, x, 1)


def layer_norm(S: Spaces, rec: OpRecord) -> None:
    """layer_norm / rms_norm: the affine weights follow the normalised dims elementwise, whose
    elements feed the statistics (removing even a zero channel changes the mean and
    variance): softened, not fixed, so the hidden size can be pruned when a target needs it."""
    x, out = rec.args[0], rec.outputs[0]
    shape = _arg(rec, 1, "normalized_shape")
    n = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    for d in range(x.dim()):
        S.union_dims(x, d, out, d)
    lead = x.dim() - n
    S.soften_tensor(x, list(range(lead, x.dim())))
    for t in _ins(rec)[1:]:
        if t.dim() == n and tuple(t.shape) == tuple(x.shape[lead:]):
            for i in range(n):
                S.union_dims(t, i, x, lead + i)
        else:
            S.fix_tensor(t)


def group_norm(S: Spaces, rec: OpRecord) -> None:
    """Statistics per group: whole groups are the unit (removing one leaves the others'
    statistics as they were). With a single group (a layer norm over channels and space,
    as in PoolFormer) the channels are units whose removal moves the statistics (softened)."""
    x, out = rec.args[0], rec.outputs[0]
    groups = int(_arg(rec, 1, "num_groups"))
    for d in range(x.dim()):
        S.union_dims(x, d, out, d)
        if d >= 2:  # reduced over within each group
            S.fix(S.ids(x, d))
    for t in _ins(rec)[1:]:
        S.union_dims(t, 0, x, 1)
    ids = S.ids(x, 1)
    if groups == 1:
        S.soften(ids)
        return
    per = ids.size // groups
    S.union(ids.reshape(groups, per)[:, :1], ids.reshape(groups, per))


def normalize(S: Spaces, rec: OpRecord) -> None:
    """``F.normalize``: each element divided by the norm over ``dim`` (a statistic)."""
    x, out = rec.args[0], rec.outputs[0]
    dims = _dims_of(_arg(rec, 2, "dim", 1), max(1, x.dim())) or []
    for d in range(x.dim()):
        S.union_dims(x, d, out, d)
    S.soften_tensor(x, dims)
