"""The public Python surface in one import: `qwen3lab.api.load` and the argument checks its callers share.

The code lives below it (loading.py: backends by name; paths.py: paths and the default model; checks.py:
argument checks); nothing here imports upward, and nothing below imports this module.
"""

from __future__ import annotations

from .checks import check_int, shorten  # noqa: F401  (public here too: qwen3lab.api.check_int)
from .loading import BACKENDS, QUANT_BACKEND, check_backend_dtype, load  # noqa: F401
from .paths import check_path, resolve_model_path  # noqa: F401
