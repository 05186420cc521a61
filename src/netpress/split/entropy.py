"""A learned factorized entropy model of the bottleneck's codes (Ballé et al., 2017/2018).

Each channel ``c`` of the codes has its own univariate density, given by a learned monotone
cumulative function (the "non-parametric" density of Ballé et al. 2018, appendix 6.1)::

    c(x) = sigmoid(f_K(... f_1(x)))      f_k(x) = g_k(H_k x + b_k)   (k < K),
    g_k(x) = x + a_k * tanh(x)           H_k = softplus(Ĥ_k) > 0,  a_k = tanh(â_k) > -1

so that ``c`` is increasing in ``x``. The probability of an integer code ``q`` is the mass
of its unit interval, ``p(q) = c(q + 1/2) - c(q - 1/2)``, the two tails folded into the end
codes of the finite alphabet ``[0, 2^bits - 1]`` (:func:`code_pmf`, which sums to 1 by
telescoping). In training the codes are replaced by ``y + u``, ``u ~ U(-1/2, 1/2)``, whose
density is exactly that interval mass (:func:`interval_likelihood`): ``-log2`` of it is the
rate term of the loss. At test time the arithmetic coder (:mod:`netpress.split.arith`) codes
with that same pmf (:func:`code_model_from_pmf`), so the trained rate and the sent bytes
match. The density sees codes relative to the middle of the alphabet, where the encoder's
output starts.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from netpress.errors import DataError
from netpress.split.arith import CodeModel

__all__ = ["FactorizedPrior", "interval_likelihood", "code_pmf", "code_model_from_pmf"]

#: Likelihoods are bounded below by this, so ``-log2 p`` stays finite in training.
MIN_LIKELIHOOD = 1e-9


def interval_likelihood(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """``sigmoid(upper) - sigmoid(lower)`` from logits, computed on the side of the sigmoid
    where it does not round to 1 (the difference of two values near 1 loses precision)."""
    sign = -torch.sign(lower + upper).detach()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))


class FactorizedPrior(nn.Module):
    """Per-channel learned densities of codes on the integer grid ``[0, 2^bits - 1]``.

    ``init_scale``: the starting density's width, in codes. The parameters are stored
    divided by ``gain`` and used multiplied by it, so each optimizer step moves the density
    ``gain`` times further than it moves the network's weights: in a training budget of a
    few hundred steps it must follow the codes as the rate term narrows them.
    """

    def __init__(self, channels: int, bits: int, filters: tuple[int, ...] = (3, 3, 3),
                 init_scale: float = 4.0, channel_dim: int = 1, gain: float = 10.0) -> None:
        super().__init__()
        self.channels, self.bits, self.channel_dim = channels, bits, channel_dim
        self.gain = gain
        self.center = float(2 ** (bits - 1))
        dims = (1, *filters, 1)
        scale = init_scale ** (1.0 / (len(dims) - 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(dims) - 1):
            init = math.log(math.expm1(1.0 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]),
                                                         init / gain)))
            self.biases.append(nn.Parameter((torch.rand(channels, dims[i + 1], 1) - 0.5) / gain))
            if i < len(dims) - 2:
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    def cdf_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logit of ``c(x)`` for ``x`` of shape ``(C, 1, N)`` (values relative to the
        middle of the alphabet), same shape."""
        h, g = x, self.gain
        for i, (m, b) in enumerate(zip(self.matrices, self.biases)):
            h = torch.matmul(F.softplus(g * m), h) + g * b
            if i < len(self.factors):
                h = h + torch.tanh(g * self.factors[i]) * torch.tanh(h)
        return h

    def _by_channel(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() < 2 or y.shape[self.channel_dim] != self.channels:
            raise DataError(f"Split entropy model: codes of shape {tuple(y.shape)} do not have "
                            f"the model's {self.channels} channels in dimension "
                            f"{self.channel_dim}")
        return y.movedim(self.channel_dim, 0).reshape(self.channels, 1, -1)

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """``c(y + 1/2) - c(y - 1/2)`` per value of ``y`` (code units, channels in dimension
        ``channel_dim``), flattened per channel to ``(C, 1, -1)``."""
        v = self._by_channel(y) - self.center
        p = interval_likelihood(self.cdf_logits(v - 0.5), self.cdf_logits(v + 0.5))
        return p.clamp_min(MIN_LIKELIHOOD)

    def rate(self, y: torch.Tensor) -> torch.Tensor:
        """``sum -log2 p(y)`` per input (mean over the batch dimension): the rate term."""
        return -torch.log2(self.likelihood(y)).sum() / y.shape[0]

    def noisy_bits(self, y: torch.Tensor) -> torch.Tensor:
        """The rate of ``y + u``, ``u ~ U(-1/2, 1/2)``: the training stand-in for rounding."""
        return self.rate(y + torch.rand_like(y) - 0.5)

    @torch.no_grad()
    def pmf(self) -> np.ndarray:
        """``(C, 2^bits)`` probabilities of each channel's codes, tails folded (float64)."""
        n = 2 ** self.bits
        edges = torch.arange(n - 1, dtype=torch.float64) + 0.5 - self.center
        logits = copy.deepcopy(self).double().cdf_logits(edges.expand(self.channels, 1, -1))
        return code_pmf(torch.sigmoid(logits[:, 0, :]).numpy())

    def code_model(self, total_bits: int = 24) -> CodeModel:
        """The arithmetic coder's model of these densities."""
        return code_model_from_pmf(self.pmf(), self.bits, total_bits)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, bits={self.bits}, gain={self.gain}"


def code_pmf(cdf_at_edges: np.ndarray) -> np.ndarray:
    """Probabilities of codes ``0..S-1`` from a CDF at the ``S - 1`` inner edges
    ``q + 1/2`` (one row per channel): differences, with ``c(-inf) = 0`` and ``c(inf) = 1``
    (each tail folded into its end code)."""
    cdf = np.asarray(cdf_at_edges, dtype=np.float64)
    rows = cdf.reshape(-1, cdf.shape[-1])
    full = np.concatenate([np.zeros((len(rows), 1)), rows, np.ones((len(rows), 1))], axis=1)
    return np.maximum(np.diff(full, axis=1), 0.0)


def code_model_from_pmf(pmf: np.ndarray, bits: int, total_bits: int = 24) -> CodeModel:
    """Integer frequencies (each at least 1, summing to at most ``2^total_bits``) of each
    channel's pmf over the ``2^bits`` codes, as the arithmetic coder's model."""
    p = np.asarray(pmf, dtype=np.float64)
    symbols = 2 ** bits
    if p.ndim != 2 or p.shape[1] != symbols or not np.all(np.isfinite(p)) or p.min() < 0:
        raise DataError(f"arithmetic coder: a pmf of shape {p.shape} for {bits}-bit codes "
                        f"must be finite, non-negative, of shape (channels, {symbols})")
    if not 8 + bits <= total_bits <= 28:
        raise DataError(f"arithmetic coder: total_bits={total_bits} must be in "
                        f"[{8 + bits}, 28]")
    p = p / p.sum(axis=1, keepdims=True)
    freq = np.maximum(1, np.floor(p * (2 ** total_bits - symbols))).astype(np.int64)
    cum = np.concatenate([np.zeros((len(freq), 1), dtype=np.int64), np.cumsum(freq, axis=1)],
                         axis=1)
    return CodeModel(bits=bits, cum=tuple(tuple(int(v) for v in row) for row in cum))
