"""qwen3lab.fast applied to whole models: the fast path against the plain eager model.

- optimize() keeps the checkpoint's parameter names (each tensor listed once), makes q/k/v and gate/up row
  views of the fused weights, and gives the model's leaves the kernels (there is no second forward);
- float32: the fast model's logits equal the plain model's to ~1e-6 (prefill, cached decode, a packed batch
  of prefills and decodes) and greedy generation gives the same tokens; bfloat16 stays within bf16 rounding;
- its taps (q/k/v/gate/up slices of the fused outputs) equal the plain model's; grafting still works; and
  recording every tap changes no bit of the logits (verify sees exactly what generation runs);
- everything above also holds with the kernels turned off (the PyTorch fallback).
"""

from __future__ import annotations

import pytest
import torch

from qwen3lab import taps as T
from qwen3lab.engine.sampler import SamplingParams
from qwen3lab.engine.task import InferTask
from qwen3lab.fast import FastLinear, optimize
from qwen3lab.models.batch import ForwardBatch
from qwen3lab.models.torch_model import Qwen3LMHeadModel, TorchBackend
from qwen3lab.qwen3 import Qwen3ForCausalLM
from qwen3lab.random_init import random_weights
from small_configs import small_cfg as make_cfg

pytestmark = pytest.mark.kernels

CASES = {"dense": make_cfg(), "gqa4-odd": make_cfg(num_attention_heads=8, head_dim=20, hidden_size=72),
         "moe": make_cfg(moe=True)}


def _pair(cfg, dtype):
    w = random_weights(cfg, seed=0)
    plain = Qwen3LMHeadModel.from_weights(cfg, w, dtype=dtype)
    fast = optimize(Qwen3LMHeadModel.from_weights(cfg, random_weights(cfg, seed=0), dtype=dtype))
    return plain, fast


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def test_optimize_keeps_names_and_views(mode):
    cfg = CASES["moe"]
    plain, fast = _pair(cfg, torch.float32)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(fast.state_dict()) == list(plain.state_dict())
    for (n, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b), n
    attn = fast.model.layers[0].self_attn
    qkv = attn.qkv_proj.weight
    assert attn.q_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert torch.equal(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), qkv)
    e = fast.model.layers[1].mlp.experts[3]
    assert torch.equal(torch.cat([e.gate_proj.weight, e.up_proj.weight]), e.gate_up_proj.weight)
    assert isinstance(fast.lm_head, FastLinear) and isinstance(attn.o_proj, FastLinear)
    leaves = [fast.model.norm, attn, attn.q_norm, e]
    assert all((m.kernel is not None) == (mode == "kernels") for m in leaves)
    assert all(m.kernel is None for m in plain.modules() if hasattr(m, "kernel"))
    optimize(fast)  # idempotent
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in plain.named_parameters()]


def test_attention_bias_stays_unfused(mode):
    cfg = make_cfg(attention_bias=True)
    plain, fast = _pair(cfg, torch.float32)
    assert fast.model.layers[0].self_attn.qkv_proj is None
    ids = torch.arange(1, 9)
    assert _rel(fast(ForwardBatch.single(ids)), plain(ForwardBatch.single(ids))) < 1e-6


def _prefill_decode(model, ids):
    """Prefill ids[:-3] into a cache, then decode the last three one by one: logits [T-2, V] (last of the
    prefill, then one row per decoded token)."""
    T_ = len(ids)
    P = T_ - 3
    c = model.new_cache(T_)
    t = torch.tensor(ids)
    out = [model(ForwardBatch.single(t[:P], c, last_only=True))]
    for j in range(P, T_):
        out.append(model(ForwardBatch.single(t[j:j + 1], c, start=j)))
    return torch.cat(out)


@pytest.mark.parametrize("case", list(CASES))
def test_fast_forward_equals_plain_float32(mode, case):
    cfg = CASES[case]
    plain, fast = _pair(cfg, torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    a, b = _prefill_decode(plain, ids), _prefill_decode(fast, ids)
    assert _rel(b, a) < 1e-5, _rel(b, a)
    full = torch.tensor(ids)
    a2 = plain(ForwardBatch.single(full))
    b2 = fast(ForwardBatch.single(full))
    assert _rel(b2, a2) < 1e-5


@pytest.mark.parametrize("case", ["dense", "moe"])
def test_fast_forward_bfloat16_within_rounding(mode, case):
    cfg = CASES[case]
    plain, fast = _pair(cfg, torch.bfloat16)
    ref = Qwen3LMHeadModel.from_weights(cfg, random_weights(cfg, seed=0), dtype=torch.float64)
    ids = torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    a, b, r = _prefill_decode(plain, ids), _prefill_decode(fast, ids), _prefill_decode(ref, ids)
    # the fast path is no further from float64 than the plain bf16 model is (plus a rounding step's worth)
    assert _rel(b, r) < 1.5 * _rel(a, r) + 2 ** -8, (_rel(b, r), _rel(a, r))


def test_packed_batch_equals_each_alone(mode):
    cfg = CASES["gqa4-odd"]
    _, fast = _pair(cfg, torch.float32)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 3)]
    alone = []
    for p in prompts:
        t = InferTask(p, SamplingParams(), max_new_tokens=4)
        lm = Qwen3ForCausalLM(fast)
        while not t.finished:
            lm.batch_infer_one_round([t])
        alone.append(t.generated)
    tasks = [InferTask(p, SamplingParams(), max_new_tokens=4) for p in prompts]
    live = tasks[:2]
    Qwen3ForCausalLM(fast).batch_infer_one_round(live)  # two prefills packed
    live.append(tasks[2])  # then a prefill packed with two decodes, then pure decode rounds of three
    while live:
        Qwen3ForCausalLM(fast).batch_infer_one_round(live)
        live = [t for t in live if not t.finished]
    assert [t.generated for t in tasks] == alone


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_float32_fast_equals_plain(mode, case):
    cfg = CASES[case]
    w = random_weights(cfg, seed=4)
    plain = Qwen3ForCausalLM.from_weights(cfg, w, dtype="float32", fast=False)
    fast = Qwen3ForCausalLM.from_weights(cfg, random_weights(cfg, seed=4), dtype="float32", fast=True)
    prompt = torch.randint(0, cfg.vocab_size, (7,), generator=torch.Generator().manual_seed(5)).tolist()
    a, b = plain.generate(prompt, max_steps=16), fast.generate(prompt, max_steps=16)
    assert a.token_ids == b.token_ids


def test_taps_on_fast_model_equal_plain(mode):
    cfg = CASES["dense"]
    w = random_weights(cfg, seed=0)
    plain = TorchBackend(cfg, w)
    fast = TorchBackend(cfg, random_weights(cfg, seed=0), fast=True)
    assert fast.name == "torch-fast" and fast.dtype == "float32"
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    a, b = plain.run(ids, taps="all"), fast.run(ids, taps="all")
    assert list(a.taps) == list(b.taps)
    for name in a.taps:
        x, y = torch.as_tensor(a.taps[name]).double(), torch.as_tensor(b.taps[name]).double()
        assert x.shape == y.shape, name
        assert float((x - y).abs().max()) <= 1e-5 * max(1.0, float(x.abs().max())), name
    # grafting the plain model's taps into the fast one reproduces the plain logits
    g = fast.run(ids, graft=a.taps)
    assert float(abs(g.logits - a.logits).max()) < 1e-4
    d = fast.run_decode(ids, 3, taps=["layers.1.q", "layers.0.gate"])
    assert d.taps["step2.layers.1.q"].shape == (1, cfg.num_attention_heads, cfg.head_dim)
    assert set(d.taps) >= {"layers.0.gate", "step0.layers.0.gate"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qk_norm_rope_leaf_runs_and_rotates_a_graft(dtype):
    """With the kernels, q/k's norms and RoPE are one kernel call a layer (qk_norm_rope), not four; its taps are
    still there, and a grafted q_norm is rotated from the graft (q_rot = RoPE(graft)), as the eager path does."""
    from qwen3lab.fast import build, set_kernels
    from qwen3lab.models.torch_model import apply_rope

    k = build.kernels()
    if k is None:
        pytest.skip(f"needs the kernels: {build.status()}")
    cfg = CASES["dense"]
    _, fast = _pair(cfg, dtype)
    calls: dict[str, int] = {}

    class Counting:
        def __getattr__(self, name):
            f = getattr(k, name)

            def counted(*a):
                calls[name] = calls.get(name, 0) + 1
                return f(*a)
            return counted

    set_kernels(fast, Counting())
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    _prefill_decode(fast, ids)
    layers = cfg.num_hidden_layers
    assert calls["qk_norm_rope"] == 4 * layers and "rope" not in calls, calls  # a prefill and three decode steps
    assert calls["rmsnorm"] == 4 * (2 * layers + 1), calls  # the layers' two norms and the final one only
    be = TorchBackend(cfg, random_weights(cfg, seed=0), dtype=dtype, fast=True)
    qn = be.run(ids, taps=["layers.0.q_norm"]).taps["layers.0.q_norm"]  # [T, Hq, Dh]
    graft = {"layers.0.q_norm": 0.5 * qn}
    got = torch.as_tensor(be.run(ids, taps=["layers.0.q_rot"], graft=graft).taps["layers.0.q_rot"])
    N = len(ids)
    cos, sin = (t[:N].view(1, N, 1, -1) for t in be.model.rope_tables(N))
    with torch.inference_mode():
        want = apply_rope(torch.as_tensor(graft["layers.0.q_norm"]).to(dtype)[None], cos, sin)[0].float()  # eager
    assert torch.equal(got, want), float((got - want).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["dense", "moe"])
def test_recording_taps_changes_no_bit(mode, case, dtype):
    """One forward: with every tap recorded (as verify does) the logits are bitwise those of a run with no taps,
    for a prefill and for cached decode steps, so verify checks the very kernels generation runs."""
    cfg = CASES[case]
    _, fast = _pair(cfg, dtype)
    ids = torch.randint(0, cfg.vocab_size, (10,), generator=torch.Generator().manual_seed(6)).tolist()
    quiet = _prefill_decode(fast, ids)
    with T.record("all") as rec:
        loud = _prefill_decode(fast, ids)
    assert set(rec.taps) == set(T.tap_sites(cfg))  # every site of every layer was recorded
    assert torch.equal(quiet, loud), float((quiet.double() - loud.double()).abs().max())


def test_optimize_aligns_streamed_weights():
    """A weight that does not start on a 64-byte boundary (as memory-mapped safetensors tensors may not) is
    moved to an aligned copy with the same values; a tied embedding moves with lm_head, still one tensor."""
    cfg = make_cfg()
    w = random_weights(cfg, seed=0)

    def misaligned(t: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(t.numel() + 8, dtype=t.dtype)
        off = next(i for i in range(1, 8) if (buf.data_ptr() + i * t.element_size()) % 64)
        out = buf[off:off + t.numel()].view(t.shape)
        out.copy_(t)
        return out

    names = ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight",
             "model.embed_tokens.weight"]
    for n in names:
        w[n] = misaligned(w[n])
    want = {n: w[n].clone() for n in names}
    model = Qwen3LMHeadModel.from_weights(cfg, w, dtype=torch.float32)
    assert model.model.layers[0].self_attn.o_proj.weight.data_ptr() % 64  # the test really starts misaligned
    optimize(model)
    streamed = [m for m in model.modules() if isinstance(m, FastLinear)]
    assert streamed and all(m.weight.data_ptr() % 64 == 0 for m in streamed), \
        [(type(m).__name__, m.weight.data_ptr() % 64) for m in streamed]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    for n in names:
        assert torch.equal(params[n], want[n]), n
