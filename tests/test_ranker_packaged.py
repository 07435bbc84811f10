"""The packaged default ranker (ltr_jax/data/ranker_smollm2) restores over the real SmolLM2 and ranks held-out
prompts by SmolLM2's own output lengths."""

import numpy as np
import pytest

from ltr_jax.models.ranker_checkpoint import default_ranker_path, load_ranker, load_scorer
from ltr_jax.train import data
from ltr_jax.train.metrics import ranking_metrics
from ltr_jax.train.trainer import PROJECT_ROOT, TrainConfig

pytestmark = pytest.mark.integration


def test_packaged_ranker_orders_held_out_prompts(smollm2_model):
    _, spec, meta = load_ranker(default_ranker_path())
    assert spec.model_dim == smollm2_model.config.dim and spec.n_layers <= smollm2_model.config.n_layers
    cfg = TrainConfig.from_dict(meta["train_config"], base_dir=PROJECT_ROOT)
    labels = {rid: row.output_tokens for rid, row in data.load_label_file(cfg.labels).items()}
    examples = [e for e in data.load_examples(cfg.prompts) if e.id in labels]
    _, val_ids = data.split_ids([e.id for e in examples], cfg.val_fraction, cfg.split_salt)
    held_out = set(val_ids[:100])  # never seen in training: the split is by id hash
    held = [e for e in examples if e.id in held_out]
    tokens = [data.render_prompt(smollm2_model.tokenizer, e.prompt, spec.max_prompt_len) for e in held]
    scorer = load_scorer(default_ranker_path(), model=smollm2_model)
    scores = scorer.score(tokens)
    assert np.all(np.isfinite(scores))
    tau = ranking_metrics(scores, np.array([labels[e.id] for e in held]))["kendall_tau_b"]
    assert tau > 0.3, f"packaged ranker tau-b {tau:.3f} on {len(held)} held-out prompts"
