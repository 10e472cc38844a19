"""Tap-dict comparison: statuses, first divergence in dataflow order, grouping, op/inherited labels."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3lab.config import Qwen3Config
from qwen3lab.errors import InputError
from qwen3lab.taps import tap_sites
from qwen3lab.verify.compare import compare_taps, first_failing, group_results
from qwen3lab.verify.isolate import attach_isolated, label_origins
from qwen3lab.verify.runner import parse_layers
from qwen3lab.verify.tolerances import DTYPE_DEFAULTS

TOL = DTYPE_DEFAULTS["float32"]


def cfg(moe: bool = False, layers: int = 3) -> Qwen3Config:
    d = {"model_type": "qwen3", "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": layers,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 16}
    if moe:
        d.update(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4)
    return Qwen3Config.from_dict(d)


def fake_taps(c: Qwen3Config, T: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    from qwen3lab.taps import canonical_shape

    rng = np.random.default_rng(seed)
    out = {}
    for n in tap_sites(c):
        if n.endswith("topk_idx"):
            out[n] = np.stack([rng.permutation(c.num_experts)[:c.num_experts_per_tok] for _ in range(T)])
        else:
            out[n] = rng.standard_normal(canonical_shape(c, n, T))
    return out


def test_identical_dicts_pass_and_unordered_input_comes_out_in_dataflow_order():
    c = cfg()
    ref = fake_taps(c)
    cand = dict(reversed(list({k: v.copy() for k, v in ref.items()}.items())))
    res = compare_taps(cand, ref, c, TOL)
    assert [r.name for r in res] == tap_sites(c)
    assert all(r.status == "pass" for r in res)
    assert first_failing(res) is None


def test_statuses_missing_extra_shape_mismatch_and_batch_dim():
    c = cfg()
    ref = fake_taps(c)
    cand = {k: v.copy() for k, v in ref.items()}
    del cand["layers.1.q_norm"]
    cand["layers.0.attn"] = cand["layers.0.attn"].reshape(3, -1)  # [T, Hq*Dh]: not the canonical layout
    cand["layers.0.attn_in"] = cand["layers.0.attn_in"][None]  # a leading batch dim of 1 is accepted
    cand["layers.0.k_norm"] = cand["layers.0.k_norm"] * 1.5
    del ref["layers.2.act"]
    res = {r.name: r for r in compare_taps(cand, ref, c, TOL)}
    assert res["layers.1.q_norm"].status == "missing" and res["layers.1.q_norm"].passed is None
    assert res["layers.2.act"].status == "no_reference" and res["layers.2.act"].passed is None
    sm = res["layers.0.attn"]
    assert sm.status == "shape_mismatch" and sm.passed is False
    assert sm.shape == [3, 2, 4] and sm.candidate_shape == [3, 8]
    assert "(3, 8)" in sm.reasons[0] and "(3, 2, 4)" in sm.reasons[0]
    assert res["layers.0.attn_in"].status == "pass" and res["layers.0.attn_in"].candidate_shape == [1, 3, 8]
    # the first failing tap in dataflow order: k_norm (site 6) comes before attn (site 10) in layer 0
    assert first_failing(list(res.values())).name == "layers.0.k_norm"


def test_layer_filter_keeps_embed_and_head():
    c = cfg()
    ref = fake_taps(c)
    res = compare_taps(ref, ref, c, TOL, layers=[1])
    names = [r.name for r in res]
    assert names[0] == "embed" and names[-2:] == ["final_norm", "logits"]
    assert {r.layer for r in res} == {None, 1}


def test_topk_idx_invalid_ids_are_reported_not_raised():
    c = cfg(moe=True)
    ref = fake_taps(c)
    cand = {k: v.copy() for k, v in ref.items()}
    cand["layers.0.topk_idx"] = cand["layers.0.topk_idx"] + 10  # ids past num_experts
    res = {r.name: r for r in compare_taps(cand, ref, c, TOL)}
    r = res["layers.0.topk_idx"]
    assert r.status == "invalid" and "outside 0..3" in r.reasons[0]
    assert res["layers.0.topk_weight"].status == "pass"  # compared slot by slot without valid ids


def test_groups_rows_and_sublayers():
    c = cfg()
    ref = fake_taps(c)
    cand = {k: v.copy() for k, v in ref.items()}
    cand["layers.2.up"] = cand["layers.2.up"] + 1.0
    res = compare_taps(cand, ref, c, TOL)
    g = group_results(res, c, TOL)
    assert [(x.layer_index, x.layer_name) for x in g] == [(-1, "embed"), (0, "layers.0"), (1, "layers.1"),
                                                          (2, "layers.2"), (3, "head")]
    assert [x.passed for x in g] == [True, True, True, False, True]
    assert g[3].worst.name == "layers.2.up"
    sub = group_results(res, c, TOL, sublayers=True)
    assert [x.layer_name for x in sub][1:3] == ["layers.0 attn", "layers.0 mlp"]
    attn = sub[1]
    assert [t.site for t in attn.taps] == ["attn_in", "q", "k", "v", "q_norm", "k_norm", "q_rot", "k_rot", "attn",
                                          "attn_out", "resid_mid"]


def test_origin_labels_and_culprit():
    c = cfg()
    ref = fake_taps(c)
    plain_cand = {k: v.copy() for k, v in ref.items()}
    # plain run: q_rot wrong and everything after it in layer 0 wrong too
    after = False
    for n in tap_sites(c):
        if n == "layers.0.q_rot":
            after = True
        if after:
            plain_cand[n] = plain_cand[n] + 1.0
    plain = {r.name: r for r in compare_taps(plain_cand, ref, c, TOL)}
    iso_cand = {k: v.copy() for k, v in ref.items()}
    iso_cand["layers.0.q_rot"] = iso_cand["layers.0.q_rot"] + 1.0  # grafted: only q_rot's own op is off
    iso = {r.name: r for r in compare_taps(iso_cand, ref, c, TOL)}
    attach_isolated(plain, iso)
    culprit = label_origins(list(plain.values()))
    assert culprit.name == "layers.0.q_rot"
    assert plain["layers.0.q_rot"].origin == "op"
    assert plain["layers.0.attn"].origin == "inherited" and plain["logits"].origin == "inherited"
    assert plain["layers.0.q"].origin is None  # passing taps carry no label


def test_parse_layers():
    assert parse_layers("0-2,5", 8) == [0, 1, 2, 5]
    assert parse_layers(None, 8) is None and parse_layers("all", 8) is None
    assert parse_layers([3, 1], 8) == [1, 3]
    with pytest.raises(InputError, match="layer 8 does not exist"):
        parse_layers("7-9", 8)
    with pytest.raises(InputError, match="'x' is not a layer index"):
        parse_layers("1,x", 8)


def test_the_package_is_callable_as_designed():
    import qwen3lab.verify as v
    from qwen3lab.models.numpy_ref import NumpyBackend
    from qwen3lab.random_init import random_weights

    c = cfg()
    b = NumpyBackend(random_weights(c, seed=1), c)
    rep = v(b, b, [1, 2, 3])
    assert isinstance(rep, v.VerifyReport) and rep.overall_success and v.metrics.compare_arrays
