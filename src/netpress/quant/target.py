"""INT8 deployment targets: which CPU an integer model will run on, and what its weights must be.

ONNX Runtime's uint8 × int8 kernels compute exactly on x86 CPUs with VNNI and on ARM64, but on
x86 CPUs without VNNI (AVX2, or AVX-512 without VNNI) they add adjacent pairs of products in
16 bits with saturation (see :mod:`netpress.quant.saturation`). A target says how
``Quantize`` shapes the weights of layers that run as integer kernels, so that the deployed
model computes exactly what the fake-quant PyTorch model computes:

=============  ==========================================================================
``x86-vnni``   full int8 codes ``[-127, 127]`` (exact on VNNI and ARM64 only)
``arm64``      full int8 codes (exact on ARM64 and VNNI only)
``x86-avx2``   int8 codes whose adjacent same-sign pairs, in the order x86 kernels read them,
               stay within ``|w0| + |w1| <= 128`` (exact on every CPU above)
``generic``    codes within ``[-64, 64]`` (7-bit, as ``reduce_range``): exact whatever order
               a u8×s8 kernel pairs them in
=============  ==========================================================================

``"auto"`` picks the target of the CPU netpress runs on (:func:`host_target`). Detection is a
pure function of the CPU flags (:func:`detect_target`); the flags come from CPUID itself on
x86-64 (what ONNX Runtime reads too), else from ``/proc/cpuinfo``.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from netpress.quant.saturation import (
    from_kernel_rows,
    is_depthwise,
    kernel_rows,
    limit_pairs,
    pair_limit,
    pair_safe_scale,
    saturating_pairs,
)

__all__ = ["TARGETS", "TARGET_CHOICES", "TargetMismatchWarning", "WeightRule", "WEIGHT_RULES",
           "detect_target", "cpu_flags", "host_target", "resolve_target", "min_weight_scale",
           "apply_weight_rule", "exact_on", "depthwise_layer"]

TARGETS = ("x86-vnni", "x86-avx2", "arm64", "generic")
TARGET_CHOICES = ("auto", *TARGETS)


class TargetMismatchWarning(UserWarning):
    """An INT8 model runs (or is exported) on a CPU whose kernels would change its outputs."""


@dataclass(frozen=True)
class WeightRule:
    """What integer weight codes may be for a target: ``|code| <= max_code`` and, when
    ``pair_limit`` is set, every same-sign adjacent pair (kernel order) within it."""

    max_code: int
    pair_limit: int | None = None


WEIGHT_RULES = {
    "x86-vnni": WeightRule(127),
    "arm64": WeightRule(127),
    "x86-avx2": WeightRule(127, pair_limit(255)),
    "generic": WeightRule(64),
}

_X86 = {"x86_64", "amd64", "i386", "i486", "i586", "i686", "x86"}
_ARM64 = {"aarch64", "arm64", "armv8", "armv8l"}
_VNNI = {"avx512_vnni", "avx_vnni", "amx_int8"}
_SATURATING = {"avx2", "avx512bw"}


def detect_target(flags: Iterable[str], machine: str) -> str:
    """The target of a CPU with these feature ``flags`` (``/proc/cpuinfo`` names) and
    ``platform.machine()``: VNNI or AMX → ``x86-vnni``; AVX2 or AVX-512BW without them →
    ``x86-avx2``; ARM64 → ``arm64``; anything else (older x86, other architectures) →
    ``generic``."""
    arch = machine.lower()
    if arch in _ARM64:
        return "arm64"
    if arch not in _X86:
        return "generic"
    names = {f.lower() for f in flags}
    if names & _VNNI:
        return "x86-vnni"
    return "x86-avx2" if names & _SATURATING else "generic"


# cpuid(leaf=edi, subleaf=esi) -> the uint32[4] at rdx: eax, ebx, ecx, edx (System V x86-64)
_CPUID_CODE = bytes.fromhex("53" "89f8" "89f1" "4989d0" "0fa2" "418900" "41895804" "41894808"
                            "4189500c" "5b" "c3")
_CPUID_BITS = {  # (leaf, subleaf, register index, bit) -> /proc/cpuinfo flag name
    (7, 0, 1, 5): "avx2", (7, 0, 1, 30): "avx512bw", (7, 0, 2, 11): "avx512_vnni",
    (7, 0, 3, 25): "amx_int8", (7, 1, 0, 4): "avx_vnni"}


def _cpuid_flags() -> frozenset[str] | None:
    """The flags above read with the CPUID instruction (x86-64 Linux/macOS), or None."""
    if platform.machine().lower() not in {"x86_64", "amd64"} or sys.platform == "win32":
        return None
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE |
                        mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError):  # W^X kernels refuse executable maps
        return None
    try:
        buf.write(_CPUID_CODE)
        holder = ctypes.c_char.from_buffer(buf)
        regs = (ctypes.c_uint32 * 4)()
        fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32,
                              ctypes.POINTER(ctypes.c_uint32 * 4))(ctypes.addressof(holder))
        fn(0, 0, ctypes.byref(regs))
        top = regs[0]
        found = set()
        for (leaf, sub, reg, bit), name in _CPUID_BITS.items():
            if leaf <= top:
                fn(leaf, sub, ctypes.byref(regs))
                if regs[reg] >> bit & 1:
                    found.add(name)
        del fn, holder
        return frozenset(found)
    finally:
        buf.close()


def _proc_cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """This CPU's flags relevant to integer kernels (CPUID on x86-64, else /proc/cpuinfo)."""
    flags = _cpuid_flags()
    return flags if flags is not None else _proc_cpuinfo_flags()


@functools.lru_cache(maxsize=1)
def host_target() -> str:
    """The target of the CPU this process runs on (detected once)."""
    return detect_target(cpu_flags(), platform.machine())


def resolve_target(target: str) -> str:
    """``target`` itself, or the host's target for ``"auto"``."""
    return host_target() if target == "auto" else target


def depthwise_layer(layer: nn.Module) -> bool:
    """Whether ``layer`` is a depthwise Conv2d (ONNX Runtime's exact depthwise kernel)."""
    return isinstance(layer, nn.Conv2d) and is_depthwise(
        layer.in_channels // layer.groups, layer.out_channels // layer.groups)


def min_weight_scale(weight: torch.Tensor, target: str, *,
                     depthwise: bool = False) -> torch.Tensor:
    """Per-output-channel smallest scale whose round-to-nearest codes obey ``target``'s rule
    (zeros where the rule asks nothing beyond int8)."""
    rule = WEIGHT_RULES[target]
    rows = kernel_rows(weight.detach().float())
    need = rows.abs().amax(1) / rule.max_code if rule.max_code < 127 else \
        torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)
    if rule.pair_limit is not None and not depthwise:
        need = pair_safe_scale(rows, need, rule.pair_limit)
    return need


def apply_weight_rule(codes: torch.Tensor, target: str, *, depthwise: bool = False,
                      ) -> torch.Tensor:
    """Integer ``codes`` made to obey ``target``'s rule (unchanged when they already do)."""
    rule = WEIGHT_RULES[target]
    out = codes.clamp(-rule.max_code, rule.max_code)
    if rule.pair_limit is not None and not depthwise:
        out = from_kernel_rows(limit_pairs(kernel_rows(out), rule.pair_limit), codes.shape)
    return out


def exact_on(cpu: str, codes: torch.Tensor, *, depthwise: bool = False) -> bool:
    """Whether integer weight ``codes`` compute exactly on a CPU of kind ``cpu`` whatever the
    uint8 activations: always on VNNI and ARM64; on AVX2 when no pair can saturate; on an
    unknown CPU (``generic``) when every code is within ``[-64, 64]``."""
    if cpu in ("x86-vnni", "arm64"):
        return True
    if cpu == "x86-avx2":
        return depthwise or not bool(saturating_pairs(kernel_rows(codes)).any())
    return bool(codes.abs().max() <= WEIGHT_RULES["generic"].max_code)
