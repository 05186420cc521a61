"""Channel spaces and the coupling relations between their elements.

Every dimension of every tensor seen in a trace (parameters and buffers included) is a
*space*: a block of element ids, one per index along that dimension. Op rules relate
elements: :meth:`Spaces.union` says two elements must be kept or removed together,
:meth:`Spaces.fix` says an element can never be removed (a model input or output, a
constant index), :meth:`Spaces.soften` that removing it changes a statistic computed over
its dimension (a norm's mean and variance, a mean over channels): it can be removed, but the
model's function then changes even if its weights were zero. The connected components of the
union relation are the smallest units that can be removed from the model; a component holding
a fixed element cannot be removed, one holding a softened element is *inexact*. Relations
are plain NumPy arrays of element ids and components come from a vectorised union-find
(:func:`connected_components`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Spaces", "SpaceKey", "MacTerm", "connected_components"]

SpaceKey = tuple[int, int]  # (id(tensor), dim)


@dataclass
class MacTerm:
    """MACs of one op: ``const`` times the product of the sizes of ``spaces``."""

    const: int
    spaces: list[SpaceKey]
    where: str


@dataclass
class Spaces:
    """Element ids per (tensor, dim), and the relations the op rules add between them."""

    base: dict[SpaceKey, int] = field(default_factory=dict)
    size: dict[SpaceKey, int] = field(default_factory=dict)
    count: int = 0
    edges: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    fixed: list[np.ndarray] = field(default_factory=list)
    fixed_by: list[str] = field(default_factory=list)
    soft: list[np.ndarray] = field(default_factory=list)
    soft_by: list[str] = field(default_factory=list)
    aligned: list[tuple[np.ndarray, int]] = field(default_factory=list)
    current: str = ""  # the op whose rule is running (for explain())
    unknown: list[tuple[np.ndarray, str]] = field(default_factory=list)
    macs: list[MacTerm] = field(default_factory=list)
    # pending split/merge relations: (flat tensor, its dim, factor tensor, factor dims)
    products: list[tuple[torch.Tensor, int, torch.Tensor, list[int]]] = \
        field(default_factory=list)

    def ids(self, t: torch.Tensor, dim: int) -> np.ndarray:
        """The element ids of dimension ``dim`` of ``t`` (negative dims count from the end)."""
        if dim < 0:
            dim += t.dim()
        key = (id(t), dim)
        b = self.base.get(key)
        n = int(t.shape[dim])
        if b is None:
            b = self.count
            self.base[key] = b
            self.size[key] = n
            self.count += n
        return np.arange(b, b + n, dtype=np.int64)

    def key(self, t: torch.Tensor, dim: int) -> SpaceKey:
        if dim < 0:
            dim += t.dim()
        self.ids(t, dim)
        return (id(t), dim)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Elements ``a[i]`` and ``b[i]`` go together (broadcast when one has length 1)."""
        if a.size == 0 or b.size == 0:
            return
        a, b = np.broadcast_arrays(a, b)
        self.edges.append((a.ravel(), b.ravel()))

    def union_dims(self, t: torch.Tensor, dt: int, u: torch.Tensor, du: int) -> None:
        """Identity map between dimension ``dt`` of ``t`` and ``du`` of ``u`` (same size)."""
        a, b = self.ids(t, dt), self.ids(u, du)
        if a.size == b.size:
            self.union(a, b)
        else:
            self.fix(a)
            self.fix(b)

    def couple_except(self, t: torch.Tensor, u: torch.Tensor, fixed: set[int] | range) -> None:
        """Same-shaped ``t`` and ``u``: dims in ``fixed`` are not prunable on either side (the
        op mixes elements along them), every other dim maps one to one."""
        for d in range(t.dim()):
            if d in fixed:
                self.fix(self.ids(t, d))
                self.fix(self.ids(u, d))
            else:
                self.union_dims(t, d, u, d)

    def union_all(self, a: np.ndarray) -> None:
        """All of ``a`` goes together."""
        if a.size > 1:
            self.union(a[:1], a[1:])

    def fix(self, a: np.ndarray) -> None:
        """These elements can never be removed."""
        if a.size:
            self.fixed.append(a.ravel())
            self.fixed_by.append(self.current)

    def soften(self, a: np.ndarray) -> None:
        """These elements feed a statistic over their dimension (see the module docstring)."""
        if a.size:
            self.soft.append(a.ravel())
            self.soft_by.append(self.current)

    def align(self, a: np.ndarray, multiple: int) -> None:
        """The dimension these elements make up must keep a multiple of ``multiple`` of them
        (a kernel's alignment, e.g. 16 bytes for ``grouped_mm``)."""
        if a.size and multiple > 1:
            self.aligned.append((a.ravel(), multiple))

    def soften_tensor(self, t: torch.Tensor, dims: list[int]) -> None:
        for d in dims:
            self.soften(self.ids(t, d))

    def fix_tensor(self, t: torch.Tensor, dims: list[int] | None = None) -> None:
        for d in range(t.dim()) if dims is None else dims:
            self.fix(self.ids(t, d))

    def mark_unknown(self, t: torch.Tensor, where: str) -> None:
        for d in range(t.dim()):
            self.unknown.append((self.ids(t, d), where))

    def add_macs(self, const: int, spaces: list[SpaceKey], where: str) -> None:
        self.macs.append(MacTerm(const, spaces, where))

    def components(self) -> np.ndarray:
        """The component label of every element (the smallest element id in its component)."""
        if not self.edges:
            return np.arange(self.count, dtype=np.int64)
        a = np.concatenate([e[0] for e in self.edges])
        b = np.concatenate([e[1] for e in self.edges])
        return connected_components(self.count, a, b)


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Labels of the connected components of the graph on ``n`` nodes with edges ``a[i]-b[i]``.

    Hook-and-shortcut (Shiloach-Vishkin) on NumPy arrays: every round hooks each edge's larger
    root under its smaller one, then compresses paths to stars; O(log n) rounds. Each
    component is labelled by its smallest node.
    """
    parent = np.arange(n, dtype=np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return parent
        a, b = a[differ], b[differ]  # edges inside one tree never matter again
        ra, rb = ra[differ], rb[differ]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
