"""The engine: sampler semantics, KV-cache bookkeeping, batched rounds, generate, and input errors.

References: hand-computed masks and probabilities, HF transformers' logits warpers, and each task run alone.
"""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from qwen3lab.config import Qwen3Config
from qwen3lab.engine.generate import generate
from qwen3lab.engine.runner import batch_infer_one_round
from qwen3lab.engine.sampler import SamplingParams, filter_logits, make_generator, sample
from qwen3lab.engine.task import InferTask
from qwen3lab.errors import InputError
from qwen3lab.models.kv_cache import KVCache
from qwen3lab.models.torch_model import Qwen3LMHeadModel
from qwen3lab.presets import preset_config
from qwen3lab.qwen3 import Qwen3ForCausalLM
from qwen3lab.random_init import random_weights
from qwen3lab.runspec import MultiDeviceError

NEG = float("-inf")


def make_cfg(moe: bool = False, **kw) -> Qwen3Config:
    d = {"model_type": "qwen3_moe" if moe else "qwen3", "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "vocab_size": 300, "rope_theta": 1e4, "max_position_embeddings": 64, "tie_word_embeddings": True}
    if moe:
        d.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    d.update(kw)
    return Qwen3Config.from_dict(d, source="test config")


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def model64(request):
    """float64, so a batch and a lone run give logits equal to ~1e-15 and sampling cannot tell them apart."""
    cfg = make_cfg(request.param)
    return Qwen3LMHeadModel.from_weights(cfg, random_weights(cfg, seed=1), dtype="float64")


# ---- sampler ---------------------------------------------------------------------------------------------
def kept(x: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isfinite(x)).flatten().tolist()


def test_top_k_keeps_the_k_largest_and_ties_at_the_boundary():
    x = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.5])
    assert kept(filter_logits(x, top_k=1)) == [1, 3]  # both 3.0s tie for first
    assert kept(filter_logits(x, top_k=3)) == [1, 2, 3]
    assert kept(filter_logits(x, top_k=5)) == [0, 1, 2, 3, 4]
    assert kept(filter_logits(x, top_k=0)) == [0, 1, 2, 3, 4]  # 0 = off


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = [0.25, 0.1, 0.5, 0.15]  # by hand, ascending: 0.1, 0.15, 0.25, 0.5; cumulative .1 .25 .5 1
    x = torch.log(torch.tensor(probs, dtype=torch.float64))
    assert kept(filter_logits(x, top_p=0.6)) == [0, 2]  # drop cum <= 0.4: 0.1 and 0.15
    assert kept(filter_logits(x, top_p=0.3)) == [2]  # drop cum <= 0.7: all but 0.5
    assert kept(filter_logits(x, top_p=0.95)) == [0, 1, 2, 3]  # drop cum <= 0.05: none (0.1 > 0.05)
    assert kept(filter_logits(x, top_p=0.01)) == [2]  # the most likely token always survives
    # temperature first: at T=0.5 the probabilities are ~ p^2 / sum = .0625 .01 .25 .0225 (/ .345)
    p2 = np.array(probs) ** 2 / np.sum(np.array(probs) ** 2)  # .181 .029 .725 .065
    assert kept(filter_logits(x, temperature=0.5, top_p=0.8)) == [0, 2]  # drop cum <= .2: .029 .065 (.094)
    assert p2[[1, 3]].sum() <= 0.2 < p2[[0, 1, 3]].sum()  # the hand figures behind that
    # top_k then top_p on what is left: k=3 leaves .25 .5 .15 -> renormalised .278 .556 .167
    assert kept(filter_logits(x, top_k=3, top_p=0.7)) == [0, 2]  # drop cum <= .3: .167 only


@pytest.mark.hf
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs HF transformers")
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.7, 20, 1.0), (1.3, 50, 0.8), (0.5, 5, 0.5)])
def test_filters_match_hf_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(0)) * 3
    ref = TemperatureLogitsWarper(temperature)(None, x.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = filter_logits(x, temperature, top_k, top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref)), "kept sets differ"
    torch.testing.assert_close(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


def test_greedy_is_argmax_first_on_ties():
    x = torch.tensor([0.1, 2.0, -1.0, 2.0])
    assert sample(x, SamplingParams()) == 1
    assert sample(x, SamplingParams(temperature=0.0, top_k=1, seed=3)) == 1


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    x = torch.tensor([0.0, 1.0, 2.0, -1.0])
    p = SamplingParams(temperature=1.0, seed=7)
    draw = lambda params, n: [sample(x, params, g) for g in [make_generator(params.seed)] for _ in range(n)]
    a, b = draw(p, 3000), draw(p, 3000)
    assert a == b
    assert a != draw(SamplingParams(temperature=1.0, seed=8), 3000)
    freq = np.bincount(a, minlength=4) / len(a)
    want = np.exp([0.0, 1.0, 2.0, -1.0]) / np.exp([0.0, 1.0, 2.0, -1.0]).sum()
    sigma = np.sqrt(want * (1 - want) / len(a))
    assert np.all(np.abs(freq - want) < 4 * sigma), (freq, want)
    assert set(draw(SamplingParams(temperature=1.0, top_k=2, seed=1), 500)) == {1, 2}


@pytest.mark.parametrize("kw,msg", [({"temperature": -0.1}, "temperature"), ({"temperature": math.nan}, "temperature"),
                                    ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"top_p": 0.0}, "top_p"),
                                    ({"top_p": 1.5}, "top_p"), ({"seed": "x"}, "seed")])
def test_bad_sampling_settings(kw, msg):
    with pytest.raises(InputError, match=msg):
        SamplingParams(**kw)


# ---- KV cache bookkeeping ----------------------------------------------------------------------------------
def test_kv_cache_reserve_grow_advance_truncate():
    c = KVCache(num_layers=2, num_kv_heads=3, head_dim=4, capacity=5, max_len=12)
    assert (c.length, c.capacity, c.free) == (0, 5, 5)
    assert c.reserve(3) == 0 and c.capacity == 5
    k = torch.arange(3 * 3 * 4, dtype=torch.float32).view(3, 3, 4)  # [Hkv, T, Dh]
    ks, vs = c.write(1, 0, k, -k)
    assert ks.shape == (3, 3, 4) and torch.equal(ks, k) and torch.equal(vs, -k)
    c.advance(3)
    assert c.reserve(4) == 3 and c.capacity == 10  # 7 > 5: doubled
    assert torch.equal(c.k[1, :, :3], k) and torch.equal(c.v[1, :, :3], -k)  # growth keeps the contents
    c.advance(4)
    assert c.reserve(5) == 7 and c.capacity == 12  # doubling capped at max_len
    with pytest.raises(InputError, match="13 positions exceed the context length 12"):
        c.reserve(6)
    c.truncate(2)
    assert c.length == 2 and c.capacity == 12
    with pytest.raises(AssertionError):
        c.write(0, 5, k, k)  # writes only at the end of what is cached
    c.reset()
    assert c.length == 0 and c.nbytes() == 2 * 2 * 3 * 12 * 4 * 4


def test_cache_for_model_is_clipped_to_the_context():
    cfg = make_cfg()
    c = KVCache.for_model(cfg, 1000, torch.bfloat16, "cpu")
    assert c.capacity == 64 and c.k.shape == (2, 2, 64, 16) and c.dtype == torch.bfloat16


# ---- batched rounds --------------------------------------------------------------------------------------
SETTINGS = [SamplingParams(), SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=1.2, top_k=5, seed=2),
            SamplingParams(temperature=1.0, top_p=0.7, seed=3)]


def _tasks(cfg, lengths):
    rng = np.random.default_rng(5)
    return [InferTask(rng.integers(0, cfg.vocab_size, size=n).tolist(), SETTINGS[k % len(SETTINGS)],
                      max_new_tokens=6) for k, n in enumerate(lengths)]


@pytest.mark.slow
def test_batch_rounds_equal_each_task_alone(model64):
    cfg = model64.cfg
    lengths = [1, 9, 4, 13]
    alone = _tasks(cfg, lengths)
    for t in alone:
        while not t.finished:
            batch_infer_one_round(model64, [t])
    batch = _tasks(cfg, lengths)
    # the last task joins after two rounds: its prefill shares a forward with the others' decode steps
    for _ in range(2):
        batch_infer_one_round(model64, batch[:3])
    rounds = 2
    while not all(t.finished for t in batch):
        out = batch_infer_one_round(model64, [t for t in batch if not t.finished])
        assert all(isinstance(i, int) for i in out)
        rounds += 1
    for k, (a, b) in enumerate(zip(alone, batch, strict=True)):
        assert b.generated == a.generated, f"task {k} ({b.sampling}): batch {b.generated} vs alone {a.generated}"
        assert len(b.generated) == 6 and b.finish_reason == "length" and b.cache.length == len(b.tokens) - 1
    assert rounds == 8


def test_stop_ids_finish_a_task_and_finished_tasks_are_refused(model64):
    cfg = model64.cfg
    probe = InferTask([3, 1, 4], max_new_tokens=5)
    while not probe.finished:
        batch_infer_one_round(model64, [probe])
    stop_at = max(k for k, t in enumerate(probe.generated) if t not in probe.generated[:k])
    t = InferTask([3, 1, 4], stop_ids={probe.generated[stop_at]}, max_new_tokens=5)
    while not t.finished:  # stop_at: the last step whose token had not appeared before
        batch_infer_one_round(model64, [t])
    assert t.generated == probe.generated[:stop_at + 1] and t.finish_reason == "stop"
    with pytest.raises(InputError, match="task 0 is finished"):
        batch_infer_one_round(model64, [t])
    assert cfg.vocab_size == 300


def test_context_end_finishes_a_task(model64):
    ctx = model64.cfg.max_position_embeddings
    t = InferTask(list(range(ctx - 2)))
    batch_infer_one_round(model64, [t])
    assert not t.finished
    batch_infer_one_round(model64, [t])
    assert t.finished and t.finish_reason == "context" and len(t.tokens) == ctx


@pytest.mark.parametrize("tokens,msg", [([], "task 1 is empty"), ([5, 300], "invalid token id 300 at index 1"),
                                        ([5, -1], "invalid token id -1"), ([5, 2.0], "invalid token id 2.0"),
                                        ([1] * 64, "64 tokens: at or past the context length 64")])
def test_bad_prompts_are_input_errors(model64, tokens, msg):
    with pytest.raises(InputError, match=msg):
        batch_infer_one_round(model64, [InferTask([1, 2]), InferTask(tokens)])


def test_appended_invalid_token_is_an_input_error(model64):
    t = InferTask([1, 2, 3])
    batch_infer_one_round(model64, [t])
    t.tokens.append(999)
    with pytest.raises(InputError, match="invalid token id 999"):
        batch_infer_one_round(model64, [t])


# ---- generate ------------------------------------------------------------------------------------------
def test_generate_stops_on_stop_ids_and_max_steps(model64):
    free = generate(model64, [7, 8, 9], max_steps=10)
    assert len(free.token_ids) == 10 and free.finish_reason == "length" and free.text == ""
    k = max(i for i, t in enumerate(free.token_ids) if t not in free.token_ids[:i])
    r = generate(model64, [7, 8, 9], max_steps=10, stop_ids=[free.token_ids[k]])
    assert r.token_ids == free.token_ids[:k + 1] and r.finish_reason == "stop"
    assert r.tokens_per_s > 0 and r.prefill_s > 0
    with pytest.raises(InputError, match="max_steps"):
        generate(model64, [1], max_steps=0)
    with pytest.raises(InputError, match="stop strings need a tokenizer"):
        generate(model64, [1], stop_strings=["x"])


@pytest.fixture(scope="module")
def real_vocab(tmp_path_factory):
    """A make-model checkpoint dir (tiny preset: real Qwen3 vocabulary and tokenizer), and the API on it."""
    from qwen3lab.make_model import make_model

    path = make_model(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", layers=1, dtype="float32", seed=3)
    return path, Qwen3ForCausalLM.from_pretrained(path, dtype="float32")


@pytest.mark.slow
def test_from_pretrained_equals_the_same_weights_from_a_dict(real_vocab):
    path, m = real_vocab
    assert m.tokenizer is not None and m.dtype == "float32" and m.config.num_hidden_layers == 1
    cfg = preset_config("tiny", num_hidden_layers=1)
    d = Qwen3ForCausalLM.from_weights(cfg, random_weights(cfg, seed=3), tokenizer=m.tokenizer)
    a, b = m.generate("Hello", max_steps=8), d.generate("Hello", max_steps=8)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert 151645 in m.eos_token_ids  # <|im_end|> from the checkpoint's generation_config


@pytest.mark.slow
def test_stop_strings_cut_the_text_and_streaming_adds_up(real_vocab):
    _, m = real_vocab
    free = m.generate("The answer is", max_steps=24)
    assert free.finish_reason in ("length", "stop")
    text = free.text
    pieces = []
    streamed = m.generate("The answer is", max_steps=24, stream=lambda tok, s: pieces.append((tok, s)))
    assert "".join(s for _, s in pieces) == streamed.text == text
    assert [tok for tok, _ in pieces] == streamed.token_ids
    # a stop string from the middle of the text: the result ends just before its first occurrence
    mid = len(text) // 2
    stop = text[mid:mid + 3]
    assert stop.strip(), f"pick a visible stop string, text was {text!r}"
    pieces.clear()
    r = m.generate("The answer is", max_steps=24, stop=[stop], stream=lambda tok, s: pieces.append(s))
    assert r.text == text[:text.find(stop)] and r.finish_reason == "stop_string"
    assert "".join(pieces) == r.text  # nothing of the stop string was streamed
    assert r.token_ids == free.token_ids[:len(r.token_ids)] and len(r.token_ids) < len(free.token_ids)


@pytest.mark.kernels  # real_vocab loads through the fast path: its first use builds the kernels
def test_api_errors(real_vocab):
    _, m = real_vocab
    with pytest.raises(InputError, match="empty"):
        m.generate("")
    with pytest.raises(InputError, match="invalid token id 151936"):
        m.generate([1, 151936])
    with pytest.raises(InputError, match="context length 40960"):
        m.generate([1] * 40960)
    with pytest.raises(InputError, match="stop must be token ids"):
        m.generate([1], stop=[1.5])
    with pytest.raises(InputError, match="temperature"):
        m.generate([1], temperature=-1)
    bare = Qwen3ForCausalLM(m.model)
    with pytest.raises(InputError, match="needs a tokenizer"):
        bare.generate("Hello")
    assert bare.generate([9707], max_steps=3).text == ""


@pytest.mark.kernels  # real_vocab loads through the fast path: its first use builds the kernels
def test_ndev_and_device_errors(real_vocab):
    path, _ = real_vocab
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    k = (os.cpu_count() or 1) + 1  # more cpu ranks than cores: refused before any process starts
    with pytest.raises(MultiDeviceError, match=f"ndev={k} cpu ranks need a core each"):
        Qwen3ForCausalLM.from_pretrained(path, ndev=k)
    if n >= 1:
        with pytest.raises(MultiDeviceError, match=f"ndev={n + 1} needs {n + 1} CUDA devices; this machine has {n}"):
            Qwen3ForCausalLM.from_pretrained(path, device="cuda", ndev=n + 1)
    with pytest.raises(InputError, match="ndev"):
        Qwen3ForCausalLM.from_pretrained(path, ndev=0)
    if n == 0:
        with pytest.raises(InputError, match="no CUDA device"):
            Qwen3ForCausalLM.from_pretrained(path, device="cuda")


@pytest.mark.kernels  # real_vocab loads through the fast path: its first use builds the kernels
def test_new_task_and_batch_api(real_vocab):
    _, m = real_vocab
    tasks = [m.new_task("Hello", max_new_tokens=4), m.new_task([9707, 11, 1879], max_new_tokens=2, temperature=0.9,
                                                                  seed=0)]
    alone = [m.generate("Hello", max_steps=4).token_ids,
             m.generate([9707, 11, 1879], max_steps=2, temperature=0.9, seed=0).token_ids]
    while not all(t.finished for t in tasks):
        m.batch_infer_one_round([t for t in tasks if not t.finished])
    assert [t.generated[:len(a)] for t, a in zip(tasks, alone, strict=True)] == alone
    with pytest.raises(InputError, match="stop strings are handled by generate"):
        m.new_task("Hi", stop=["x"])
