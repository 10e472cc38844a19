"""serve/ without a server: the streaming reasoning split against the whole-text split (cut at every
possible place), and request checking naming the field. Unit tier: no model, no sockets."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from qwen3lab.serve.protocol import APIError, chat_prompt, parse_common  # noqa: E402
from qwen3lab.serve.reasoning import ReasoningStream, split_reasoning  # noqa: E402

TEXTS = [
    "<think>\nlet me see</think>\n\nThe answer is 4.",
    "<think></think>\n\nshort",
    "no thinking at all",
    "opened by the template</think>the answer",
    "<think>never closed",
    "<thi",
    "a < b and c </ d",
]


def _stream(text: str, cuts: list[int], opened: bool) -> tuple[str, str]:
    rs, r, c = ReasoningStream(opened), "", ""
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        dr, dc = rs.push(text[a:b])
        r, c = r + dr, c + dc
    dr, dc = rs.finish()
    return r + dr, c + dc


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_split_equals_whole_split_at_every_cut(text):
    whole_r, whole_c = split_reasoning(text)
    opened = "</think>" in text and not text.startswith("<think>")  # the prompt opened <think>
    for cut in range(len(text) + 1):
        for cuts in ([cut], list(range(1, len(text)))):  # one cut anywhere; one character per delta
            r, c = _stream(text, cuts, opened)
            if "</think>" in text:
                assert (r.strip("\n") or None, c) == (whole_r, whole_c), (text, cuts, r, c, whole_r, whole_c)
            elif text.startswith("<think>"):  # never closed: streaming sent it as reasoning (it could not know)
                assert (r, c) == (text.removeprefix("<think>"), ""), (text, cuts, r, c)
            else:
                assert (r, c) == ("", text), (text, cuts, r, c)


def test_split_reasoning_by_hand():
    assert split_reasoning("<think>\nhmm\n</think>\n\nHi") == ("hmm", "Hi")
    assert split_reasoning("Hi") == (None, "Hi")  # no </think>: all content, as vLLM's Qwen3 parser


@pytest.mark.parametrize("body, param", [
    ({"temperature": "hot"}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": 3}, "model"),
    ({"logprobs": 99}, "logprobs"),
])
def test_parse_common_names_the_field(body, param):
    with pytest.raises(APIError) as e:
        parse_common({"prompt": "x", **body}, chat=False)
    assert e.value.status == 400 and e.value.param == param and param in e.value.message, e.value.body()


def test_chat_fields():
    f = parse_common({"messages": [], "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 3}, chat=True)
    assert (f["max_tokens"], f["logprobs"]) == (7, 3)
    assert parse_common({"messages": []}, chat=True)["max_tokens"] is None  # the rest of the context
    with pytest.raises(APIError) as e:
        parse_common({"top_logprobs": 2}, chat=True)
    assert e.value.param == "top_logprobs"


def test_chat_prompt_uses_the_template_and_thinking_switch():
    from qwen3lab.tokenizer import Tokenizer

    tok = Tokenizer.bundled()
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    ids = chat_prompt({"messages": msgs, "chat_template_kwargs": {"enable_thinking": False}}, tok)
    assert ids == tok.encode_chat([{"role": "user", "content": "Hi"}], enable_thinking=False)
    with pytest.raises(APIError) as e:
        chat_prompt({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, tok)
    assert e.value.param == "messages[0].content"
