"""MoE routing at near ties: re-run the reference routing as the candidate did.

In bfloat16 a router's logits carry ~1e-2 relative error, so where two experts' logits are within that
error of each other a correct candidate may choose differently from the float64 reference (metrics.py
calls such a token a near tie). Every tap after it would then differ by far more than rounding, and a
correct port would fail. So when all the candidate's differing choices are near ties, the reference runs
again with each MoE layer's expert choice pinned to the candidate's, and the weights of those experts
recomputed from the reference's own router logits (float64 softmax, renormalised when norm_topk_prob):
"what the reference computes when it routes as the candidate did". Everything downstream is then compared
against that run. A choice that is not a near tie is a wrong top-k and fails as it is.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .. import taps as _taps
from ..backends.check import unbatched_sink
from ..models.numpy_ref import softmax64, topk_weights


def _like(value: np.ndarray, x):
    """value shaped, typed and placed like the model's tensor x (NumPy or torch)."""
    if isinstance(x, np.ndarray):
        return value.reshape(x.shape).astype(x.dtype, copy=False)
    import torch

    return torch.from_numpy(np.ascontiguousarray(value)).reshape(x.shape).to(device=x.device, dtype=x.dtype)


class PinRouting(_taps.Recorder):
    """Records the reference's taps while replacing its expert choice with `routing` ({topk_idx tap: [T, K]})
    and its top-k weights with softmax(own router logits) at those experts. What is recorded is what flowed
    on (the pinned values, so a graft from this run is consistent); the reference's own choice at each
    pinned layer is kept in `own` for the topk_idx comparison."""

    def __init__(self, names, sink, routing: Mapping[str, np.ndarray], cfg):
        super().__init__(names, unbatched_sink(sink, cfg))
        self.routing, self.cfg = routing, cfg
        self._logits: np.ndarray | None = None
        self._idx: np.ndarray | None = None
        self.own: dict[str, np.ndarray] = {}

    def on_tap(self, name: str, x):
        full = self.prefix + name
        site = _taps.split_name(full)[2]
        if site == "router_logits":
            self._logits = _taps.to_numpy(x).reshape(-1, self.cfg.num_experts).astype(np.float64)  # [T, E]
        elif site == "topk_idx" and full in self.routing:
            own = _taps.to_numpy(x)
            self.own[full] = own.reshape(-1, own.shape[-1])  # [T, K]
            self._idx = np.asarray(self.routing[full]).astype(np.int64).reshape(-1, self.cfg.num_experts_per_tok)
            x = _like(self._idx, x)
        elif site == "topk_weight" and self._idx is not None and self._logits is not None:
            # the block's expert weights at the candidate's experts, as the oracle computes them
            x = _like(topk_weights(softmax64(self._logits), self._idx, self.cfg), x)
            self._idx = None
        self.keep(full, x)
        return x
