"""tokenizer.py against the `tokenizers` library, transformers' AutoTokenizer and apply_chat_template, and the
published Qwen3 chat prompt ids."""

from __future__ import annotations

import difflib
import hashlib
import json
from importlib import resources

import pytest
import tokenizers

from qwen3lab.errors import InputError, TokenizerError
from qwen3lab.tokenizer import IncrementalDecoder, Tokenizer, bundled_file_text

CHAT_PROMPT = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
CHAT_IDS = [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]  # published with Qwen3

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "你好，世界",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "日本語のテキスト：こんにちは、カタカナとひらがな。漢字も。",
    "مرحبا بالعالم، هذه جملة باللغة العربية.",
    "Emoji: 🙂🚀👩‍👩‍👧‍👦 🇯🇵 and rare ones 🦜🫠",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x != 0: print(x ** 2)\n",
    "spaces:    four   three\n\n\n\nnewlines\r\n  \t tabs\t\t end   ",
    "Numbers 1234567890 3.14159 -42 1e-6 and 'quotes' \"double\" can't won't",
    "Ünïcödé ñ ß ø Ελληνικά Русский текст हिन्दी 한국어 ไทย",
    "mixed <|im_start|>special tokens<|im_end|> inside <think>text</think> <|endoftext|>",
    "",
    " ",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A dir holding the bundled tokenizer files, decompressed (what make_model writes)."""
    d = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_text(bundled_file_text(name), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def ours(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def ref_tok(tok_dir):
    return tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def test_bundled_files_are_the_published_ones():
    # SHA256SUMS records the sha256 of the files published with Qwen/Qwen3-0.6B
    sums = resources.files("qwen3lab").joinpath("data", "qwen3-tokenizer", "SHA256SUMS").read_text().split("\n")
    expected = {line.split()[1]: line.split()[0] for line in sums if line.strip()}
    for name, digest in expected.items():
        got = hashlib.sha256(bundled_file_text(name).encode("utf-8")).hexdigest()
        assert got == digest, f"{name}: sha256 {got} != published {digest}"


@pytest.mark.slow
def test_chat_prompt_ids(ours):
    assert ours.encode(CHAT_PROMPT) == CHAT_IDS
    assert ours.encode_chat([{"role": "user", "content": "Hello"}]) == CHAT_IDS
    assert ours.apply_chat_template([{"role": "user", "content": "Hello"}]) == CHAT_PROMPT
    assert ours.encode(ours.apply_chat_template([{"role": "user", "content": "Hello"}])) == CHAT_IDS


def test_basic_properties(ours):
    assert ours.vocab_size == 151669  # 151643 regular + 26 added tokens
    assert ours.id_to_token(151644) == "<|im_start|>" and ours.id_to_token(151667) == "<think>"
    assert ours.token_to_id("<|im_end|>") == 151645
    assert ours.eos_token_ids == [151645]  # no generation_config.json / config.json: tokenizer_config eos_token
    assert {151643, 151644, 151645} <= ours.special_token_ids and 151667 not in ours.special_token_ids


@pytest.mark.hf
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_matches_tokenizers_and_transformers(ours, ref_tok, hf_tok, text):
    ref = ref_tok
    got = ours.encode(text)
    want = ref.encode(text).ids
    assert got == want, f"ours {got}\ntokenizers {want}"
    hf_ids = hf_tok.encode(text)
    assert got == hf_ids, f"ours {got}\ntransformers {hf_ids}"
    # decode inverts encode (NFC-normalised text) and equals transformers' decode
    assert ours.decode(got) == hf_tok.decode(hf_ids)
    assert ours.decode(got, skip_special_tokens=True) == hf_tok.decode(hf_ids, skip_special_tokens=True)


def test_special_tokens_in_text_are_single_tokens(ours):
    ids = ours.encode("a<|im_start|>b<think>c")
    assert 151644 in ids and 151667 in ids
    assert ours.decode(ids) == "a<|im_start|>b<think>c"


# ---- chat template against transformers -----------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & later",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "城市"}},
                                               "required": ["city"]}}}]

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello"}],
    "system_user": [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "What is 2+2?"}],
    "multi_turn_think": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?"},
        {"role": "user", "content": "Say 你好"},
        {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n你好"},
        {"role": "user", "content": "Thanks"},
    ],
    "reasoning_content_field": [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2", "reasoning_content": "one plus one"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "two plus two"},
    ],
    "tools": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temp": 21, "sky": "clear"}'},
        {"role": "tool", "content": '{"humidity": 40}'},
    ],
    "none_content": [{"role": "user", "content": "Hey"},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}],
}


def _show_diff(a: str, b: str) -> str:
    return "\n".join(difflib.unified_diff(b.splitlines(), a.splitlines(), "transformers", "ours", lineterm=""))


@pytest.mark.hf
@pytest.mark.parametrize("thinking", [True, False], ids=["think", "nothink"])
@pytest.mark.parametrize("gen_prompt", [True, False], ids=["genprompt", "nogen"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(ours, hf_tok, name, gen_prompt, thinking):
    msgs = CONVERSATIONS[name]
    tools = TOOLS if name == "tools" else None
    want = hf_tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen_prompt,
                                      enable_thinking=thinking)
    got = ours.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen_prompt, enable_thinking=thinking)
    assert got == want, _show_diff(got, want)
    want_ids = hf_tok.apply_chat_template(msgs, tools=tools, tokenize=True, return_dict=False,
                                          add_generation_prompt=gen_prompt, enable_thinking=thinking)
    assert ours.encode_chat(msgs, tools=tools, add_generation_prompt=gen_prompt,
                            enable_thinking=thinking) == list(want_ids)


@pytest.mark.hf
def test_chat_template_thinking_default_matches_transformers_default(ours, hf_tok):
    msgs = CONVERSATIONS["system_user"]
    want = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)  # enable_thinking unset
    assert ours.apply_chat_template(msgs) == want
    off = ours.apply_chat_template(msgs, enable_thinking=False)
    assert off == want + "<think>\n\n</think>\n\n"  # Qwen3's documented non-thinking prompt


def test_messages_not_modified(ours):
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<think>a</think>b"}]
    before = json.dumps(msgs)
    ours.apply_chat_template(msgs)
    assert json.dumps(msgs) == before


# ---- incremental decoding ---------------------------------------------------------------------------
@pytest.mark.parametrize("text", [t for t in TEXTS if t.strip()] + ["你好，世界" * 3 + "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦜"])
@pytest.mark.parametrize("skip", [False, True])
def test_incremental_decoder_equals_full_decode(ours, text, skip):
    ids = ours.encode(text)
    dec = IncrementalDecoder(ours, skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids]
    streamed = "".join(pieces) + dec.flush()
    assert streamed == ours.decode(ids, skip_special_tokens=skip), pieces
    assert all("\ufffd" not in p for p in pieces), pieces


def test_incremental_decoder_holds_split_characters(ours):
    # 🦜 is several byte-level tokens: nothing may be emitted until its last byte arrives
    ids = ours.encode("🦜")
    assert len(ids) > 1, ids
    dec = IncrementalDecoder(ours)
    pieces = [dec.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🦜", pieces
    # a dangling partial character comes out (as U+FFFD, like a full decode) at flush
    dec = IncrementalDecoder(ours)
    assert dec.push(ids[0]) == "" and dec.flush() == ours.decode(ids[:1])


# ---- eos ids and fallbacks -----------------------------------------------------------------------------
@pytest.mark.slow
def test_eos_ids_sources(tok_dir, tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_text((tok_dir / name).read_text(encoding="utf-8"), encoding="utf-8")
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3", "eos_token_id": 151643}))
    assert Tokenizer.from_dir(d).eos_token_ids == [151643]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    assert Tokenizer.from_dir(d).eos_token_ids == [151645, 151643]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(TokenizerError, match="generation_config.json: eos_token_id must be"):
        Tokenizer.from_dir(d)


def test_fallback_to_bundled(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    with pytest.warns(UserWarning, match="has no tokenizer.json; using the bundled Qwen3 tokenizer"):
        t = Tokenizer.from_dir(tmp_path)
    assert "bundled" in t.note and t.encode(CHAT_PROMPT) == CHAT_IDS and t.eos_token_ids == [7, 8]
    assert Tokenizer.bundled().eos_token_ids == [151645, 151643]


@pytest.mark.slow
def test_errors_name_the_file(tok_dir, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=f"{d / 'tokenizer.json'}: not a valid tokenizer.json"):
        Tokenizer.from_dir(d)
    (d / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text(encoding="utf-8"), encoding="utf-8")
    (d / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match=f"{d / 'tokenizer_config.json'}: malformed JSON at line 1"):
        Tokenizer.from_dir(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    t = Tokenizer.from_dir(d)
    with pytest.raises(TokenizerError, match="tokenizer_config.json: no chat_template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}ok"}))
    t = Tokenizer.from_dir(d)
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TokenizerError, match="chat_template raised: only one message"):
        t.apply_chat_template([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}])
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(TokenizerError, match="syntax error"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="no such checkpoint directory"):
        Tokenizer.from_dir(tmp_path / "absent")
    with pytest.raises(InputError, match="non-empty list of messages"):
        t.apply_chat_template([])
    with pytest.raises(InputError, match="cannot decode token id -1"):
        t.decode([1, -1])


@pytest.mark.hf
def test_decode_padding_ids_like_transformers(ours, hf_tok):
    # ids between the tokenizer's 151669 and the model's vocab_size 151936 exist in random-weight models' output
    ids = [9707, 151700, 151935, 9707, 151645]
    assert ours.decode(ids) == hf_tok.decode(ids) == "HelloHello<|im_end|>"
    dec = IncrementalDecoder(ours)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "HelloHello<|im_end|>"


@pytest.mark.hf
def test_template_sandbox_and_tojson(tok_dir, tmp_path):
    d = tmp_path / "sb"
    d.mkdir()
    (d / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text(encoding="utf-8"), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0].content | tojson }}"}))
    t = Tokenizer.from_dir(d)
    # transformers' tojson: no HTML escaping, non-ASCII kept
    assert t.apply_chat_template([{"role": "user", "content": "<a & 你>"}]) == '"<a & 你>"'
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ ''.__class__.__mro__ }}"}))
    with pytest.raises(TokenizerError):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}])


PLAIN_TEMPLATE = """{% for m in messages %}
  {% if m.role == 'system' %}
    {% continue %}
  {% endif %}
  <{{ m.role }}>
  {{ m.content }}
  {% set ns = namespace(n=loop.index) %}
  {% if ns.n > 2 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{{ eos_token }}{% endif %}
"""


@pytest.mark.hf
def test_whitespace_control_matches_transformers(tok_dir, hf_tok, tmp_path):
    # trim_blocks / lstrip_blocks / loopcontrols matter for templates without {%- -%}; Qwen3's uses dashes only
    d = tmp_path / "plain"
    d.mkdir()
    (d / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text(encoding="utf-8"), encoding="utf-8")
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = PLAIN_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    ours = Tokenizer.from_dir(d)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "user", "content": "d"}]
    for gen in (True, False):
        want = hf_tok.apply_chat_template(msgs, chat_template=PLAIN_TEMPLATE, tokenize=False, add_generation_prompt=gen)
        got = ours.apply_chat_template(msgs, add_generation_prompt=gen)
        assert got == want, _show_diff(got, want)
