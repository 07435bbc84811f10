"""Ranker training data: loaders (prompts.jsonl, ShareGPT, tfds), labels, the id-hash split, prompt rendering."""

import json
import sys

import numpy as np
import pytest

from ltr_jax.models.tiny import byte_level_tokenizer
from ltr_jax.train import data


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------ split
def test_split_is_deterministic_disjoint_and_complete():
    ids = [f"p-{i}" for i in range(2000)]
    train, val = data.split_ids(ids, 0.1)
    assert (train, val) == data.split_ids(list(ids), 0.1)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(ids)
    assert 150 < len(val) < 250  # about 10 %


def test_adding_prompts_never_moves_old_ones():
    old = [f"old-{i}" for i in range(500)]
    new = [f"new-{i}" for i in range(500)]
    train_old, val_old = data.split_ids(old, 0.2)
    train_all, val_all = data.split_ids(new[:250] + old + new[250:], 0.2)
    assert set(val_old) == set(val_all) & set(old)
    assert set(train_old) == set(train_all) & set(old)


def test_cv_folds_partition_the_training_split_only():
    ids = [f"p-{i}" for i in range(3000)]
    train, val = data.split_ids(ids, 0.1)
    folds = [data.cv_fold_of(rid, 5, 0.1) for rid in train]
    counts = np.bincount(folds, minlength=5)
    assert counts.sum() == len(train) and counts.min() > 0.8 * len(train) / 5  # five about equal folds
    assert folds == [data.cv_fold_of(rid, 5, 0.1) for rid in train]  # fixed by the id
    with pytest.raises(ValueError, match="validation split"):
        data.cv_fold_of(val[0], 5, 0.1)


def test_split_depends_on_salt_and_checks_fraction():
    ids = [str(i) for i in range(300)]
    assert data.split_ids(ids, 0.3, salt="a")[1] != data.split_ids(ids, 0.3, salt="b")[1]
    with pytest.raises(ValueError, match="val_fraction=1.0"):
        data.split_ids(ids, 1.0)


# ------------------------------------------------------------------------------------------------ loaders
def test_prompts_jsonl_format(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "source": "gsm8k", "prompt": "2+2?", "reference": "4"},
        {"id": "b", "source": "lima", "prompt": "Write a poem."},
    ])
    a, b = data.load_examples(path)
    assert a == data.Example("a", "2+2?", "4", "gsm8k")
    assert b.reference is None and b.source == "lima"


def test_sharegpt_json_with_conversations(tmp_path):
    records = [
        {"id": "s1", "conversations": [
            {"from": "system", "value": "be nice"},
            {"from": "human", "value": "first question"},
            {"from": "gpt", "value": "first answer"},
            {"from": "human", "value": "second question"},
            {"from": "gpt", "value": "second answer"}]},
        {"id": "s2", "conversations": [{"from": "gpt", "value": "no user turn at all"}]},
        {"id": "s3", "conversations": [{"from": "human", "value": "unanswered"}]},
        {"conversations": [{"from": "human", "value": "no id"}, {"from": "gpt", "value": "ok"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(records))
    examples = data.load_examples(path)
    assert [e.id for e in examples][:2] == ["s1", "s3"]  # s2 has no user turn and is skipped
    assert examples[0].prompt == "first question" and examples[0].reference == "first answer"
    assert examples[1].reference is None
    generated = examples[2]
    assert generated.id.startswith("sharegpt-") and generated.prompt == "no id"
    assert data.load_examples(path)[2].id == generated.id  # stable across loads


def test_sharegpt_jsonl_with_messages(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "m1", "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]},
        {"id": "m2", "messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "late"}]},
    ])
    m1, m2 = data.load_examples(path)
    assert (m1.prompt, m1.reference) == ("hello", "hi")
    assert (m2.prompt, m2.reference) == ("late", None)


def test_loader_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "ok"}\n{not json}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: not valid JSON"):
        data.load_examples(bad)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"id": "a", "text": "?"}])
    with pytest.raises(data.DataError, match=r"odd.jsonl:1: unrecognised record"):
        data.load_examples(odd)
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    with pytest.raises(data.DataError, match="duplicate id 'a'"):
        data.load_examples(dup)
    with pytest.raises(data.DataError, match="no such file"):
        data.load_examples(tmp_path / "absent.jsonl")


def test_tfds_source_without_the_extra_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(data.DataError, match=r"pip install 'ltr_jax\[tfds\]'"):
        data.load_examples("tfds:some_dataset/train")


def test_shared_dir_from_env_and_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(data.SHARED_ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(data.DataError, match="LTR_JAX_SHARED"):
        data.shared_dir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.setenv(data.SHARED_ENV_VAR, str(tmp_path / "shared"))
    with pytest.raises(data.DataError, match="prompts.jsonl is missing"):
        data.default_prompts_path()
    write_jsonl(tmp_path / "shared" / "data" / "prompts.jsonl", [{"id": "z", "prompt": "p"}])
    assert [e.id for e in data.load_examples()] == ["z"]


# ------------------------------------------------------------------------------------------------ labels
def test_label_file_parsing_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "labels.jsonl", [
        {"id": "a", "prompt_tokens": 10, "output_tokens": 42, "finish_reason": "stop"},
        {"id": "b", "prompt_tokens": 7, "output_tokens": 1024, "finish_reason": "length"},
    ])
    labels = data.load_label_file(path)
    assert labels["a"].output_tokens == 42 and labels["b"].finish_reason == "length"
    write_jsonl(path, [{"id": "a", "prompt_tokens": 10, "finish_reason": "stop"}])
    with pytest.raises(data.DataError, match=r"labels.jsonl:1: label row lacks \['output_tokens'\]"):
        data.load_label_file(path)
    write_jsonl(path, [{"id": "a", "prompt_tokens": 1, "output_tokens": -3, "finish_reason": "stop"}])
    with pytest.raises(data.DataError, match="non-negative integer"):
        data.load_label_file(path)


def test_answer_lengths_count_the_named_answer_tokens(tmp_path):
    tok = byte_level_tokenizer()
    examples = [data.Example("a", "q", "four", outputs={"m1": "sixsix", "m2": "x"}),
                data.Example("b", "q", None, outputs={"m1": "no"}), data.Example("c", "q", "héllo")]
    assert data.answer_lengths(examples, "reference", tok, "f", every=False) == {"a": 4, "c": len("héllo".encode())}
    assert data.answer_lengths(examples, "outputs.m1", tok, "f", every=False) == {"a": 6, "b": 2}
    with pytest.raises(data.DataError, match=r"f: 1 of 3 records have no 'reference' \(first: 'b'\)"):
        data.answer_lengths(examples, "reference", tok, "f")
    with pytest.raises(data.DataError, match=r"no record has 'outputs.m3'; its records' outputs are outputs.m1, "
                                             r"outputs.m2"):
        data.answer_lengths(examples, "outputs.m3", tok, "f")
    with pytest.raises(data.DataError, match="not an answer field nor a label file"):
        data.answer_lengths(examples, "outputs", tok, "f")
    labels = tmp_path / "labels.jsonl"
    write_jsonl(labels, [{"id": "a", "prompt_tokens": 1, "output_tokens": 9, "finish_reason": "stop"}])
    assert data.answer_lengths(examples, str(labels), tok, "f", every=False) == {"a": 9}
    with pytest.raises(data.DataError, match=r"no row for 2 of the 3 prompts of f \(first: 'b'\)"):
        data.answer_lengths(examples, str(labels), tok, "f")


def test_outputs_of_a_record_are_read_and_checked(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"id": "a", "prompt": "q", "outputs": {"llama3-8b": "an answer"}}])
    assert data.load_examples_file(path)[0].outputs == {"llama3-8b": "an answer"}
    write_jsonl(path, [{"id": "a", "prompt": "q", "outputs": ["an answer"]}])
    with pytest.raises(data.DataError, match="p.jsonl:1: 'outputs' must map model names to answer texts"):
        data.load_examples_file(path)


# ------------------------------------------------------------------------------------------------ rendering
def test_render_uses_chat_template_and_truncates():
    tok = byte_level_tokenizer()
    full = data.render_prompt(tok, "What is 2+2?", 10_000)
    text = tok.decode(full, skip_special_tokens=False)
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    cut = data.render_prompt(tok, "x" * 500, 64)
    assert len(cut) == 64
    assert tok.decode(cut[-12:], skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_build_ranking_data_joins_by_id():
    tok = byte_level_tokenizer()
    examples = [data.Example(i, f"prompt {i}", None) for i in ("a", "b", "c")]
    rd = data.build_ranking_data(examples, {"c": 30, "a": 10}, tok, 128)
    assert rd.ids == ["a", "c"] and rd.lengths.tolist() == [10, 30]
    sub = rd.subset(["c"])
    assert sub.ids == ["c"] and sub.tokens == [rd.tokens[1]] and isinstance(sub.lengths, np.ndarray)
    with pytest.raises(data.DataError, match="no example has a label"):
        data.build_ranking_data(examples, {"zzz": 1}, tok, 128)
