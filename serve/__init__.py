"""Serving: the inference engine (serve/engine.py: slots, paged KV cache, continuous
batching) and the OpenAI-compatible server (serve/server.py), started with
`python -m serve --workdir=DIR`. It sits beside `train/`, above `model/`."""
