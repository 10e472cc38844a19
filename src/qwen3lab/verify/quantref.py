"""`--quantised-reference`: the NumPy oracle on the candidate's own quantised weights (models/numpy_quant.py).

A quantised candidate (torch-fast int8 / int4) is then held to its activations' tolerance: what is left to
check is its arithmetic, not the format's rounding loss (README, `--quantised-reference`). The detection-power
table (power.py) builds this oracle once per format and reuses it for every planted bug.
"""

from __future__ import annotations

from pathlib import Path

from ..backends.dtypes import normalize_dtype
from ..errors import InputError
from .side import Side


def quantised_oracle(backend, weights64, cfg):
    """(the oracle on `weights64` quantised as `backend`'s weights are, a label, the backend's activation dtype).
    weights64: the checkpoint in float64 ({hf_name: tensor or array}). None when backend has no quantised
    weights."""
    from ..models.numpy_quant import quantise_weights  # NumPy-only modules, for this path only
    from ..models.numpy_ref import NumpyBackend

    model = getattr(getattr(backend, "inner", backend), "model", None)
    fmt = getattr(model, "quant", None)
    if fmt is None:
        return None
    group = getattr(model, "group_size", None) if fmt == "int4" else None
    w = quantise_weights(weights64, cfg, fmt, group)
    what = f"{fmt}-g{group}" if group else fmt
    return NumpyBackend(w, cfg), f"numpy (float64, {what} weights)", normalize_dtype(str(model.dtype))


def quantised_reference_side(reference, cand: Side, path: Path | None) -> tuple[Side, str]:
    """verify's quantised_reference: the reference Side and the candidate's activation dtype (its precision).
    Refused, naming what is missing, for anything but numpy vs our quantised model."""
    model = getattr(getattr(cand.backend, "inner", cand.backend), "model", None)
    if reference != "numpy" or getattr(model, "quant", None) is None or path is None:
        got = f"reference {reference!r}" if reference != "numpy" else (
            "no checkpoint dir" if path is None else f"candidate {cand.spec!r} with unquantised weights")
        raise InputError(f"--quantised-reference needs the numpy reference, a checkpoint dir and a candidate with "
                         f"quantised weights (torch-fast --dtype int8 / int4); got {got}")
    import torch  # the checkpoint read in float64: only for this option

    from ..weights import load_weights

    oracle, label, precision = quantised_oracle(cand.backend, load_weights(path, cand.cfg, dtype=torch.float64),
                                                cand.cfg)
    return Side(oracle, "numpy", label=label), precision
