"""verify metrics and tolerances against hand computations (scalar Python loops, not the vectorised code)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qwen3lab.errors import Qwen3LabError
from qwen3lab.verify.metrics import compare_arrays, compare_topk_idx, compare_topk_weight, per_token_error
from qwen3lab.verify.tolerances import DTYPE_DEFAULTS, check, tolerance_for


def hand_metrics(a: np.ndarray, b: np.ndarray) -> dict:
    """The metric definitions, one element at a time."""
    fa, fb = [float(x) for x in a.reshape(-1)], [float(x) for x in b.reshape(-1)]
    dot = sum(x * y for x, y in zip(fa, fb, strict=True))
    na = math.sqrt(sum(x * x for x in fa))
    nb = math.sqrt(sum(y * y for y in fb))
    diffs = [x - y for x, y in zip(fa, fb, strict=True)]
    k = max(range(len(diffs)), key=lambda i: abs(diffs[i]))
    return {"cos": dot / (na * nb), "mse": sum(d * d for d in diffs) / len(diffs),
            "rel": math.sqrt(sum(d * d for d in diffs)) / nb, "max": abs(diffs[k]), "argmax": k,
            "mean": sum(abs(d) for d in diffs) / len(diffs)}


@pytest.mark.parametrize("shape,axes", [((5, 7), ("token", "channel")), ((4, 3, 6), ("token", "head", "channel"))])
def test_metrics_equal_hand_formulas(shape, axes):
    rng = np.random.default_rng(0)
    b = rng.standard_normal(shape)
    a = b + 0.01 * rng.standard_normal(shape)
    m = compare_arrays(a.astype(np.float32), b, axes)
    h = hand_metrics(a.astype(np.float32), b)
    assert m.cosine_similarity == pytest.approx(h["cos"], rel=1e-12)
    assert m.mse == pytest.approx(h["mse"], rel=1e-12)
    assert m.relative_error == pytest.approx(h["rel"], rel=1e-12)
    assert m.max_abs_error == pytest.approx(h["max"], rel=1e-12)
    assert m.mean_abs_error == pytest.approx(h["mean"], rel=1e-12)
    want = dict(zip(axes, np.unravel_index(h["argmax"], shape), strict=True))
    assert m.max_abs_location == {k: int(v) for k, v in want.items()}
    assert m.compared == int(np.prod(shape))


def test_location_names_the_planted_element():
    b = np.zeros((6, 4, 8))  # [T, H, Dh]
    b[...] = 1.0
    a = b.copy()
    a[3, 2, 5] += 0.5
    a[1, 0, 0] += 0.1
    m = compare_arrays(a, b, ("token", "head", "channel"))
    assert m.max_abs_location == {"token": 3, "head": 2, "channel": 5}
    assert m.max_abs_error == pytest.approx(0.5)


def test_identical_zero_and_degenerate_references():
    z = np.zeros((3, 4))
    m = compare_arrays(z, z)
    assert (m.cosine_similarity, m.relative_error, m.mse, m.max_abs_error) == (1.0, 0.0, 0.0, 0.0)
    m = compare_arrays(np.ones((3, 4)), z)
    assert m.relative_error == math.inf and m.cosine_similarity == 0.0
    assert check(m, DTYPE_DEFAULTS["float32"], "embed")  # fails


def test_nan_and_inf_are_counted_and_fail():
    b = np.arange(12, dtype=np.float64).reshape(3, 4) + 1
    a = b.copy()
    a[1, 2] = np.nan
    a[2, 0] = np.inf
    m = compare_arrays(a, b, ("token", "channel"))
    assert (m.nan_candidate, m.inf_candidate, m.nan_reference, m.inf_reference) == (1, 1, 0, 0)
    assert m.nonfinite_mismatch == 2
    assert m.max_abs_location == {"token": 1, "channel": 2}  # the first non-finite position
    assert m.compared == 10 and m.relative_error == 0.0  # the finite part agrees exactly
    why = check(m, DTYPE_DEFAULTS["bfloat16"], "attn_out")
    assert why and "NaN/Inf" in why[0]
    # the same NaN on both sides is not a mismatch
    b2 = b.copy()
    b2[1, 2] = np.nan
    a2 = b2.copy()
    m2 = compare_arrays(a2, b2)
    assert m2.nonfinite_mismatch == 0 and m2.nan_candidate == m2.nan_reference == 1
    assert not check(m2, DTYPE_DEFAULTS["float64"], "embed")


def test_topk_idx_compared_as_sets_per_token():
    ref = np.array([[0, 3], [1, 2], [5, 4], [2, 0]])
    same_sets = np.array([[3, 0], [1, 2], [4, 5], [0, 2]])  # slots permuted: the same experts
    m = compare_topk_idx(same_sets, ref, num_experts=6)
    assert m.match_fraction == 1.0 and m.max_abs_error == 0.0
    one_off = same_sets.copy()
    one_off[2] = [4, 1]  # token 2 chose expert 1 instead of 5
    m = compare_topk_idx(one_off, ref, num_experts=6)
    assert m.match_fraction == 0.75
    assert m.max_abs_location["token"] == 2 and m.max_abs_location["expert"] in (1, 5)
    assert check(m, DTYPE_DEFAULTS["float32"], "topk_idx")  # a token whose top-k differs fails
    assert not check(compare_topk_idx(same_sets, ref, 6), DTYPE_DEFAULTS["float32"], "topk_idx")


def test_topk_weight_aligned_by_expert_id():
    ref_idx = np.array([[0, 3], [1, 2]])
    ref_w = np.array([[0.7, 0.3], [0.6, 0.4]])
    cand_idx = np.array([[3, 0], [1, 2]])  # token 0 lists its experts the other way round
    cand_w = np.array([[0.3, 0.7], [0.6, 0.5]])  # ... with the same weights; token 1 slot 1 is off by 0.1
    m = compare_topk_weight(cand_w, ref_w, cand_idx, ref_idx, num_experts=4)
    # by hand: dense [T, E] weights differ only at (token 1, expert 2): 0.5 vs 0.4
    assert m.max_abs_error == pytest.approx(0.1)
    assert m.max_abs_location == {"token": 1, "expert": 2}
    assert m.mse == pytest.approx(0.01 / 8)
    assert m.relative_error == pytest.approx(0.1 / math.sqrt(0.49 + 0.09 + 0.36 + 0.16))


def test_per_token_error_by_hand():
    ref = np.array([[3.0, 4.0], [1.0, 0.0]])
    cand = np.array([[3.0, 4.0], [1.0, 1.0]])
    np.testing.assert_allclose(per_token_error(cand, ref), [0.0, 1.0])


def test_tolerance_selection_and_overrides():
    assert tolerance_for("float32", "float64") == DTYPE_DEFAULTS["float32"]
    assert tolerance_for("bf16", "float64") == DTYPE_DEFAULTS["bfloat16"]
    assert tolerance_for("float64", "float32") == DTYPE_DEFAULTS["float32"]  # the looser side decides
    s = tolerance_for("float64", preset="simple")
    assert (s.cos_min, s.mse_max, s.rel_max) == (0.99, 1e-4, 0.01)
    o = tolerance_for("float32", rel_max=0.5, cos_min=0.9)
    assert (o.rel_max, o.cos_min, o.mse_max) == (0.5, 0.9, None) and "overrides" in o.name
    with pytest.raises(Qwen3LabError, match="unknown tolerance preset 'loose'"):
        tolerance_for("float32", preset="loose")
    with pytest.raises(Qwen3LabError, match="--rel-max"):
        tolerance_for("float32", rel_max=-1)
    # the defaults are ordered: each lower precision is looser
    order = [DTYPE_DEFAULTS[d] for d in ("float64", "float32", "float16", "bfloat16", "int8")]
    assert all(a.rel_max < b.rel_max and a.cos_min > b.cos_min for a, b in zip(order, order[1:], strict=False))


def test_check_reasons_name_threshold_and_value():
    b = np.full((4, 4), 0.1)
    a = b * 1.02  # relative error 0.02, cosine 1, MSE 4e-6
    tol = tolerance_for("float32", preset="simple")
    why = check(compare_arrays(a, b), tol, "mlp_out")
    assert why == ["relative error 0.02 > 0.01"]
    why = check(compare_arrays(a * 100, b * 100), tol, "mlp_out")  # same relative error, MSE 0.04 > 1e-4 now
    assert why == ["relative error 0.02 > 0.01", "MSE 0.04 > 0.0001"]


def test_chunked_pass_equals_one_pass(monkeypatch):
    """Large taps are reduced a chunk at a time (bounded memory); the numbers must not depend on it."""
    from qwen3lab.verify import metrics

    rng = np.random.default_rng(1)
    b = rng.standard_normal((37, 1001))
    a = b + 1e-3 * rng.standard_normal(b.shape)
    a[30, 900] += 5.0
    a[2, 3] = np.inf
    whole = compare_arrays(a, b, ("token", "channel"))
    monkeypatch.setattr(metrics, "CHUNK", 777)
    chunked = compare_arrays(a, b, ("token", "channel"))
    for f in ("cosine_similarity", "mse", "relative_error", "mean_abs_error"):
        assert getattr(chunked, f) == pytest.approx(getattr(whole, f), rel=1e-12), f
    assert (chunked.max_abs_location, chunked.inf_candidate, chunked.nonfinite_mismatch) == ({"token": 2, "channel": 3},
                                                                                            1, 1)
    a[2, 3] = b[2, 3]
    assert compare_arrays(a, b, ("token", "channel")).max_abs_location == {"token": 30, "channel": 900}


def test_near_tie_routing_by_hand():
    """A token's different expert choice is excused only when the router-logit error explains it."""
    ref_logits = np.array([[3.0, 2.0, 1.00, 0.98, -1.0]])  # top-3 by the reference: {0, 1, 2}
    cand_close = np.array([[3.0, 2.0, 0.99, 0.995, -1.0]])  # err 0.015 >= (1.00 - 0.98) / 2: swap 2 -> 3
    cand_idx, ref_idx = np.array([[0, 1, 3]]), np.array([[0, 1, 2]])
    m = compare_topk_idx(cand_idx, ref_idx, 5, cand_close, ref_logits)
    assert (m.match_fraction, m.near_tie_tokens, m.tokens) == (0.0, 1, 1)
    assert not check(m, DTYPE_DEFAULTS["bfloat16"], "topk_idx")
    cand_far = np.array([[3.0, 2.0, 1.00, 0.985, -1.0]])  # err 0.005 < 0.01: the same swap is a wrong top-k
    m = compare_topk_idx(cand_idx, ref_idx, 5, cand_far, ref_logits)
    assert m.near_tie_tokens == 0
    assert check(m, DTYPE_DEFAULTS["bfloat16"], "topk_idx") == [
        "expert set differs on 1 of 1 tokens (matching or near-tie tokens 0.0% < 100%)"]
    wrong = np.array([[0, 1, 4]])  # expert 4 is far below expert 2: never a near tie at this error
    assert compare_topk_idx(wrong, ref_idx, 5, cand_close, ref_logits).near_tie_tokens == 0
