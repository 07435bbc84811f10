"""A description of the machine a benchmark or training run measured on, recorded beside its numbers."""

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
