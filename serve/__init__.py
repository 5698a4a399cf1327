"""Serving: the inference engine (slots, paged KV cache, continuous batching) and the
OpenAI-compatible server. It sits beside `train/`, above `model/`."""
