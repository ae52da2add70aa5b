"""Which floating-point type an engine computes in.

vLLM-CPU runs bf16 fast only where the CPU has native bf16 (AVX-512 BF16 or AMX, or the Arm bf16
extension); elsewhere bf16 is emulated: on a 2-core AMD EPYC with AVX2 only, SmolLM2-135M generated 32
output tok/s in bf16 against 120 in fp32. So `dtype: auto` means bf16 on CPUs with native bf16 and fp32
on the others; on GPUs it stays the engine's own auto (the checkpoint's dtype, fp32 halved). An explicit
dtype is always kept. `SPHUATUO_CPU_DTYPE` (float32 / bfloat16) overrides the CPU choice, e.g. to time on
a bf16 machine what an AVX2 machine runs.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import cache

from sphuatuo.recipe import EngineConfig

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (AVX-512 BF16, AMX) and Arm ("bf16" feature)
OVERRIDE = "SPHUATUO_CPU_DTYPE"


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    reason: str


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (x86 `flags`, Arm `Features`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_dtype(flags: frozenset[str] | None = None) -> DtypeChoice:
    """What `dtype: auto` runs in on this CPU, and why."""
    forced = os.environ.get(OVERRIDE)
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"{OVERRIDE}={forced!r}: use float32 or bfloat16")
        return DtypeChoice(forced, f"forced by {OVERRIDE}")
    flags = cpu_flags() if flags is None else flags
    native = sorted(set(NATIVE_BF16_FLAGS) & flags)
    if native:
        return DtypeChoice("bfloat16", f"the CPU has native bf16 ({', '.join(native)})")
    return DtypeChoice("float32", f"no native bf16 on this {platform.machine()} CPU (bf16 would be emulated, "
                                  "about 4x slower than fp32)")


def engine_dtype(engine: EngineConfig) -> str:
    """The dtype to start `engine` with: its own unless it is `auto` on a CPU engine."""
    if engine.dtype != "auto" or engine.gpus_per_replica > 0:
        return engine.dtype
    return cpu_dtype().dtype
