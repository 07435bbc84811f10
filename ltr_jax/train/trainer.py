"""The ranker training recipe: config, head training for each method, and the end-to-end run.

`run_training(config)` does: load the serving model and its tokenizer, load prompts and labels (a label file
from the labeling job, else trace lengths of the references), render prompts with the chat template, split by
id hash, compute (or reuse) frozen backbone features, train one head per method (ListMLE over lists of
``list_size`` prompts; regression and bucket classification over minibatches of the same size), evaluate each on
the held-out split, and export the chosen method's head with Orbax.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ltr_jax.config_schema import ConfigError, build_config, check_settings, load_config, setting
from ltr_jax.models.ranker import METHODS, POOLINGS, RankerHead, RankerSpec, scores_from_outputs
from ltr_jax.train import data as train_data
from ltr_jax.train import losses
from ltr_jax.train.features import FeatureSet, cached_features
from ltr_jax.train.metrics import evaluation, source_prior, tau_b

# Relative paths in a YAML config resolve against the project root: the folder that holds the ltr_jax package
# (the repository root in a checkout), wherever the command is run from.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _each_method(methods: list[str]) -> str | None:
    if not methods:
        return "give at least one of " + ", ".join(METHODS)
    bad = [m for m in methods if m not in METHODS]
    return f"unknown method {bad[0]!r} (choose from {list(METHODS)})" if bad else None


def _each_length_field(fields: list[str]) -> str | None:
    return next((f"{f!r}: {p}" for f in fields if (p := train_data.check_length_field(f))), None)


def _positive_dims(dims: list[int]) -> str | None:
    return None if all(d > 0 for d in dims) else "every hidden width must be > 0"


@dataclass
class OptimizerConfig:
    name: str = setting("adamw", choices=("adamw", "adam", "sgd"), doc="optax optimizer")
    lr: float = setting(1e-3, ge=0, doc="peak learning rate (0 = the head stays as it starts)")
    weight_decay: float = setting(0.01, ge=0, doc="decoupled weight decay (adamw)")
    schedule: str = setting("cosine", choices=("cosine", "constant"), doc="cosine: decay to 0 over training")
    warmup_steps: int = setting(20, ge=0, doc="linear warm-up steps")


@dataclass
class TrainConfig:
    """Everything one training run needs (YAML keys are these field names; `ltr_jax.config_schema` checks them)."""

    name: str = setting("ranker", doc="run name in the report")
    model: str | None = setting(None, doc="serving model (load_model source): null = embedded SmolLM2, a .gguf or "
                                          "a Hugging Face directory")
    prompts: str | None = setting(None, doc="null/'shared' = ../shared/data/prompts.jsonl; a JSON/JSONL path; "
                                            "'tfds:NAME'")
    labels: str | None = setting(None, doc="label JSONL from the labeling job; null = token counts of the answers "
                                           "named by `lengths`")
    lengths: str = setting("reference", check=train_data.check_length_field,
                           doc="without a label file, the answer whose token count is a prompt's length: "
                               "'reference' or 'outputs.NAME' (e.g. outputs.llama3-8b)")
    extra_lengths: list[str] = setting(default_factory=list, check=_each_length_field,
                                       doc="more answers of the same prompts (e.g. outputs.llama3-70b) whose lengths "
                                           "train as extra lists; validation and export metrics use `lengths` only")
    methods: list[str] = setting(default_factory=lambda: list(METHODS), check=_each_method,
                                 doc="heads to train: " + ", ".join(METHODS))
    n_layers: int = setting(4, ge=1, doc="backbone layers the ranker's features come from")
    pooling: str = setting("mean", choices=POOLINGS, doc="how a prompt's hidden states become one feature")
    hidden_dims: list[int] = setting(default_factory=lambda: [128], check=_positive_dims, doc="MLP head widths")
    max_prompt_len: int = setting(512, ge=1, doc="prompt tokens the ranker reads (longer prompts are cut)")
    list_size: int = setting(32, ge=1, doc="prompts per ListMLE list (and per minibatch of the other methods)")
    lists_per_step: int = setting(1, ge=1, doc="lists per optimizer step (1 = one list per step, as the paper)")
    epochs: int = setting(30, ge=1)
    seed: int = setting(0, ge=0)
    num_buckets: int = setting(losses.NUM_BUCKETS, ge=2, doc="length buckets of the classify head")
    bucket_scheme: str = setting("quantile", choices=("quantile", "uniform"),
                                 doc="classify bucket edges: quantiles of training lengths, or uniform width")
    val_fraction: float = setting(0.1, gt=0, check=lambda v: None if v < 1 else "must be < 1",
                                  doc="held-out share of prompts (split by id hash)")
    cv_folds: int = setting(0, ge=0, check=lambda v: "must be 0 (off) or an integer >= 2" if v == 1 else None,
                            doc="> 1: also report k-fold cross-validated tau-b over the training split")
    split_salt: str = setting(train_data.DEFAULT_SPLIT_SALT, doc="salt of the id-hash train/validation split")
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    feature_cache_dir: str | None = setting("default", doc="'default' = <user cache>/ranker_features; null = none")
    token_budget: int = setting(4096, ge=1, doc="prompt tokens per backbone batch while computing features")
    export_method: str | None = setting("listmle", doc="which head to export (null = export nothing)")
    export_path: str | None = setting(None, doc="where to export it; relative paths resolve against the project root")

    def __post_init__(self) -> None:
        if isinstance(self.optimizer, dict):  # direct construction, e.g. TrainConfig(optimizer={"lr": 0.01})
            self.optimizer = build_config(OptimizerConfig, self.optimizer, "optimizer")
        check_settings(self)
        self.validate()

    def validate(self) -> None:
        """The checks that involve more than one key (each key's own range is checked by its `setting`)."""
        if self.export_method is not None and self.export_method not in self.methods:
            raise ConfigError.at("export_method", self.export_method,
                                 f"must be one of the trained methods {self.methods} (or null)")
        if self.labels and (self.lengths != "reference" or self.extra_lengths):
            raise ConfigError("lengths, extra_lengths: a label file gives the lengths; set `labels: null` to count "
                              "answer tokens instead", "lengths")
        if self.export_method is not None and not self.export_path:
            raise ConfigError("export_path: required when export_method is set (or set export_method: null)",
                              "export_path")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base_dir: Path | None = None) -> TrainConfig:
        """Build from a mapping; relative paths resolve against ``base_dir`` (None: left as given)."""
        return build_config(cls, _resolve_paths(raw, base_dir) if base_dir is not None else raw)

    def to_portable_dict(self) -> dict[str, Any]:
        """The config as plain data, with project paths relative to the project root (for export metadata)."""
        d = dataclasses.asdict(self)
        return {k: _portable(v) if isinstance(v, str) else v for k, v in d.items()}

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: Iterable[str] = ()) -> TrainConfig:
        """``path`` (None = the defaults) plus ``--set`` style ``overrides``; relative paths resolve against the
        project root."""
        return load_config(path, overrides, cls, prepare=lambda raw: _resolve_paths(raw, PROJECT_ROOT))


def _resolve_paths(raw: Any, base_dir: Path) -> Any:
    """``raw`` with its relative file paths made absolute against ``base_dir`` ('shared', 'default' and tfds: names
    are not paths)."""
    if not isinstance(raw, dict):
        return raw  # build_config names the problem
    raw = dict(raw)
    for key in ("export_path", "labels", "prompts", "feature_cache_dir"):
        value = raw.get(key)
        if not isinstance(value, str) or not value or value in ("shared", "default") or value.startswith("tfds:"):
            continue
        path = Path(value).expanduser()
        raw[key] = str(path if path.is_absolute() else (base_dir / path).resolve())
    return raw


# ------------------------------------------------------------------------------------------------ head training
@dataclass
class HeadResult:
    method: str
    head: RankerHead
    spec: RankerSpec
    train_seconds: float
    final_loss: float


def _portable(text: str) -> str:
    """Paths inside the project written relative to its root (no machine-specific prefixes in exports)."""
    return text.replace(str(PROJECT_ROOT) + "/", "")


def _targets(method: str, lengths: np.ndarray, edges: np.ndarray | None, log_mean: float, log_std: float
             ) -> np.ndarray:
    if method == "listmle":
        return lengths.astype(np.float32)
    if method == "regression":
        return ((np.log1p(lengths) - log_mean) / log_std).astype(np.float32)
    return np.asarray(losses.bucketize(lengths, edges), np.float32)


def _make_optimizer(opt: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    if opt.schedule == "cosine":
        warmup = min(opt.warmup_steps, max(total_steps // 10, 1))
        lr = optax.warmup_cosine_decay_schedule(0.0, opt.lr, warmup, max(total_steps, warmup + 1))
    else:
        lr = opt.lr
    if opt.name == "adamw":
        return optax.adamw(lr, weight_decay=opt.weight_decay)
    if opt.name == "adam":
        return optax.adam(lr)
    return optax.sgd(lr)


def _list_order(groups: Sequence[np.ndarray], size: int, per_step: int, pad: int, rng: np.random.Generator
                ) -> np.ndarray:
    """One epoch's [steps, per_step, size] row indices: each group's rows shuffled and cut into lists of ``size``
    (a list never mixes groups), the lists shuffled; ``pad`` fills the short last list of a group and the last
    step."""
    lists = []
    for rows in groups:
        perm = rng.permutation(rows)
        filled = np.full((-(-len(perm) // size) * size,), pad)
        filled[:len(perm)] = perm
        lists.append(filled.reshape(-1, size))
    stacked = np.concatenate(lists)[rng.permutation(sum(len(x) for x in lists))]
    steps = -(-len(stacked) // per_step)
    out = np.full((steps * per_step, size), pad)
    out[:len(stacked)] = stacked
    return out.reshape(steps, per_step, size)


def train_head(method: str, features: np.ndarray, lengths: np.ndarray, spec_base: RankerSpec,
               cfg: TrainConfig, init_head: RankerHead | None = None, extra: Sequence[np.ndarray] = ()
               ) -> HeadResult:
    """Train one head on cached features [N, F] and output lengths [N]; returns the head and its spec.

    ``extra``: more length labels of the same prompts ([N] each, -1 where a prompt has none), e.g. other models'
    answers; each label set trains as lists of its own (a list never mixes two sets), with the targets scaled as
    the primary lengths are. ``init_head`` (same shape) starts training from a copy of that head, feature
    statistics included, instead of a fresh initialisation (e.g. a head pre-trained on trace lengths).
    """
    start = time.perf_counter()
    lengths = np.asarray(lengths)
    edges = losses.bucket_edges(lengths, cfg.num_buckets, cfg.bucket_scheme) if method == "classify" else None
    spec = dataclasses.replace(
        spec_base, method=method, num_outputs=cfg.num_buckets if method == "classify" else 1,
        bucket_edges=tuple(edges.tolist()) if edges is not None else ())
    log_len = np.log1p(lengths)
    log_mean, log_std = float(log_len.mean()), float(log_len.std() + 1e-6)

    if init_head is not None:
        head = nnx.clone(init_head)
    else:
        head = RankerHead.for_spec(spec, seed=cfg.seed)
        head.set_feature_stats(features)
    graphdef, params, stats = nnx.split(head, nnx.Param, ...)

    # rows: (feature row, target) of every label set; the row after the last is the zero padding
    n = len(lengths)
    label_sets = [np.asarray(lengths)] + [np.asarray(e) for e in extra]
    row_feature = np.concatenate([np.flatnonzero(ls >= 0) for ls in label_sets])
    row_target = np.concatenate([_targets(method, ls[ls >= 0], edges, log_mean, log_std) for ls in label_sets])
    groups, at = [], 0
    for ls in label_sets:
        groups.append(np.arange(at, at + int((ls >= 0).sum())))
        at += len(groups[-1])
    pad = at
    row_feature = np.concatenate([row_feature, [n]])
    row_target = np.concatenate([row_target, np.zeros((1,), np.float32)]).astype(np.float32)

    size, per_step = cfg.list_size, cfg.lists_per_step
    steps_per_epoch = -(-sum(-(-len(g) // size) for g in groups) // per_step)
    tx = _make_optimizer(cfg.optimizer, steps_per_epoch * cfg.epochs)
    opt_state = tx.init(params)

    def loss_fn(p, feats, tgt, mask, key):
        outputs = nnx.merge(graphdef, p, stats)(feats)
        if method == "listmle":
            return losses.listmle_loss(outputs[..., 0], tgt, mask, key)
        if method == "regression":
            return losses.regression_loss(outputs[..., 0], tgt, mask)
        return losses.classify_loss(outputs, tgt.astype(jnp.int32), mask)

    @jax.jit
    def step(p, state, feats, tgt, mask, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, feats, tgt, mask, key)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    feats_padded = np.concatenate([features, np.zeros((1, features.shape[1]), np.float32)])
    loss = jnp.zeros(())
    for _epoch in range(cfg.epochs):
        order = _list_order(groups, size, per_step, pad, rng)
        for idx in order:
            key, sub = jax.random.split(key)
            params, opt_state, loss = step(params, opt_state, feats_padded[row_feature[idx]], row_target[idx],
                                           idx < pad, sub)
    nnx.update(head, params)
    return HeadResult(method, head, spec, time.perf_counter() - start, float(loss))


def head_scores(head: RankerHead, method: str, features: np.ndarray) -> np.ndarray:
    return np.asarray(scores_from_outputs(method, head(jnp.asarray(features))))


# ------------------------------------------------------------------------------------------------ end to end
def cross_validate(method: str, features: np.ndarray, lengths: np.ndarray, ids: list[str], spec_base: RankerSpec,
                   cfg: TrainConfig, extra: Sequence[np.ndarray] = ()) -> dict[str, Any]:
    """k-fold Kendall tau-b of one method over training rows only (folds from `data.cv_fold_of`): each fold is
    scored by a head trained on the other folds (and their ``extra`` label sets). The held-out validation split is
    never touched."""
    folds = np.array([train_data.cv_fold_of(rid, cfg.cv_folds, cfg.val_fraction, cfg.split_salt) for rid in ids])
    taus = []
    for k in range(cfg.cv_folds):
        fit, score = folds != k, folds == k
        if fit.sum() < cfg.list_size or score.sum() < 2:
            raise ValueError(f"cv_folds={cfg.cv_folds} leaves fold {k} with {int(score.sum())} prompts and "
                             f"{int(fit.sum())} to train on; use fewer folds or more labels")
        res = train_head(method, features[fit], lengths[fit], spec_base, cfg, extra=[e[fit] for e in extra])
        taus.append(tau_b(head_scores(res.head, method, features[score]), lengths[score]))
    return {"folds": cfg.cv_folds, "kendall_tau_b_mean": float(np.mean(taus)),
            "kendall_tau_b_std": float(np.std(taus)), "per_fold": [round(t, 4) for t in taus]}


def default_feature_cache_dir() -> Path:
    from ltr_jax.models.default_model import cache_dir

    return cache_dir() / "ranker_features"


def load_serving_model(source: str | None):
    """The serving model (config, params, tokenizer) via the shared loader."""
    from ltr_jax.models.loading import load_model

    return load_model(source)


def prepare_data(cfg: TrainConfig, tokenizer) -> tuple[train_data.RankingData, str, list[np.ndarray]]:
    """Examples joined with labels and rendered; returns (data, a description of the label source, the
    `extra_lengths` label sets aligned with the data's rows, -1 where a prompt lacks that answer)."""
    examples = train_data.load_examples(cfg.prompts)
    origin = str(cfg.prompts or "the shared prompts")
    if cfg.labels:
        if not Path(cfg.labels).is_file():
            raise train_data.DataError(
                f"label file {cfg.labels} does not exist; make it with the labeling job (ltr_jax.train.label), "
                "point `labels:` at another label JSONL, or set `labels: null` to train on answer lengths")
        labels = train_data.answer_lengths(examples, cfg.labels, tokenizer, origin, every=False)
        label_source = f"label file {cfg.labels}"
    else:
        labels = train_data.answer_lengths(examples, cfg.lengths, tokenizer, origin, every=False)
        label_source = ("trace lengths (token count of each reference)" if cfg.lengths == "reference" else
                        f"token counts of {cfg.lengths}")
    data = train_data.build_ranking_data(examples, labels, tokenizer, cfg.max_prompt_len)
    extra = []
    for spec in cfg.extra_lengths:
        more = train_data.answer_lengths(examples, spec, tokenizer, origin, every=False)
        extra.append(np.array([more.get(rid, -1) for rid in data.ids], np.int64))
    if extra:
        label_source += " + extra lists of " + ", ".join(cfg.extra_lengths)
    return data, label_source, extra


def run_training(cfg: TrainConfig, model=None, progress: bool = True) -> dict[str, Any]:
    """The whole recipe; returns a JSON-able report (and exports the chosen head when configured)."""
    from ltr_jax.models.ranker_checkpoint import save_ranker

    t0 = time.perf_counter()
    model = model if model is not None else load_serving_model(cfg.model)
    data, label_source, extra = prepare_data(cfg, model.tokenizer)
    train_ids, val_ids = train_data.split_ids(data.ids, cfg.val_fraction, cfg.split_salt)
    if len(train_ids) < cfg.list_size or len(val_ids) < 2:
        raise ValueError(f"too little data: {len(train_ids)} training and {len(val_ids)} validation prompts")
    prep_seconds = time.perf_counter() - t0

    cache_dir = None
    if cfg.feature_cache_dir == "default":
        cache_dir = default_feature_cache_dir()
    elif cfg.feature_cache_dir:
        cache_dir = Path(cfg.feature_cache_dir)
    features: FeatureSet = cached_features(model.config, model.params, data.tokens, cfg.n_layers, cache_dir,
                                           progress=progress, token_budget=cfg.token_budget)
    index = {rid: i for i, rid in enumerate(data.ids)}
    train_rows = np.array([index[r] for r in train_ids])
    val_rows = np.array([index[r] for r in val_ids])
    x = features.select(cfg.pooling)

    spec_base = RankerSpec(model_source=cfg.model, model_name=model.config.name, model_dim=model.config.dim,
                           n_layers=cfg.n_layers, pooling=cfg.pooling, hidden_dims=tuple(cfg.hidden_dims),
                           max_prompt_len=cfg.max_prompt_len)
    results = {}
    exported = None
    val_lengths = data.lengths[val_rows]
    val_sources = [data.sources[i] for i in val_rows]
    prior = source_prior([data.sources[i] for i in train_rows], data.lengths[train_rows], val_sources)
    train_extra = [e[train_rows] for e in extra]
    for method in cfg.methods:
        res = train_head(method, x[train_rows], data.lengths[train_rows], spec_base, cfg, extra=train_extra)
        scores = head_scores(res.head, method, x[val_rows])
        metrics = evaluation(scores, val_lengths, val_sources, [len(data.tokens[i]) for i in val_rows], prior,
                             seed=cfg.seed)
        if method == "classify":  # also the coarse variant: rank by the single most likely bucket (many ties)
            argmax = -np.argmax(np.asarray(res.head(jnp.asarray(x[val_rows]))), axis=-1)
            metrics["tau_b_argmax_bucket"] = tau_b(argmax, val_lengths)
        results[method] = {**metrics, "train_seconds": round(res.train_seconds, 2), "final_loss": res.final_loss}
        if cfg.cv_folds:
            results[method]["cross_validation"] = cross_validate(
                method, x[train_rows], data.lengths[train_rows], list(train_ids), spec_base, cfg, extra=train_extra)
        if method == cfg.export_method and cfg.export_path:
            save_ranker(cfg.export_path, res.head, res.spec, extra={
                "trained_on": _portable(label_source), "train_prompts": len(train_ids),
                "val_prompts": len(val_ids), "val_kendall_tau_b": metrics["tau_b"], "val_ci95": metrics["ci95"],
                "val_source_prior_tau_b": metrics["baselines"]["source_prior"],
                **({"cv_kendall_tau_b": results[method]["cross_validation"]["kendall_tau_b_mean"]}
                   if cfg.cv_folds else {}),
                "train_config": cfg.to_portable_dict()})
            exported = cfg.export_path
    report = {
        "name": cfg.name,
        "labels": _portable(label_source),
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "n_layers": cfg.n_layers,
        "pooling": cfg.pooling,
        "hidden_dims": list(cfg.hidden_dims),
        "prep_seconds": round(prep_seconds, 2),
        "feature_seconds": round(features.seconds, 2),
        "features_computed": features.computed,
        "methods": results,
        "exported": _portable(exported) if exported else None,
        "total_seconds": round(time.perf_counter() - t0, 2),
    }
    return report
