"""`ChatTokenizer`: text <-> token ids, the model's chat template, its stop tokens, and streaming detokenization.

Built either from a GGUF file's tokenizer metadata (a GPT-2-style byte-level BPE rebuilt as a Hugging Face
`tokenizers.Tokenizer` from `tokenizer.ggml.tokens` / `merges` / `token_type`) or from a Hugging Face checkpoint
directory (`tokenizer.json`, `tokenizer_config.json`, optional `chat_template.jinja` and `generation_config.json`).
Chat templates are Jinja2 rendered in a sandbox, with the variables and helpers Hugging Face templates expect
(`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, `strftime_now`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp token types (gguf.TokenType)
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end an assistant turn in common chat formats (ChatML, Llama 3); added to the stop set when present.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>")

# Split patterns of the pre-tokenizers llama.cpp names in `tokenizer.ggml.pre` (same regexes as the upstream
# Hugging Face tokenizer.json files of those models).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bpe_pre_tokenizer(pre: str, source: str):
    """(pre-tokenizer, ignore_merges) for a llama.cpp `tokenizer.ggml.pre` name."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("default", "gpt2", "gpt-2"):
        return byte_level, False
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    if pre in ("llama3", "llama-bpe", "llama-v3"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, raw_bytes]), True
    if pre == "qwen2":
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, raw_bytes]), False
    raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported (supported: default, gpt2, smollm, "
                     f"starcoder, refact, llama-bpe, qwen2); load the model from a Hugging Face directory with its "
                     f"tokenizer.json instead")


_MARK = "\x00\x01"  # stands in for message contents while a chat template renders (no text contains it)
_MARKED = re.compile(re.escape(_MARK) + r"(\d+)" + re.escape(_MARK))


def _content_text(content: Any) -> Any:
    """A message's content as the template sees it: OpenAI content parts keep their text parts, joined."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content


def tokenizer_from_gguf_metadata(meta: dict[str, Any], source: str) -> Tokenizer:
    """Rebuild a byte-level BPE `tokenizers.Tokenizer` from GGUF `tokenizer.ggml.*` metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model={kind!r} is not supported (only 'gpt2' byte-level BPE, "
                         f"as used by SmolLM2 and Llama 3); use a Hugging Face directory with tokenizer.json")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in meta:
            raise ValueError(f"{source}: metadata key {key!r} is missing; cannot build the tokenizer")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [_TOKEN_NORMAL] * len(tokens)))
    if len(types) != len(tokens):
        raise ValueError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if len(vocab) != len(tokens):
        raise ValueError(f"{source}: the token list has {len(tokens) - len(vocab)} duplicate entries")
    merges = []
    for m in meta["tokenizer.ggml.merges"]:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ValueError(f"{source}: malformed BPE merge {m!r} (expected 'left right')")
        merges.append((left, right))
    pre, ignore_merges = _bpe_pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")), source)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
            if ty == _TOKEN_USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


class IncrementalDecoder:
    """Streaming detokenizer: `push(id)` returns only newly completed text (never half of a UTF-8 character);
    `finish()` flushes whatever is held back. The concatenation of all returned pieces equals
    `tokenizer.decode(all ids)`.

    It decodes a short window (the tokens since the last emitted boundary plus the ones before it), so each step
    costs O(window), and decoders that treat the first token of a sequence specially still produce exact deltas.
    """

    def __init__(self, tokenizer: ChatTokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int | Iterable[int]) -> str:
        if isinstance(token_id, int):
            self._ids.append(token_id)
        else:
            self._ids.extend(int(t) for t in token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing new, or an incomplete multi-byte character: wait for more tokens
        delta = new_text.removeprefix(prefix_text)
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return delta

    def finish(self) -> str:
        """Emit held-back text (e.g. a trailing incomplete character becomes U+FFFD, as in a full decode)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text):] if new_text.startswith(prefix_text) else ""

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)


def _raise_template_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTokenizer:
    """A model's tokenizer plus chat template and stop tokens."""

    def __init__(self, tokenizer: Tokenizer, *, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, extra_stop_token_ids: Iterable[int] = (),
                 add_bos: bool = False, source: str = ""):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self._id_of(bos_token)
        self.eos_token_id = self._id_of(eos_token)
        self.add_bos = bool(add_bos and self.bos_token_id is not None)
        stops: list[int] = []
        candidates = [self.eos_token_id, *extra_stop_token_ids, *(self._id_of(t) for t in _END_OF_TURN_TOKENS)]
        for tid in candidates:
            if tid is not None and int(tid) not in stops:
                stops.append(int(tid))
        self.stop_token_ids: tuple[int, ...] = tuple(stops)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    # -- constructors ------------------------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "GGUF file") -> ChatTokenizer:
        tok = tokenizer_from_gguf_metadata(meta, source)
        tokens = meta["tokenizer.ggml.tokens"]

        def token_at(key: str) -> str | None:
            idx = meta.get(key)
            if idx is None:
                return None
            if not 0 <= int(idx) < len(tokens):
                raise ValueError(f"{source}: {key}={idx} is outside the vocabulary of {len(tokens)} tokens")
            return tokens[int(idx)]

        extra = [int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(tok, chat_template=meta.get("tokenizer.chat_template"),
                   bos_token=token_at("tokenizer.ggml.bos_token_id"),
                   eos_token=token_at("tokenizer.ggml.eos_token_id"), extra_stop_token_ids=extra,
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)), source=source)

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> ChatTokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`, `generation_config.json`)."""
        directory = Path(directory)
        tok_file = directory / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: missing; a Hugging Face checkpoint directory needs tokenizer.json "
                                    f"(the fast-tokenizer file)")
        try:
            tok = Tokenizer.from_file(str(tok_file))
        except Exception as exc:
            raise ValueError(f"{tok_file}: not a valid tokenizers file ({exc})") from exc
        cfg = _read_json(directory / "tokenizer_config.json", required=False)
        gen = _read_json(directory / "generation_config.json", required=False)
        template = _chat_template_of(cfg, directory)
        eos_ids = gen.get("eos_token_id", [])
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        bos_token = _token_text(cfg.get("bos_token"))
        probe = "a"
        with_special = tok.encode(probe, add_special_tokens=True).ids
        bos_id = tok.token_to_id(bos_token) if bos_token else None
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # infer from the post-processor, as the fast tokenizer would apply it
            add_bos = bos_id is not None and bool(with_special) and with_special[0] == bos_id
        return cls(tok, chat_template=template, bos_token=bos_token, eos_token=_token_text(cfg.get("eos_token")),
                   extra_stop_token_ids=eos_ids, add_bos=bool(add_bos), source=str(directory))

    # -- encoding ----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of `text`. With ``special`` the special tokens written in the text (e.g. `<|im_start|>`)
        become their single ids; without, they stay the characters they are (text a user typed). BOS is prepended
        when the model wants it (`add_bos`, default: the tokenizer's setting) and the text does not already start
        with it (chat templates usually write it themselves)."""
        ids = (self.tokenizer if special else self._as_text).encode(text, add_special_tokens=False).ids
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    @cached_property
    def _as_text(self) -> Tokenizer:
        """A copy that encodes special-token strings as plain text (a copy: the flag is the tokenizer's state, and
        tokenizing runs on several threads)."""
        plain = Tokenizer.from_str(self.tokenizer.to_str())
        plain.encode_special_tokens = True
        return plain

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------------------------
    @cached_property
    def _compiled_template(self):
        from jinja2 import ext
        from jinja2.exceptions import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not self.chat_template:
            raise ValueError(f"{self.source or 'this tokenizer'} has no chat template; send a raw completion "
                             f"prompt instead, or load a model whose tokenizer config defines chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
        env.globals["raise_exception"] = _raise_template_exception
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
        try:
            return env.from_string(self.chat_template)
        except TemplateSyntaxError as exc:
            raise ValueError(f"{self.source}: the chat template does not parse: {exc}") from exc

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) to the prompt text the model was tuned on."""
        from jinja2.exceptions import TemplateError

        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"messages[{i}] must be a dict with a string 'role', got {m!r}")  # noqa: TRY004
            content = _content_text(m.get("content"))
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}]['content'] must be a string, got {type(content).__name__}")  # noqa: TRY004
            clean.append({**m, "content": content})
        try:
            return self._compiled_template.render(
                messages=clean, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                eos_token=self.eos_token or "", **extra)
        except TemplateError as exc:
            raise ValueError(f"chat template rejected the messages: {exc}") from exc

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """Token ids of the chat prompt: the template's own text with its special tokens, each message's content
        as plain text, so a `<|im_end|>` typed inside a message stays those characters and cannot close a turn.
        The template is rendered with a marker in place of each non-empty content, and the template's pieces are
        tokenized apart from the contents (the pre-tokenizers split at these places anyway)."""
        contents = {}
        marked = []
        for i, m in enumerate(messages):
            content = _content_text(m.get("content")) if isinstance(m, dict) else None
            if isinstance(content, str) and content:
                contents[str(i)] = content
                m = {**m, "content": f"{_MARK}{i}{_MARK}"}
            marked.append(m)
        text = self.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, **extra)
        ids: list[int] = []
        for k, piece in enumerate(_MARKED.split(text)):  # template text, content index, template text, ...
            if k % 2:
                if piece not in contents:
                    raise ValueError("a message field other than its content holds the chat-content marker")
                ids += self.encode(contents[piece], add_bos=False, special=False)
            elif piece:
                if _MARK in piece:
                    raise ValueError("the chat template changed a message's content while rendering it, so the "
                                     "content cannot be kept apart from the template's control tokens")
                ids += self.encode(piece, add_bos=False)
        if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    #: user messages whose renders `shared_prefix_tokens` compares: different first characters, so a header token
    #: that merged with the message's start could not survive in all of them
    _PREFIX_PROBES = ("Hello there.", "1 + 1 = ?", "\n- item", " x", "Écris un mot.")

    @cached_property
    def shared_prefix(self) -> tuple[int, ...]:
        """The tokens every single-user-message chat prompt starts with: the template's fixed header (BOS, the
        default system prompt, the user turn's opening). Empty without a chat template. The engine and ranker
        cache this prefix's K/V; a prompt that does not start with it simply runs whole."""
        if not self.chat_template:
            return ()
        try:
            renders = [self.encode(self.apply_chat_template([{"role": "user", "content": m}]))
                       for m in self._PREFIX_PROBES]
        except ValueError:  # a template that will not render a lone user message: nothing to share
            return ()
        n = 0
        while all(len(r) > n for r in renders) and len({r[n] for r in renders}) == 1:
            n += 1
        return tuple(renders[0][:n])


def _read_json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path}: missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")  # noqa: TRY004
    return data


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_of(cfg: dict[str, Any], directory: Path) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
