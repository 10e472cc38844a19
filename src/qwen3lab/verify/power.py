"""Detection power (`qwen3lab verify --self-test`): per dtype, the smallest planted bug verify catches.

Two bugs real ports ship scale smoothly, so their size can be swept: ffn_down's weight x (1 + eps) in layer 0
(a wrong dequantisation scale: llama.cpp ffn_down x1.02 in issue 15) and every RMSNorm's epsilon x (1 + eps)
(a config field read wrong: RMSNorm eps x10). For each candidate dtype:
1. the clean candidate is verified first: it must pass (0 false alarms), else that dtype's search is not run;
2. the rungs of LADDER are searched by bisection for the smallest eps whose bug makes verify fail. verify's
   error at the bug's tap grows with eps (ffn_down: layers.0.mlp_out's relative error is eps itself), so
   "caught" is monotone along the ladder and bisection needs ~log2(rungs) + 1 runs per bug, not one per rung.
Candidates (a real-shaped model, the NumPy float64 oracle as reference, the bug planted in the candidate only):
- float32: our torch model in float32 at the float32 tolerance;
- bfloat16: our torch model in bfloat16 with `--band` (each tap's threshold FACTOR x the spread of a clean
  bfloat16 run: band.py). The clean candidate IS that arithmetic, so its own run cannot raise a false alarm; a
  port with another summation order has the FACTOR's room;
- q8_0: the oracle's code in float32 on q8_0 weights, every matmul's input quantised to q8_0 as ggml's CPU dot
  products do (models/numpy_quant.q8_0): llama.cpp's q8_0 arithmetic, emulated;
- int8 / int4: our fast path's weight-only formats (torch-fast, bfloat16 activations) when the C++ kernels are
  built (otherwise the rows say why they were skipped), against the float64 oracle at the format's tolerance,
  and with `--quantised-reference` (the oracle on the same quantised weights, at bfloat16's tolerance).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models import numpy_ref
from ..models.numpy_quant import q8_0, quantised_names

LADDER = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0, 1000.0)
BUGS = {"ffn_down": "ffn_down x (1+eps)", "rms_eps": "RMSNorm eps x (1+eps)"}  # short: table headers
DOWN = "model.layers.0.mlp.down_proj.weight"


def smallest_caught(ladder: Sequence[float], caught: Callable[[float], bool]) -> tuple[float | None, dict]:
    """The smallest rung r with caught(r), by bisection (caught assumed monotone along the ascending ladder),
    and every rung tried {rung: caught}. None when even the largest rung is not caught."""
    tried: dict[float, bool] = {}

    def probe(i: int) -> bool:
        if ladder[i] not in tried:
            tried[ladder[i]] = bool(caught(ladder[i]))
        return tried[ladder[i]]

    lo, hi = -1, len(ladder) - 1  # invariant: rung hi is caught (checked first), rung lo is not (or -1)
    if not probe(hi):
        return None, tried
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid):
            hi = mid
        else:
            lo = mid
    return ladder[hi], tried


def plant(weights: dict, bug: str | None, eps: float) -> tuple[dict, float]:
    """(weights, factor on every RMSNorm's eps) with the bug planted; the weights are a copy where changed. The
    eps is changed in the candidate's modules, never in its config: the config is what the reference (and
    --quantised-reference's oracle) is built from."""
    if bug == "ffn_down":
        return {**weights, DOWN: weights[DOWN] * (1 + eps)}, 1.0
    assert bug in (None, "rms_eps"), bug
    return weights, 1.0 + eps if bug == "rms_eps" else 1.0


def _torch(cfg, weights: dict, factor: float, **kw):
    """Our torch model with every RMSNorm's eps x factor (the modules read it at each call)."""
    from ..models import torch_model as tm  # torch: only when the self-test runs

    b = tm.TorchBackend(cfg, weights, **kw)
    for m in b.model.modules():
        if isinstance(m, tm.RMSNorm):
            m.eps = m.eps * factor
    return b


class GgmlQ8Emulation:
    """The oracle's code in float32 on q8_0 weights, each matmul's input quantised to q8_0 (module docstring).
    numpy_ref.linear is swapped only for the duration of this backend's own runs."""

    name = "q8_0 emulation"
    dtype = "q8_0"

    def __init__(self, cfg, weights: dict, eps_factor: float = 1.0, cache: dict | None = None):
        """weights: torch tensors or arrays; cache ({id(tensor): (tensor, its q8_0 array)}, shared between
        candidates) saves quantising again the tensors a planted bug left as they were."""
        cache = {} if cache is None else cache
        names = set(quantised_names(weights))
        w = {}
        for k, v in weights.items():
            hit = cache.get(id(v))
            if hit is None or hit[0] is not v:
                a = np.asarray(v.double().numpy() if hasattr(v, "double") else v, dtype=np.float64)
                hit = cache[id(v)] = (v, q8_0(a) if k in names else a)
            w[k] = hit[1]
        # the oracle reads its RMSNorm eps from the config: a changed copy for the inner run only
        inner_cfg = dataclasses.replace(cfg, rms_norm_eps=cfg.rms_norm_eps * eps_factor)
        self.inner = numpy_ref.NumpyBackend(w, inner_cfg, dtype="float32")
        self.cfg = cfg

    def run(self, input_ids, taps=None, graft=None):
        orig = numpy_ref.linear

        def linear(x, w, bias=None):
            return orig(q8_0(x).astype(x.dtype) if x.shape[-1] % 32 == 0 else x, w, bias)

        numpy_ref.linear = linear
        try:
            return self.inner.run(input_ids, taps=taps, graft=graft)
        finally:
            numpy_ref.linear = orig


@dataclass
class PowerRow:
    dtype: str
    clean_ok: bool | None  # None: skipped
    clean_note: str  # the clean run's first divergence, or why the row was skipped
    smallest: dict[str, float | None]  # bug -> smallest eps caught (None: none on the ladder)
    tried: dict[str, dict[float, bool]]


def _candidates(fast_ok: bool):
    """dtype label -> (make(cfg, weights, eps_factor) -> backend, extra verify kwargs) or why it is skipped."""
    out = {
        "float32": (lambda c, w, f: _torch(c, w, f, dtype="float32"), {}),
        "bfloat16 --band": (lambda c, w, f: _torch(c, w, f, dtype="bfloat16"), {"band": True}),
        "q8_0": (lambda c, w, f, cache={}: GgmlQ8Emulation(c, w, f, cache), {}),  # noqa: B006 - one cache per table
    }
    for q in ("int8", "int4"):
        make = (lambda c, w, f, q=q: _torch(c, w, f, dtype="bfloat16", quant=q))
        out[q] = (make, {}) if fast_ok else "the C++ kernels are not built"
        out[f"{q} --quantised-reference"] = (make, {"quantised_reference": True}) if fast_ok \
            else "the C++ kernels are not built"
    return out


def detection_power(model_path: Path, ids, dtypes: Sequence[str] | None = None, ladder: Sequence[float] = LADDER,
                    bugs: Sequence[str] = tuple(BUGS), fast_ok: bool = False) -> list[PowerRow]:
    """One PowerRow per dtype (module docstring); `dtypes` picks among float32, bfloat16 --band, q8_0, int8, int4."""
    import torch  # the checkpoint's weights as torch tensors, which every candidate here takes

    from ..config import Qwen3Config
    from ..weights import load_weights
    from .quantref import quantised_oracle
    from .runner import verify
    from .tolerances import tolerance_for

    cfg = Qwen3Config.from_file(model_path)
    weights = load_weights(model_path, cfg, dtype=torch.float32)
    w64 = lambda: load_weights(model_path, cfg, dtype=torch.float64)  # noqa: E731 - for the quantised oracles
    ref = numpy_ref.NumpyBackend(weights, cfg)
    rows = []
    for dt, cand in _candidates(fast_ok).items():
        if dtypes is not None and dt not in dtypes:
            continue
        if isinstance(cand, str):
            rows.append(PowerRow(dt, None, cand, {}, {}))
            continue
        make, kw = cand
        reference = ref
        if kw.get("band"):  # --band re-runs our model from the checkpoint
            kw = {**kw, "model_path": model_path}
        if kw.pop("quantised_reference", False):  # the oracle on the format's weights: built once for the row
            reference, _, precision = quantised_oracle(make(cfg, weights, 1.0), w64(), cfg)
            kw = {**kw, "tolerance": tolerance_for(precision)}

        def fails(bug, eps, make=make, kw=kw, reference=reference):
            w, factor = plant(weights, bug, eps)
            return verify(reference, make(cfg, w, factor), ids, isolate=False, **kw)

        clean = fails(None, 0.0)
        fd = clean.first_divergence
        row = PowerRow(dt, clean.overall_success, fd.name if fd else "none", {}, {})
        if clean.overall_success:
            for bug in bugs:
                row.smallest[bug], row.tried[bug] = smallest_caught(
                    ladder, lambda e, bug=bug, fails=fails: not fails(bug, e).overall_success)
        rows.append(row)
    return rows


def fmt_eps(e: float | None) -> str:
    return "none on the ladder" if e is None else f"{e:g}"
