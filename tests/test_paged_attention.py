"""Paged decode attention (models/paged_cache.py, fast/kernels.cpp attend_paged_decode) against a float64 reference.

The reference writes each new key/value into its slot, gathers each sequence's positions 0..pos through its block
table by hand (plain Python indexing) and computes softmax(q K^T * scale) V in float64. The C++ kernel runs on
every path this CPU has (avx512 / avx2 / portable: the `k` fixture), with block sizes that split the online
softmax's chunks unevenly, sequences long enough for several chunks, GQA groups of 1, 2 and 3 heads, one shared
pool (the engine) and one pool per sequence (standalone caches). The pure-PyTorch fallback (one gather + one
SDPA) is held to the same reference.
"""

from __future__ import annotations

import pytest
import torch

from qwen3lab import runspec
from qwen3lab.fast import build
from qwen3lab.models.paged_cache import KVPool, PagedDecode, PagedSeqCache, attend_paged_decode


@pytest.fixture(scope="module", params=build.PATHS)
def k(request):
    """The kernels of one path this CPU has (the others skip with the reason)."""
    import shutil

    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler")
    lacks = runspec.missing(request.param)
    if lacks:
        pytest.skip(f"{request.param}: this CPU lacks {', '.join(sorted(lacks))}")
    return build.build(request.param)


def _case(Hq, Hkv, Dh, bs, lengths, dtype, shared, seed=0):
    """Random pools, block tables (shuffled block ids) and caches of `lengths` positions each; q and new k / v."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    need = [length // bs + 1 for length in lengths]
    if shared:
        pool = KVPool(1, sum(need) + 3, Hkv, bs, Dh, dtype)
        pool.k.copy_(torch.randn(pool.k.shape, generator=g))
        pool.v.copy_(torch.randn(pool.v.shape, generator=g))
        ids = torch.randperm(pool.num_blocks, generator=g).tolist()
        caches, at = [], 0
        for length, n in zip(lengths, need, strict=True):
            caches.append(PagedSeqCache(pool, ids[at:at + n], length))
            at += n
    else:
        caches = []
        for length, n in zip(lengths, need, strict=True):
            pool = KVPool(1, n + 2, Hkv, bs, Dh, dtype)
            pool.k.copy_(torch.randn(pool.k.shape, generator=g))
            pool.v.copy_(torch.randn(pool.v.shape, generator=g))
            caches.append(PagedSeqCache(pool, torch.randperm(n + 2, generator=g)[:n].tolist(), length))
    q = torch.randn(1, B, Hq, Dh, generator=g).to(dtype)
    kn = torch.randn(1, B, Hkv, Dh, generator=g).to(dtype)
    vn = torch.randn(1, B, Hkv, Dh, generator=g).to(dtype)
    return caches, q, kn, vn


def _reference(caches, q, kn, vn, scale):
    """float64: the new k/v at slot `length`, then attention of q over positions 0..length; [1, B, Hq, Dh]."""
    out = []
    Hq = q.shape[2]
    for b, c in enumerate(caches):
        bs, S = c.pool.block_size, c.length + 1
        K = torch.stack([c.pool.k[0, c.block_table[p // bs], :, p % bs] for p in range(S)], 1).double()  # [Hkv, S, Dh]
        V = torch.stack([c.pool.v[0, c.block_table[p // bs], :, p % bs] for p in range(S)], 1).double()
        K[:, -1], V[:, -1] = kn[0, b].double(), vn[0, b].double()
        R = Hq // K.shape[0]
        K, V = K.repeat_interleave(R, 0), V.repeat_interleave(R, 0)  # [Hq, S, Dh]: head h reads group h // R
        p = torch.softmax(torch.einsum("hd,hsd->hs", q[0, b].double(), K) * scale, -1)
        out.append(torch.einsum("hs,hsd->hd", p, V))
    return torch.stack(out)[None]


def _close(got, want, dtype):
    """float32: ~1e-6 relative to the largest output. bfloat16: each element within one bf16 rounding step of
    the float64 answer (the float32 sums round once, at the end)."""
    got, want = got.double(), want.double()
    err = float((got - want).abs().max())
    if dtype == torch.float32:
        assert err < 1e-5 * float(want.abs().max()), f"max abs err {err}"
    else:
        step = (want.abs() * 2 ** -8).clamp_min(float(want.abs().max()) * 2 ** -16)
        bad = (got - want).abs() > step
        assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} elements past one bf16 step, max err {err}"


def _check_slots(caches, kn, vn):
    for b, c in enumerate(caches):
        bs = c.pool.block_size
        blk, off = c.block_table[c.length // bs], c.length % bs
        assert torch.equal(c.pool.k[0, blk, :, off], kn[0, b]) and torch.equal(c.pool.v[0, blk, :, off], vn[0, b])


CASES = [  # Hq, Hkv, Dh, block size, cached lengths
    (16, 8, 128, 16, [0, 15, 16, 700]),  # Qwen3-0.6B's heads; 700: three chunks of 256
    (6, 2, 64, 5, [3, 301, 0]),  # a block size that does not divide the chunk
    (4, 4, 20, 1, [40, 0]),  # one position a block; Dh with a vector tail
    (9, 3, 32, 7, [519]),
]


@pytest.mark.kernels
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv,Dh,bs,lengths", CASES)
def test_kernel_matches_float64_and_writes_slots(k, Hq, Hkv, Dh, bs, lengths, dtype, shared):
    caches, q, kn, vn = _case(Hq, Hkv, Dh, bs, lengths, dtype, shared)
    scale = Dh ** -0.5
    want = _reference(caches, q, kn, vn, scale)
    paged = PagedDecode(caches, torch.device("cpu"))
    got = k.attend_paged_decode(q, kn, vn, *paged.layer(0), paged.tables, paged.pos, scale)
    assert got.shape == q.shape and got.dtype == dtype
    _check_slots(caches, kn, vn)
    _close(got, want, dtype)


@pytest.mark.kernels
def test_kernel_refuses_a_block_outside_the_pool(k):
    caches, q, kn, vn = _case(4, 2, 16, 4, [5], torch.float32, shared=True)
    paged = PagedDecode(caches, torch.device("cpu"))
    paged.tables[0, 0] = 10_000
    with pytest.raises(RuntimeError, match="outside the pool"):
        k.attend_paged_decode(q, kn, vn, *paged.layer(0), paged.tables, paged.pos, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv,Dh,bs,lengths", CASES[:2])
def test_fallback_matches_float64_and_writes_slots(Hq, Hkv, Dh, bs, lengths, dtype):
    caches, q, kn, vn = _case(Hq, Hkv, Dh, bs, lengths, dtype, shared=True, seed=1)
    scale = Dh ** -0.5
    want = _reference(caches, q, kn, vn, scale)
    got = attend_paged_decode(q, kn, vn, PagedDecode(caches, torch.device("cpu")), 0, scale, torch.float32)
    _check_slots(caches, kn, vn)
    _close(got, want, dtype)


def test_standalone_cache_reserve_grows_and_keeps_its_blocks():
    c = PagedSeqCache.standalone(num_layers=2, num_kv_heads=3, head_dim=4, capacity=5, max_len=40, block_size=4)
    assert c.capacity == 8 and c.block_table == [0, 1] and c.reserve(3) == 0
    kv = torch.arange(3 * 3 * 4, dtype=torch.float32).view(3, 3, 4)  # [Hkv, T, Dh]
    c.prepare(0, 3, torch.device("cpu"))
    keys, _ = c.write(1, 0, kv, -kv)
    c.advance(3)
    assert c.reserve(10) == 3 and c.capacity == 16 and c.block_table == [0, 1, 2, 3]  # 13 > 8: doubled
    keys, vals = c.gather(1, 3)
    assert torch.equal(keys, kv) and torch.equal(vals, -kv), (keys, kv)  # the blocks moved with the growth
    assert c.reserve(37) == 3 and c.capacity == 40  # doubling capped at max_len
    with pytest.raises(Exception, match="context length 40"):
        c.reserve(38)
    c.truncate(1)
    assert c.length == 1 and c.free == 39
