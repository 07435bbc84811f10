"""Export and restore of trained rankers: the head's arrays with Orbax, the recipe as JSON beside them.

Layout of an exported ranker directory::

    <dir>/ranker.json   {"format": "ltr_jax.ranker", "version": 1, "spec": RankerSpec, "arrays": {path: shape},
                         "head_sha256": {file under head/: digest}, ...provenance}
    <dir>/head/         Orbax StandardCheckpointer output of the head's NNX state (KBs)

The backbone is not stored: it is the serving model's own first ``spec.n_layers`` blocks, rebuilt from the model
(``spec.model_source``) at serve time. Every failure to restore (missing files, unreadable JSON, arrays whose
shapes disagree with the JSON, a head file whose digest differs from the one recorded at export, an Orbax read
error, a backbone of the wrong width) raises `RankerCheckpointError` naming the path and the problem. The digests
are checked before Orbax reads anything, so a corrupt export is refused without a read that fails half-way
(exports from before the digests are read unchecked).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ltr_jax.models.ranker import RankerHead, RankerScorer, RankerSpec

FORMAT_NAME = "ltr_jax.ranker"
FORMAT_VERSION = 1
SPEC_FILE = "ranker.json"
HEAD_DIR = "head"


class RankerCheckpointError(RuntimeError):
    """An exported ranker is missing, corrupt or does not match what it claims to be."""


def default_ranker_path() -> Path:
    """The ranker shipped with the package (trained on SmolLM2's own output lengths)."""
    return Path(__file__).resolve().parents[1] / "data" / "ranker_smollm2"


def _expected_shapes(spec: RankerSpec) -> dict[str, tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: RankerHead.for_spec(spec))
    return _flatten_shapes(nnx.to_pure_dict(nnx.state(abstract)))


def _flatten_shapes(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{'layers.0.kernel': shape, ...} from a nested dict of arrays or Orbax ArrayMetadata."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):  # Orbax wraps NNX variables
            return _flatten_shapes(tree["value"], prefix)
        out: dict[str, tuple[int, ...]] = {}
        for key, sub in tree.items():
            out.update(_flatten_shapes(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tuple(int(d) for d in tree.shape)}


def save_ranker(path: str | Path, head: RankerHead, spec: RankerSpec, extra: dict[str, Any] | None = None) -> Path:
    """Write ``head`` (Orbax) and ``spec`` (JSON) to directory ``path``, replacing an earlier export there."""
    path = Path(path).resolve()
    shapes = _flatten_shapes(nnx.to_pure_dict(nnx.state(head)))
    expected = _expected_shapes(spec)
    if shapes != expected:
        raise ValueError(f"head arrays {shapes} do not match the spec's shapes {expected}")
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:  # closed on exit: no background thread outlives the save
        checkpointer.save(path / HEAD_DIR, nnx.state(head), force=True)
        checkpointer.wait_until_finished()
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "spec": spec.to_dict(),
            "arrays": {k: list(v) for k, v in sorted(shapes.items())},
            "head_sha256": _digests(path / HEAD_DIR), **(extra or {})}
    (path / SPEC_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _digests(head_dir: Path) -> dict[str, str]:
    """{file path under ``head_dir``: its SHA-256}, every file."""
    return {f.relative_to(head_dir).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(head_dir.rglob("*")) if f.is_file()}


def _check_digests(head_dir: Path, recorded: Any) -> None:
    if not isinstance(recorded, dict):
        raise RankerCheckpointError(f"{head_dir.parent / SPEC_FILE}: 'head_sha256' should map file names to "
                                    "digests; re-export the ranker")
    found = _digests(head_dir)
    for name, digest in sorted(recorded.items()):
        if name not in found:
            raise RankerCheckpointError(f"{head_dir / name}: missing (the export recorded it); restore the whole "
                                        "ranker directory or re-export it")
        if found[name] != digest:
            raise RankerCheckpointError(f"{head_dir / name}: corrupt (its SHA-256 differs from the one recorded at "
                                        "export); restore the whole ranker directory or re-export it")


def read_spec(path: str | Path) -> tuple[RankerSpec, dict[str, Any]]:
    """The spec and the whole JSON of an exported ranker, validated."""
    path = Path(path)
    spec_file = path / SPEC_FILE
    if not path.is_dir():
        raise RankerCheckpointError(f"{path}: no ranker checkpoint here (directory missing); train one with "
                                    "`python -m ltr_jax.train --config configs/ranker_smollm2.yaml`")
    if not spec_file.is_file():
        raise RankerCheckpointError(f"{spec_file}: missing; an exported ranker directory holds {SPEC_FILE} and "
                                    f"{HEAD_DIR}/")
    try:
        meta = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RankerCheckpointError(f"{spec_file}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise RankerCheckpointError(f"{spec_file}: not a ranker export (format is {meta.get('format')!r} "
                                    f"if any, expected {FORMAT_NAME!r})" if isinstance(meta, dict) else
                                    f"{spec_file}: expected a JSON object")
    if meta.get("version") != FORMAT_VERSION:
        raise RankerCheckpointError(f"{spec_file}: format version {meta.get('version')!r}, this code reads "
                                    f"version {FORMAT_VERSION}")
    try:
        spec = RankerSpec.from_dict(meta["spec"])
    except (KeyError, TypeError, ValueError) as err:
        raise RankerCheckpointError(f"{spec_file}: bad 'spec' ({err})") from err
    return spec, meta


def load_ranker(path: str | Path) -> tuple[RankerHead, RankerSpec, dict[str, Any]]:
    """Restore (head, spec, metadata) from an export, checking every array's shape against the spec first."""
    path = Path(path).resolve()
    spec, meta = read_spec(path)
    head_dir = path / HEAD_DIR
    if not head_dir.is_dir():
        raise RankerCheckpointError(f"{head_dir}: missing; the head's Orbax checkpoint should be here")
    if "head_sha256" in meta:
        _check_digests(head_dir, meta["head_sha256"])
    with ocp.StandardCheckpointer() as checkpointer:
        return _restore_head(path, head_dir, spec, meta, checkpointer)


def _restore_head(path: Path, head_dir: Path, spec: RankerSpec, meta: dict[str, Any],
                  checkpointer: ocp.StandardCheckpointer) -> tuple[RankerHead, RankerSpec, dict[str, Any]]:
    expected = _expected_shapes(spec)
    try:
        stored = _flatten_shapes(checkpointer.metadata(head_dir).item_metadata.tree)
    except Exception as err:
        raise RankerCheckpointError(f"{head_dir}: unreadable Orbax checkpoint ({type(err).__name__}: {err})") from err
    if stored != expected:
        diffs = [f"{k}: stored {stored.get(k)}, expected {expected.get(k)}"
                 for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k)]
        raise RankerCheckpointError(
            f"{path}: the head's arrays do not match {SPEC_FILE} (feature_dim {spec.feature_dim} = model_dim "
            f"{spec.model_dim} x pooling {spec.pooling!r}, hidden {list(spec.hidden_dims)}, "
            f"{spec.num_outputs} outputs): " + "; ".join(diffs[:6]))
    abstract = nnx.eval_shape(lambda: RankerHead.for_spec(spec))
    graphdef, abstract_state = nnx.split(abstract)
    try:
        state = checkpointer.restore(head_dir, abstract_state)
    except Exception as err:
        raise RankerCheckpointError(f"{head_dir}: could not restore the head ({type(err).__name__}: {err})") from err
    leaves = jax.tree.leaves(state)
    if not all(np.all(np.isfinite(np.asarray(leaf))) for leaf in leaves):
        raise RankerCheckpointError(f"{head_dir}: restored arrays contain NaN or infinity")
    return nnx.merge(graphdef, state), spec, meta


def load_scorer(path: str | Path | None = None, model: Any = None, **scorer_kwargs: Any) -> RankerScorer:
    """A serving `RankerScorer` from an export (default: the packaged SmolLM2 ranker).

    ``model`` is an already-loaded serving model (anything with ``config`` and ``params``); when None the
    backbone is loaded from ``spec.model_source`` with `ltr_jax.models.loading.load_model`.
    """
    path = Path(path) if path is not None else default_ranker_path()
    head, spec, _ = load_ranker(path)
    if model is None:
        from ltr_jax.models.loading import load_model

        model = load_model(spec.model_source)
    config = model.config
    if config.dim != spec.model_dim or config.n_layers < spec.n_layers:
        raise RankerCheckpointError(
            f"{path}: ranker was trained on {spec.model_name!r} (dim {spec.model_dim}, first {spec.n_layers} "
            f"layers) but the backbone given is {config.name!r} (dim {config.dim}, {config.n_layers} layers); "
            "serve it with the model it was trained on or retrain the ranker for this model")
    return RankerScorer(spec, head, config, model.params, **scorer_kwargs)
