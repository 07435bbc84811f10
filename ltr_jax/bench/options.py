"""Command-line options shared by `bench run` (real engine) and `bench simulate` (discrete-event simulator).

Owns the policy names and the options both commands take in the same sense, so the two reports stay comparable:
policies, request rates, gamma CV, the preemption cap and resume mode, starvation control, seed and output directory.

The options that are config keys are shorthands into the one config tree (`ltr_jax.config.EngineRunConfig`): they
default to nothing, `--config FILE` and `--set KEY=VALUE` are read by the same loader as ``serve``, a shorthand given
on the command line is one more ``--set``, and `resolve_config` writes the resolved values back into the namespace.
So a benchmark's defaults are the server's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from ltr_jax.config import ConfigError, EngineRunConfig, load_config
from ltr_jax.engine.preemption import PREEMPT_MODES
from ltr_jax.scheduler.policies import DEFAULT_MAX_PREEMPTIONS
from ltr_jax.scheduler.starvation import STARVATION_RULES, StarvationConfig

POLICIES = ("fcfs", "ltr", "ltr+starvation", "ltr-rescore", "classify", "oracle-sjf", "oracle-srtf")
DEFAULT_POLICIES = "fcfs,ltr,ltr+starvation,classify,oracle-sjf"


@dataclass(frozen=True)
class Shorthand:
    """A command-line option that sets one config key (``dest`` in the namespace, ``key`` in the tree)."""

    dest: str
    key: str


SHARED_SHORTHANDS = (
    Shorthand("max_preemptions", "scheduler.policy_params.max_preemptions"),
    Shorthand("preempt_mode", "engine.preempt_mode"),
    Shorthand("starvation_rule", "scheduler.starvation.rule"),
    Shorthand("starvation_slack", "scheduler.starvation.slack_s"),
    Shorthand("starvation_slack_share", "scheduler.starvation.slack_share"),
    Shorthand("starvation_estimate_sds", "scheduler.starvation.estimate_sds"),
    Shorthand("starvation_threshold", "scheduler.starvation.threshold_s"),
    Shorthand("starvation_quantum", "scheduler.starvation.quantum_s"),
    Shorthand("starvation_requeue", "scheduler.starvation.requeue_after_quantum"),
)


def add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config of the engine, scheduler and ranker keys (the "
                   "sections `serve` reads; default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set ranker.state_budget_mb=512 (repeatable)")


def add_shared_options(p: argparse.ArgumentParser, *, rates: str) -> None:
    add_config_options(p)
    p.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated, from {', '.join(POLICIES)}")
    p.add_argument("--rates", default=rates, help="comma-separated Poisson/gamma request rates (req/s)")
    p.add_argument("--cv", type=float, default=2.0, help="coefficient of variation of gamma inter-arrival times")
    p.add_argument("--max-preemptions", type=int, default=None, help="per request, for every preemptive policy "
                   "(0 = the policy never displaces a running request; starvation promotions still may); sets "
                   "scheduler.policy_params.max_preemptions (default: the policy's own, "
                   f"{DEFAULT_MAX_PREEMPTIONS})")
    p.add_argument("--preempt-mode", default=None, choices=PREEMPT_MODES,
                   help="how a preempted request resumes: 'swap' keeps its K/V and continues where it stopped; "
                   "'recompute' re-prefills its prompt and every token it produced (engine.preempt_mode)")
    p.add_argument("--starvation-rule", default=None, choices=STARVATION_RULES,
                   help="ltr+starvation's rule (scheduler.starvation.rule): 'fcfs-slack' promotes a request once "
                   "it has waited longer than FCFS would have made a request arriving during its wait wait (estimated "
                   "online), plus the slack; "
                   "'threshold' after --starvation-threshold seconds of waiting, for --starvation-quantum "
                   "(default: the config's, fcfs-slack; 'threshold' when --starvation-threshold is given)")
    p.add_argument("--starvation-slack", type=float, default=None,
                   help="fcfs-slack: the promise's slack: seconds a request may wait beyond FCFS's delay "
                   "(scheduler.starvation.slack_s; the rule promotes scheduler.starvation.slack_reserve of it early)")
    p.add_argument("--starvation-slack-share", type=float, default=None,
                   help="fcfs-slack: the slack is the larger of --starvation-slack and this share of FCFS's delay "
                   "(scheduler.starvation.slack_share)")
    p.add_argument("--starvation-estimate-sds", type=float, default=None,
                   help="fcfs-slack: FCFS's delay is estimated this many standard deviations of the unstarted "
                   "requests' work below its expectation (scheduler.starvation.estimate_sds)")
    p.add_argument("--starvation-threshold", type=threshold_arg, default=None,
                   help="threshold rule: seconds a request may wait (before its first token, or between tokens) "
                   "before ltr+starvation promotes it (scheduler.starvation.threshold_s); or 'fcfs': the worst "
                   "max_waiting_time of this invocation's fcfs run at the same rate (known only after the fact: "
                   "for comparison)")
    p.add_argument("--starvation-quantum", type=float, default=None,
                   help="threshold rule: seconds a promoted request keeps its priority "
                   "(scheduler.starvation.quantum_s)")
    p.add_argument("--starvation-requeue", action=argparse.BooleanOptionalAction, default=None,
                   help="threshold rule: when a promoted request's quantum ends it is back in rank order, and a "
                   "better-ranked waiting request may take its slot (it resumes later); off: a promotion runs it "
                   "to its end (scheduler.starvation.requeue_after_quantum)")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals, prompt sampling and sampling")
    p.add_argument("--out", default=None, help="directory for report.json, report.md and PNG plots")


def lookup(tree: Any, key: str) -> Any:
    """The value at dotted ``key`` of a config tree (a policy parameter left out: the configured policy's own)."""
    section, _, name = key.rpartition(".")
    if section == "scheduler.policy_params":
        return getattr(tree.scheduler.make_policy(), name)
    node = tree
    for part in key.split("."):
        node = getattr(node, part)
    return node


def resolve_config(p: argparse.ArgumentParser, args: argparse.Namespace,
                   shorthands: tuple[Shorthand, ...]) -> EngineRunConfig:
    """Read ``--config`` and ``--set`` plus every shorthand given into the tree; write each shorthand's resolved
    value back into ``args`` (``args.config_tree`` holds the tree). A bad key or value exits with its message."""
    overrides = list(args.overrides)
    if getattr(args, "starvation_threshold", None) is not None and getattr(args, "starvation_rule", None) is None:
        overrides.append("scheduler.starvation.rule=threshold")  # a threshold given asks for the threshold rule
    for sh in shorthands:
        value = getattr(args, sh.dest)
        if value is not None and not (sh.dest == "starvation_threshold" and value == "fcfs"):
            overrides.append(f"{sh.key}={json.dumps(value)}")  # JSON is YAML: the loader reads it back typed
    try:
        tree = load_config(args.config, overrides, EngineRunConfig)
    except ConfigError as err:
        p.error(str(err))
    for sh in shorthands:
        if not (sh.dest == "starvation_threshold" and getattr(args, sh.dest) == "fcfs"):
            setattr(args, sh.dest, lookup(tree, sh.key))
    args.config_tree = tree
    return tree


def threshold_arg(text: str) -> float | str:
    if text == "fcfs":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of seconds nor 'fcfs'") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def resolve_threshold(args: argparse.Namespace, results: dict[str, Any]) -> float:
    """The starvation threshold for this rate: the number given, or the fcfs run's worst max_waiting_time."""
    if args.starvation_threshold != "fcfs":
        return float(args.starvation_threshold)
    worst = results["fcfs"]["max_waiting_time_s"]["max"]
    return max(math.ceil(worst * 10) / 10, 0.1)


def starvation_config(args: argparse.Namespace, threshold_s: float | None = None) -> StarvationConfig:
    """ltr+starvation's control: the config tree's section with the shorthands' resolved values (a replayed run
    may have set them from its report) and the threshold rule's threshold resolved for this rate
    (`resolve_threshold`)."""
    values = {"rule": args.starvation_rule, "slack_s": args.starvation_slack,
              "slack_share": args.starvation_slack_share, "estimate_sds": args.starvation_estimate_sds,
              "quantum_s": args.starvation_quantum,
              "requeue_after_quantum": args.starvation_requeue}
    if threshold_s is not None:
        values["threshold_s"] = float(threshold_s)
    elif args.starvation_threshold != "fcfs":
        values["threshold_s"] = float(args.starvation_threshold)
    return dataclasses.replace(args.config_tree.scheduler.starvation, **values)


def starvation_report(args: argparse.Namespace) -> dict[str, Any]:
    """The starvation settings a report records (the threshold as given: a number or 'fcfs')."""
    described = starvation_config(args).describe()
    if described["rule"] == "threshold":
        described["threshold_s"] = args.starvation_threshold
    return described


def check_policies(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    policies = args.policies.split(",")
    bad = [x for x in policies if x not in POLICIES]
    if bad:
        p.error(f"unknown policies {bad}; choose from {', '.join(POLICIES)}")
    if (args.starvation_threshold == "fcfs" and "ltr+starvation" in policies
            and ("fcfs" not in policies or policies.index("fcfs") > policies.index("ltr+starvation"))):
        p.error("--starvation-threshold fcfs needs fcfs listed before ltr+starvation in --policies")
