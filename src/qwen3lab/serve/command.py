"""`qwen3lab serve`'s own options and the uvicorn run; cli.py loads the model and calls `run_server`.

fastapi / uvicorn are the `serve` extra: imported when the server starts, so the rest of the CLI works
without them, and a missing one is a one-line error naming the extra to install.

With --ndev N the model is a tensor-parallel TPModel (models/tp_run.py) and this process is rank 0, the only
one serving HTTP. The ranks are stopped in the app's lifespan shutdown (after the drain), not after
uvicorn.run returns: uvicorn re-raises the SIGTERM / SIGINT it caught once it has drained, which ends this
process there. A lost rank makes the app ask uvicorn to exit (should_exit), and then this raises DistError:
one line and exit status 2.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import DistError, InputError


def serve_options(fn):
    for opt in reversed([
        click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on"),
        click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True),
        click.option("--max-num-seqs", type=click.IntRange(1, 4096), default=256, show_default=True,
                     help="sequences in the running batch at most"),
        click.option("--max-queue", type=click.IntRange(1), default=None,
                     help="sequences accepted (running + waiting) before answering 429 [default: 4 x max-num-seqs]"),
        click.option("--kv-memory", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="GiB for the KV cache [default: a fraction of free memory]"),
        click.option("--api-key", default=None, envvar="QWEN3LAB_API_KEY",
                     help="require `Authorization: Bearer KEY` on every route but /health"),
        click.option("--served-model-name", default=None, help="the model name clients send [default: the dir name]"),
    ]):
        fn = opt(fn)
    return fn


def run_server(lm, model_dir: str, host: str, port: int, max_num_seqs: int, max_queue: int | None,
               kv_memory: float | None, api_key: str | None, served_model_name: str | None) -> None:
    """Serve lm until SIGTERM / Ctrl-C; uvicorn's graceful shutdown lets running requests finish first."""
    try:
        import uvicorn  # optional dependency: the `serve` extra

        from .app import make_app
    except ImportError as e:
        raise InputError(f"qwen3lab serve needs the serve extra: pip install 'qwen3lab[serve]' ({e})") from None
    name = served_model_name or Path(str(model_dir)).name or "qwen3lab"
    close = getattr(lm.model, "close", None)  # a TPModel: stops the other ranks
    box: list = []
    try:
        app = make_app(lm, name, max_num_seqs=max_num_seqs, kv_memory_gib=kv_memory, api_key=api_key,
                       max_queue=max_queue, on_shutdown=close,
                       on_fatal=lambda _msg: setattr(box[0], "should_exit", True))
    except BaseException:
        if close is not None:
            close()
        raise
    click.echo(app.state.server.engine.describe(), err=True)
    ranks = f", {lm.model.world} tensor-parallel ranks" if close is not None else ""
    click.echo(f"serving {name} on http://{host}:{port}/v1 (max {max_num_seqs} sequences{ranks}"
               f"{', API key required' if api_key else ''})", err=True)
    box.append(uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                             timeout_graceful_shutdown=None)))
    box[0].run()
    if app.state.server.loop.dead is not None:
        raise DistError(f"the server stopped: {app.state.server.loop.dead}")
