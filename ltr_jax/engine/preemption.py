"""How a preempted request resumes (imported by the engine loop, the config tree and the simulator; no JAX).

* ``"swap"``: its slot's K/V is copied out (within a memory budget) and a later insert continues where it stopped;
* ``"recompute"``: its prompt plus every token it produced is prefilled again.

`PreemptionConfig` holds the two keys (a part of the config tree's ``engine`` section).
"""

from __future__ import annotations

from dataclasses import dataclass

from ltr_jax.config_schema import setting

PREEMPT_MODES = ("swap", "recompute")


@dataclass(frozen=True)
class PreemptionConfig:
    preempt_mode: str = setting("swap", choices=PREEMPT_MODES, doc="how a preempted request resumes: 'swap' keeps "
                                "its K/V (within swap_budget_mb) and continues where it stopped; 'recompute' "
                                "re-prefills its prompt and every token it produced")
    swap_budget_mb: float = setting(512.0, ge=0, doc="memory for the K/V of preempted requests (preempt_mode "
                                                      "swap); past it a preempted request recomputes")
