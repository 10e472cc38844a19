"""`verify --export-reference ref.safetensors`: the reference's taps, ids and positions as a tap dump.

Isolation for a port in any language: the port reads this file, feeds each op the reference's input (the
"overwrite in the debug callback" pattern: after each op, record its output, then replace it with the
reference's tensor of the same tap before the next op reads it), and writes a second dump; `verify
--candidate dump:port.safetensors --isolated dump:port-isolated.safetensors` then labels every failing tap
`op` (wrong on the reference's inputs too) or `inherited`. The file is the dump format (README), written at
the reference's precision (float64 for the NumPy oracle) with metadata role = "reference"; with
--decode-steps N it holds the prefill rows and `step{j}.` rows (the reference's full recompute at each
position), so a port can overwrite its KV-cache decode steps the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import taps as _taps
from ..backends.dump import file_sha256
from ..config import Qwen3Config
from ..errors import InputError
from .inputs import parse_layers, resolve_input_ids
from .side import resolve


def export_reference(path, reference="numpy", input_ids=None, *, model_path, test_input: str | None = None,
                     decode_steps: int = 0, probs: bool = False, layers=None,
                     reference_dtype: str | None = None) -> tuple[Path, int]:
    """Run the reference once and write every tap (within `layers`) as a dump; (path, number of taps)."""
    model = Path(model_path)
    if not (model / "config.json").is_file():
        raise InputError(f"--export-reference needs --model-path with a config.json; {model} has none")
    cfg = Qwen3Config.from_file(model)
    ref = resolve(reference, model, cfg, dtype=reference_dtype or "float64", role="reference")
    ids, _ = resolve_input_ids(input_ids, test_input, model, (ref,), cfg)
    if not isinstance(decode_steps, int) or not 0 <= decode_steps < len(ids):
        raise InputError(f"--decode-steps must be in 0..{len(ids) - 1} for {len(ids)} input tokens, "
                         f"got {decode_steps!r}")
    names = _taps.tap_sites(cfg, probs=probs, layers=parse_layers(layers, cfg.num_hidden_layers))
    arr = np.asarray(ids, dtype=np.int64)
    res = ref.run_decode(arr, decode_steps, names) if decode_steps else ref.run(arr, names)
    taps = dict(sorted(res.taps.items(), key=lambda kv: _taps.dataflow_key(kv[0])))
    out = _taps.write_dump(path, taps, backend=ref.label, dtype=ref.dtype, input_ids=ids,
                           positions=list(range(len(ids))), config_sha256=file_sha256(model / "config.json"),
                           extra={"role": "reference", "decode_steps": str(decode_steps)})
    return out, len(taps)
