"""Facts about the machine: a description recorded beside a benchmark's or training run's numbers, the
process's memory mappings against the kernel's limit (each compiled XLA step on a CPU holds some), and its
resident memory (read, and handed back to the system after the allocation bursts of compiling)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Any

import jax


def _cpuinfo(field: str) -> str | None:
    """The first non-empty value of ``field`` in /proc/cpuinfo (Linux); None where it is not readable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == field and value.strip():
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str | None:
    """The CPU's model name, e.g. 'AMD EPYC'; None where it is not readable."""
    return _cpuinfo("model name")


# CPU features with bfloat16 matrix instructions (Intel AMX, AVX-512 BF16): with them XLA:CPU's bfloat16 matmuls of
# several rows beat float32 ones; without them they are far slower
BF16_MATMUL_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, e.g. 'avx2', 'amx_bf16'; empty where not readable."""
    return frozenset((_cpuinfo("flags") or "").split())


def memory_maps() -> tuple[int, int] | None:
    """(memory mappings this process holds, the kernel's per-process limit ``vm.max_map_count``), or None where
    /proc does not say (not Linux). Each program XLA compiles for a CPU maps its code and data; past the limit
    the next compile fails with "Cannot allocate memory" however much memory is free."""
    try:
        with open("/proc/sys/vm/max_map_count", encoding="ascii") as f:
            limit = int(f.read().strip())
        with open("/proc/self/maps", "rb") as f:
            used = sum(1 for _ in f)
    except (OSError, ValueError):
        return None
    return used, limit


def resident_mb(pid: int | None = None) -> float | None:
    """Resident memory in MiB of this process (or of process ``pid``); None where /proc does not say."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def release_free_memory() -> None:
    """Hand memory the C allocator holds but no longer uses back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). Compiling with XLA allocates and frees a lot on many threads; glibc keeps those pages otherwise."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def machine_info() -> dict[str, Any]:
    """Host, processor (and CPU model), CPU count, JAX backend and device kind, and the JAX version (JSON-able)."""
    return {
        "host": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_bf16_matmul": bool(cpu_flags() & BF16_MATMUL_FLAGS),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
    }
