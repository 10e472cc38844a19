"""The fast paths as `qwen3lab verify` candidates against the float64 NumPy oracle, and int8's accuracy cost.

- float32, bfloat16 and int8 (bfloat16 and float32 activations) fast models pass verify at their dtype's
  tolerance (int8: its own, the loosest), prefill and KV-cache decode steps, dense and MoE;
- the fast model's forward with no taps (what generation runs; bitwise the same as with taps,
  test_fast_model.py) is compared by its logits: cosine to the oracle and top-1
  agreement, with bounds set from measurement (Qwen3-0.6B shape, 28 layers: int8 logit cosine >= 0.9988,
  top-1 88 % on random weights, whose logits are nearly flat; README "Fast CPU inference").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen3lab import verify
from qwen3lab.config import Qwen3Config
from qwen3lab.fast import build
from qwen3lab.models.numpy_ref import NumpyBackend
from qwen3lab.models.torch_model import TorchBackend
from qwen3lab.random_init import random_weights
from small_configs import small_cfg

pytestmark = pytest.mark.kernels

IDS = [9707, 11, 419, 374, 264, 1273, 1946, 13, 576, 3974, 13876, 3835]


def make_cfg(moe: bool) -> Qwen3Config:
    """Three layers and a 16384-token vocabulary: enough for logit cosine and top-1 to mean something."""
    return small_cfg(moe, intermediate_size=128, num_hidden_layers=3, vocab_size=16384)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    build.reset()
    yield


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def oracle(request):
    cfg = make_cfg(request.param)
    w = random_weights(cfg, seed=0)
    return cfg, w, NumpyBackend({k: v.double().numpy() for k, v in w.items()}, cfg)


CANDIDATES = [("float32", None), ("bfloat16", None), ("bfloat16", "int8"), ("float32", "int8")]


@pytest.mark.parametrize("dtype,quant", CANDIDATES, ids=["fp32", "bf16", "int8", "int8-fp32act"])
def test_fast_candidate_passes_verify(oracle, dtype, quant):
    cfg, w, ref = oracle
    cand = TorchBackend(cfg, w, dtype=dtype, fast=True, quant=quant)
    assert cand.dtype == (quant or dtype)
    rep = verify(ref, cand, IDS, decode_steps=2)
    bad = [(r.name, r.reasons) for r in rep.results if r.passed is False]
    assert rep.overall_success and not bad, bad
    assert rep.tolerance.name == ("int8" if quant else dtype)
    assert len(rep.compared) == len(rep.results)


def _logit_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return float(cos.min()), float((a.argmax(-1) == b.argmax(-1)).mean())


@pytest.mark.parametrize("dtype,quant,cos_min", [("float32", None, 1 - 1e-6), ("bfloat16", None, 0.999),
                                                 ("bfloat16", "int8", 0.995)], ids=["fp32", "bf16", "int8"])
def test_fast_logits_against_oracle(dtype, quant, cos_min):
    cfg = make_cfg(False)  # dense: MoE routing flips at near ties would dominate a logits-only comparison
    w = random_weights(cfg, seed=1)
    ref = NumpyBackend({k: v.double().numpy() for k, v in w.items()}, cfg).run(IDS).logits
    cand = TorchBackend(cfg, w, dtype=dtype, fast=True, quant=quant)
    got = cand.run(IDS).logits  # no taps, as generation runs it
    plain = TorchBackend(cfg, w, dtype=dtype).run(IDS).logits  # the eager model at the same activation dtype
    cos, top1 = _logit_agreement(ref, got)
    cos_plain, _ = _logit_agreement(ref, plain)
    print(f"{dtype} {quant}: logit cosine min {cos:.8f} (eager {cos_plain:.8f}), top-1 agreement {top1:.3f}")
    assert cos >= cos_min
    if quant is None:  # the kernel leaves are no less accurate than the eager ops they replace
        assert 1 - cos <= 2 * (1 - cos_plain) + 1e-9
    assert top1 >= (1.0 if dtype == "float32" else 0.75)


def test_quant_options_are_checked():
    cfg = make_cfg(False)
    w = random_weights(cfg, seed=0)
    from qwen3lab.errors import InputError

    with pytest.raises(InputError, match="quant must be one of int8"):
        TorchBackend(cfg, w, quant="int9")
    with pytest.raises(InputError, match="dtype='int8' means quant='int8', but quant='int9'"):
        TorchBackend(cfg, w, dtype="int8", quant="int9")
    with pytest.raises(InputError, match="needs dtype 'float32' or 'bfloat16' activations"):  # what the kernels take
        TorchBackend(cfg, w, dtype="float16", quant="int8")
    assert TorchBackend(cfg, w, dtype="int8").model.dtype == torch.bfloat16  # the shorthand: bf16 activations
    b = TorchBackend(cfg, w, quant="int8")
    assert b.name == "torch-int8" and b.dtype == "int8" and b.model.quant == "int8"
    with torch.inference_mode():
        layer = b.model.model.layers[0]
        # the HF-named projections are int8 row views of the fused int8 weight, scales alike
        assert layer.self_attn.q_proj.weight.dtype == torch.int8
        assert torch.equal(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
                           layer.mlp.gate_up_proj.weight)
        assert layer.self_attn.q_proj.scale.shape == (cfg.num_attention_heads * cfg.head_dim,)


LONG_IDS = [(i * 7919) % 16000 + 100 for i in range(48)]  # 48 tokens: the prefill takes the many-row GEMM


@pytest.mark.parametrize("gemm", ["ours", "torch"])
@pytest.mark.parametrize("quant", [None, "int8"], ids=["bf16", "int8"])
def test_many_row_prefill_passes_verify_with_either_gemm(oracle, monkeypatch, quant, gemm):
    """A prompt longer than SMALL_M runs the prefill GEMM that fast/tune.py picks; each of the two must pass
    verify (prefill + a decode step) and keep the fast model's logits as close to the oracle as the eager
    model's (int8: within the int8 bound above)."""
    from qwen3lab.fast import tune
    from qwen3lab.fast.linear import SMALL_M

    assert len(LONG_IDS) > SMALL_M
    monkeypatch.setenv(tune.ENV, gemm)
    tune.reset()
    try:
        cfg, w, ref = oracle
        cand = TorchBackend(cfg, w, dtype="bfloat16", fast=True, quant=quant)
        assert tune.choose(quant or "bfloat16") == gemm
        rep = verify(ref, cand, LONG_IDS, decode_steps=1)
        bad = [(r.name, r.reasons) for r in rep.results if r.passed is False]
        assert rep.overall_success and not bad, bad
        if cfg.num_experts:
            return  # logits-only comparison: dense only (see above)
        got = cand.run(LONG_IDS).logits
        cos, _ = _logit_agreement(ref.run(LONG_IDS).logits, got)
        print(f"{gemm} {quant}: logit cosine min {cos:.6f}")
        assert cos >= (0.995 if quant else 0.999)
    finally:
        tune.reset()
