"""`dsexport serve BUNDLE`: a local OpenAI-compatible server (docs/serve.md). Needs the `serve`
extra (starlette, uvicorn); no torch."""

from __future__ import annotations

from pathlib import Path

import click

from dsexport.core.errors import UserError

from .app import cli


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes the model to the network.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--api-key", envvar="DSEXPORT_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on every endpoint but /health (or set DSEXPORT_API_KEY).")
@click.option("--parallel", default=4, show_default=True, type=click.IntRange(1, 256),
              help="Sequences decoded together in one batch (continuous batching).")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(0, 100000),
              help="Sequences that may wait for a free row; beyond that requests get 429.")
@click.option("--ctx-size", default=None, type=click.IntRange(2), help="Context limit in tokens (default: the model's).")
@click.option("--threads", default=None, type=click.IntRange(1, 1024), help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--expert-cache-mb", default=None, type=float,
              help="Paged bundles: MiB of routed experts kept resident (docs/paging.md).")
@click.option("--draft", type=click.Choice(["mtp"]), default=None,
              help="Draft with the bundle's MTP graph; requests then run one at a time (docs/mtp.md).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files at startup.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(bundle, host, port, api_key, parallel, max_queue, ctx_size, threads, expert_cache_mb, draft, no_verify,
          log_level) -> None:
    """Serve a bundle over HTTP with OpenAI's API (chat and text completions, streaming)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError('`dsexport serve` needs starlette and uvicorn: pip install "dsexport[serve]"') from None
    from dsexport.runtime import Engine
    from dsexport.serve.app import is_loopback, make_server_state
    from dsexport.serve.server import bind, serve_forever, url_of

    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty")
    engine = Engine.load(bundle, threads=threads, max_context=ctx_size, verify=not no_verify,
                         expert_cache_mb=expert_cache_mb, draft=draft)
    loopback = is_loopback(host)
    try:
        sock = bind(host, port)
    except OSError as e:
        engine.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    model = Path(bundle).resolve().name
    app, scheduler = make_server_state(engine, model, parallel=parallel, max_queue=max_queue, api_key=api_key,
                                       loopback_only_hosts=loopback)
    if not loopback and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this address can use the "
                   "model", err=True)
    mode = "one request at a time (MTP drafting)" if draft else f"{parallel} in parallel, {max_queue} queued"
    click.echo(f"dsexport serve: {model} at {url_of(sock)}/v1 ({mode}, context {engine.max_context})", err=True)
    try:
        serve_forever(app, sock, log_level)
    finally:
        scheduler.close()
        sock.close()
        engine.close()
