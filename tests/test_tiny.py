"""qwen3lab tiny: the forward pass against independent computations, weights files, explain, stability."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qwen3lab.errors import InputError, WeightsError
from qwen3lab.models import numpy_ref
from qwen3lab.tiny.config import tiny_config
from qwen3lab.tiny.explain import explain
from qwen3lab.tiny.forward import tiny_forward
from qwen3lab.tiny.scalar import scalar_forward
from qwen3lab.tiny.stability import check_stability
from qwen3lab.tiny.weights import INITS, init_weights, read_weights, write_weights

IDS = [1, 3, 7, 2]


def _diff_report(a: dict, b: dict) -> str:
    lines = []
    for k in a:
        if k in b:
            x, y = np.asarray(a[k], dtype=float), np.asarray(b[k], dtype=float)
            same = (x == y) | (np.isnan(x) & np.isnan(y))
            d = np.max(np.where(same, 0.0, np.abs(x - y)), initial=0.0)
            lines.append(f"{k}: max |diff| {d:.3g}")
    return "\n".join(lines)


# ---- the forward pass equals independent computations ------------------------------------------------
@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("init", INITS)
def test_oracle_equals_scalar_loops(moe, init):
    """Every tap of the oracle (vectorised NumPy) equals the pure-Python loop forward, every element."""
    cfg = tiny_config(moe=moe)
    w = init_weights(cfg, init, seed=3)
    got = tiny_forward(cfg, w, IDS)
    ref = scalar_forward(w, cfg, IDS)
    assert set(ref) == set(got.taps), set(ref) ^ set(got.taps)
    for name, arr in got.taps.items():
        r = np.array(ref[name], dtype=np.float64)
        if not np.allclose(arr, r, rtol=1e-12, atol=1e-12):
            pytest.fail(f"{name} differs; every tap:\n" + _diff_report(ref, got.taps))
    np.testing.assert_allclose(got.logits, np.array(ref["logits"]), rtol=1e-12, atol=1e-12)


def test_scalar_forward_catches_a_planted_oracle_bug(monkeypatch):
    """The comparison above can fail: an oracle with SiLU replaced by ReLU disagrees with the loops."""
    cfg = tiny_config()
    w = init_weights(cfg, "random", 0)
    monkeypatch.setattr(numpy_ref, "silu", lambda x: np.maximum(x, 0))
    got = tiny_forward(cfg, w, IDS)
    ref = scalar_forward(w, cfg, IDS)
    assert np.allclose(got.taps["layers.0.gate"], ref["layers.0.gate"])
    assert not np.allclose(got.taps["layers.0.act"], ref["layers.0.act"])


def _ones_by_hand(cfg, n_tokens: int) -> float:
    """Logit value of the all-ones model, by hand: every vector is constant, so each step is one scalar.

    RMSNorm of a constant vector c with weight 1 is c / sqrt(c² + eps); a [R, C] all-ones projection of a
    constant vector c is C·c; v is the same at every position so attention returns v whatever the
    probabilities; SwiGLU of the constant m is silu(D·m)·D·m, and down_proj sums I of those."""
    D, I, H, Dh, eps = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim, cfg.rms_norm_eps

    def norm(c):
        return c / math.sqrt(c * c + eps)

    def silu(x):
        return x / (1 + math.exp(-x))

    x = 1.0  # embedding row of ones
    for _ in range(cfg.num_hidden_layers):
        a = norm(x)
        v = D * a  # v_proj row sums
        attn_out = H * Dh * v  # o_proj sums all heads' channels
        x = x + attn_out
        m = norm(x)
        act = silu(D * m) * (D * m)
        x = x + I * act
    return D * norm(x)  # lm_head row of ones · final_norm


def test_ones_model_equals_hand_arithmetic():
    cfg = tiny_config()
    w = init_weights(cfg, "ones")
    got = tiny_forward(cfg, w, IDS).logits
    want = _ones_by_hand(cfg, len(IDS))
    np.testing.assert_allclose(got, np.full_like(got, want), rtol=1e-12)


def test_identity_init_is_what_the_docs_say():
    cfg = tiny_config()
    w = init_weights(cfg, "identity")
    E = w["model.embed_tokens.weight"]
    assert E.shape == (10, 8) and np.array_equal(E[9], np.eye(8)[1]) and np.array_equal(E[3], np.eye(8)[3])
    assert np.array_equal(w["model.layers.0.mlp.gate_proj.weight"], np.eye(16, 8))
    assert np.array_equal(w["model.norm.weight"], np.ones(8))
    a = init_weights(cfg, "arange")["model.layers.0.self_attn.q_proj.weight"]  # [8, 8]
    assert a[0, 0] == pytest.approx(-0.5 + 0.5 / 64) and a[0, 1] - a[0, 0] == pytest.approx(1 / 64)


def test_random_init_is_seeded():
    cfg = tiny_config()
    a, b, c = (init_weights(cfg, "random", s)["model.layers.0.self_attn.q_proj.weight"] for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ---- weights files ------------------------------------------------------------------------------------
def _edit(path, fmt: str, name: str, index: tuple, delta: float) -> None:
    """Change one weight in a file the way a person would: with that format's own tools or a text editor."""
    if fmt == "safetensors":
        d = load_file(str(path))
        d[name][index] += delta
        save_file(d, str(path))
    elif fmt == "npz":
        with np.load(path) as z:
            d = {k: z[k].copy() for k in z.files}
        d[name][index] += delta
        np.savez(path, **d)
    else:
        d = json.loads(path.read_text())
        row = d[name]
        for i in index[:-1]:
            row = row[i]
        row[index[-1]] += delta
        path.write_text(json.dumps(d))


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "json"])
def test_weights_file_round_trip_and_one_edit(tmp_path, fmt):
    """Saving and reading back changes nothing; adding δ to lm_head[v, c] moves logits[:, v] by
    δ·final_norm[:, c] and nothing else (final_norm does not depend on lm_head)."""
    cfg = tiny_config()
    w = init_weights(cfg, "random", 0)
    path = write_weights(tmp_path / f"w.{fmt}", w, cfg)
    back = read_weights(path, cfg)
    for k in w:
        assert np.array_equal(back[k], w[k]), k
    base = tiny_forward(cfg, back, IDS)

    v, c, delta = 4, 2, 0.75
    _edit(path, fmt, "lm_head.weight", (v, c), delta)
    edited = tiny_forward(cfg, read_weights(path, cfg), IDS)
    change = edited.logits - base.logits
    expect = np.zeros_like(change)
    expect[:, v] = delta * base.taps["final_norm"][:, c]
    np.testing.assert_allclose(change, expect, atol=1e-12)


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "json"])
def test_weights_file_edit_inside_a_layer(tmp_path, fmt):
    """An edit to layer 1's down_proj moves layer 1's mlp_out by δ·act exactly and leaves layer 0 alone."""
    cfg = tiny_config()
    path = write_weights(tmp_path / f"w.{fmt}", init_weights(cfg, "arange"), cfg)
    base = tiny_forward(cfg, read_weights(path, cfg), IDS)
    _edit(path, fmt, "model.layers.1.mlp.down_proj.weight", (5, 3), -0.5)
    edited = tiny_forward(cfg, read_weights(path, cfg), IDS)
    for name in ("layers.0.resid_post", "layers.1.act"):
        assert np.array_equal(edited.taps[name], base.taps[name]), name
    expect = base.taps["layers.1.mlp_out"].copy()
    expect[:, 5] += -0.5 * base.taps["layers.1.act"][:, 3]
    np.testing.assert_allclose(edited.taps["layers.1.mlp_out"], expect, atol=1e-12)
    assert not np.allclose(edited.logits, base.logits)


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "json"])
def test_weights_file_missing_tensor_is_named(tmp_path, fmt):
    cfg = tiny_config()
    w = init_weights(cfg, "random", 0)
    gone = "model.layers.1.mlp.up_proj.weight"
    path = write_weights(tmp_path / f"w.{fmt}", w, cfg)
    if fmt == "safetensors":
        d = load_file(str(path))
        del d[gone]
        save_file(d, str(path))
    elif fmt == "npz":
        with np.load(path) as z:
            d = {k: z[k] for k in z.files if k != gone}
        np.savez(path, **d)
    else:
        d = json.loads(path.read_text())
        del d[gone]
        path.write_text(json.dumps(d))
    with pytest.raises(WeightsError, match=gone.replace(".", r"\.")) as e:
        read_weights(path, cfg)
    assert str(path) in str(e.value)


def test_weights_file_extra_and_misshaped_tensors(tmp_path):
    cfg = tiny_config()
    w = init_weights(cfg, "random", 0)
    path = tmp_path / "w.npz"
    np.savez(path, **w, **{"model.layers.2.mlp.up_proj.weight": np.zeros((16, 8))})
    with pytest.raises(WeightsError, match=r"unexpected.*model\.layers\.2\.mlp\.up_proj\.weight"):
        read_weights(path, cfg)
    np.savez(path, **{**w, "model.norm.weight": np.ones(9)})
    with pytest.raises(WeightsError, match=r"'model\.norm\.weight' has shape \[9\], expected \[8\]"):
        read_weights(path, cfg)
    with pytest.raises(WeightsError, match="unknown weights format"):
        write_weights(tmp_path / "w.pt", w, cfg)
    bad = tmp_path / "bad.json"
    bad.write_text('{"model.norm.weight": [1, 2,')
    with pytest.raises(WeightsError, match="malformed JSON"):
        read_weights(bad, cfg)


def test_json_weights_are_editable_text(tmp_path):
    """One matrix row per line, so a person can find a weight by eye."""
    cfg = tiny_config()
    path = write_weights(tmp_path / "w.json", init_weights(cfg, "ones"), cfg)
    lines = path.read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if '"model.layers.0.self_attn.q_proj.weight"' in l)
    assert lines[start + 1].strip() == "[" + ", ".join(["1.0"] * 8) + "],"


def test_token_flags_are_checked():
    from qwen3lab.tiny.config import parse_tokens

    cfg = tiny_config()
    assert parse_tokens("1, 3,7,2", cfg) == IDS
    with pytest.raises(InputError, match="invalid token id 10"):
        parse_tokens("1,10", cfg)
    with pytest.raises(InputError, match="exceed the context length 4"):
        parse_tokens("1,2,3,4,5", cfg)
    with pytest.raises(InputError, match="comma-separated integers"):
        parse_tokens("1,a", cfg)


# ---- explain -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("moe", [False, True])
def test_explain_checks_pass(moe):
    cfg = tiny_config(moe=moe)
    w = init_weights(cfg, "random", 0)
    run = tiny_forward(cfg, w, IDS)
    wt = explain(cfg, w, IDS, run.taps)
    assert wt.ok, [c for c in wt.checks if not c.passed]
    assert len(wt.checks) >= 18
    text = wt.text()
    assert text.strip().endswith(f"{len(wt.checks)}/{len(wt.checks)} checks passed")
    for phrase in ("RMSNorm", "rms = sqrt(ms + eps)", "RoPE", "Softmax", "score =", "silu" if not moe else "router"):
        assert phrase in text, phrase


def test_explain_other_token_channel_layer_and_gqa():
    cfg = tiny_config(nh=4, nkvh=2, d=12, dctx=6)
    w = init_weights(cfg, "arange")
    ids = [0, 9, 4, 4, 1]
    run = tiny_forward(cfg, w, ids)
    wt = explain(cfg, w, ids, run.taps, layer=1, token=2, channel=7, head=3)
    assert wt.ok, [c for c in wt.checks if not c.passed]
    assert "kv head 1" in wt.text()
    with pytest.raises(InputError, match="--explain-token 5 is out of range 0..4"):
        explain(cfg, w, ids, run.taps, token=5)


def test_explain_shows_the_arithmetic():
    """The printed RMSNorm line holds the actual squares, and its result is the oracle's value."""
    cfg = tiny_config()
    w = init_weights(cfg, "ones")
    run = tiny_forward(cfg, w, IDS)
    text = explain(cfg, w, IDS, run.taps, precision=4).text()
    assert "ms = (1.0000² + 1.0000² + 1.0000² + 1.0000² + 1.0000² + 1.0000² + 1.0000² + 1.0000²) / 8" in \
        " ".join(l.strip() for l in text.splitlines())


def test_explain_catches_a_wrong_oracle(monkeypatch):
    """A check that cannot fail proves nothing: RMSNorm with the eps outside the sqrt fails the walkthrough."""
    cfg = tiny_config()
    w = init_weights(cfg, "random", 0)
    monkeypatch.setattr(numpy_ref, "rms_norm",
                        lambda x, wt, eps: x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + 1e-3) * wt)
    run = tiny_forward(cfg, w, IDS)
    wt = explain(cfg, w, IDS, run.taps)
    assert not wt.ok
    assert not next(c for c in wt.checks if "attn_in" in c.label).passed
    assert wt.text().strip().endswith(f"{wt.passed}/{len(wt.checks)} checks passed")


# ---- stability ---------------------------------------------------------------------------------------
def _clean():
    cfg = tiny_config()
    w = init_weights(cfg, "random", 0)
    return cfg, w, tiny_forward(cfg, w, IDS)


def test_stability_clean_run_passes():
    cfg, w, run = _clean()
    rep = check_stability(cfg, run.taps, w)
    assert rep.passed, [(t.name, t.problems) for t in rep.failures()]
    assert "unit RMS before weight" in rep["layers.1.mlp_in"].checks
    assert "zero above causal diagonal" in rep["layers.0.probs"].checks


def test_stability_flags_planted_nan():
    cfg, w, run = _clean()
    taps = dict(run.taps)
    taps["layers.1.v"] = taps["layers.1.v"].copy()
    taps["layers.1.v"][2, 0, 3] = np.nan
    rep = check_stability(cfg, taps, w)
    assert rep["layers.1.v"].verdict == "FAIL"
    assert "1 NaN (first at [2, 0, 3])" in rep["layers.1.v"].problems[0]
    assert rep.failures()[0].name == "layers.1.v"


def test_stability_flags_nan_weight_through_the_model():
    """A NaN planted in a weight spreads; the first failing tap is the one that weight makes."""
    cfg = tiny_config()
    w = init_weights(cfg, "random", 0)
    w["model.layers.1.self_attn.k_proj.weight"][2, 5] = np.nan
    run = tiny_forward(cfg, w, IDS)
    rep = check_stability(cfg, run.taps, w)
    assert not rep.passed
    assert rep.failures()[0].name == "layers.1.k"
    assert rep["layers.0.resid_post"].verdict == "ok"


def test_stability_flags_blow_up():
    cfg = tiny_config()
    w = init_weights(cfg, "random", 0)
    w["model.layers.0.mlp.down_proj.weight"] *= 1e6
    rep = check_stability(cfg, tiny_forward(cfg, w, IDS).taps, w)
    first = rep.failures()[0]
    assert first.name == "layers.0.mlp_out"
    assert "blow-up: max |x|" in first.problems[0]


def test_stability_flags_planted_causal_leak():
    cfg, w, run = _clean()
    taps = dict(run.taps)
    p = taps["layers.0.probs"].copy()
    p[1, 0, :] = [0.5, 0.5, 0.0, 0.0]  # token 0 attends to position 1: still sums to 1, in [0, 1]
    taps["layers.0.probs"] = p
    rep = check_stability(cfg, taps, w)
    probs = rep["layers.0.probs"]
    assert probs.verdict == "FAIL"
    assert any("causal mask broken" in m and "token 0 attends to later position 1" in m for m in probs.problems)
    assert not any("sum to 1" in m for m in probs.problems)


def test_stability_flags_model_without_causal_mask(monkeypatch):
    """An attention that lets every query see every key (all keys at position 0) breaks the mask check
    and no longer matches softmax of the (causal) scores."""
    cfg = tiny_config()
    w = init_weights(cfg, "random", 0)
    real = numpy_ref.attention
    monkeypatch.setattr(numpy_ref, "attention",
                        lambda q, k, v, qp, kp, name=None: real(q, k, v, qp, np.zeros_like(kp), name))
    rep = check_stability(cfg, tiny_forward(cfg, w, IDS).taps, w)
    msgs = rep["layers.0.probs"].problems
    assert any("causal mask broken" in m for m in msgs) and any("softmax" in m for m in msgs)
    assert rep.failures()[0].name == "layers.0.probs"


def test_stability_flags_rows_not_summing_to_one_and_out_of_range():
    cfg, w, run = _clean()
    taps = dict(run.taps)
    p = taps["layers.1.probs"].copy()
    p[0, 3, 0] += 0.2
    p[1, 2, 1] = -0.1
    taps["layers.1.probs"] = p
    msgs = check_stability(cfg, taps, w)["layers.1.probs"].problems
    assert any("do not sum to 1" in m for m in msgs) and any("outside [0, 1]" in m for m in msgs)


def test_stability_flags_wrong_rmsnorm_eps(monkeypatch):
    """eps 1e-5 where the config says 1e-6 moves the RMS of output/weight by ~5e-6: the unit-RMS check sees it."""
    cfg = tiny_config()
    w = init_weights(cfg, "random", 0)
    real = numpy_ref.rms_norm
    monkeypatch.setattr(numpy_ref, "rms_norm", lambda x, wt, eps: real(x, wt, eps * 10))
    rep = check_stability(cfg, tiny_forward(cfg, w, IDS).taps, w)
    assert rep.failures()[0].name == "layers.0.attn_in"
    assert "RMSNorm output / weight has RMS" in rep.failures()[0].problems[0]


def test_stability_flags_broken_scores_mask():
    cfg, w, run = _clean()
    taps = dict(run.taps)
    s = taps["layers.0.scores"].copy()
    s[0, 0, 2] = 0.3
    taps["layers.0.scores"] = s
    rep = check_stability(cfg, taps, w)
    assert any("not masked" in m for m in rep["layers.0.scores"].problems)


def test_attention_bias_model_through_scalar_loops_and_explain():
    """attention_bias=True (q/k/v/o biases): the loops, the oracle and the walkthrough agree."""
    cfg = tiny_config().replace(attention_bias=True)
    w = init_weights(cfg, "random", 5)
    run = tiny_forward(cfg, w, IDS)
    ref = scalar_forward(w, cfg, IDS)
    np.testing.assert_allclose(run.logits, np.array(ref["logits"]), atol=1e-12)
    wt = explain(cfg, w, IDS, run.taps, channel=5)
    assert wt.ok, [c for c in wt.checks if not c.passed]
    assert "+ bias[" in wt.text()


# ---- printing ----------------------------------------------------------------------------------------
def test_format_matrix_wraps_without_eliding():
    from qwen3lab.tiny.printer import format_matrix

    a = np.arange(3 * 40, dtype=np.float64).reshape(3, 40) / 7 - 5
    text = format_matrix(a, precision=3, width=80)
    lines = text.splitlines()
    assert max(len(l) for l in lines) <= 80
    assert "..." not in text
    values = [float(x) for l in lines if l.strip().startswith("t") for x in l.split()[1:]]
    assert len(values) == a.size and set(np.round(a, 3).ravel()) == set(values)
    blocks = [l for l in lines if l.strip().startswith("columns")]
    assert blocks == ["  columns 0-9:", "  columns 10-19:", "  columns 20-29:", "  columns 30-39:"]
    # 41 columns at 12 per line: blocks of 11, 11, 11, 8 -- never a lone last column
    text41 = format_matrix(np.ones((2, 41)), precision=3, width=80)
    assert [l.strip() for l in text41.splitlines() if "columns" in l] == \
        ["columns 0-10:", "columns 11-21:", "columns 22-32:", "columns 33-40:"]


def test_format_matrix_alignment_nan_and_large_values():
    from qwen3lab.tiny.printer import format_matrix, format_tap

    text = format_matrix(np.array([[1.0, np.nan], [-np.inf, 2.5]]), precision=2)
    assert text.splitlines() == ["        0    1", "  t0 1.00  nan", "  t1 -inf 2.50"]
    big = format_matrix(np.array([[1.0, 2e7]]), precision=2)
    assert "2.00e+07" in big and "1.00e+00" in big  # one notation per matrix keeps columns aligned
    t = format_tap("layers.0.probs", np.full((2, 3, 3), 1 / 3), precision=3)
    assert t.count("head ") == 2 and "rows: query token, columns: key position" in t
