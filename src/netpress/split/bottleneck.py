"""The learned bottleneck of split computing: encoder, integer codes, decoder.

The encoder reduces the cut tensor to ``channels`` channels (and, for image-like maps, by
``stride`` in space: a stride that is a power of two above 2 is reached by a stack of 3×3
stride-2 convolutions, each halving the width, and undone by as many transposed ones),
ending in a BatchNorm whose affine maps values onto the code grid.
:func:`quantize_ste` turns them into integer codes ``q = clamp(round(z), 0, 2^bits - 1)`` (the
tensor the device sends) with a straight-through gradient inside the range, and hands the
decoder ``q / (2^bits - 1)`` (:class:`CodeQuant`). The decoder rebuilds a tensor of the cut
tensor's shape. The grid is fixed (unit step), so no scale travels with the codes and the ONNX
graph of the head ends in ``Round``/``Clip``.

With ``entropy="factorized"`` the bottleneck also holds a learned per-channel density of
the codes (:class:`~netpress.split.entropy.FactorizedPrior`); in training its forward pass
records the rate of the noisy codes (``-log2 p`` bits per input, :meth:`Bottleneck.take_rate`)
for the loss, and the encoder's codes start around the middle of the alphabet (:class:`Gain`).

Maps of rank 4 (N, C, H, W) use convolutions; rank 2 (N, C) and rank 3 (N, L, C) use Linear
layers on the last dimension.
"""

from __future__ import annotations

import torch
from torch import nn

from netpress.errors import ModelError
from netpress.split.entropy import FactorizedPrior

__all__ = ["quantize_ste", "code_max", "CodeQuant", "Bottleneck", "build_bottleneck",
           "ResidualBlock", "ENTROPY_MODELS"]

#: The entropy models a bottleneck can learn: none (a static coder is fitted afterwards) or
#: a factorized prior trained with the rate term.
ENTROPY_MODELS = ("none", "factorized")


def code_max(bits: int) -> int:
    """The largest code of ``bits``-bit unsigned codes."""
    return 2 ** bits - 1


def quantize_ste(z: torch.Tensor, qmax: int) -> torch.Tensor:
    """``clamp(round(z), 0, qmax)`` forward; gradient 1 where ``0 <= z <= qmax``, else 0."""
    clipped = torch.clamp(z, 0.0, float(qmax))
    return clipped + (torch.round(clipped) - clipped).detach()


class CodeQuant(nn.Module):
    """Integer codes of the bottleneck, handed to the decoder as ``(q - offset) / scale``:
    by default ``q / qmax`` in ``[0, 1]``; a learned-entropy bottleneck uses ``q - center``
    (its codes sit a few steps around the middle of the alphabet: scaled by ``1 / qmax``
    they would be a constant plus variations 255 times smaller)."""

    def __init__(self, bits: int, offset: float = 0.0, scale: float | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.qmax = code_max(bits)
        self.offset = float(offset)
        self.scale = float(self.qmax if scale is None else scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.dequantize(quantize_ste(z, self.qmax))
        return self.dequantize(torch.clamp(torch.round(z), 0.0, float(self.qmax)))

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """The decoder's input for codes ``q``."""
        return (q - self.offset) / self.scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, offset={self.offset}, scale={self.scale}"


class Bottleneck(nn.Module):
    """``decoder(quant(encoder(x)))``, cropped back to the cut tensor's spatial size."""

    def __init__(self, encoder: nn.Module, quant: CodeQuant, decoder: nn.Module,
                 size: tuple[int, ...] = (), prior: FactorizedPrior | None = None) -> None:
        super().__init__()
        self.encoder, self.quant, self.decoder = encoder, quant, decoder
        self.size = tuple(size)
        self.prior = prior
        self._rate: torch.Tensor | None = None

    def take_rate(self) -> torch.Tensor | None:
        """The rate (bits per input) of the last training forward pass, then forgotten;
        ``None`` without a prior or outside training."""
        rate, self._rate = self._rate, None
        return rate

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The transmitted integer codes (float tensor of whole numbers)."""
        return torch.clamp(torch.round(self.encoder(x)), 0.0, float(self.quant.qmax))

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        """Rebuild the cut tensor from codes ``q`` (whole numbers in ``[0, qmax]``)."""
        return self._crop(self.decoder(self.quant.dequantize(q)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        if self.prior is not None and self.training and torch.is_grad_enabled():
            self._rate = self.prior.noisy_bits(torch.clamp(z, 0.0, float(self.quant.qmax)))
        return self._crop(self.decoder(self.quant(z)))

    def _crop(self, y: torch.Tensor) -> torch.Tensor:
        if len(self.size) == 2:  # a strided encoder rounds odd sizes up
            y = y[:, :, : self.size[0], : self.size[1]]
        return y


def _norm_init(bn: nn.Module, qmax: int) -> None:
    """Start the pre-quantization affine so the codes spread over the grid."""
    with torch.no_grad():
        bn.weight.fill_(qmax / 6.0)  # type: ignore[operator]
        bn.bias.fill_(qmax / 4.0)  # type: ignore[operator]


class Gain(nn.Module):
    """``gain * x + offset`` (constants). After a normalization whose affine starts at
    ``spread / gain``, it puts codes at ``offset ± spread`` while each optimizer step of
    the affine moves them ``gain`` times further: the rate term must be able to shrink a
    channel to a single code within a few hundred Adam steps."""

    def __init__(self, gain: float, offset: float) -> None:
        super().__init__()
        self.gain, self.offset = gain, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain + self.offset

    def extra_repr(self) -> str:
        return f"gain={self.gain}, offset={self.offset}"


#: The learned-entropy encoder's codes start at the middle of the alphabet ± this spread,
#: and its normalization affine moves ``ENTROPY_GAIN`` times faster than the other weights.
ENTROPY_SPREAD, ENTROPY_GAIN = 2.0, 10.0


def _halvings(stride: int) -> int:
    """How many stride-2 stages make ``stride`` (0 when it is not a power of two above 2)."""
    n = stride.bit_length() - 1
    return n if stride > 2 and stride == 2 ** n else 0


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU()]


def _down(c: int, mid: int, stride: int, depth: int = 1) -> list[nn.Module]:
    """Conv + BN + ReLU stages taking ``c`` channels to ``mid`` and dividing the size; each
    stage is its strided conv then ``depth - 1`` stride-1 ones."""
    steps = [2] * _halvings(stride) or [stride]
    layers: list[nn.Module] = []
    for i, s in enumerate(steps):
        layers += _conv_bn(c if i == 0 else mid, mid, s)
        for _ in range(depth - 1):
            layers += _conv_bn(mid, mid)
    return layers


def _up(channels: int, mid: int, stride: int, depth: int = 1) -> list[nn.Module]:
    """The decoder's upsampling stages, from the codes' ``channels`` to ``mid`` channels;
    each stage is its transposed conv then ``depth - 1`` stride-1 convs."""
    steps = [2] * _halvings(stride) or [stride]
    layers: list[nn.Module] = []
    for i, s in enumerate(steps):
        cin = channels if i == 0 else mid
        layers += [nn.ConvTranspose2d(cin, mid, 2 * s, stride=s, padding=s // 2, bias=False)
                   if s > 1 else nn.Conv2d(cin, mid, 3, padding=1, bias=False),
                   nn.BatchNorm2d(mid), nn.ReLU()]
        for _ in range(depth - 1):
            layers += _conv_bn(mid, mid)
    return layers


class ResidualBlock(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))``: two 3×3 stride-1 convolutions of
    ``width`` channels with a skip around them (the server-side decoder's extra layers)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


def _up_residual(channels: int, mid: int, stride: int, depth: int) -> list[nn.Module]:
    """The server-side decoder's upsampling: each stage is its transposed conv (+ BN +
    ReLU) then ``depth - 1`` :class:`ResidualBlock` s at that stage's resolution (for
    ``stride=2``, the cut tensor's)."""
    layers = _up(channels, mid, stride, 1)
    if depth == 1:
        return layers
    out: list[nn.Module] = []
    for layer in layers:  # a ReLU ends every upsampling stage: put the blocks after it
        out.append(layer)
        if isinstance(layer, nn.ReLU):
            out += [ResidualBlock(mid) for _ in range(depth - 1)]
    return out


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"Split: {name}={value!r} must be an int >= 1")


def build_bottleneck(shape: tuple[int, ...], channels: int, bits: int, *, stride: int = 2,
                     hidden: int | None = None, entropy: str = "none",
                     depth: int = 1, decoder_hidden: int | None = None,
                     decoder_depth: int | None = None) -> Bottleneck:
    """A bottleneck for cut tensors of ``shape`` (batch dimension included); ``entropy``
    is one of :data:`ENTROPY_MODELS`; ``depth``: 3×3 convolutions per resolution stage of
    the encoder and of the decoder (image-like maps; 1: one strided conv per stage).

    ``decoder_hidden`` / ``decoder_depth`` size the server-side decoder on its own (it
    costs no bytes and no device MACs). Both ``None``: the decoder mirrors the encoder
    (``hidden`` wide, ``depth - 1`` plain conv + BN + ReLU layers after each upsampling).
    Either given: each upsampling stage (transposed conv + BN + ReLU, ``decoder_hidden``
    wide, default ``hidden``) is followed by ``decoder_depth - 1`` (default ``depth - 1``)
    :class:`ResidualBlock` s; Linear bottlenecks (rank 2 and 3) take ``decoder_hidden`` as
    the decoder's width and have no stride-1 layers."""
    if entropy not in ENTROPY_MODELS:
        raise ModelError(f"Split: entropy={entropy!r}; choose one of {ENTROPY_MODELS}")
    _check_positive("depth", depth)
    for name, value in (("decoder_hidden", decoder_hidden), ("decoder_depth", decoder_depth)):
        if value is not None:
            _check_positive(name, value)
    residual = decoder_hidden is not None or decoder_depth is not None
    qmax = code_max(bits)
    if len(shape) == 4:
        c, h, w = shape[1], shape[2], shape[3]
        mid = hidden or c
        dec_mid = decoder_hidden or mid
        enc_bn: nn.Module = nn.BatchNorm2d(channels)
        encoder = nn.Sequential(*_down(c, mid, stride, depth),
                                nn.Conv2d(mid, channels, 1, bias=False), enc_bn)
        up = (_up_residual(channels, dec_mid, stride, decoder_depth or depth) if residual
              else _up(channels, mid, stride, depth))
        decoder = nn.Sequential(*up, nn.Conv2d(dec_mid, c, 3, padding=1))
        size: tuple[int, ...] = (h, w)
    elif len(shape) in (2, 3):
        c = shape[-1]
        mid = hidden or c
        dec_mid = decoder_hidden or mid
        enc_bn = nn.LayerNorm(channels)
        encoder = nn.Sequential(nn.Linear(c, mid), nn.ReLU(), nn.Linear(mid, channels), enc_bn)
        decoder = nn.Sequential(nn.Linear(channels, dec_mid), nn.ReLU(),
                                nn.Linear(dec_mid, c))
        size = ()
    else:
        raise ModelError(f"Split: the tensor at the cut has shape {tuple(shape)}; a bottleneck "
                         f"needs (N, C), (N, L, C) or (N, C, H, W)")
    prior, quant = None, CodeQuant(bits)
    if entropy == "factorized":
        prior = FactorizedPrior(channels, bits, channel_dim=-1 if len(shape) == 3 else 1)
        with torch.no_grad():
            enc_bn.weight.fill_(ENTROPY_SPREAD / ENTROPY_GAIN)  # type: ignore[operator]
            enc_bn.bias.zero_()  # type: ignore[operator]
        encoder.append(Gain(ENTROPY_GAIN, prior.center))
        quant = CodeQuant(bits, offset=prior.center, scale=1.0)
    else:
        _norm_init(enc_bn, qmax)
    return Bottleneck(encoder, quant, decoder, size, prior)
