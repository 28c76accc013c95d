"""The CPU features that decide which kernels the engines pick (read from /proc/cpuinfo, Linux;
elsewhere nothing is known and the engines decide alone)."""

from __future__ import annotations

import functools
import os
import platform

#: kernel-relevant flags, in rising order of what they enable for int8/bf16 matrix products
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@functools.cache
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and every flag /proc/cpuinfo lists (the platform's processor name and
    no flags when it cannot be read)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return model, flags


def cpu_flags() -> frozenset[str]:
    """The kernel-relevant flags this CPU reports (empty when /proc/cpuinfo cannot be read)."""
    return cpu_model_and_flags()[1] & frozenset(KERNEL_FLAGS)


def isa_summary(flags: frozenset[str] | None = None) -> str:
    """The best int8/bf16 instruction set: ``amx``, ``avx512-vnni``, ``avx-vnni``, ``avx512``,
    ``avx2``, or ``unknown``."""
    flags = cpu_flags() if flags is None else flags
    for name, needed in (
        ("amx", {"amx_int8", "amx_bf16"}),
        ("avx512-vnni", {"avx512_vnni"}),
        ("avx-vnni", {"avx_vnni"}),
        ("avx512", {"avx512f"}),
        ("avx2", {"avx2"}),
    ):
        if needed <= flags:
            return name
    return "unknown"


def default_threads(threads: int) -> int:
    """The thread count an engine given ``threads`` (0 = its default: every core) uses."""
    return threads if threads > 0 else (os.cpu_count() or 1)


#: the flags with which PyTorch's (oneDNN's) bfloat16 matrix products run natively (about twice
#: float32's speed; elsewhere they are emulated, slower than float32)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & frozenset(NATIVE_BF16_FLAGS))


#: the flags with which MLAS's u8 x s8 GEMM uses VNNI (no int16 saturation)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_gemm_saturates(machine: str, flags: frozenset[str]) -> bool:
    """True on an x86 CPU without VNNI, where MLAS's u8 x s8 GEMM adds product pairs in int16 and
    can saturate with 8-bit weights (targets/onnxruntime/dynamic_int8.py). Unknown flags on x86
    count as no VNNI."""
    return machine.lower() in ("x86_64", "amd64", "i386", "i686") and not flags & frozenset(VNNI_FLAGS)
