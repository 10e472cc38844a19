"""Per-tap error metrics: candidate array vs reference array, computed in float64.

- cosine similarity, MSE, relative error ||a-b||/||b||, max abs error with its location named by the
  tap's canonical axes (token, head, channel, ...), mean abs error, NaN/Inf counts on each side.
- Positions where either side is NaN/Inf are left out of the numeric metrics and counted instead; a
  non-finite value the reference does not also have at that position fails the tap (tolerances.py).
- MoE routing taps are compared by expert id, not by slot, because implementations may list a token's
  chosen experts in any order:
  * `topk_idx` [T, K] is compared as a set per token: `match_fraction` is the fraction of tokens whose
    chosen expert set equals the reference's; a token whose set differs is a failing token. The numeric
    fields are those of the multi-hot [T, E] selection masks (so max_abs_location names the first token
    and an expert that differs).
    A differing token is a *near tie* when the swap is explained by the candidate's own router-logit
    error at that token: with r, c the reference's and candidate's router logits and err = max|c - r|,
    a candidate that ranks by its logits can prefer b over a only if r_a - r_b <= 2 err; so when every
    dropped expert a and added expert b satisfy that, low precision (not a wrong top-k) made the choice.
  * `topk_weight` [T, K] is scattered to a dense [T, E] matrix by its own token's expert ids (zero for
    experts not chosen) on each side, then compared like any other tap: a weight is matched with the
    weight the other side gave the same expert.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Names of the axes of each tap's canonical shape (DESIGN.md), used to name the max-error location.
_AXES_TD = ("token", "channel")
_AXES_THD = ("token", "head", "channel")
AXES = {
    "embed": _AXES_TD, "attn_in": _AXES_TD, "attn_out": _AXES_TD, "resid_mid": _AXES_TD, "mlp_in": _AXES_TD,
    "mlp_out": _AXES_TD, "resid_post": _AXES_TD, "final_norm": _AXES_TD,
    "gate": _AXES_TD, "up": _AXES_TD, "act": _AXES_TD,
    "q": _AXES_THD, "k": _AXES_THD, "v": _AXES_THD, "q_norm": _AXES_THD, "k_norm": _AXES_THD,
    "q_rot": _AXES_THD, "k_rot": _AXES_THD, "attn": _AXES_THD, "k_cache": _AXES_THD, "v_cache": _AXES_THD,
    "probs": ("head", "token", "position"),
    "router_logits": ("token", "expert"), "topk_idx": ("token", "expert"), "topk_weight": ("token", "expert"),
    "logits": ("token", "vocab"),
}


def axes_for(site: str, ndim: int) -> tuple[str, ...]:
    axes = AXES.get(site)
    if axes is not None and len(axes) == ndim:
        return axes
    return tuple(f"dim{i}" for i in range(ndim))


@dataclass
class TapMetrics:
    cosine_similarity: float
    mse: float
    relative_error: float
    max_abs_error: float
    max_abs_location: dict[str, int] | None  # e.g. {"token": 3, "head": 1, "channel": 17}
    mean_abs_error: float
    nan_candidate: int = 0
    inf_candidate: int = 0
    nan_reference: int = 0
    inf_reference: int = 0
    nonfinite_mismatch: int = 0  # positions non-finite on one side only (or NaN vs Inf)
    match_fraction: float | None = None  # topk_idx: fraction of tokens whose expert set matches
    near_tie_tokens: int | None = None  # topk_idx: differing tokens explained by the router logits' error
    tokens: int | None = None  # topk_idx: number of tokens compared
    compared: int = 0  # number of positions that entered the numeric metrics

    def to_dict(self) -> dict:
        return asdict(self)


CHUNK = 1 << 20  # elements per float64 pass: a [32, 151936] logits tap never needs 4 full float64 copies


def compare_arrays(cand: np.ndarray, ref: np.ndarray, axes: tuple[str, ...] | None = None) -> TapMetrics:
    """Metrics of `cand` against `ref` (same shape), in float64, a chunk of CHUNK elements at a time."""
    shape = np.shape(cand)
    assert shape == np.shape(ref), (shape, np.shape(ref))
    axes = axes or tuple(f"dim{i}" for i in range(len(shape)))
    fa_all, fb_all = np.ravel(cand), np.ravel(ref)  # views when contiguous (memmaps stay on disk)
    N = fa_all.size
    dd = aa = bb = ab = sabs = 0.0
    n = mismatch = nan_a = inf_a = nan_b = inf_b = 0
    max_abs, max_at, first_odd = -1.0, -1, -1
    for lo in range(0, max(N, 1), CHUNK):
        a = np.asarray(fa_all[lo:lo + CHUNK], dtype=np.float64)
        b = np.asarray(fb_all[lo:lo + CHUNK], dtype=np.float64)
        ca, cb = float(np.dot(a, a)), float(np.dot(b, b))
        idx = None
        if not (np.isfinite(ca) and np.isfinite(cb)):
            # some NaN/Inf (or a square past 1e308): count them and keep only positions finite on both sides
            na_, nb_ = np.isnan(a), np.isnan(b)
            ia, ib = np.isinf(a), np.isinf(b)
            nan_a, inf_a, nan_b, inf_b = (nan_a + int(na_.sum()), inf_a + int(ia.sum()), nan_b + int(nb_.sum()),
                                          inf_b + int(ib.sum()))
            both = ~(na_ | ia | nb_ | ib)
            # one side non-finite, or both non-finite but different (NaN vs +Inf, +Inf vs -Inf)
            odd = ~both & ~((na_ & nb_) | (ia & (a == b)))
            if odd.any() and first_odd < 0:
                first_odd = lo + int(np.flatnonzero(odd)[0])
            mismatch += int(odd.sum())
            idx = np.flatnonzero(both)
            a, b = a[idx], b[idx]
            ca, cb = float(np.dot(a, a)), float(np.dot(b, b))
        aa += ca
        bb += cb
        ab += float(np.dot(a, b))
        d = a - b
        dd += float(np.dot(d, d))
        n += d.size
        if d.size:
            absd = np.abs(d, out=d)
            sabs += float(absd.sum())
            k = int(np.argmax(absd))
            if absd[k] > max_abs:
                max_abs, max_at = float(absd[k]), lo + (k if idx is None else int(idx[k]))
    if aa == 0.0 and bb == 0.0:
        cos = 1.0
    elif aa == 0.0 or bb == 0.0:
        cos = 0.0
    else:
        cos = ab / np.sqrt(aa * bb)
    if bb > 0:
        rel = float(np.sqrt(dd / bb))
    else:
        rel = 0.0 if dd == 0.0 else float("inf")
    loc = None
    if mismatch:
        # a non-finite value where the reference has a number (or vice versa) is the worst error there is
        loc, max_abs = _location(first_odd, shape, axes), float("inf")
    elif n:
        loc = _location(max_at, shape, axes)
    else:
        max_abs = 0.0
    return TapMetrics(
        cosine_similarity=float(cos), mse=dd / n if n else 0.0, relative_error=rel, max_abs_error=max_abs,
        max_abs_location=loc, mean_abs_error=sabs / n if n else 0.0, nan_candidate=nan_a, inf_candidate=inf_a,
        nan_reference=nan_b, inf_reference=inf_b, nonfinite_mismatch=mismatch, compared=int(n),
    )


def _location(flat: int, shape: tuple[int, ...], axes: tuple[str, ...]) -> dict[str, int]:
    idx = np.unravel_index(flat, shape) if shape else ()
    return {ax: int(i) for ax, i in zip(axes, idx, strict=True)}


def topk_mask(idx: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, K] expert ids -> [T, E] multi-hot selection mask (float64)."""
    idx = np.asarray(idx).astype(np.int64)
    T = idx.shape[0]
    m = np.zeros((T, num_experts), dtype=np.float64)  # [T, E]
    m[np.arange(T)[:, None], idx] = 1.0
    return m


def topk_dense(idx: np.ndarray, weight: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, K] ids and weights -> [T, E] weights placed at their expert id (0 where not chosen)."""
    idx = np.asarray(idx).astype(np.int64)
    w = np.asarray(weight, dtype=np.float64)
    T = idx.shape[0]
    dense = np.zeros((T, num_experts), dtype=np.float64)  # [T, E]
    np.add.at(dense, (np.arange(T)[:, None], idx), w)
    return dense


def valid_expert_ids(idx: np.ndarray, num_experts: int) -> str | None:
    """None if every entry is an integer expert id in range, else a message saying what is wrong."""
    arr = np.asarray(idx)
    if not np.all(np.isfinite(arr)):
        return "contains NaN/Inf"
    if np.any(arr != np.round(arr)):
        return "contains non-integer values"
    if arr.size and (arr.min() < 0 or arr.max() >= num_experts):
        return f"has expert ids outside 0..{num_experts - 1} (min {arr.min():g}, max {arr.max():g})"
    return None


def compare_topk_idx(cand: np.ndarray, ref: np.ndarray, num_experts: int, cand_logits: np.ndarray | None = None,
                     ref_logits: np.ndarray | None = None, rel_cap: float | None = None) -> TapMetrics:
    """Set comparison per token; numeric fields from the [T, E] multi-hot masks. With both sides' router
    logits [T, E], differing tokens that are near ties (module docstring) are counted in near_tie_tokens;
    `rel_cap` (the tolerance's rel_max) caps the logit error a near tie may claim, so a wrong router cannot
    excuse its own wrong choices."""
    mc, mr = topk_mask(cand, num_experts), topk_mask(ref, num_experts)
    m = compare_arrays(mc, mr, ("token", "expert"))
    same = np.all(mc == mr, axis=-1)  # [T]
    m.match_fraction = float(same.mean()) if same.size else 1.0
    m.tokens = int(same.size)
    if cand_logits is not None and ref_logits is not None and np.shape(cand_logits) == np.shape(ref_logits) \
            and np.shape(ref_logits) == mr.shape:
        m.near_tie_tokens = sum(near_tie(mc[t], mr[t], cand_logits[t], ref_logits[t], rel_cap)
                               for t in np.flatnonzero(~same))
    return m


def near_tie(cand_mask: np.ndarray, ref_mask: np.ndarray, cand_logits: np.ndarray, ref_logits: np.ndarray,
             rel_cap: float | None = None) -> bool:
    """Whether one token's different expert choice is explained by its router-logit error (r_a - r_b <= 2 err),
    err capped at rel_cap * max |r| (what the dtype's tolerance allows a correct router)."""
    r = np.asarray(ref_logits, dtype=np.float64)
    c = np.asarray(cand_logits, dtype=np.float64)
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(c))):
        return False
    err = float(np.max(np.abs(c - r)))
    if rel_cap is not None:
        err = min(err, rel_cap * float(np.max(np.abs(r))))
    dropped = r[(ref_mask > 0) & (cand_mask == 0)]
    added = r[(cand_mask > 0) & (ref_mask == 0)]
    if dropped.size == 0 or added.size == 0:
        return False
    return float(dropped.max() - added.min()) <= 2 * err


def compare_topk_weight(cand_w: np.ndarray, ref_w: np.ndarray, cand_idx: np.ndarray, ref_idx: np.ndarray,
                        num_experts: int) -> TapMetrics:
    """Weights aligned by expert id through the dense [T, E] scatter of each side."""
    return compare_arrays(topk_dense(cand_idx, cand_w, num_experts), topk_dense(ref_idx, ref_w, num_experts),
                          ("token", "expert"))


def per_token_error(cand: np.ndarray, ref: np.ndarray, token_axis: int = 0) -> np.ndarray:
    """Relative error of each token's slice, ||a_t - b_t|| / ||b_t|| (for the HTML report)."""
    a = np.moveaxis(np.asarray(cand, dtype=np.float64), token_axis, 0).reshape(np.shape(cand)[token_axis], -1)
    b = np.moveaxis(np.asarray(ref, dtype=np.float64), token_axis, 0).reshape(np.shape(ref)[token_axis], -1)
    num = np.linalg.norm(np.nan_to_num(a - b, nan=np.inf), axis=1)
    den = np.linalg.norm(b, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))


def per_channel_error(cand: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Max abs error of each channel (last axis) over all other axes (for the HTML report)."""
    d = np.abs(np.asarray(cand, dtype=np.float64) - np.asarray(ref, dtype=np.float64))
    d = np.nan_to_num(d, nan=np.inf)
    return d.reshape(-1, d.shape[-1]).max(axis=0) if d.ndim else d.reshape(1)
