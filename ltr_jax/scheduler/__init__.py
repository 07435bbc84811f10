"""Rank scheduler (pure Python, no JAX): requests, policies, the batch-slot scheduler and its simulator."""

from .policies import POLICY_NAMES, Policy, make_policy
from .request import Request, RequestState
from .scheduler import Decision, Scheduler, StarvationConfig

__all__ = [
    "POLICY_NAMES",
    "Decision",
    "Policy",
    "Request",
    "RequestState",
    "Scheduler",
    "StarvationConfig",
    "make_policy",
]
