"""`letterpress serve`: an OpenAI-compatible HTTP server (a drop-in for `vllm serve` with the `openai` client).

    schemas.py      pydantic request models, and the fields we refuse rather than ignore
    body.py         reading a body: size limit, strict JSON, valid Unicode, then the schema
    engine_loop.py  the background thread that owns `llm.scheduler`, and the asyncio bridge to it
    text.py         per-choice incremental detokenization and stop strings
    metrics.py      Prometheus counters, gauges and histograms
    app.py          routes, streaming, errors, auth
    launch.py       the `serve` command's arguments and start-up

Importing this package is cheap: fastapi and uvicorn load only when a server is built.
"""
