"""A description of the machine a benchmark or training run measured on, recorded beside its numbers."""

from __future__ import annotations

import os
import platform
from typing import Any

import jax


def machine_info() -> dict[str, Any]:
    """Host, processor, CPU count, JAX backend and device kind, and the JAX version (JSON-able)."""
    return {
        "host": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
    }
