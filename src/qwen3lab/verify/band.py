"""`--band`: per-tap thresholds from the measured noise floor, instead of one number per dtype.

The reference runs twice, in float64 and at the candidate's precision (our torch model at the candidate's
dtype: a correct implementation of the same arithmetic); each tap's spread between the two (relative error,
1 - cosine) is the rounding noise a correct port at that precision shows there. Each tap's threshold is
FACTOR times that spread, never tighter than the float32 tolerance (a spread of ~0 would otherwise fail any
other correct summation order) and never looser than the dtype's default. The method of AWS Neuron's accuracy
debugger. The report says how many thresholds came from the band and which kept the dtype's default
(topk_idx, and taps the low-precision run has not).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import InputError
from .metrics import compare_arrays
from .tolerances import DTYPE_DEFAULTS, Tolerance

FACTOR = 3.0  # measured spread x FACTOR: room for another correct summation order at the same precision


def band_tolerance(tol: Tolerance, reference_taps, cfg, model_path, ids, names, dtype: str) -> tuple[Tolerance, str]:
    """`tol` with per-tap thresholds (Tolerance.bands) from the spread of `dtype` vs `reference_taps`, and a
    sentence for the report saying where each threshold came from."""
    from ..loading import load  # here: torch is only needed when --band is asked for

    if model_path is None:
        raise InputError("--band needs --model-path (the reference runs again at the candidate's precision)")
    if dtype in ("float64",) or dtype not in ("float32", "float16", "bfloat16"):
        raise InputError(f"--band needs a float32 / float16 / bfloat16 candidate (the reference is re-run at it), "
                         f"got {dtype}")
    low = load(model_path, backend="torch", dtype=dtype).run(np.asarray(ids, dtype=np.int64), taps=names).taps
    floor = DTYPE_DEFAULTS["float32"]
    bands, kept = {}, []
    for name in names:
        ref, got = reference_taps.get(name), low.get(name)
        if ref is None or got is None or name.endswith("topk_idx"):
            kept.append(name)
            continue
        m = compare_arrays(np.asarray(got), np.asarray(ref), ("token",) * np.ndim(ref))
        rel = min(max(FACTOR * m.relative_error, floor.rel_max), tol.rel_max)
        cos = max(min(1 - FACTOR * (1 - m.cosine_similarity), floor.cos_min), tol.cos_min)
        bands[name] = replace(tol, rel_max=rel, cos_min=cos, name=f"band {name}", bands=None)
    how = (f"--band: {len(bands)} taps' thresholds are {FACTOR:g}x the spread of the reference at {dtype} vs "
           f"float64 (between float32's and the {tol.name} default); {len(kept)} keep the {tol.name} default"
           + (f" ({', '.join(kept[:4])}{', ...' if len(kept) > 4 else ''})" if kept else ""))
    return replace(tol, bands=bands, name=f"{tol.name} band"), how


def band_for_run(tol: Tolerance, ref, cand, model_path, ids, names, decode_steps: int) -> tuple[Tolerance, str]:
    """verify's --band: one more reference run (the float64 taps) and the candidate's precision's spread."""
    if decode_steps:
        raise InputError("--band covers prefill taps only; drop --decode-steps")
    taps = ref.run(np.asarray(ids, dtype=np.int64), names).taps
    return band_tolerance(tol, taps, ref.cfg, model_path, ids, names, cand.precision)
