"""Tokenizer: tokenizer.json through the `tokenizers` library, chat template through jinja2.

Notable:
- encode() applies exactly what tokenizer.json says (Qwen3 adds no BOS); special tokens written in the text,
  like <|im_start|>, are recognised as single tokens.
- The chat template is rendered the way transformers renders it: a sandboxed jinja2 environment with
  trim_blocks/lstrip_blocks and the loopcontrols extension, `raise_exception`, `strftime_now` and a `tojson`
  filter that does not HTML-escape; messages with None values lose those keys; the special tokens
  (eos_token, pad_token, ...) are template variables. Qwen3's `enable_thinking=False` appends an empty
  <think></think> block to the generation prompt.
- eos ids come from generation_config.json (Qwen3: <|im_end|> and <|endoftext|>), else config.json, else the
  tokenizer_config eos_token.
- A dir without tokenizer.json falls back to the bundled Qwen3 tokenizer (Apache-2.0, Qwen) with a warning.
- IncrementalDecoder streams text token by token, holding back bytes of a UTF-8 character split over tokens.
"""

from __future__ import annotations

import gzip
import json
import numbers
import warnings
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from .chat_template import plain, render
from .checks import shorten
from .errors import InputError, TokenizerError
from .jsonio import LIMITS, check_regular_file, read_json, read_text

BUNDLED = "bundled Qwen3 tokenizer (qwen3lab/data/qwen3-tokenizer, Apache-2.0, Qwen)"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
MAX_DECODE_ID = 2**32 - 1  # `tokenizers` holds ids as u32; past the vocabulary up to this, an id decodes to ""


def bundled_file_text(name: str) -> str:
    """Decompressed text of a bundled tokenizer file ("tokenizer.json" or "tokenizer_config.json")."""
    res = resources.files("qwen3lab").joinpath("data", "qwen3-tokenizer", name + ".gz")
    try:
        return gzip.decompress(res.read_bytes()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{res}: the bundled tokenizer file is unreadable ({e}); reinstall qwen3lab") from None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    d = read_json(path, TokenizerError, what, max_bytes=LIMITS["config"])
    if not isinstance(d, dict):
        raise TokenizerError(f"{path}: expected a JSON object in {what}, got {type(d).__name__}")
    return d


def _tokenizer_from_str(text: str, source: str) -> HFTokenizer:
    try:
        return HFTokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception for bad files
        raise TokenizerError(f"{source}: not a valid tokenizer.json ({e})") from None


@lru_cache(maxsize=1)
def _bundled_tokenizer() -> HFTokenizer:
    # Parsing the 11 MB JSON takes about a second; the object is immutable for our use, so share it.
    return _tokenizer_from_str(bundled_file_text("tokenizer.json"), BUNDLED)


def _token_text(v: Any) -> str | None:
    # tokenizer_config stores special tokens as a string or as an AddedToken dict {"content": ...}
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _eos_list(v: Any) -> list[int] | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return [v]
    if isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        return list(v)
    return None


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------
class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, chat template, eos ids."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        tokenizer_config: dict[str, Any],
        eos_token_ids: list[int] | None = None,
        source: str = BUNDLED,
        chat_template_source: str | None = None,
        note: str | None = None,
    ):
        self._tok = tokenizer
        self.config = tokenizer_config
        self.source = source
        self.note = note  # set when something was substituted, e.g. the bundled tokenizer
        self._template_source = chat_template_source or source
        tmpl = tokenizer_config.get("chat_template")
        if isinstance(tmpl, list):  # older format: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = named.get("default")
        if tmpl is not None and not isinstance(tmpl, str):
            raise TokenizerError(f"{self._template_source}: chat_template must be a string, got {type(tmpl).__name__}")
        self.chat_template: str | None = tmpl
        self.special_tokens = {k: t for k in _SPECIAL_KEYS if (t := _token_text(tokenizer_config.get(k))) is not None}
        if eos_token_ids is None:
            eos = self.special_tokens.get("eos_token")
            eos_id = self._tok.token_to_id(eos) if eos is not None else None
            eos_token_ids = [eos_id] if eos_id is not None else []
        self.eos_token_ids: list[int] = list(eos_token_ids)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def bundled(cls) -> Tokenizer:
        """The Qwen3 tokenizer shipped with qwen3lab (byte-identical to Qwen/Qwen3-0.6B's)."""
        cfg = json.loads(bundled_file_text("tokenizer_config.json"))
        tok = _bundled_tokenizer()
        # Qwen3's generation_config.json: stop on <|im_end|> and <|endoftext|>
        eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
        return cls(tok, cfg, eos_token_ids=eos, source=BUNDLED)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Tokenizer of a checkpoint dir (tokenizer.json, tokenizer_config.json, generation_config.json,
        config.json); the bundled Qwen3 tokenizer when the dir has no tokenizer.json."""
        path = Path(path)
        if path.is_file():
            path = path.parent
        if not path.is_dir():
            raise TokenizerError(f"{path}: no such checkpoint directory")
        tj = path / "tokenizer.json"
        # exists(), not is_file(): a FIFO or directory under a tokenizer file's name is refused by name, never
        # skipped (nor opened: read_text checks it is a regular file of sane size first)
        if not tj.exists():
            tok = cls.bundled()
            tok.note = f"{path} has no tokenizer.json; using the {BUNDLED}"
            warnings.warn(tok.note, stacklevel=2)
            eos = cls._eos_from_dir(path)
            if eos:
                tok.eos_token_ids = eos
            return tok
        text = read_text(tj, TokenizerError, "tokenizer.json", max_bytes=LIMITS["tokenizer"])
        hf = _tokenizer_from_str(text, str(tj))
        tc_path = path / "tokenizer_config.json"
        tcfg = _read_json(tc_path, "tokenizer_config.json") if tc_path.exists() else {}
        tmpl_source = str(tc_path)
        # transformers 5 saves the template in its own file; it wins over tokenizer_config.json
        jinja_file = path / "chat_template.jinja"
        if jinja_file.exists():
            check_regular_file(jinja_file, TokenizerError, "chat template")  # a FIFO would block the read
            try:
                tcfg["chat_template"] = jinja_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{jinja_file}: cannot read ({e})") from None
            tmpl_source = str(jinja_file)
        return cls(hf, tcfg, eos_token_ids=cls._eos_from_dir(path), source=str(tj), chat_template_source=tmpl_source)

    @staticmethod
    def _eos_from_dir(path: Path) -> list[int] | None:
        for name in ("generation_config.json", "config.json"):
            f = path / name
            if f.exists():
                v = _read_json(f, name).get("eos_token_id")
                if v is not None:
                    eos = _eos_list(v)
                    if eos is None:
                        raise TokenizerError(f"{f}: eos_token_id must be an integer or a list of integers, got {v!r}")
                    return eos
        return None

    # ---- encode / decode ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (Qwen3: 151669; the model's
        vocab_size 151936 has padding rows beyond)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"encode() takes a str, got {type(text).__name__} {shorten(text)}"
                             + ("; decode bytes to str first (e.g. data.decode('utf-8'))"
                                if isinstance(text, (bytes, bytearray)) else ""))
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. from os.fsdecode of bytes that are not UTF-8
            raise InputError(f"encode(): the text is not valid Unicode: {e.object[e.start:e.end]!r} at index "
                             f"{e.start} is a lone surrogate (invalid UTF-8 decoded with surrogateescape?)") from None
        return self._tok.encode(text).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of token ids: a sequence of integers (or a 1-D numpy array / tensor) in 0..MAX_DECODE_ID."""
        if not isinstance(skip_special_tokens, bool):
            raise InputError(f"skip_special_tokens must be True or False, got {shorten(skip_special_tokens)}")
        if getattr(ids, "ndim", None) == 1 and hasattr(ids, "tolist"):  # a numpy array or torch tensor
            ids = ids.tolist()
        if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Sequence):
            raise InputError(f"decode() takes a sequence of token ids, got {type(ids).__name__} {shorten(ids)}")
        for k, i in enumerate(ids):
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i <= MAX_DECODE_ID:
                raise InputError(f"cannot decode token id {shorten(i)} at index {k}: token ids are integers in "
                                 f"0..{MAX_DECODE_ID} (ids past this tokenizer's {self.vocab_size} decode to "
                                 f"nothing)")
        # Ids past the tokenizer (Qwen3's embedding has padding rows 151669..151935, which a random-weight model
        # can emit) decode to nothing, as in `tokenizers` and transformers.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def special_token_ids(self) -> set[int]:
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    # ---- chat --------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text transformers' apply_chat_template(..., tokenize=False) gives for these messages."""
        if self.chat_template is None:
            raise TokenizerError(f"{self._template_source}: no chat_template; cannot format chat messages")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InputError("apply_chat_template needs a non-empty list of messages")
        chat = []
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise InputError(f"message {k} must be a dict with 'role' and 'content', got {m!r}")
            # Keys whose value is None are dropped (an OpenAI-style content=None must not render as "None")
            m = {key: v for key, v in m.items() if v is not None}
            # Reasoning passed as "thinking"/"reasoning" is what templates read as reasoning_content
            if "reasoning_content" not in m:
                for alias in ("thinking", "reasoning"):
                    if alias in m:
                        m = {"thinking": m[alias], **m, "reasoning_content": m[alias]}
                        break
            chat.append(plain(m))
        variables = {**self.special_tokens, **plain(kwargs)}
        variables["enable_thinking"] = bool(enable_thinking)
        return self._render(dict(messages=chat, tools=plain(tools), documents=None,
                                 add_generation_prompt=add_generation_prompt, **variables))

    def _render(self, variables: dict[str, Any]) -> str:
        return render(self.chat_template, variables, f"{self._template_source}: chat_template")

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Token ids of the chat prompt (the template writes every special token itself)."""
        return self.encode(self.apply_chat_template(messages, **kwargs))

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab={self.vocab_size}, eos={self.eos_token_ids})"


class IncrementalDecoder:
    """Streaming detokenizer: push(token_id) returns the text that token completes.

    Decodes a short window (from the last point where the text was whole) instead of the full sequence; a
    window ending in U+FFFD is an unfinished multi-byte character and waits for the next token. flush()
    returns whatever is still held back at the end (e.g. a genuinely invalid byte sequence)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: text of ids[_prefix:_read] was already emitted
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return now[len(before):]
