"""The config system: YAML + --set overrides into the typed tree, and the errors it gives (also through the CLI)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from ltr_jax.config import ConfigError, EngineSection, ServeConfig, load_config
from ltr_jax.config_schema import apply_overrides, build_config, parse_override, setting

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ good configs
@pytest.mark.parametrize("name", ["serve_smollm2.yaml", "serve_tiny.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, ServeConfig)
    assert cfg.server.host == "127.0.0.1"
    assert cfg.engine.max_seq_len & (cfg.engine.max_seq_len - 1) == 0


def test_yaml_values_and_nested_sections(tmp_path):
    path = write(tmp_path, """
engine: {num_slots: 3, max_seq_len: 512}
scheduler:
  policy: fcfs
  starvation: {enabled: false, threshold_s: 2}
server: {request_timeout_s: null, port: 0}
""")
    cfg = load_config(path)
    assert cfg.engine.num_slots == 3 and cfg.engine.max_seq_len == 512
    assert cfg.scheduler.policy == "fcfs"
    assert cfg.scheduler.starvation.enabled is False
    assert cfg.scheduler.starvation.threshold_s == 2.0 and isinstance(cfg.scheduler.starvation.threshold_s, float)
    assert cfg.server.request_timeout_s is None and cfg.server.port == 0
    assert cfg.engine.to_engine_config().max_seq_len == 512
    assert cfg.scheduler.starvation.enabled is False


@pytest.mark.parametrize("text,key,value", [
    ("server.port=9000", "server.port", 9000),
    ("a.b=true", "a.b", True),
    ("model.source=null", "model.source", None),
    ("x.y=1.5", "x.y", 1.5),
    ("x.y=hello world", "x.y", "hello world"),
    ("x.y='007'", "x.y", "007"),
    ("x.y=", "x.y", ""),
    ("x.y=a=b", "x.y", "a=b"),
])
def test_parse_override_values_are_yaml_scalars(text, key, value):
    assert parse_override(text) == (key, value)


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1", ".a=1"])
def test_parse_override_rejects_malformed(bad):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override(bad)


def test_overrides_apply_in_order_and_create_sections():
    raw = {"server": {"port": 1}}
    out = apply_overrides(raw, ["server.port=2", "server.port=3", "scheduler.starvation.enabled=false"])
    assert out == {"server": {"port": 3}, "scheduler": {"starvation": {"enabled": False}}}
    assert raw == {"server": {"port": 1}}  # the input is not modified


def test_set_overrides_the_file(tmp_path):
    path = write(tmp_path, "engine: {num_slots: 3}\nscheduler: {policy: fcfs}\n")
    cfg = load_config(path, ["engine.num_slots=5", "scheduler.policy=ltr-rescore",
                             "scheduler.policy_params.min_samples=8", "server.api_key=s3cret"])
    assert cfg.engine.num_slots == 5
    assert cfg.scheduler.policy == "ltr-rescore"
    assert cfg.scheduler.make_policy().min_samples == 8
    assert cfg.server.api_key == "s3cret"


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("overrides,key,fragment", [
    (["engine.num_slot=3"], "engine.num_slot", "did you mean 'num_slots'"),
    (["bogus.x=1"], "bogus", "allowed keys in the config: model, engine"),
    (["engine.num_slots=0"], "engine.num_slots", ">= 1"),
    (["engine.num_slots=four"], "engine.num_slots", "must be an integer"),
    (["engine.num_slots=2.5"], "engine.num_slots", "must be an integer"),
    (["engine.num_slots=true"], "engine.num_slots", "must be an integer"),
    (["engine.max_seq_len=1000"], "engine.max_seq_len", "power of two"),
    (["engine.min_prefill_bucket=4096"], "engine.min_prefill_bucket", "<= engine.max_seq_len"),
    (["scheduler.policy=sjf"], "scheduler.policy", "'fcfs', 'ltr'"),
    (["scheduler.policy=oracle-sjf"], "scheduler.policy", "only run in benchmarks"),
    (["scheduler.policy_params.max_preemptions=-1"], "scheduler.policy_params.max_preemptions", ">= 0"),
    (["scheduler.policy_params.speed=3"], "scheduler.policy_params.speed", "valid parameters"),
    (["scheduler.starvation.threshold_s=0"], "scheduler.starvation.threshold_s", "> 0"),
    (["scheduler.starvation.enabled=yes please"], "scheduler.starvation.enabled", "true/false"),
    (["server.port=70000"], "server.port", "<= 65535"),
    (["server.max_queue=0"], "server.max_queue", ">= 1"),
    (["server.request_timeout_s=-1"], "server.request_timeout_s", "> 0"),
    (["server.default_max_tokens=5000"], "server.default_max_tokens", "< engine.max_seq_len"),
    (["server=3"], "server", "mapping"),
    (["logging.level=LOUD"], "logging.level", "'DEBUG', 'INFO'"),
    (["model.dtype=float8"], "model.dtype", "'float32', 'bfloat16'"),
    (["scheduler.policy=classify", "ranker.enabled=false"], "ranker.enabled", "classify"),
    (["ranker.max_batch=0"], "ranker.max_batch", ">= 1"),
])
def test_bad_values_name_the_dotted_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert key in message, message
    assert fragment in message, message
    assert info.value.key == key


def test_error_says_where_the_value_came_from(tmp_path):
    path = write(tmp_path, "engine: {num_slots: 0}\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: engine\.num_slots = 0"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set engine\.num_slots=-4: engine\.num_slots = -4"):
        load_config(path, ["engine.num_slots=-4"])


@pytest.mark.parametrize("text,fragment", [
    ("engine: [1, 2]\n", "engine = [1, 2] is not allowed: must be a mapping"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("engine: {num_slots: 3\n", "not valid YAML"),
])
def test_malformed_files(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text))


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/serve.yaml")


def test_generic_core_with_another_schema():
    """Other CLIs reuse the core with their own dataclasses: required keys, lists, nested sections."""

    @dataclasses.dataclass
    class Bench:
        name: str
        rates: list[float] = dataclasses.field(default_factory=lambda: [1.0])
        engine: EngineSection = dataclasses.field(default_factory=EngineSection)
        repeats: int = setting(3, ge=1, le=10)

    cfg = build_config(Bench, {"name": "x", "rates": [1, 2.5], "engine": {"num_slots": 2}})
    assert cfg.rates == [1.0, 2.5] and cfg.engine.num_slots == 2
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        build_config(Bench, {})
    with pytest.raises(ConfigError, match=r"rates\[1\] = 'fast' is not allowed: each item must be a number"):
        build_config(Bench, {"name": "x", "rates": [1, "fast"]})
    with pytest.raises(ConfigError, match=r"repeats = 11 is not allowed: must be >= 1 and <= 10"):
        build_config(Bench, {"name": "x", "repeats": 11})
    with pytest.raises(ConfigError, match=r"unknown key 'engine\.slots'"):
        build_config(Bench, {"name": "x", "engine": {"slots": 2}})


# ------------------------------------------------------------------------------------------------ the CLI
def run_serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ltr_jax.serve", *args], capture_output=True, text=True, check=False,
                          timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("args,fragment", [
    (["--set", "engine.num_slotz=4"], "unknown key 'engine.num_slotz' (did you mean 'num_slots'?)"),
    (["--set", "scheduler.policy=shortest"], "scheduler.policy = 'shortest' is not allowed"),
    (["--config", "configs/serve_tiny.yaml", "--set", "server.port=-1"], "server.port = -1 is not allowed"),
    (["--config", "/nonexistent.yaml"], "does not exist"),
])
def test_cli_config_errors_exit_2_without_traceback(args, fragment):
    proc = run_serve(*args)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1  # one line


def test_cli_print_config_applies_overrides():
    proc = run_serve("--config", "configs/serve_tiny.yaml", "--set", "engine.num_slots=7",
                     "--set", "server.request_timeout_s=null", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert "num_slots: 7" in proc.stdout
    assert "request_timeout_s: null" in proc.stdout
    assert "source: tiny" in proc.stdout


def test_cli_help_config_lists_every_key():
    proc = run_serve("--help-config")
    assert proc.returncode == 0
    for key in ("model.source", "engine.num_slots", "scheduler.starvation.threshold_s", "ranker.checkpoint",
                "server.max_queue", "server.api_key", "logging.level"):
        assert key in proc.stdout


def test_cli_unloadable_model_exits_2_naming_model_source(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"NOTGGUF" * 10)
    proc = run_serve("--config", "configs/serve_tiny.yaml", "--set", f"model.source={bogus}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.source" in proc.stderr and "not a GGUF file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_required_ranker_exits_2_naming_ranker_checkpoint(tmp_path):
    proc = run_serve("--config", "configs/serve_tiny.yaml", "--set", "ranker.enabled=true",
                     "--set", f"ranker.checkpoint={tmp_path / 'no_ranker_here'}", "--set", "ranker.required=true",
                     timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ranker.checkpoint" in proc.stderr and "no exported ranker there" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ranker_batch_is_one_prompt_per_pass_on_a_cpu_unless_set():
    ranker = load_config(None, []).ranker
    assert ranker.max_batch is None
    assert (ranker.ranker_batch("cpu"), ranker.ranker_batch("gpu"), ranker.ranker_batch("tpu")) == (1, 32, 32)
    assert load_config(None, ["ranker.max_batch=8"]).ranker.ranker_batch("cpu") == 8
