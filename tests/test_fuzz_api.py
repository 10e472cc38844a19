"""Fuzz the Python API's boundary (issue 13): qwen3lab.load, Qwen3ForCausalLM (construction, generate, new_task,
batch_infer_one_round), the engine's generate / InferTask, and the tokenizer's encode / decode.

Every wrong-typed or out-of-range argument must be an InputError (a Qwen3LabError: the CLI prints it as one
line) whose message names the argument, raised before any forward runs; every valid value must give the
result the canonical spelling of the same call gives. One small random model (vocab 300, no tokenizer) takes
the id-level cases; one make-model checkpoint (real vocabulary and tokenizer) takes paths and text.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qwen3lab
from fuzz_settings import fuzz
from qwen3lab.api import resolve_model_path
from qwen3lab.config import Qwen3Config
from qwen3lab.engine.generate import TokenStream
from qwen3lab.engine.generate import generate as engine_generate
from qwen3lab.engine.runner import batch_infer_one_round
from qwen3lab.engine.sampler import SamplingParams
from qwen3lab.engine.task import InferTask
from qwen3lab.errors import InputError, Qwen3LabError
from qwen3lab.qwen3 import Qwen3ForCausalLM
from qwen3lab.random_init import random_weights
from qwen3lab.tokenizer import MAX_DECODE_ID

pytestmark = pytest.mark.slow

VOCAB = 300
CTX = 64


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


class Forwards:
    """Counts the model's forwards, to prove an error came before anything ran."""

    def __init__(self, module: torch.nn.Module):
        self.n = 0
        module.register_forward_pre_hook(lambda *_: self._count())

    def _count(self):
        self.n += 1


@pytest.fixture(scope="module")
def small():
    """(api model without a tokenizer, forward counter): vocab 300, context 64, eager; float64, so a batch and a
    lone run cannot differ by a rounding that flips a greedy choice."""
    d = {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB,
         "rope_theta": 1e4, "max_position_embeddings": CTX, "tie_word_embeddings": True}
    cfg = Qwen3Config.from_dict(d, source="fuzz config")  # no eos: every run makes all its tokens
    m = Qwen3ForCausalLM.from_weights(cfg, random_weights(cfg, seed=2), dtype="float64", fast=False)
    return m, Forwards(m.model)


class PathLikeDir(os.PathLike):
    def __init__(self, p):
        self.p = p

    def __fspath__(self):
        return self.p


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(dir, api model loaded through a custom os.PathLike): the tiny preset, real vocabulary and tokenizer."""
    from qwen3lab.make_model import make_model

    path = make_model(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", layers=1, dtype="float32", seed=3)
    return path, Qwen3ForCausalLM.from_pretrained(PathLikeDir(str(path)), dtype="float32", fast=False)


def refused(fn, *names: str) -> InputError:
    """fn() must raise an InputError (a Qwen3LabError) whose message names one of `names`."""
    with pytest.raises(InputError) as e:
        fn()
    assert isinstance(e.value, Qwen3LabError)
    msg = str(e.value)
    assert any(n in msg for n in names), f"{msg!r} names none of {names}"
    assert "\n" not in msg and len(msg) < 400, f"not one short line: {msg!r}"
    return e.value


# ---- strategies ---------------------------------------------------------------------------------------------
junk = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=4), st.binary(max_size=4),
                 st.lists(st.integers(-2, 2), max_size=2),
                 st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
not_paths = st.one_of(st.integers(), st.binary(max_size=12), st.builds(bytearray, st.binary(max_size=6)),
                      st.lists(st.text(max_size=5), max_size=3), st.tuples(st.text(max_size=4)), st.floats(),
                      st.booleans(), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
                      st.sets(st.integers(0, 3), max_size=2))
ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)
bad_id = st.one_of(st.integers(max_value=-1), st.integers(min_value=VOCAB), st.floats(), st.booleans(),
                   st.text(max_size=2), st.none(), st.lists(st.integers(0, 5), max_size=2), st.binary(max_size=2))


@st.composite
def with_bad_element(draw, good=ids, bad=bad_id):
    """A sequence of valid ids with one bad element at a random place."""
    xs = draw(good)
    xs.insert(draw(st.integers(0, len(xs))), draw(bad))
    return xs


bad_prompts = st.one_of(
    st.binary(min_size=1, max_size=12),  # b"hello": text or ids? (it used to run as ids)
    st.builds(bytearray, st.binary(min_size=1, max_size=6)),
    with_bad_element(),
    st.just([]),
    st.lists(st.integers(0, 5), min_size=CTX, max_size=CTX + 3),  # no room left in the context
    st.integers(), st.none(), st.floats(), st.sets(st.integers(0, 5), min_size=1, max_size=3),
    st.dictionaries(st.integers(0, 5), st.integers(0, 5), min_size=1, max_size=2),
    st.lists(st.integers(0, 5), min_size=1, max_size=4).map(lambda x: np.array(x, dtype=np.float32)),
    st.lists(st.booleans(), min_size=1, max_size=4).map(np.array),
    st.lists(st.integers(0, 5), min_size=2, max_size=4).map(lambda x: torch.tensor([x])),  # 2-D
)
bad_counts = st.one_of(st.integers(max_value=0), st.booleans(), st.floats(), st.text(max_size=3), st.just("x"),
                       st.lists(st.integers(1, 3), max_size=2), st.binary(max_size=2), st.just(np.float64(2.0)))
bad_streams = st.one_of(st.integers(), st.text(max_size=3), st.floats(), st.booleans(), st.binary(max_size=3),
                        st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
bad_stops = st.one_of(st.floats(), st.booleans(), st.integers(max_value=-1), st.integers(min_value=VOCAB),
                      st.binary(min_size=1, max_size=3), st.just(""),
                      with_bad_element(st.lists(st.integers(0, VOCAB - 1), max_size=3),
                                       st.one_of(st.integers(max_value=-1), st.integers(min_value=VOCAB), st.floats(),
                                                 st.booleans(), st.none(), st.binary(max_size=2), st.just(""),
                                                 st.lists(st.integers(0, 3), max_size=1))))


# ---- paths: qwen3lab.load, from_pretrained, resolve_model_path -----------------------------------------------
PATH_ENTRIES = {
    "load": lambda p: qwen3lab.load(p),
    "load-numpy": lambda p: qwen3lab.load(p, backend="numpy"),
    "from_pretrained": lambda p: Qwen3ForCausalLM.from_pretrained(p, fast=False),
}


@pytest.mark.parametrize("entry", list(PATH_ENTRIES))
@fuzz(25)
@given(p=not_paths)
def test_non_path_values_are_refused_naming_path(entry, p):
    e = refused(lambda: PATH_ENTRIES[entry](p), "path")
    assert type(p).__name__ in str(e)


@pytest.mark.parametrize("p,msg", [("", "path is empty"), ("a\0b", "NUL character"),
                                   ("x" * 5000, "File name too long"),
                                   (PathLikeDir(b"/tmp"), "path must be a str path")])
def test_unusable_path_strings(p, msg):
    with pytest.raises(Qwen3LabError, match=msg):
        qwen3lab.load(p)


def test_valid_path_spellings_resolve_to_the_checkpoint(ckpt):
    path, m = ckpt  # the fixture itself loaded through an os.PathLike
    for p in (str(path), Path(path), PathLikeDir(str(path))):
        assert resolve_model_path(p) == Path(path)
    with pytest.raises(Qwen3LabError, match="no such checkpoint directory"):
        qwen3lab.load(str(path / "missing"))
    b = qwen3lab.load(Path(path), backend="numpy")  # and a Path runs: the oracle and our model agree
    logits = b.run([9707, 11]).logits[-1]
    assert int(np.argmax(logits)) == m.generate([9707, 11], max_steps=1).token_ids[0]


class DefaultModel(Exception):
    pass


@pytest.mark.parametrize("p", [None, "default", Path("default")])
def test_none_and_default_still_mean_the_default_model(monkeypatch, p):
    import qwen3lab.make_model

    def default():
        raise DefaultModel  # reached the default model: the argument passed the checks

    monkeypatch.setattr(qwen3lab.make_model, "ensure_default_model", default)
    for entry in ("load", "from_pretrained"):
        with pytest.raises(DefaultModel):
            PATH_ENTRIES[entry](p)


# ---- prompts -----------------------------------------------------------------------------------------------
PROMPT_ENTRIES = {
    "generate": lambda m, p: m.generate(p, max_steps=2),
    "new_task": lambda m, p: m.new_task(p, max_new_tokens=2),
    "engine.generate": lambda m, p: engine_generate(m.model, p, max_steps=2),
}


@pytest.mark.parametrize("entry", list(PROMPT_ENTRIES))
@fuzz(25)
@given(p=bad_prompts)
def test_bad_prompts_are_refused_before_any_forward(small, entry, p):
    m, fwd = small
    before = fwd.n
    refused(lambda: PROMPT_ENTRIES[entry](m, p), "prompt")
    assert fwd.n == before


@fuzz(15)
@given(p=ids, form=st.sampled_from(["tuple", "numpy", "numpy-int32", "tensor", "np-scalars"]))
def test_every_spelling_of_token_ids_gives_the_same_tokens(small, p, form):
    m, _ = small
    spelled = {"tuple": tuple(p), "numpy": np.array(p), "numpy-int32": np.array(p, dtype=np.int32),
               "tensor": torch.tensor(p), "np-scalars": [np.int64(t) for t in p]}[form]
    want = m.generate(p, max_steps=3)
    got = m.generate(spelled, max_steps=3)
    assert got.token_ids == want.token_ids and len(got.token_ids) == 3 and got.finish_reason == "length"
    assert all(type(t) is int and 0 <= t < VOCAB for t in got.token_ids)
    task = m.new_task(spelled, max_new_tokens=3)
    while not task.finished:
        m.batch_infer_one_round([task])
    assert task.generated == want.token_ids and all(type(t) is int for t in task.tokens)


# ---- max_steps / max_new_tokens ----------------------------------------------------------------------------
COUNT_ENTRIES = {
    "generate": (lambda m, v: m.generate([1, 2], max_steps=v), "max_steps"),
    "engine.generate": (lambda m, v: engine_generate(m.model, [1, 2], max_steps=v), "max_steps"),
    "TokenStream": (lambda m, v: TokenStream(m.model, [1, 2], max_steps=v), "max_steps"),
    "new_task": (lambda m, v: m.new_task([1, 2], max_new_tokens=v), "max_new_tokens"),
    "InferTask": (lambda m, v: InferTask([1, 2], max_new_tokens=v), "max_new_tokens"),
}


@pytest.mark.parametrize("entry", list(COUNT_ENTRIES))
@fuzz(12)
@given(v=bad_counts)
def test_bad_step_counts_are_refused_naming_the_argument(small, entry, v):
    m, fwd = small
    fn, name = COUNT_ENTRIES[entry]
    before = fwd.n
    e = refused(lambda: fn(m, v), name)
    assert ">= 1" in str(e) and fwd.n == before


@fuzz(8)
@given(n=st.integers(1, 6), numpy=st.booleans())
def test_valid_step_counts_give_that_many_tokens(small, n, numpy):
    m, _ = small
    full = m.generate([4, 5, 6], max_steps=6).token_ids
    k = np.int64(n) if numpy else n
    assert m.generate([4, 5, 6], max_steps=k).token_ids == full[:n]
    t = m.new_task([4, 5, 6], max_new_tokens=k)
    while not t.finished:
        m.batch_infer_one_round([t])
    assert t.generated == full[:n] and t.finish_reason == "length"


# ---- stream ------------------------------------------------------------------------------------------------
@fuzz(15)
@given(s=bad_streams)
def test_a_stream_that_is_not_callable_is_refused_before_generating(small, s):
    m, fwd = small
    before = fwd.n
    refused(lambda: m.generate([1, 2, 3], max_steps=2, stream=s), "stream")
    refused(lambda: engine_generate(m.model, [1, 2, 3], max_steps=2, stream=s), "stream")
    assert fwd.n == before


class Recorder:
    def __init__(self):
        self.seen = []

    def __call__(self, tok, text):
        self.seen.append(tok)


def test_callable_streams_see_every_token(small):
    m, _ = small
    want = m.generate([7, 8], max_steps=4).token_ids
    seen: list[int] = []
    rec = Recorder()
    for s in (lambda tok, text: seen.append(tok), rec, functools.partial(lambda out, tok, text: out.append(tok), seen)):
        assert m.generate([7, 8], max_steps=4, stream=s).token_ids == want
    assert seen == want + want and rec.seen == want


# ---- stop --------------------------------------------------------------------------------------------------
@fuzz(25)
@given(s=bad_stops)
def test_bad_stop_values_are_refused_naming_stop(small, s):
    m, fwd = small
    before = fwd.n
    refused(lambda: m.generate([1, 2], max_steps=2, stop=s), "stop")
    refused(lambda: m.new_task([1, 2], stop=s), "stop")
    assert fwd.n == before


@fuzz(8)
@given(k=st.integers(0, 7), spell=st.sampled_from(["int", "list", "numpy"]))
def test_a_valid_stop_id_ends_generation_there(small, k, spell):
    m, _ = small
    free = m.generate([9, 10, 11], max_steps=8).token_ids
    tok = free[k]
    stop = {"int": tok, "list": [tok], "numpy": [np.int64(tok)]}[spell]
    r = m.generate([9, 10, 11], max_steps=8, stop=stop)
    first = free.index(tok)
    assert r.token_ids == free[:first + 1] and r.finish_reason == "stop"


# ---- tasks and batches -------------------------------------------------------------------------------------
bad_batches = st.one_of(
    st.integers(), st.none(), st.floats(), st.text(max_size=3), st.binary(max_size=3),
    st.dictionaries(st.integers(0, 3), st.integers(), min_size=1, max_size=2),
    st.lists(st.one_of(junk, st.just(SamplingParams()), st.builds(lambda x: InferTask, st.none())), min_size=1,
             max_size=3),
)


@fuzz(25)
@given(tasks=bad_batches, pos=st.integers(0, 2))
def test_a_batch_that_is_not_a_list_of_tasks_is_refused_untouched(small, tasks, pos):
    m, fwd = small
    good = m.new_task([1, 2, 3], max_new_tokens=2)
    if isinstance(tasks, list):
        tasks.insert(min(pos, len(tasks)), good)  # a good task among the bad: it must stay untouched
    before = fwd.n
    refused(lambda: m.batch_infer_one_round(tasks), "task")
    refused(lambda: batch_infer_one_round(m.model, tasks), "task")
    assert fwd.n == before and good.cache is None and good.tokens == [1, 2, 3]


def run_out(m, task) -> list[int]:
    while not task.finished:
        m.batch_infer_one_round([task])
    return task.generated


@fuzz(12)
@given(prompts=st.lists(ids, min_size=1, max_size=3), dup=st.integers(0, 2), at=st.integers(0, 3),
       rounds=st.integers(0, 2))
def test_one_task_twice_in_a_batch_is_refused_and_corrupts_nothing(small, prompts, dup, at, rounds):
    m, fwd = small
    tasks = [m.new_task(p, max_new_tokens=4) for p in prompts]
    for _ in range(rounds):  # duplicates refused whether the task is fresh or already has a cache
        for t in tasks:
            m.batch_infer_one_round([t])
    state = [(list(t.tokens), t.cache.length if t.cache else None) for t in tasks]
    batch = list(tasks)
    batch.insert(min(at, len(batch)), tasks[dup % len(tasks)])
    before = fwd.n
    e = refused(lambda: m.batch_infer_one_round(batch), "same task")
    assert fwd.n == before
    assert [(t.tokens, t.cache.length if t.cache else None) for t in tasks] == state
    i, j = sorted(k for k, t in enumerate(batch) if t is tasks[dup % len(tasks)])
    assert f"tasks {i} and {j}" in str(e)
    for p, t in zip(prompts, tasks, strict=True):  # each still generates what a fresh task does
        assert run_out(m, t) == run_out(m, m.new_task(p, max_new_tokens=4))


def test_two_tasks_sharing_one_cache_are_refused(small):
    m, fwd = small
    a, b = m.new_task([1, 2], max_new_tokens=3), m.new_task([1, 2], max_new_tokens=3)
    m.batch_infer_one_round([a])
    b.cache = a.cache
    before = fwd.n
    refused(lambda: m.batch_infer_one_round([a, b]), "share one KV cache")
    assert fwd.n == before


TASK_FIELDS = {"sampling": st.one_of(junk, st.just(SamplingParams)),
               "stop_ids": st.one_of(st.floats(), st.text(min_size=1, max_size=3), st.binary(min_size=1, max_size=2),
                                     st.lists(st.one_of(st.floats(), st.booleans(), st.integers(max_value=-1),
                                                        st.text(max_size=1)), min_size=1, max_size=2)),
               "tokens": st.one_of(st.binary(min_size=1, max_size=3), st.text(min_size=1, max_size=3), st.integers(),
                                   st.none(), with_bad_element(bad=st.one_of(st.floats(), st.booleans(), st.none()))),
               "max_new_tokens": bad_counts,
               "cache": st.one_of(st.integers(), st.text(max_size=2), st.lists(st.integers(), max_size=1))}


@pytest.mark.parametrize("field", list(TASK_FIELDS))
@fuzz(8)
@given(data=st.data())
def test_infer_task_fields_are_checked_at_construction_and_before_a_round(small, field, data):
    m, fwd = small
    v = data.draw(TASK_FIELDS[field])
    refused(lambda: InferTask(**{"tokens": [1, 2], field: v}), field)
    t = InferTask([1, 2], max_new_tokens=2)  # reassigned after construction: caught before the forward
    setattr(t, field, v)
    before = fwd.n
    refused(lambda: m.batch_infer_one_round([t]), f"task 0 {field}", "task 0: invalid token id")
    assert fwd.n == before


def test_constructor_arguments(small):
    m, _ = small
    for v in (None, 5, "model", m, torch.nn.Linear(2, 2)):
        refused(lambda v=v: Qwen3ForCausalLM(v), "model")
    for v in (5, "tok", object()):
        refused(lambda v=v: Qwen3ForCausalLM(m.model, tokenizer=v), "tokenizer")
    cfg = m.config
    refused(lambda: Qwen3ForCausalLM.from_weights({"vocab_size": 3}, {}), "cfg")
    refused(lambda: Qwen3ForCausalLM.from_weights(cfg, [1, 2]), "weights")
    refused(lambda: Qwen3ForCausalLM.from_weights(cfg, random_weights(cfg, seed=2), fast="no"), "fast")
    refused(lambda: Qwen3ForCausalLM.from_pretrained("x", spec="cpu"), "spec")
    assert Qwen3ForCausalLM(m.model).generate([3], max_steps=2).token_ids == m.generate([3], max_steps=2).token_ids


# ---- tokenizer encode / decode -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(ckpt):
    return ckpt[1].tokenizer


bad_decode = st.one_of(
    with_bad_element(st.lists(st.integers(0, 151000), max_size=5),
                     st.one_of(st.integers(min_value=MAX_DECODE_ID + 1), st.integers(max_value=-1), st.floats(),
                               st.booleans(), st.text(max_size=2), st.none(), st.lists(st.integers(0, 3), max_size=2))),
    st.text(min_size=1, max_size=4), st.integers(), st.binary(min_size=1, max_size=4), st.none(), st.floats(),
    st.sets(st.integers(0, 5), min_size=1, max_size=2),
)


@fuzz(30)
@given(v=bad_decode)
def test_decode_refuses_what_is_not_token_ids(tok, v):
    refused(lambda: tok.decode(v), "token id", "decode()")


@fuzz(15)
@given(v=st.lists(st.integers(0, 151668), max_size=12), pad=st.lists(st.integers(151669, MAX_DECODE_ID), max_size=3),
       skip=st.booleans())
def test_decode_valid_ids_like_the_tokenizers_library(tok, v, pad, skip):
    want = tok._tok.decode(v, skip_special_tokens=skip)
    assert tok.decode(v, skip_special_tokens=skip) == want
    assert tok.decode(np.array(v + pad, dtype=np.int64), skip_special_tokens=skip) == want  # past the vocab: ""


@fuzz(15)
@given(v=st.one_of(st.binary(max_size=4), st.integers(), st.none(), st.lists(st.text(max_size=2), max_size=2),
                   st.builds(bytearray, st.binary(max_size=3)), st.floats()),
       text=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20))
def test_encode_takes_str_only_and_round_trips(tok, v, text):
    refused(lambda: tok.encode(v), "encode()")
    assert tok.decode(tok.encode(text)) == text


@fuzz(10)
@given(head=st.text(max_size=5), sur=st.integers(0xD800, 0xDFFF), tail=st.text(max_size=5))
def test_encode_refuses_lone_surrogates(tok, head, sur, tail):
    e = refused(lambda: tok.encode(head + chr(sur) + tail), "surrogate")
    assert f"at index {len(head)}" in str(e)


def test_decode_rejects_non_bool_skip_special_tokens(tok):
    refused(lambda: tok.decode([1], skip_special_tokens="yes"), "skip_special_tokens")


# ---- the issue's examples, one regression test each ---------------------------------------------------------
@pytest.mark.parametrize("p", [5, b"/tmp", ["/tmp"]], ids=["int", "bytes", "list"])
def test_issue_api_given_an_int_bytes_list_path(p):
    refused(lambda: qwen3lab.load(p), "path")
    refused(lambda: Qwen3ForCausalLM.from_pretrained(p), "path")


def test_issue_stream_5(small):
    m, _ = small
    refused(lambda: m.generate([1, 2], max_steps=2, stream=5), "stream")


def test_issue_tasks_that_are_not_tasks(small):
    m, _ = small
    refused(lambda: m.batch_infer_one_round([1, 2]), "task 0 is not an InferTask")
    refused(lambda: m.batch_infer_one_round("ab"), "tasks must be a sequence of InferTask")


def test_issue_max_new_tokens_x_and_not_positive(small):
    m, _ = small
    for v in ("x", 0, -1):
        refused(lambda v=v: m.new_task([1, 2], max_new_tokens=v), "max_new_tokens")
    refused(lambda: m.generate([1, 2], max_steps="x"), "max_steps")


def test_issue_decode_10_to_the_12(tok):
    refused(lambda: tok.decode([10**12]), "cannot decode token id 1000000000000")


def test_issue_generate_bytes_is_not_token_ids(ckpt):
    _, m = ckpt
    refused(lambda: m.generate(b"hello", max_steps=2), "got bytes")
    assert m.generate("hello", max_steps=2).token_ids == m.generate(m.tokenizer.encode("hello"), max_steps=2).token_ids


def test_issue_one_task_twice_corrupts_its_cache(small):
    m, _ = small
    t = m.new_task([1, 2, 3], max_new_tokens=4)
    refused(lambda: m.batch_infer_one_round([t, t]), "tasks 0 and 1 are the same task")
    assert t.cache is None and t.tokens == [1, 2, 3]
    assert run_out(m, t) == run_out(m, m.new_task([1, 2, 3], max_new_tokens=4))


def test_a_task_whose_generator_fails_leaves_every_cache_untouched(small, monkeypatch):
    """Random generators are made before any cache work: a seed torch cannot take (say) fails the round before
    the forward, instead of after it with the caches advanced past the tokens."""
    m, fwd = small
    ok, bad = m.new_task([5, 6], max_new_tokens=3), m.new_task([7, 8], temperature=1.0, seed=4, max_new_tokens=3)
    m.batch_infer_one_round([ok])

    def fails(device):
        raise ValueError("Overflow when unpacking long long")

    monkeypatch.setattr(bad, "rng", fails)
    before, state = fwd.n, (list(ok.tokens), ok.cache.length)
    with pytest.raises(ValueError, match="Overflow"):
        m.batch_infer_one_round([ok, bad])
    assert fwd.n == before and (ok.tokens, ok.cache.length) == state and bad.cache is None
    assert run_out(m, ok) == run_out(m, m.new_task([5, 6], max_new_tokens=3))
