"""Typed errors for every boundary a user touches. Each message names the file, tensor, field or value."""


class Qwen3LabError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ConfigError(Qwen3LabError, ValueError):
    """config.json is missing, malformed, or describes something that is not a valid Qwen3."""


class WeightsError(Qwen3LabError, ValueError):
    """A checkpoint tensor is missing, unexpected, mis-shaped, of the wrong dtype, or its file is bad."""


class TokenizerError(Qwen3LabError, ValueError):
    """tokenizer.json / tokenizer_config.json missing or unreadable."""


class InputError(Qwen3LabError, ValueError):
    """Bad model input: empty prompt, invalid token id, prompt past the context length."""


class NumericsError(Qwen3LabError, FloatingPointError):
    """NaN or Inf found in weights or activations."""


class DumpError(Qwen3LabError, ValueError):
    """A tap dump file is malformed."""


class DistError(Qwen3LabError, RuntimeError):
    """A tensor-parallel run could not start or lost a rank (dist/group.py, models/tp_run.py)."""


class MissingDependencyError(Qwen3LabError, ImportError):
    """An optional dependency (transformers for the `hf` backend) is not installed."""
