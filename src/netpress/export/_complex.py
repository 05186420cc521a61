"""Complex numbers carried as real and imaginary parts while an export traces a model.

ONNX has no complex tensors, and the TorchScript exporter refuses the ops that make them.
Llama 4 builds its rotary embedding as ``torch.polar(ones, angles)`` and rotates queries
and keys as ``view_as_real(view_as_complex(q.reshape(..., -1, 2)) * freqs[:, :, None])``.
While :func:`netpress.export.onnx.export_onnx` traces, those calls make a
:class:`SplitComplex` instead: a plain Python pair of real tensors that supports what
such code does with it (products with complex or real values, indexing, ``to``), and
``view_as_real`` stacks the pair back into the real ``[..., 2]`` tensor. The trace then
holds only real ops (a rotation by ``cos``/``sin``). Any other use of the pair fails with
an error that names it, and the export is refused as before. ``torch.fft.fft`` and
``torch.fft.fftn`` (FNet's token mixing) of a real tensor or a pair become the same
pairs, each transformed axis a product with the ``cos``/``sin`` DFT matrices of its
length (built in the graph, so the length stays free).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SplitComplex", "complex_call"]


class SplitComplex:
    """A complex tensor as ``real + i * imag`` (two real tensors of one shape)."""

    __slots__ = ("real", "imag")

    def __init__(self, real: torch.Tensor, imag: torch.Tensor) -> None:
        self.real, self.imag = real, imag

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        """torch functions given a pair (``torch.view_as_real``; torch's argument parser
        accepts the pair in a tensor's place because of this method)."""
        out = complex_call(func, args, dict(kwargs or {}))
        if out is NotImplemented:
            raise RuntimeError(f"netpress cannot pass a complex pair to {func!r}")
        return out

    def __mul__(self, other: Any) -> SplitComplex:
        if isinstance(other, SplitComplex):
            return SplitComplex(self.real * other.real - self.imag * other.imag,
                                self.real * other.imag + self.imag * other.real)
        if isinstance(other, (int, float)) or (isinstance(other, torch.Tensor)
                                               and not other.is_complex()):
            return SplitComplex(self.real * other, self.imag * other)
        return NotImplemented

    __rmul__ = __mul__

    def __getitem__(self, key: Any) -> SplitComplex:
        return SplitComplex(self.real[key], self.imag[key])

    def to(self, *args: Any, **kwargs: Any) -> SplitComplex:
        """``to(device)``; a complex dtype asked for keeps the parts' real dtype."""
        args = tuple(_real_dtype(a) for a in args)
        kwargs = {k: _real_dtype(v) for k, v in kwargs.items()}
        return SplitComplex(self.real.to(*args, **kwargs), self.imag.to(*args, **kwargs))

    @property
    def shape(self) -> torch.Size:
        return self.real.shape

    @property
    def device(self) -> torch.device:
        return self.real.device

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"netpress exports complex values as real pairs and cannot do "
                             f"'.{name}' on one (only products, indexing, .to and "
                             f"torch.view_as_real)")


def _real_dtype(value: Any) -> Any:
    if isinstance(value, torch.dtype) and value.is_complex:
        return torch.float64 if value == torch.complex128 else torch.float32
    return value


def _polar(magnitude: torch.Tensor, angle: torch.Tensor) -> SplitComplex:
    return SplitComplex(magnitude * torch.cos(angle), magnitude * torch.sin(angle))


def _view_as_complex(x: torch.Tensor) -> SplitComplex:
    real, imag = x.unbind(-1)
    return SplitComplex(real, imag)


def _view_as_real(z: Any) -> torch.Tensor:
    return torch.stack((z.real, z.imag), dim=-1)


def _parts(x: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(real, imag)`` of a pair, ``(x, None)`` of a real tensor."""
    return (x.real, x.imag) if isinstance(x, SplitComplex) else (x, None)


def _dft(x: Any, dim: int) -> SplitComplex:
    """The discrete Fourier transform of ``x`` (real or a pair) along ``dim``, unscaled
    (torch's ``norm="backward"``): with ``C = cos(2 pi k n / N)``, ``S = sin(...)``,
    ``(a + ib)(C - iS)`` summed over ``n``. ``N`` is read in the graph."""
    real, imag = _parts(x)
    last = real.dim() - 1
    dim = dim % real.dim()
    size = real.shape[dim]
    steps = torch.arange(size, dtype=real.dtype, device=real.device)
    angle = (2 * torch.pi / size) * steps[:, None] * steps[None, :]
    cos, sin = torch.cos(angle), torch.sin(angle)

    def along(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (t.transpose(dim, last) @ m).transpose(dim, last)  # m symmetric: over n

    if imag is None:
        return SplitComplex(along(real, cos), -along(real, sin))
    return SplitComplex(along(real, cos) + along(imag, sin), along(imag, cos) - along(real, sin))


def _fft(x: Any, n: Any = None, dim: int = -1, norm: Any = None) -> SplitComplex:
    if n is not None or norm not in (None, "backward"):
        raise RuntimeError("netpress exports torch.fft.fft only without n and with "
                           "norm='backward'")
    return _dft(x, dim)


def _fftn(x: Any, s: Any = None, dim: Any = None, norm: Any = None) -> SplitComplex | Any:
    if s is not None or norm not in (None, "backward"):
        raise RuntimeError("netpress exports torch.fft.fftn only without s and with "
                           "norm='backward'")
    rank = len(_parts(x)[0].shape)
    dims = range(rank) if dim is None else ([dim] if isinstance(dim, int) else dim)
    for d in dims:
        x = _dft(x, d)
    return x


def _real_input(x: Any) -> bool:
    return isinstance(x, SplitComplex) or (isinstance(x, torch.Tensor) and not x.is_complex()
                                          and x.is_floating_point())


def complex_call(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The split form of ``func(*args, **kwargs)`` where ``func`` makes or reads complex
    values netpress carries as pairs; ``NotImplemented`` for any other call. A pair
    reaching another torch function raises a ``RuntimeError`` naming it (the export turns
    it into a refusal naming the module)."""
    if func is torch.polar:
        return _polar(*args, **kwargs)
    if func is torch.view_as_complex and isinstance(args[0], torch.Tensor) \
            and not args[0].is_complex():
        return _view_as_complex(args[0])
    if func is torch.view_as_real and isinstance(args[0], SplitComplex):
        return _view_as_real(args[0])
    if func in (torch.fft.fft, torch.fft.fftn) and args and _real_input(args[0]):
        return (_fft if func is torch.fft.fft else _fftn)(*args, **kwargs)
    if any(isinstance(a, SplitComplex) for a in (*args, *kwargs.values())):
        name = getattr(func, "__name__", repr(func))
        raise RuntimeError(f"netpress exports complex values as real pairs and cannot pass "
                           f"one to torch.{name}")
    return NotImplemented
