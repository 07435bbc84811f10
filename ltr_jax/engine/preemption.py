"""How a preempted request resumes (imported by the engine loop, the config tree and the simulator; no JAX).

* ``"swap"``: its slot's K/V is copied out (within a memory budget) and a later insert continues where it stopped;
* ``"recompute"``: its prompt plus every token it produced is prefilled again.
"""

PREEMPT_MODES = ("swap", "recompute")
