"""Facts about the machine: a description recorded beside a benchmark's or training run's numbers, and the
process's memory mappings against the kernel's limit (each compiled XLA step on a CPU holds some)."""

from __future__ import annotations

import os
import platform
from typing import Any

import jax


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), e.g. 'AMD EPYC'; None where it is not readable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return None


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


def machine_info() -> dict[str, Any]:
    """Host, processor (and CPU model), CPU count, JAX backend and device kind, and the JAX version (JSON-able)."""
    return {
        "host": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
    }
