"""`slm serve`: an OpenAI-compatible HTTP server with batched decoding and a chat page.

`app.py` holds the FastAPI routes, `scheduler.py` the one thread that owns the model and
steps every running request in a shared batch, `batch_cache.py` joins and trims the batch
rows of generation caches, `protocol.py` the request schemas and OpenAI's error format,
`text.py` incremental detokenisation, stop sequences and chat prompts. FastAPI and uvicorn
are imported only here, so the rest of the package runs without the `serve` extra.
"""
