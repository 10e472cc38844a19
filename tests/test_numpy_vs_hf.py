"""NumPy oracle vs HuggingFace transformers, tap by tap, on randomly drawn small configs.

HF runs in float64 (it still builds RMSNorm and the RoPE tables in float32: ~2e-7 is its floor), so every
tap must agree to 1e-6 relative (max abs diff / max abs of the oracle); topk_idx must agree exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hf_utils import hf_model
from qwen3lab.backends.hf import HFBackend, MissingDependencyError, require_transformers
from qwen3lab.config import Qwen3Config
from qwen3lab.models.numpy_ref import NumpyBackend
from qwen3lab.random_init import random_weights
from qwen3lab.taps import tap_sites

pytestmark = pytest.mark.hf

pytest.importorskip("transformers")  # the [test] extra installs it; without it these comparisons cannot run

TOL = 1e-6
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def make_cfg(spec: dict) -> Qwen3Config:
    d = {
        "model_type": "qwen3_moe" if spec.get("moe") else "qwen3",
        "hidden_size": spec["hidden"], "intermediate_size": spec["inter"],
        "num_hidden_layers": spec["layers"], "num_attention_heads": spec["kv_heads"] * spec["n_rep"],
        "num_key_value_heads": spec["kv_heads"], "head_dim": spec["head_dim"], "vocab_size": spec["vocab"],
        "rms_norm_eps": spec.get("eps", 1e-6), "rope_theta": spec.get("theta", 10000.0),
        "rope_scaling": spec.get("rope_scaling"), "max_position_embeddings": 256,
        "tie_word_embeddings": spec["tied"], "attention_bias": spec.get("bias", False),
    }
    if spec.get("moe"):
        d.update(num_experts=spec["experts"], num_experts_per_tok=spec["topk"], moe_intermediate_size=spec["moe_inter"],
                 norm_topk_prob=spec["norm_topk"], decoder_sparse_step=spec["sparse_step"],
                 mlp_only_layers=spec["mlp_only"])
    return Qwen3Config.from_dict(d, source="test spec")


@st.composite
def specs(draw) -> dict:
    layers = draw(st.integers(1, 3))
    spec = {
        "hidden": draw(st.sampled_from([16, 32, 48])), "inter": draw(st.sampled_from([16, 40])),
        "layers": layers, "kv_heads": draw(st.sampled_from([1, 2])), "n_rep": draw(st.sampled_from([1, 2, 4, 8])),
        "head_dim": draw(st.sampled_from([8, 16, 24])), "vocab": draw(st.sampled_from([64, 97])),
        "tied": draw(st.booleans()), "bias": draw(st.sampled_from([False, False, False, True])),
        "theta": draw(st.sampled_from([10000.0, 1e6])),
        "rope_scaling": draw(st.sampled_from([None, None, None, YARN])),
        "moe": draw(st.booleans()), "T": draw(st.integers(1, 10)), "seed": draw(st.integers(0, 2**16)),
    }
    if spec["moe"]:
        experts = draw(st.sampled_from([4, 8]))
        spec.update(experts=experts, topk=draw(st.integers(1, 4)), moe_inter=draw(st.sampled_from([8, 16])),
                    norm_topk=draw(st.booleans()), sparse_step=draw(st.sampled_from([1, 2])),
                    mlp_only=draw(st.lists(st.integers(0, layers - 1), max_size=1, unique=True)))
    return spec


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-300))


def compare(ref: dict, cand: dict, tol: float) -> tuple[list[tuple[str, float]], str]:
    """Per-tap relative errors (topk_idx: count of differing entries) and a report of the worst ones."""
    errs = []
    for name, r in ref.items():
        c = cand[name]
        assert c.shape == r.shape, f"{name}: shape {c.shape} vs oracle {r.shape}"
        if name.endswith("topk_idx"):
            errs.append((name, float(np.sum(c != r))))
        else:
            errs.append((name, rel_err(c, r)))
    worst = sorted(errs, key=lambda e: -e[1])[:8]
    report = "\n".join(f"  {n:28s} {e:.3e}" for n, e in worst)
    return errs, report


def run_both(cfg: Qwen3Config, seed: int, T: int, hf_dtype=torch.float64, np_dtype="float64"):
    w = random_weights(cfg, seed)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=T)
    ref = NumpyBackend(w, cfg, dtype=np_dtype).run(ids, taps=["*"])
    hf = HFBackend(hf_model(cfg, w, dtype=hf_dtype)).run(ids, taps=["*"])
    return ref, hf


# derandomize: the same draws every run (HF's float32 norms put the worst tap near 7e-7 on rare draws)
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs())
# explicit corners: attention bias + GQA 8 + untied; YaRN + MoE with every layer sparse and no renormalisation
@example(spec={"hidden": 32, "inter": 40, "layers": 2, "kv_heads": 1, "n_rep": 8, "head_dim": 24, "vocab": 97,
               "tied": False, "bias": True, "moe": False, "T": 7, "seed": 1})
@example(spec={"hidden": 48, "inter": 16, "layers": 3, "kv_heads": 2, "n_rep": 2, "head_dim": 16, "vocab": 64,
               "tied": True, "rope_scaling": YARN, "moe": True, "experts": 8, "topk": 3, "moe_inter": 8,
               "norm_topk": False, "sparse_step": 2, "mlp_only": [2], "T": 10, "seed": 2})
def test_numpy_matches_hf_every_tap(spec):
    cfg = make_cfg(spec)
    ref, hf = run_both(cfg, spec["seed"], spec["T"])
    expected = tap_sites(cfg, probs=True)
    assert list(ref.taps) == expected
    assert list(hf.taps) == expected, f"HF missing {sorted(set(expected) - set(hf.taps))}"
    errs, report = compare(ref.taps, hf.taps, TOL)
    bad = [(n, e) for n, e in errs if e > TOL]
    assert not bad, f"config {spec}\nworst taps (relative error; topk_idx: entries differing):\n{report}"
    assert rel_err(hf.logits, ref.logits) <= TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_idx_agrees_exactly(seed):
    spec = {"hidden": 32, "inter": 32, "layers": 2, "kv_heads": 2, "n_rep": 2, "head_dim": 16, "vocab": 97,
            "tied": False, "moe": True, "experts": 16, "topk": 4, "moe_inter": 8, "norm_topk": True,
            "sparse_step": 1, "mlp_only": []}
    cfg = make_cfg(spec)
    ref, hf = run_both(cfg, seed, T=48)
    for i in range(cfg.num_hidden_layers):
        a, b = ref.taps[f"layers.{i}.topk_idx"], hf.taps[f"layers.{i}.topk_idx"]
        rows = np.nonzero((a != b).any(axis=1))[0]
        assert rows.size == 0, f"layer {i}: tokens {rows.tolist()} route differently: oracle {a[rows]}, HF {b[rows]}"
        assert a.shape == (48, 4) and len(np.unique(a)) > 4  # routing is actually spread over experts


def test_float32_oracle_matches_hf_float32():
    spec = {"hidden": 32, "inter": 40, "layers": 2, "kv_heads": 2, "n_rep": 4, "head_dim": 16, "vocab": 97,
            "tied": True, "moe": True, "experts": 4, "topk": 2, "moe_inter": 16, "norm_topk": True,
            "sparse_step": 1, "mlp_only": [0]}
    cfg = make_cfg(spec)
    ref, hf = run_both(cfg, 3, T=9, hf_dtype=torch.float32, np_dtype="float32")
    assert ref.logits.dtype == np.float32 and all(v.dtype in (np.float32, np.int64) for v in ref.taps.values())
    errs, report = compare(ref.taps, hf.taps, 1e-5)
    assert all(e <= 1e-5 for _, e in errs), report


@pytest.mark.parametrize("moe", [False, True])
def test_hf_backend_loads_checkpoint_dir(tmp_path, moe):
    """A per-expert checkpoint on disk goes through transformers' own loading (fusing experts) and matches."""
    from safetensors.torch import save_file

    spec = {"hidden": 32, "inter": 40, "layers": 2, "kv_heads": 1, "n_rep": 4, "head_dim": 16, "vocab": 64,
            "tied": False, "moe": moe, "experts": 4, "topk": 2, "moe_inter": 8, "norm_topk": True,
            "sparse_step": 1, "mlp_only": []}
    cfg = make_cfg(spec)
    w = random_weights(cfg, 5)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file({k: v.contiguous() for k, v in w.items()}, str(tmp_path / "model.safetensors"))
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    hf = HFBackend(tmp_path, dtype="float64")
    assert hf.name == "hf" and hf.dtype == "float64" and hf.cfg.is_moe == moe
    got = hf.run(ids, taps="all")
    ref = NumpyBackend(w, cfg).run(ids, taps="all")
    errs, report = compare(ref.taps, got.taps, TOL)
    assert all(e <= TOL for _, e in errs), report


def test_numpy_from_pretrained(tmp_path):
    pytest.importorskip("qwen3lab.weights")
    from safetensors.torch import save_file

    cfg = make_cfg({"hidden": 32, "inter": 40, "layers": 1, "kv_heads": 2, "n_rep": 2, "head_dim": 8,
                    "vocab": 64, "tied": True})
    w = random_weights(cfg, 6)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file(w, str(tmp_path / "model.safetensors"))
    b = NumpyBackend.from_pretrained(tmp_path)
    assert b.dtype == "float64" and b.cfg.hidden_size == 32
    np.testing.assert_array_equal(b.run([1, 2, 3]).logits, NumpyBackend(w, cfg).run([1, 2, 3]).logits)


def test_hf_graft_isolates_a_planted_bug():
    """HF with a wrong q_norm eps in layer 1, grafted with the oracle's taps: only that tap is off."""
    cfg = make_cfg({"hidden": 32, "inter": 40, "layers": 3, "kv_heads": 2, "n_rep": 2, "head_dim": 16,
                    "vocab": 97, "tied": False, "moe": True, "experts": 4, "topk": 2, "moe_inter": 8,
                    "norm_topk": True, "sparse_step": 2, "mlp_only": []})
    w = random_weights(cfg, 7)
    ids = list(range(1, 12))
    ref = NumpyBackend(w, cfg).run(ids, taps=["*"])
    model = hf_model(cfg, w, dtype=torch.float64)
    model.model.layers[1].self_attn.q_norm.variance_epsilon = 0.5  # the planted bug
    hf = HFBackend(model)
    plain = hf.run(ids, taps=["*"])
    grafted = hf.run(ids, taps=["*"], graft=ref.taps)
    g_errs = dict(compare(ref.taps, grafted.taps, TOL)[0])
    p_errs = dict(compare(ref.taps, plain.taps, TOL)[0])
    assert g_errs["layers.1.q_norm"] > 1e-2
    leaked = {n: e for n, e in g_errs.items() if n != "layers.1.q_norm" and e > TOL}
    assert not leaked, f"grafted run: error leaked past layers.1.q_norm: {leaked}"
    # without graft the bug propagates downstream (to what consumes the graftable values)
    for n in ("layers.1.q_rot", "layers.1.attn", "layers.1.resid_post", "layers.2.attn_in", "logits"):
        assert p_errs[n] > 1e-3, (n, p_errs[n])
    assert all(p_errs[n] <= TOL for n in tap_sites(cfg, probs=True) if n.startswith("layers.0.") or n == "embed")


def test_hf_graft_with_own_taps_reproduces_itself():
    cfg = make_cfg({"hidden": 32, "inter": 40, "layers": 2, "kv_heads": 1, "n_rep": 2, "head_dim": 16,
                    "vocab": 97, "tied": True, "moe": True, "experts": 4, "topk": 2, "moe_inter": 8,
                    "norm_topk": False, "sparse_step": 1, "mlp_only": [1]})
    hf = HFBackend(hf_model(cfg, random_weights(cfg, 8), dtype=torch.float64))
    ids = [5, 4, 3, 2, 1]
    own = hf.run(ids, taps=["*"])
    again = hf.run(ids, taps=["*"], graft=own.taps)
    for name, arr in own.taps.items():
        np.testing.assert_array_equal(again.taps[name], arr, err_msg=name)
    np.testing.assert_array_equal(again.logits, own.logits)


def test_hf_probs_only_when_asked():
    cfg = make_cfg({"hidden": 16, "inter": 16, "layers": 2, "kv_heads": 1, "n_rep": 4, "head_dim": 8,
                    "vocab": 64, "tied": True})
    hf = HFBackend(hf_model(cfg, random_weights(cfg, 9)))
    assert hf.dtype == "float32"
    r = hf.run([1, 2, 3], taps="all")
    assert list(r.taps) == tap_sites(cfg) and not any(n.endswith("probs") for n in r.taps)
    r = hf.run([1, 2, 3], taps=["layers.*.probs"])
    assert list(r.taps) == ["layers.0.probs", "layers.1.probs"] and r.taps["layers.0.probs"].shape == (4, 3, 3)
    assert hf.run([1, 2, 3]).taps == {}


def test_missing_transformers_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'qwen3lab\[hf\]'"):
        require_transformers()


@pytest.mark.parametrize("moe", [False, True])
def test_hf_kv_cache_decode_matches_oracle_steps(moe):
    """HF prefill + cached single-token steps vs the oracle's full recompute sliced per step."""
    spec = {"hidden": 32, "inter": 40, "layers": 2, "kv_heads": 2, "n_rep": 2, "head_dim": 16, "vocab": 97,
            "tied": moe, "rope_scaling": YARN if moe else None, "moe": moe, "experts": 4, "topk": 2,
            "moe_inter": 8, "norm_topk": True, "sparse_step": 1, "mlp_only": []}
    cfg = make_cfg(spec)
    w = random_weights(cfg, 10)
    ids, steps = [9, 8, 7, 6, 5, 4, 3, 2], 4
    ref = NumpyBackend(w, cfg).run_decode(ids, steps, taps=["*"])
    hf = HFBackend(hf_model(cfg, w, dtype=torch.float64))
    got = hf.run_decode(ids, steps, taps=["*"])
    assert list(got.taps) == list(ref.taps)
    assert got.taps["step3.layers.1.probs"].shape == (cfg.num_attention_heads, 1, 8)
    errs, report = compare(ref.taps, got.taps, TOL)
    assert all(e <= TOL for _, e in errs), report
    assert rel_err(got.logits, ref.logits) <= TOL
    # grafting HF's own per-step taps back reproduces them (the prefix reaches the reference lookup)
    again = hf.run_decode(ids, steps, taps=["*"], graft=got.taps)
    for name, arr in got.taps.items():
        np.testing.assert_array_equal(again.taps[name], arr, err_msg=name)


def test_hf_backend_errors_name_the_problem(tmp_path):
    from qwen3lab.errors import ConfigError, InputError, WeightsError

    with pytest.raises(ConfigError, match="config.json not found"):
        HFBackend(tmp_path / "nowhere")
    cfg = make_cfg({"hidden": 16, "inter": 16, "layers": 1, "kv_heads": 1, "n_rep": 2, "head_dim": 8,
                    "vocab": 64, "tied": True})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    with pytest.raises(WeightsError, match=str(tmp_path)):
        HFBackend(tmp_path)  # config but no weights
    with pytest.raises(InputError, match="int8"):
        HFBackend(tmp_path, dtype="int8")
    hf = HFBackend(hf_model(cfg, random_weights(cfg, 0)))
    with pytest.raises(InputError, match="decode_steps"):
        hf.run_decode([1, 2], 2)
    with pytest.raises(InputError, match="invalid token id 64"):
        hf.run([64])
