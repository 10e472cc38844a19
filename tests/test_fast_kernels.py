"""qwen3lab.fast's C++ kernels against independent references, and the PyTorch fallback.

- linear_small / linear_large (bf16, f32, int8 + scales) against a float64 matmul of the same (rounded) inputs,
  over odd shapes that exercise every tail: K not a multiple of the vector width, N not a multiple of the row
  block, M across the input-row blocks;
- the fused ops against the model's own eager modules (RMSNorm, apply_rope, F.silu, SDPA) on the same inputs:
  float32 to ~1e-6, bfloat16 to one bf16 rounding step on a small fraction of elements (sum order differs);
- argmax_rows against torch.argmax, ties and NaN included;
- FastLinear / Int8Linear give the same numbers with the kernels and with the fallback.
The kernels are skipped (with the reason) where they cannot be built; the fallback tests always run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwen3lab import runspec
from qwen3lab.fast import build
from qwen3lab.fast.gemm import int8_gemm_bf16
from qwen3lab.fast.linear import FastLinear, Int8Linear
from qwen3lab.models.torch_model import RMSNorm, apply_rope

pytestmark = pytest.mark.kernels


def _compiler() -> str | None:
    """Why the compiled kernels cannot be tested here (no C++ compiler), or None."""
    import shutil

    return None if shutil.which("c++") or shutil.which("g++") or shutil.which("clang++") else "no C++ compiler"


@pytest.fixture(scope="module", params=build.PATHS)
def k(request):
    """The kernels of one path: every path this CPU has runs (portable always), the others skip with the reason."""
    if _compiler():
        pytest.skip(_compiler())
    lacks = runspec.missing(request.param)
    if lacks:
        pytest.skip(f"{request.param}: this CPU lacks {', '.join(sorted(lacks))}")
    mod = build.build(request.param)
    assert mod.PATH == request.param
    return mod


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / (b.double().abs().max() + 1e-30))


def _quant(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = W.abs().amax(1) / 127
    return torch.round(W / s[:, None]).to(torch.int8), s


# int8 weights: with AVX512-VNNI each input row is quantised to int16 (relative error <= 1.5e-5 of its largest
# element) before the exact integer dot products; far below the weights' own int8 error (~4e-3).
INT8_X_REL = 2e-4

SHAPES = [(1, 8, 3), (2, 40, 13), (3, 33, 9), (5, 1000, 64), (6, 100, 11), (7, 64, 5), (9, 1024, 17), (17, 64, 40),
          (1, 1000, 19), (1, 2100, 9), (9, 2100, 67)]
# (M, K, N): every remainder of the 2-, 4- and 8-row blocks of inputs and weights; one input row (its own loop: 4
# chunks a step, then single chunks, then the tail; int8 across a 2048-column segment); bf16 weights in several
# ~128 KiB runs of rows, each met by one group of input rows at a time (the last run partial), its 2100 columns in
# slices of 1024 (sums carried between them, the last slice with a tail)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_stream_prefetch_never_changes_a_one_row_linear(k, dtype):
    """The one-row streams' software prefetch (runspec.stream_prefetch) only moves memory early: the sums are the
    same bit for bit at every distance, and match float64 (K crosses int8's 2048-column segment)."""
    g = torch.Generator().manual_seed(7)
    x, W = torch.randn(1, 2100, generator=g), torch.randn(67, 2100, generator=g)
    scale = None
    if dtype == "int8":
        W, scale = _quant(W)  # float32 activations: the int16 input rounding alone (INT8_X_REL)
    elif dtype == "bfloat16":
        x, W = x.bfloat16(), W.bfloat16()
    ref = x.double() @ (W.double() * (scale.double()[:, None] if scale is not None else 1)).T
    before = k.stream_prefetch()
    try:
        ys = {}
        for dist in (0, 64, 2048, 1 << 20):  # both distances: this weight type's is one of them
            k.set_stream_prefetch(dist, dist)
            assert k.stream_prefetch() == (dist, dist)
            ys[dist] = k.linear_small(x, W, scale)
        for bad in ((-1, 0), (0, -1)):
            with pytest.raises(RuntimeError, match="0 .. 1 MiB ahead, got -1"):
                k.set_stream_prefetch(*bad)
    finally:
        k.set_stream_prefetch(*before)
    for dist, y in ys.items():
        assert torch.equal(y, ys[0]), (dist, (y.float() - ys[0].float()).abs().max())
    tol = INT8_X_REL if dtype == "int8" else 2 ** -8 if dtype == "bfloat16" else 1e-6
    assert _rel(ys[0], ref) < tol, _rel(ys[0], ref)


def test_built_kernels_take_this_cpus_prefetch(k):
    assert k.stream_prefetch() == runspec.stream_prefetch()


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_linear_small_matches_float64(k, M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x, W = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    ref = x.double() @ W.double().T
    y = k.linear_small(x, W, None)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert _rel(y, ref) < 1e-6, _rel(y, ref)
    xb, Wb = x.bfloat16(), W.bfloat16()
    yb = k.linear_small(xb, Wb, None)
    refb = xb.double() @ Wb.double().T  # exact products, float32 accumulation: only the final bf16 rounding
    assert yb.dtype == torch.bfloat16 and _rel(yb, refb) < 2 ** -8, _rel(yb, refb)
    q, s = _quant(W)
    refq = x.double() @ (q.double() * s.double()[:, None]).T
    assert _rel(k.linear_small(x, q, s), refq) < INT8_X_REL
    assert _rel(k.linear_small(xb, q, s), xb.double() @ (q.double() * s.double()[:, None]).T) < 2 ** -8
    x[0, 0] = float("inf")  # a non-finite input propagates: the float32 int8 kernel runs (int16 cannot carry it)
    yq = k.linear_small(x, q, s)
    assert not torch.isfinite(yq[0]).any()
    if M > 1:  # the other rows through that kernel: float32 products, no int16 rounding of x
        assert _rel(yq[1:], refq[1:]) < 1e-6, _rel(yq[1:], refq[1:])


@pytest.mark.parametrize("M,K,N", SHAPES[1:])
def test_linear_large_matches_float64(k, M, K, N):
    g = torch.Generator().manual_seed(7 + M + K + N)
    xb, Wb = torch.randn(M, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
    for band in (1, 5, 4096):  # bands smaller than, not dividing, and larger than N
        y = k.linear_large(xb, Wb, None, band)
        assert y.dtype == torch.bfloat16 and _rel(y, xb.double() @ Wb.double().T) < 2 ** -8
    x = xb.float()
    q, s = _quant(Wb.float())
    assert _rel(k.linear_large(x, q, s, 3), x.double() @ (q.double() * s.double()[:, None]).T) < 1e-6


def test_linear_rejects_bad_inputs(k):
    with pytest.raises(RuntimeError, match="columns"):
        k.linear_small(torch.randn(1, 8), torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="dtype"):
        k.linear_small(torch.randn(1, 8), torch.randn(4, 8).bfloat16(), None)
    with pytest.raises(RuntimeError, match="scale"):
        k.linear_small(torch.randn(1, 8), torch.zeros(4, 8, dtype=torch.int8), None)
    with pytest.raises(RuntimeError, match="contiguous"):  # a weight is never copied behind the caller's back
        k.linear_small(torch.randn(1, 8), torch.randn(8, 4).T, None)


def test_kernels_take_any_leading_shape_and_strides(k):
    """The model's leaves hand the kernels x [..., C] as it is (strided slices included) and expect [..., N] back:
    the same numbers as the contiguous 2-d rows."""
    torch.manual_seed(0)
    W = torch.randn(12, 16)
    x = torch.randn(2, 3, 40)[..., 4:20]  # [2, 3, 16], not contiguous
    want = k.linear_small(x.reshape(-1, 16).contiguous(), W, None).view(2, 3, 12)
    got = k.linear_small(x, W, None)
    assert got.shape == (2, 3, 12) and torch.equal(got, want), (got - want).abs().max()
    w = torch.randn(16)
    assert torch.equal(k.rmsnorm(x, w, 1e-6), k.rmsnorm(x.reshape(6, 16).contiguous(), w, 1e-6).view(2, 3, 16))
    gu = torch.randn(1, 3, 32)
    assert k.silu_mul(gu).shape == (1, 3, 16)
    assert torch.equal(k.silu_mul(gu), k.silu_mul(gu[0]).unsqueeze(0))
    q = torch.randn(1, 3, 2, 8)  # [1, N, H, Dh] with cos / sin [1, N, 1, Dh]
    cos, sin = torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8)
    assert torch.equal(k.rope(q, cos, sin), k.rope(q[0].contiguous(), cos.view(3, 8), sin.view(3, 8)).unsqueeze(0))
    with pytest.raises(RuntimeError, match=r"cos/sin \[M, Dh\], got \[3, 2, 8\] and \[2, 8\]"):
        k.rope(q, torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))


def _close_in_dtype(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """float32: ~1e-6 relative. bfloat16: elements differ by at most one bf16 step (2^-7 relative) and only a
    few percent of them (float32 sums in another order can land on the other side of a rounding boundary)."""
    got, want = got.double(), want.double()
    if dtype == torch.float32:
        assert _rel(got, want) < 1e-5, _rel(got, want)
        return
    scale = want.abs().clamp_min(want.abs().max() * 1e-3)
    err = (got - want).abs() / scale
    assert float(err.max()) <= 2 ** -6, float(err.max())
    assert float((err > 0).double().mean()) < 0.1, float((err > 0).double().mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [8, 64, 100])
def test_rmsnorm_matches_module(k, dtype, D):
    g = torch.Generator().manual_seed(D)
    norm = RMSNorm(D, 1e-6)
    norm.weight = torch.nn.Parameter((1 + 0.1 * torch.randn(D, generator=g)).to(dtype), requires_grad=False)
    x, r = (torch.randn(3, D, generator=g).to(dtype) for _ in range(2))
    with torch.inference_mode():
        for rows in (x + r, x):  # a residual sum, as the layers feed their norms, and a plain row
            before = rows.clone()
            _close_in_dtype(k.rmsnorm(rows, norm.weight, 1e-6), norm(rows), dtype)
            assert torch.equal(rows, before)  # the input is read, never written
    with pytest.raises(RuntimeError, match="rmsnorm: x"):
        k.rmsnorm(x, norm.weight[:-1], 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Dh", [(4, 32), (2, 8), (8, 20), (16, 128)])
def test_rope_and_head_norm_match_modules(k, dtype, H, Dh):
    """RoPE as apply_rope computes it, and q/k's per-head RMSNorm as the norm kernel over rows of one head."""
    g = torch.Generator().manual_seed(H * 100 + Dh)
    M = 5
    x = torch.randn(M, H, Dh, generator=g).to(dtype)
    norm = RMSNorm(Dh, 1e-6)
    norm.weight = torch.nn.Parameter((1 + 0.1 * torch.randn(Dh, generator=g)).to(dtype), requires_grad=False)
    pos = torch.arange(M, dtype=torch.float32)[:, None] * (10000.0 ** (-torch.arange(Dh // 2) / (Dh // 2)))
    ang = torch.cat((pos, pos), dim=-1)  # [M, Dh]
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    with torch.inference_mode():
        want = apply_rope(x[None], cos.view(1, M, 1, Dh), sin.view(1, M, 1, Dh))[0]
        got = k.rope(x, cos, sin)
        assert got.shape == (M, H, Dh) and got.dtype == dtype
        # each product rounded to the dtype, then the sum: the same three roundings as the eager ops
        assert torch.equal(got, want), float((got.double() - want.double()).abs().max())
        _close_in_dtype(k.rmsnorm(x.reshape(-1, Dh), norm.weight, 1e-6).view(M, H, Dh), norm(x), dtype)
    with pytest.raises(RuntimeError, match="rope: x"):
        k.rope(x, cos[:2], sin[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv,Dh", [(16, 8, 128), (4, 2, 20), (3, 1, 8)])
@pytest.mark.parametrize("M", [1, 5, 40])  # one decode token; a prefill spanning several threads' row blocks
def test_qk_norm_rope_equals_norm_then_rope(k, dtype, Hq, Hkv, Dh, M):
    """The fused q/k leaf gives what the norm kernel then the RoPE kernel give, bit for bit (the model taps either
    and grafts onto either), and stays within a bf16 step of the eager modules, which the separate kernels match;
    each head takes its own norm's weight and eps."""
    g = torch.Generator().manual_seed(M * 1000 + Hq * 10 + Dh)
    qkv = torch.randn(1, M, (Hq + 2 * Hkv) * Dh, generator=g).to(dtype)
    q = qkv[..., :Hq * Dh].view(1, M, Hq, Dh)  # a slice of the fused projection, as the model hands it over
    kk = qkv[..., Hq * Dh:(Hq + Hkv) * Dh].view(1, M, Hkv, Dh)
    wq, wk = ((1 + 0.1 * torch.randn(Dh, generator=g)).to(dtype) for _ in range(2))
    pos = torch.arange(7, 7 + M, dtype=torch.float32)[:, None] * (1e6 ** (-torch.arange(Dh // 2) / (Dh // 2)))
    ang = torch.cat((pos, pos), dim=-1)
    cos, sin = ang.cos().to(dtype).view(1, M, 1, Dh), ang.sin().to(dtype).view(1, M, 1, Dh)
    with torch.inference_mode():
        qn, kn, qr, kr = k.qk_norm_rope(q, kk, wq, wk, 1e-6, 1e-5, cos, sin)
        want_qn, want_kn = k.rmsnorm(q, wq, 1e-6), k.rmsnorm(kk, wk, 1e-5)
        pairs = ((qn, want_qn), (kn, want_kn), (qr, k.rope(want_qn, cos, sin)), (kr, k.rope(want_kn, cos, sin)))
        for got, want in pairs:
            assert got.shape == want.shape and got.dtype == dtype
            assert torch.equal(got, want), float((got.double() - want.double()).abs().max())
        nq, nk = RMSNorm(Dh, 1e-6), RMSNorm(Dh, 1e-5)
        nq.weight, nk.weight = (torch.nn.Parameter(w, requires_grad=False) for w in (wq, wk))
        _close_in_dtype(qr, apply_rope(nq(q), cos, sin), dtype)
        _close_in_dtype(kr, apply_rope(nk(kk), cos, sin), dtype)
    with pytest.raises(RuntimeError, match="qk_norm_rope: q"):
        k.qk_norm_rope(q, kk, wq[:-1], wk, 1e-6, 1e-6, cos, sin)
    with pytest.raises(RuntimeError, match="qk_norm_rope: every input in q's dtype"):
        k.qk_norm_rope(q, kk.double(), wq, wk, 1e-6, 1e-6, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(k, dtype):
    g = torch.Generator().manual_seed(3)
    gu = (4 * torch.randn(3, 2 * 50, generator=g)).to(dtype)  # 50: a tail after three 16-wide chunks
    gate, up = gu.chunk(2, dim=-1)
    _close_in_dtype(k.silu_mul(gu), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# head sizes 128 and 64 take the register-blocked passes (heads per group even and odd), others the generic one
@pytest.mark.parametrize("Hq,Hkv,Dh", [(4, 2, 32), (8, 2, 20), (16, 16, 8), (16, 8, 128), (6, 2, 128), (20, 4, 64)])
def test_attend_decode_matches_sdpa_and_writes_cache(k, dtype, Hq, Hkv, Dh):
    g = torch.Generator().manual_seed(Hq + Dh)
    B, cap, pos = 3, 40, [0, 7, 38]  # a first token, a few, the last slot of the cache
    kc = [torch.randn(Hkv, cap, Dh, generator=g).to(dtype) for _ in range(B)]
    vc = [torch.randn(Hkv, cap, Dh, generator=g).to(dtype) for _ in range(B)]
    q = torch.randn(B, Hq, Dh, generator=g).to(dtype)
    kn, vn = torch.randn(B, Hkv, Dh, generator=g).to(dtype), torch.randn(B, Hkv, Dh, generator=g).to(dtype)
    scale = Dh ** -0.5
    want = []
    for b in range(B):
        K, V = kc[b].clone(), vc[b].clone()
        K[:, pos[b]], V[:, pos[b]] = kn[b], vn[b]
        S = pos[b] + 1
        o = F.scaled_dot_product_attention(q[b].float().view(1, Hq, 1, Dh),
                                           K[:, :S].float().repeat_interleave(Hq // Hkv, 0)[None],
                                           V[:, :S].float().repeat_interleave(Hq // Hkv, 0)[None], scale=scale)
        want.append(o.view(Hq, Dh))
    got = k.attend_decode(q, kn, vn, kc, vc, pos, scale)
    for b in range(B):
        assert torch.equal(kc[b][:, pos[b]], kn[b]) and torch.equal(vc[b][:, pos[b]], vn[b])
    _close_in_dtype(got, torch.stack(want).to(dtype), dtype)


def test_argmax_rows_matches_torch(k):
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for V in (5, 16, 17, 1000):
            x = torch.randn(4, V, generator=g).to(dtype)
            x[1, V // 2] = x[1].max()  # a tie: the first index wins
            x[2, V - 1] = float("nan")  # a NaN wins, as in torch.argmax
            x[3] = float("-inf")
            assert k.argmax_rows(x) == torch.argmax(x.float(), dim=-1).tolist(), (dtype, V)


@pytest.mark.parametrize("M", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_modules_same_with_and_without_kernels(M, dtype):
    g = torch.Generator().manual_seed(M)
    W = torch.randn(24, 40, generator=g)
    x = torch.randn(2, M, 40, generator=g).to(dtype)
    lin, q8 = FastLinear(W.to(dtype)), Int8Linear.from_float(W)
    try:
        build.reset(enabled=False)
        assert build.kernels() is None and "fallback" in build.status()
        plain, plain8 = lin(x), q8(x)
        build.reset()
        if build.kernels() is None:
            pytest.skip(f"kernels unavailable: {build.status()}")
        fast, fast8 = lin(x), q8(x)
    finally:
        build.reset()
    assert fast.shape == plain.shape == (2, M, 24) and fast.dtype == plain.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert _rel(fast, plain) < tol and _rel(fast8, plain8) < max(tol, INT8_X_REL)
    deq = x.double() @ (q8.weight.double() * q8.scale.double()[:, None]).T  # int8 * row scale, by definition
    assert _rel(plain8, deq) < tol


def test_int8_quantisation_round_trip():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 64, generator=g)
    W[3] = 0  # an all-zero row keeps scale 1 and stays zero
    q8 = Int8Linear.from_float(W)
    assert q8.weight.dtype == torch.int8 and q8.scale.dtype == torch.float32
    assert int(q8.weight.abs().max()) == 127 and torch.all(q8.weight[3] == 0)
    err = (q8.dequantized() - W).abs()
    assert float((err / q8.scale[:, None]).max()) <= 0.5 + 1e-6  # round to nearest: half a step at most
    assert math.isclose(float(q8.scale[0]), float(W[0].abs().max()) / 127, rel_tol=1e-6)


@pytest.mark.parametrize("n", [1, 63, 64 * 4097 + 5])
def test_stream_read_reads_every_byte(k, n):
    t = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    assert k.stream_read(t) == float(t.long().sum())


# ---- the prefill GEMM choice (fast/tune.py) ----------------------------------------------------------------
@pytest.mark.parametrize("M,K,N", [(40, 64, 24), (33, 1000, 4100)])
def test_int8_gemm_bf16_matches_float64(M, K, N):
    g = torch.Generator().manual_seed(M + N)
    xb = torch.randn(M, K, generator=g).bfloat16()
    q, s = _quant(torch.randn(N, K, generator=g))
    want = xb.double() @ (q.double() * s.double()[:, None]).T
    for band in (7, 2048):  # bands not dividing N, and (N = 4100) more than one of the default size
        got = int8_gemm_bf16(xb, q, s, band)
        assert got.dtype == torch.bfloat16 and got.shape == (M, N)
        assert _rel(got, want) < 2 ** -7, _rel(got, want)  # two bf16 roundings: the product, then the scaled one


@pytest.fixture
def fresh_tune(monkeypatch):
    from qwen3lab.fast import tune

    monkeypatch.delenv(tune.ENV, raising=False)
    tune.reset()
    yield tune
    tune.reset()


@pytest.mark.parametrize("timings,want", [({"ours": 3.0, "torch": 9.0}, "ours"),
                                          ({"ours": 9.0, "torch": 3.0}, "torch")])
def test_tune_keeps_the_faster_gemm_once_per_process(fresh_tune, monkeypatch, timings, want):
    if build.kernels() is None:
        pytest.skip(f"kernels unavailable: {build.status()}")
    calls = []
    monkeypatch.setattr(fresh_tune, "_measure", lambda kind, k: calls.append(kind) or dict(timings))
    assert fresh_tune.choose("bfloat16") == want and fresh_tune.choose("bfloat16") == want
    assert calls == ["bfloat16"]  # measured once, then remembered
    assert f"{timings['ours']:.1f} vs {timings['torch']:.1f} ms" in fresh_tune.status()


def test_tune_measures_both_gemms_for_real(fresh_tune):
    if build.kernels() is None:
        pytest.skip(f"kernels unavailable: {build.status()}")
    for kind in fresh_tune.KINDS:
        assert fresh_tune.choose(kind) in fresh_tune.CHOICES
        ms = fresh_tune._timings[kind]
        assert set(ms) == set(fresh_tune.CHOICES) and all(0 < v < 10_000 for v in ms.values()), ms
        assert fresh_tune.choose(kind) == min(ms, key=ms.get)


def test_tune_env_forces_the_choice_and_rejects_bad_values(fresh_tune, monkeypatch):
    from qwen3lab.errors import InputError

    monkeypatch.setenv(fresh_tune.ENV, "ours")
    assert fresh_tune.choose("int8") == "ours" and "set by QWEN3LAB_GEMM" in fresh_tune.status()
    fresh_tune.reset()
    monkeypatch.setenv(fresh_tune.ENV, "fastest")
    with pytest.raises(InputError, match="QWEN3LAB_GEMM must be one of ours, torch, got 'fastest'"):
        fresh_tune.choose("bfloat16")


@pytest.mark.parametrize("choice", ["ours", "torch"])
def test_many_row_linears_agree_with_float64_either_way(k, fresh_tune, monkeypatch, choice):
    monkeypatch.setenv(fresh_tune.ENV, choice)
    g = torch.Generator().manual_seed(3)
    W, x = torch.randn(300, 96, generator=g), torch.randn(70, 96, generator=g).bfloat16()  # 70 rows > SMALL_M
    lin, q8 = FastLinear(W.bfloat16()), Int8Linear.from_float(W)
    assert _rel(lin(x), x.double() @ W.bfloat16().double().T) < 2 ** -8
    assert _rel(q8(x), x.double() @ (q8.weight.double() * q8.scale.double()[:, None]).T) < 2 ** -7


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A killed build leaves torch's lock file behind and every later build would wait on it forever."""
    import os
    import time
    import warnings

    lock = tmp_path / "lock"
    lock.touch()
    assert not build.clear_stale_lock(tmp_path) and lock.exists()  # a live build's: kept
    old = time.time() - build.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert build.clear_stale_lock(tmp_path) and not lock.exists()
    assert "stale kernel build lock" in str(w[0].message)
    assert not build.clear_stale_lock(tmp_path) and not build.clear_stale_lock(None)  # nothing to remove


def test_bf16_dot_product_path_is_built_exactly_where_the_cpu_has_it(k):
    """The avx512 build takes vdpbf16ps for bf16 linears iff the CPU has AVX512-BF16 (build.py adds
    -mavx512bf16 then); the other builds never do. test_linear_small_matches_float64 checks its numbers."""
    want = k.PATH == "avx512" and "avx512_bf16" in runspec.cpu_flags()
    assert bool(k.BF16_DOT) is want, (k.PATH, k.BF16_DOT)
