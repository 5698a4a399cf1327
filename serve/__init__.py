"""Serving Kiln models: the inference engine (serve/engine.py) and the OpenAI-compatible
server (serve/server.py), started with `python -m serve --workdir=DIR`."""
