"""The JSON report (`--output FILE`). Schema (schema_version 1):

```
{
  "schema_version": 1,
  "model_path": str | null,          checkpoint dir verified (null when backends were passed as objects)
  "test_input": str | null,          the text tokenized, or null when ids were given
  "input_ids": [int, ...],
  "reference": str,                  e.g. "numpy (float64)"
  "candidate": str,                  e.g. "torch (float32, cpu)"
  "kernels": {str: str} | null,      our torch model: the kernel each kind of leaf ran, e.g. {"linear": "avx2-f32",
                                     "norm": "avx2", "rope": "avx2", "silu_mul": "avx2", "attention": ...,
                                     "qk_norm_rope": "avx2"} (the last: q/k's norms + RoPE, one leaf)
  "dtype": str,                      the candidate's dtype
  "overall_success": bool,           true when at least one tap was compared and none failed
  "total_layers_tested": int,        decoder layers with at least one compared tap (per decode step)
  "layers_passed": int,
  "layers_failed": int,
  "first_divergence": str | null,    first failing tap in dataflow order
  "culprit": str | null,             first tap whose own op fails on the reference's inputs (isolation)
  "summary": str,                    the one-sentence verdict
  "isolation": str,                  "ran", or why it did not
  "decode_steps": int,
  "layers": [int] | null,            the --layers selection
  "tolerance": {"name", "cos_min", "rel_max", "mse_max", "topk_match_min",
                "kv": {...} | null (KV-cache tolerance), "band": {tap: {"rel_max", "cos_min"}} (--band)},
  "problems": [str],                 metadata / config mismatches found on the way
  "notes": [str],                    how the comparison was made (e.g. MoE routing pinned at near ties)
  "timings": {"load_s", "reference_s", "candidate_s", "isolation_s"},
  "layer_results": [                 dataflow order; embed is layer_index -1, final_norm + logits are
    {                                layer_index num_hidden_layers ("head"); decode steps repeat the layers
      "layer_index": int,            with layer_name "step{j}.layers.{i}"
      "layer_name": str,
      "passed": bool | null,
      "taps": [
        {
          "name": str,                       e.g. "layers.3.q_rot"
          "shape": [int] | null,             the reference's shape
          "cosine_similarity": float | null,
          "mse": float | null,
          "relative_error": float | null,    ||cand - ref|| / ||ref||
          "max_abs_error": float | null,
          "max_abs_location": {axis: index} | null,   e.g. {"token": 3, "head": 1, "channel": 17}
          "passed": bool | null,             null: not compared (missing / no reference)
          "origin": "op" | "inherited" | null,        failing taps, when isolation ran
          "status": "pass" | "fail" | "shape_mismatch" | "invalid" | "missing" | "no_reference",
          "candidate_shape": [int] | null,
          "mean_abs_error": float | null,
          "nan_count": {"candidate": int, "reference": int},
          "inf_count": {"candidate": int, "reference": int},
          "match_fraction": float | null,    topk_idx: tokens whose expert set matches
          "near_tie_tokens": int | null,     topk_idx: differing tokens explained by router-logit error
          "reasons": [str],                  why it failed / was not compared
          "isolated": {"cosine_similarity", "relative_error", "max_abs_error", "passed"} | null
        }
      ]
    }
  ]
}
```
Non-finite numbers (an infinite relative error against an all-zero reference, a NaN) are written as
null; the NaN/Inf counts say why.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .compare import TapResult
from .report import VerifyReport

SCHEMA_VERSION = 1


def _num(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def tap_dict(r: TapResult) -> dict:
    m = r.metrics
    iso = None
    if r.isolated_status is not None:
        im = r.isolated
        iso = {"cosine_similarity": _num(im.cosine_similarity) if im else None,
               "relative_error": _num(im.relative_error) if im else None,
               "max_abs_error": _num(im.max_abs_error) if im else None,
               "passed": r.isolated_status == "pass"}
    return {
        "name": r.name,
        "shape": r.shape,
        "cosine_similarity": _num(m.cosine_similarity) if m else None,
        "mse": _num(m.mse) if m else None,
        "relative_error": _num(m.relative_error) if m else None,
        "max_abs_error": _num(m.max_abs_error) if m else None,
        "max_abs_location": m.max_abs_location if m else None,
        "passed": r.passed,
        "origin": r.origin,
        "status": r.status,
        "candidate_shape": r.candidate_shape,
        "mean_abs_error": _num(m.mean_abs_error) if m else None,
        "nan_count": {"candidate": m.nan_candidate, "reference": m.nan_reference} if m else None,
        "inf_count": {"candidate": m.inf_candidate, "reference": m.inf_reference} if m else None,
        "match_fraction": _num(m.match_fraction) if m else None,
        "near_tie_tokens": m.near_tie_tokens if m else None,
        "reasons": list(r.reasons),
        "isolated": iso,
    }


def to_dict(rep: VerifyReport) -> dict:
    tested, passed, failed = rep.layer_counts()
    fd = rep.first_divergence
    return {
        "schema_version": SCHEMA_VERSION,
        "model_path": rep.model_path,
        "test_input": rep.test_input,
        "input_ids": [int(i) for i in rep.input_ids],
        "reference": rep.reference,
        "candidate": rep.candidate,
        "kernels": rep.kernels,
        "dtype": rep.dtype,
        "overall_success": rep.overall_success,
        "total_layers_tested": tested,
        "layers_passed": passed,
        "layers_failed": failed,
        "first_divergence": fd.name if fd else None,
        "culprit": rep.culprit.name if rep.culprit else None,
        "summary": rep.sentence(),
        "isolation": rep.isolation,
        "decode_steps": rep.decode_steps,
        "layers": rep.layers,
        "tolerance": rep.tolerance.to_dict(),
        "problems": list(rep.problems),
        "notes": list(rep.notes),
        "timings": {k: round(v, 4) for k, v in rep.timings.items()},
        "layer_results": [
            {"layer_index": g.layer_index, "layer_name": g.layer_name, "passed": g.passed,
             "taps": [tap_dict(t) for t in g.taps]}
            for g in rep.groups()
        ],
    }


def write_json(rep: VerifyReport, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(to_dict(rep), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path
