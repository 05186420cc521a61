"""Complex numbers carried as real and imaginary parts while an export traces a model.

ONNX has no complex tensors, and the TorchScript exporter refuses the ops that make them.
Llama 4 builds its rotary embedding as ``torch.polar(ones, angles)`` and rotates queries
and keys as ``view_as_real(view_as_complex(q.reshape(..., -1, 2)) * freqs[:, :, None])``.
While :func:`netpress.export.onnx.export_onnx` traces, those calls make a
:class:`SplitComplex` instead: a plain Python pair of real tensors that supports what
such code does with it (products with complex or real values, indexing, ``to``), and
``view_as_real`` stacks the pair back into the real ``[..., 2]`` tensor. The trace then
holds only real ops (a rotation by ``cos``/``sin``). Any other use of the pair fails with
an error that names it, and the export is refused as before.
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
    if any(isinstance(a, SplitComplex) for a in (*args, *kwargs.values())):
        name = getattr(func, "__name__", repr(func))
        raise RuntimeError(f"netpress exports complex values as real pairs and cannot pass "
                           f"one to torch.{name}")
    return NotImplemented
