"""The `qwen3lab` click group and what every command shares: one-line errors (friendly_errors) and the
checkpoint-dir help text. The commands live in run.py (make-model, generate, chat, serve) and tools.py
(params, verify, tiny, bench); cli/__init__.py registers both on `main`."""

from __future__ import annotations

import functools
import os
import sys

import click

from ..errors import Qwen3LabError

MODEL_HELP = "checkpoint dir (config.json + safetensors + tokenizer.json); default: the embedded default model"


def friendly_errors(fn):
    """Turn Qwen3LabError (and Ctrl-C) into a one-line message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Qwen3LabError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="qwen3lab")
def main() -> None:
    """qwen3lab: run, verify layer by layer, show and measure Qwen3 (dense and MoE) models."""
    _remove_torch_tmp_dirs_at_exit()


_TMP_WATCHED: list[set] = []


def _remove_torch_tmp_dirs_at_exit() -> None:
    """torch makes $TMPDIR/torchinductor_$USER (its compile cache dir) whenever torch._dynamo is imported, which
    building any nn.Module does (torch._compile's disable wrapper) and transformers does on import. We never
    compile, so a run would leave an empty dir behind: at exit, remove the ones that appeared and stayed empty."""
    import atexit
    import tempfile

    if _TMP_WATCHED:  # once per process (tests invoke main many times)
        return
    tmp = tempfile.gettempdir()

    def torch_dirs() -> set:
        try:
            return {e.path for e in os.scandir(tmp) if e.name.startswith("torchinductor_") and e.is_dir()}
        except OSError:
            return set()

    _TMP_WATCHED.append(torch_dirs())

    def cleanup() -> None:
        for d in torch_dirs() - _TMP_WATCHED[0]:
            try:
                os.rmdir(d)  # only when empty: a cache someone filled meanwhile stays
            except OSError:
                pass

    atexit.register(cleanup)

