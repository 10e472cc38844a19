"""Taps through the NumPy oracle: names in dataflow order, canonical shapes, probs on request, graft
(reproduces the reference exactly; confines a planted bug to its own tap), decode slicing, dump files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen3lab import taps as T
from qwen3lab.config import Qwen3Config
from qwen3lab.errors import InputError, WeightsError
from qwen3lab.models import numpy_ref
from qwen3lab.models.numpy_ref import NumpyBackend
from qwen3lab.random_init import random_weights

IDS = [7, 3, 60, 1, 42, 5, 19]


def small_cfg(moe: bool) -> Qwen3Config:
    d = {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 64,
         "tie_word_embeddings": not moe}
    if moe:  # layer 1 stays dense, so a MoE model with both kinds of MLP is covered
        d.update(model_type="qwen3_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=8,
                 norm_topk_prob=True, mlp_only_layers=[1])
    return Qwen3Config.from_dict(d, source="test")


@pytest.fixture(params=[False, True], ids=["dense", "moe"])
def cfg(request):
    return small_cfg(request.param)


@pytest.fixture
def weights(cfg):
    return random_weights(cfg, seed=11)


def errors(ref: dict, cand: dict) -> dict[str, float]:
    return {n: float(np.max(np.abs(cand[n] - r)) / max(np.max(np.abs(r)), 1e-300)) for n, r in ref.items()}


def test_record_gives_every_site_in_dataflow_order_and_canonical_shapes(cfg, weights):
    r = NumpyBackend(weights, cfg).run(IDS, taps="all")
    assert list(r.taps) == T.tap_sites(cfg)
    for name, arr in r.taps.items():
        assert arr.shape == T.canonical_shape(cfg, name, len(IDS)), name
        assert arr.dtype == (np.int64 if name.endswith("topk_idx") else np.float64), name
    np.testing.assert_array_equal(r.taps["logits"], r.logits)
    assert r.logits.shape == (len(IDS), cfg.vocab_size)
    assert any(n.endswith("router_logits") for n in r.taps) == cfg.is_moe
    # patterns select subsets, still in dataflow order (a pattern may match the optional probs)
    sub = NumpyBackend(weights, cfg).run(IDS, taps=["layers.2.*", "embed"])
    assert list(sub.taps) == ["embed"] + [n for n in T.tap_sites(cfg, probs=True) if n.startswith("layers.2.")]


def test_probs_only_when_asked(cfg, weights):
    b = NumpyBackend(weights, cfg)
    assert not any(n.endswith(".probs") for n in b.run(IDS, taps="all").taps)
    assert b.run(IDS).taps == {}
    r = b.run(IDS, taps=["layers.*.probs"])
    assert list(r.taps) == [f"layers.{i}.probs" for i in range(cfg.num_hidden_layers)]
    p = r.taps["layers.0.probs"]
    assert p.shape == (cfg.num_attention_heads, len(IDS), len(IDS))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    seen = np.tril(np.ones((len(IDS), len(IDS)), dtype=bool))  # query t sees keys 0..t
    assert np.all(p[:, ~seen] == 0) and np.all(p[:, seen] > 0)
    assert list(b.run(IDS, taps=["*"]).taps) == T.tap_sites(cfg, probs=True)


def test_graft_with_own_taps_reproduces_reference_exactly(cfg, weights):
    b = NumpyBackend(weights, cfg)
    ref = b.run(IDS, taps=["*"])
    g = b.run(IDS, taps=["*"], graft=ref.taps)
    assert list(g.taps) == list(ref.taps)
    for name, arr in ref.taps.items():
        np.testing.assert_array_equal(g.taps[name], arr, err_msg=name)
    np.testing.assert_array_equal(g.logits, ref.logits)


def test_graft_confines_a_planted_bug_to_its_tap(cfg, weights):
    """Layer 1's q_norm uses a wrong epsilon: grafted, only that tap differs; plain, the error spreads."""
    ref = NumpyBackend(weights, cfg).run(IDS, taps=["*"])
    calls = {"n": 0}
    real = numpy_ref.rms_norm

    def rms_norm_bug(x, w, eps):
        # q_norm is the only norm over [T, Hq, Dh]; the 2nd such call is layer 1's
        if x.ndim == 3 and x.shape[1] == cfg.num_attention_heads:
            calls["n"] += 1
            if calls["n"] % cfg.num_hidden_layers == 2:
                eps = 0.5
        return real(x, w, eps)

    bug = NumpyBackend(weights, cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(numpy_ref, "rms_norm", rms_norm_bug)
        plain = bug.run(IDS, taps=["*"])
        grafted = bug.run(IDS, taps=["*"], graft=ref.taps)
    g, p = errors(ref.taps, grafted.taps), errors(ref.taps, plain.taps)
    assert g["layers.1.q_norm"] > 1e-2
    assert {n for n, e in g.items() if e > 0} == {"layers.1.q_norm"}, {n: e for n, e in g.items() if e > 0}
    spread = [n for n in ("layers.1.q_rot", "layers.1.probs", "layers.1.attn", "layers.1.resid_post",
                          "layers.2.attn_in", "final_norm", "logits") if p[n] > 1e-3]
    assert len(spread) == 7, f"plain run errors: { {n: p[n] for n in p if n.startswith('layers.1')} }"
    assert all(p[n] == 0 for n in T.tap_sites(cfg, probs=True, layers=[0]) if not n.startswith(("final", "logits")))


def test_graft_of_a_weights_bug_in_one_expert_path(weights):
    """MoE: a wrong router weight in layer 2 shows in router_logits only, once grafted."""
    cfg = small_cfg(moe=True)
    w = random_weights(cfg, seed=11)
    ref = NumpyBackend(w, cfg).run(IDS, taps="all")
    bad = dict(w)
    bad["model.layers.2.mlp.gate.weight"] = w["model.layers.2.mlp.gate.weight"] * -1.0
    g = errors(ref.taps, NumpyBackend(bad, cfg).run(IDS, taps="all", graft=ref.taps).taps)
    assert {n for n, e in g.items() if e > 0} == {"layers.2.router_logits"}


def test_run_decode_slices_steps_like_a_kv_cache(cfg, weights):
    b = NumpyBackend(weights, cfg)
    T_, steps = len(IDS), 3
    P = T_ - steps
    d = b.run_decode(IDS, steps, taps=["*"])
    full = b.run(IDS)
    np.testing.assert_array_equal(d.logits, full.logits)
    prefix = b.run(IDS[:P], taps=["*"])
    for name, arr in prefix.taps.items():  # prefill taps = a run on the prompt alone (causality)
        np.testing.assert_allclose(d.taps[name], arr, rtol=1e-12, atol=1e-12, err_msg=name)
    for j in range(steps):
        for name in T.tap_sites(cfg, probs=True):
            step = d.taps[f"step{j}.{name}"]
            assert step.shape == T.canonical_shape(cfg, name, 1, P + j + 1), (j, name)
    # each step's probs are a distribution over the P + j + 1 cached positions
    np.testing.assert_allclose(d.taps["step2.layers.0.probs"].sum(-1), 1.0, rtol=1e-12)
    # graft in the per-step layout is stitched back and reproduces the run exactly
    g = b.run_decode(IDS, steps, taps=["*"], graft=d.taps)
    for name, arr in d.taps.items():
        np.testing.assert_array_equal(g.taps[name], arr, err_msg=name)
    only = b.run_decode(IDS, steps, taps=["step1.layers.0.q"])
    assert list(only.taps) == ["step1.layers.0.q"]
    with pytest.raises(InputError, match="decode_steps"):
        b.run_decode(IDS, len(IDS))


def test_float32_oracle_computes_in_float32(weights, cfg):
    r64 = NumpyBackend(weights, cfg).run(IDS, taps="all")
    r32 = NumpyBackend(weights, cfg, dtype="float32").run(IDS, taps="all")
    assert r32.logits.dtype == np.float32 and r32.taps["layers.0.q_rot"].dtype == np.float32
    err = errors(r64.taps, r32.taps)
    assert max(err.values()) < 1e-5, sorted(err.items(), key=lambda e: -e[1])[:3]


def test_backend_checks_weights_and_inputs(cfg, weights):
    missing = {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_norm.weight"}
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        NumpyBackend(missing, cfg)
    wrong = dict(weights, **{"model.norm.weight": torch.ones(cfg.hidden_size + 1)})
    with pytest.raises(WeightsError, match=r"model\.norm\.weight.*\[33\].*\[32\]"):
        NumpyBackend(wrong, cfg)
    with pytest.raises(InputError, match="bfloat16"):
        NumpyBackend(weights, cfg, dtype="bfloat16")
    b = NumpyBackend(weights, cfg)
    assert (b.name, b.dtype) == ("numpy", "float64")
    with pytest.raises(InputError, match="invalid token id 64"):
        b.run([1, 64])


def test_dump_round_trip_with_metadata(tmp_path, cfg, weights):
    r = NumpyBackend(weights, cfg).run(IDS, taps=["*"])
    path = T.write_dump(tmp_path / "taps.safetensors", r.taps, backend="numpy", dtype="float64", input_ids=IDS,
                        config_sha256=cfg.sha256(), positions=list(range(len(IDS))))
    taps, meta = T.read_dump(path)
    assert list(taps) == list(r.taps)
    for name, arr in r.taps.items():
        np.testing.assert_array_equal(taps[name], arr, err_msg=name)
        assert taps[name].dtype == arr.dtype
    assert meta["format"] == "qwen3lab.taps" and meta["backend"] == "numpy" and meta["dtype"] == "float64"
    assert meta["input_ids"] == IDS and meta["positions"] == list(range(len(IDS)))
    assert meta["config_sha256"] == cfg.sha256()
    # a dump read back grafts like the in-memory taps
    g = NumpyBackend(weights, cfg).run(IDS, taps=["*"], graft=taps)
    np.testing.assert_array_equal(g.logits, r.logits)


def test_dump_written_as_bfloat16_by_torch(tmp_path, cfg, weights):
    """An outside program's bf16 dump (safetensors via torch) reads back as float32 holding the bf16 values."""
    from safetensors.torch import save_file

    r = NumpyBackend(weights, cfg).run(IDS, taps="all")
    bf = {n: torch.from_numpy(a).to(torch.bfloat16) for n, a in r.taps.items() if a.dtype == np.float64}
    meta = {"format": "qwen3lab.taps", "version": "1", "backend": "outside", "dtype": "bfloat16",
            "input_ids": str(IDS)}
    save_file(dict(sorted(bf.items())), str(tmp_path / "bf16.safetensors"), metadata=meta)  # name-sorted on disk
    taps, meta2 = T.read_dump(tmp_path / "bf16.safetensors")
    assert list(taps) == [n for n in r.taps if n in bf]  # dataflow order restored
    for name, t in bf.items():
        assert taps[name].dtype == np.float32
        np.testing.assert_array_equal(taps[name], t.float().numpy(), err_msg=name)
        assert np.max(np.abs(taps[name] - r.taps[name])) <= 2**-8 * np.max(np.abs(r.taps[name])), name
    assert meta2["dtype"] == "bfloat16" and meta2["input_ids"] == IDS
