"""Training data for the length ranker: prompt sources, output-length labels, and the train/validation split.

Owns:
- locating the shared data folder (``$LTR_JAX_SHARED`` or ``../shared`` beside the checkout);
- reading prompts from our ``prompts.jsonl`` format (``{"id", "source", "prompt", "reference"}``), from
  ShareGPT-style JSON/JSONL (``conversations`` with ``from``/``value`` or ``messages`` with ``role``/``content``;
  first user turn = prompt, first assistant turn after it = reference) and, optionally, from a
  tensorflow-datasets data set (the ``tfds`` extra);
- reading label files (JSONL rows ``{"id", "prompt_tokens", "output_tokens", "finish_reason"}`` written by the
  labeling job) and the fallback trace-length labels (token count of each ``reference``);
- the deterministic split: an id goes to validation iff a hash of it falls below the validation fraction, so
  adding prompts never moves old ones between splits;
- rendering a prompt through the serving model's chat template into (truncated) token ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ltr_jax.models.ranker import truncate_prompt_tokens

SHARED_ENV_VAR = "LTR_JAX_SHARED"
DEFAULT_SPLIT_SALT = "ltr-jax-split-v1"
LABEL_FIELDS = ("id", "prompt_tokens", "output_tokens", "finish_reason")

_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant", "model", "bot", "chatgpt")


class DataError(ValueError):
    """A data or label file is missing or malformed; the message names the file and the problem."""


class PromptTokenizer(Protocol):
    """What rendering needs from the serving model's tokenizer (``ltr_jax.models.tokenizer.ChatTokenizer``)."""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Example:
    """One prompt: a stable id, the first user turn, the reference answer when the source has one, and other
    recorded answers by model name (``outputs`` of the AlpacaEval file: ``{"llama3-8b": "...", ...}``)."""

    id: str
    prompt: str
    reference: str | None = None
    source: str = ""
    outputs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LengthLabel:
    """One labeling-job row: how many tokens the serving model produced for a prompt, and why it stopped."""

    id: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str


# ------------------------------------------------------------------------------------------------ locations
def shared_dir() -> Path:
    """The shared read-only data folder: ``$LTR_JAX_SHARED`` or ``../shared`` beside the repository."""
    env = os.environ.get(SHARED_ENV_VAR)
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / ".." / "shared"
    if not path.is_dir():
        raise DataError(
            f"shared data folder not found at {path}; set {SHARED_ENV_VAR} to the folder that holds "
            "data/prompts.jsonl (it sits beside the project checkout as ../shared)"
        )
    return path.resolve()


def default_prompts_path() -> Path:
    path = shared_dir() / "data" / "prompts.jsonl"
    if not path.is_file():
        raise DataError(f"{path} is missing; the shared folder should hold data/prompts.jsonl")
    return path


# ------------------------------------------------------------------------------------------------ parsing
def _stable_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]}"


def _turns(record: dict[str, Any]) -> list[tuple[str, str]] | None:
    """(role, text) pairs of a ShareGPT-style record, or None when it has no conversation."""
    if isinstance(record.get("conversations"), list):
        return [(str(t.get("from", "")).lower(), t.get("value")) for t in record["conversations"]
                if isinstance(t, dict)]
    if isinstance(record.get("messages"), list):
        return [(str(t.get("role", "")).lower(), t.get("content")) for t in record["messages"]
                if isinstance(t, dict)]
    return None


def parse_record(record: Any, where: str) -> Example | None:
    """One record of any supported format -> Example; None for a conversation without a user turn.

    ``where`` (file and line) goes into error messages.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise DataError(f"{where}: 'prompt' must be a string")
        reference = record.get("reference")
        rid = record.get("id") or _stable_id("prompt", prompt)
        outputs = record.get("outputs") or {}
        if not isinstance(outputs, dict) or not all(isinstance(v, str) for v in outputs.values()):
            raise DataError(f"{where}: 'outputs' must map model names to answer texts")
        return Example(str(rid), prompt, reference if isinstance(reference, str) else None,
                       str(record.get("source", "")), {str(k): v for k, v in outputs.items()})
    turns = _turns(record)
    if turns is None:
        raise DataError(
            f"{where}: unrecognised record (keys {sorted(record)[:8]}); expected 'prompt' "
            "(prompts.jsonl format), 'conversations' (ShareGPT) or 'messages' (role/content)"
        )
    user_at = next((i for i, (role, text) in enumerate(turns) if role in _USER_ROLES and isinstance(text, str)),
                   None)
    if user_at is None:
        return None
    prompt = turns[user_at][1]
    reference = next((text for role, text in turns[user_at + 1:]
                      if role in _ASSISTANT_ROLES and isinstance(text, str)), None)
    rid = record.get("id") or _stable_id("sharegpt", prompt)
    return Example(str(rid), prompt, reference, str(record.get("source", "sharegpt")))


def _read_records(path: Path) -> Iterable[tuple[Any, str]]:
    """(record, 'file:line') pairs from a JSON array file or a JSONL file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from err
        for i, record in enumerate(records):
            yield record, f"{path}[{i}]"
        return
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: not valid JSON ({err})") from err
        yield record, f"{path}:{line_no}"


def _dedupe(examples: Iterable[Example], origin: str) -> list[Example]:
    seen: dict[str, Example] = {}
    for ex in examples:
        if ex.id in seen:
            raise DataError(f"{origin}: duplicate id {ex.id!r}; ids must be unique (they key labels and splits)")
        seen[ex.id] = ex
    return list(seen.values())


def load_examples_file(path: str | Path) -> list[Example]:
    """Prompts from a prompts.jsonl-style or ShareGPT-style JSON/JSONL file (formats may be mixed per record)."""
    path = Path(path)
    parsed = (parse_record(record, where) for record, where in _read_records(path))
    return _dedupe((ex for ex in parsed if ex is not None), str(path))


def load_tfds(name: str, split: str = "train", prompt_key: str = "prompt", reference_key: str | None = None,
              id_key: str | None = None) -> list[Example]:
    """Prompts from a tensorflow-datasets data set (needs the ``tfds`` extra: pip install 'ltr_jax[tfds]')."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataError(
            f"loading tfds:{name} needs tensorflow-datasets, which is not installed; "
            "install it with: pip install 'ltr_jax[tfds]'"
        ) from err

    def text(value: Any) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    out = []
    for i, row in enumerate(tfds.as_numpy(tfds.load(name, split=split))):
        if prompt_key not in row:
            raise DataError(f"tfds:{name}/{split} row {i} has no field {prompt_key!r}; fields: {sorted(row)}")
        prompt = text(row[prompt_key])
        reference = text(row[reference_key]) if reference_key and reference_key in row else None
        rid = text(row[id_key]) if id_key and id_key in row else f"{name}-{split}-{i}"
        out.append(Example(rid, prompt, reference, name))
    return _dedupe(out, f"tfds:{name}/{split}")


def load_examples(spec: str | Path | None = None) -> list[Example]:
    """Prompts from a source spec: None or 'shared' (the shared prompts.jsonl), a file path, or 'tfds:NAME[/SPLIT]'."""
    if spec is None or str(spec) == "shared":
        return load_examples_file(default_prompts_path())
    spec = str(spec)
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].partition("/")
        return load_tfds(name, split or "train")
    return load_examples_file(spec)


# ------------------------------------------------------------------------------------------------ labels
def load_label_file(path: str | Path) -> dict[str, LengthLabel]:
    """Rows ``{"id", "prompt_tokens", "output_tokens", "finish_reason"}`` keyed by id (later rows win)."""
    path = Path(path)
    labels: dict[str, LengthLabel] = {}
    for record, where in _read_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object")
        missing = [f for f in LABEL_FIELDS if f not in record]
        if missing:
            raise DataError(f"{where}: label row lacks {missing}; rows need {list(LABEL_FIELDS)}")
        out_tokens = record["output_tokens"]
        if not isinstance(out_tokens, int) or isinstance(out_tokens, bool) or out_tokens < 0:
            raise DataError(f"{where}: output_tokens must be a non-negative integer, got {out_tokens!r}")
        labels[str(record["id"])] = LengthLabel(str(record["id"]), int(record["prompt_tokens"]), out_tokens,
                                                str(record["finish_reason"]))
    if not labels:
        raise DataError(f"{path}: no label rows")
    return labels


LENGTH_FIELDS_HELP = ("'reference' (token count of each record's reference answer), 'outputs.NAME' (of the "
                      "answer recorded for model NAME, e.g. outputs.llama3-8b) or the path of a label JSONL from "
                      "the labeling job")


def check_length_field(spec: str) -> str | None:
    """Why ``spec`` names no answer field ('reference' or 'outputs.NAME'), or None when it does."""
    if spec == "reference" or (spec.startswith("outputs.") and len(spec) > len("outputs.")):
        return None
    return f"must be 'reference' or 'outputs.NAME' (e.g. outputs.llama3-8b), got {spec!r}"


def answer_lengths(examples: Sequence[Example], spec: str, tokenizer: PromptTokenizer, origin: str,
                   every: bool = True) -> dict[str, int]:
    """Output lengths by id: the token count (under ``tokenizer``) of each example's answer named by ``spec``
    ('reference' or 'outputs.NAME'), or the ``output_tokens`` of a label file when ``spec`` is a path.

    ``every``: an example without that answer is an error naming it (else it is left out). ``origin`` (the
    prompts' file) goes into messages."""
    problem = check_length_field(spec)
    if problem is not None:
        if Path(spec).expanduser().is_file():
            rows = load_label_file(Path(spec).expanduser())
            lengths = {ex.id: rows[ex.id].output_tokens for ex in examples if ex.id in rows}
            if not lengths:
                raise DataError(f"label file {spec} has no row for any of the {len(examples)} prompts of {origin}; "
                                "was it made from these prompts?")
            if every and len(lengths) < len(examples):
                missing = [ex.id for ex in examples if ex.id not in rows]
                raise DataError(f"label file {spec} has no row for {len(missing)} of the {len(examples)} prompts "
                                f"of {origin} (first: {missing[0]!r}); label them or drop them from the prompts")
            return lengths
        raise DataError(f"lengths {spec!r}: not an answer field nor a label file; give {LENGTH_FIELDS_HELP}")
    name = spec.partition(".")[2]

    def answer(ex: Example) -> str | None:
        return ex.reference if spec == "reference" else ex.outputs.get(name)

    texts = {ex.id: answer(ex) for ex in examples}
    missing = [rid for rid, text in texts.items() if not isinstance(text, str)]
    if len(missing) == len(texts):
        known = sorted({k for ex in examples for k in ex.outputs})
        raise DataError(f"{origin}: no record has {spec!r}" + (
            f"; its records' outputs are {', '.join('outputs.' + k for k in known)}" if known else
            "; its records carry no 'outputs'") + (" and no 'reference'" if spec == "reference" else ""))
    if every and missing:
        raise DataError(f"{origin}: {len(missing)} of {len(texts)} records have no {spec!r} (first: {missing[0]!r}); "
                        "every prompt needs the answer its length is counted from")
    return {rid: len(tokenizer.encode(text)) for rid, text in texts.items() if isinstance(text, str)}


# ------------------------------------------------------------------------------------------------ split
def validation_fraction_of(example_id: str, salt: str = DEFAULT_SPLIT_SALT) -> float:
    """A uniform number in [0, 1) fixed by the id alone."""
    digest = hashlib.sha256(f"{salt}\0{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_validation(example_id: str, val_fraction: float, salt: str = DEFAULT_SPLIT_SALT) -> bool:
    return validation_fraction_of(example_id, salt) < val_fraction


def cv_fold_of(example_id: str, folds: int, val_fraction: float, salt: str = DEFAULT_SPLIT_SALT) -> int:
    """Cross-validation fold (0 .. folds-1) of a training id: the training share of the id's split number cut
    into ``folds`` equal parts, so folds are disjoint, about equal and never touch the validation split."""
    u = validation_fraction_of(example_id, salt)
    if u < val_fraction:
        raise ValueError(f"{example_id!r} is in the validation split; folds are cut from the training split only")
    return min(int((u - val_fraction) / (1.0 - val_fraction) * folds), folds - 1)


def split_ids(ids: Iterable[str], val_fraction: float = 0.1, salt: str = DEFAULT_SPLIT_SALT
              ) -> tuple[list[str], list[str]]:
    """(train ids, validation ids), each in input order; membership depends only on each id."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    train, val = [], []
    for rid in ids:
        (val if is_validation(rid, val_fraction, salt) else train).append(rid)
    return train, val


# ------------------------------------------------------------------------------------------------ rendering
def render_prompt(tokenizer: PromptTokenizer, prompt: str, max_prompt_len: int) -> list[int]:
    """The token ids the serving model would see for this first user turn, truncated for the ranker."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return truncate_prompt_tokens(tokenizer.encode(text), max_prompt_len)


@dataclass
class RankingData:
    """Examples joined with their labels and rendered prompt tokens, in a fixed order."""

    ids: list[str]
    tokens: list[list[int]]
    lengths: np.ndarray  # output length label per example, int64
    sources: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, keep: Sequence[str]) -> RankingData:
        index = {rid: i for i, rid in enumerate(self.ids)}
        rows = [index[rid] for rid in keep]
        return RankingData([self.ids[i] for i in rows], [self.tokens[i] for i in rows], self.lengths[rows],
                           [self.sources[i] for i in rows])


def build_ranking_data(examples: Sequence[Example], labels: dict[str, int], tokenizer: PromptTokenizer,
                       max_prompt_len: int) -> RankingData:
    """Join examples with labels by id (unlabelled examples are dropped) and render every prompt."""
    kept = [ex for ex in examples if ex.id in labels]
    if not kept:
        raise DataError(
            f"no example has a label: {len(examples)} examples, {len(labels)} labels, and no id in common; "
            "check that the label file was made from these prompts"
        )
    tokens = [render_prompt(tokenizer, ex.prompt, max_prompt_len) for ex in kept]
    return RankingData([ex.id for ex in kept], tokens, np.array([labels[ex.id] for ex in kept], np.int64),
                       [ex.source for ex in kept])
