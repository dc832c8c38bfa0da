"""`dsexport serve`: a local OpenAI-compatible HTTP server over a bundle (docs/serve.md).

    openai_api.py   request validation and OpenAI's response shapes
    scheduler.py    the worker thread: continuous batching, queue, cancellation
    cache_stats.py  expert-cache counters of paged bundles, per response and cumulative
    streaming.py    server-sent events and the disconnect watch
    metrics.py      Prometheus text
    app.py          the routes (Starlette) and the guard (API key, Host, body size)
    server.py       uvicorn, in the foreground or on a thread

Needs the `serve` extra (starlette, uvicorn); imports nothing of torch or the build side.
"""
