"""What the HTTP server costs on top of the engine, on CPU (docs/benchmarks.md, Serving).

  python docs/baselines/server_bench.py                    # 1 and 8 concurrent clients
  python docs/baselines/server_bench.py --concurrency=1,8,32 --requests_per_client=4

From the project root. One random Kiln transformer (d_model 256, 4 layers, 4 heads over 2
KV heads, float32) over the byte tokenizer; prompts of 16 to 256 random printable bytes,
16 to 128 new tokens each, greedy, no stop (every request runs to its length). The same
workload runs twice on one engine (warmed up first, so nothing compiles while timed):
- `engine`: one thread per client submitting to `Engine` directly and reading its stream;
- `http`: one asyncio client per client streaming `/v1/completions` (SSE) from the server
  (uvicorn on a local port, in this process), timing the chunks as they arrive. The
  clients run in a child process, so that they do not share the server's interpreter lock.
Throughput is generated tokens over wall time; time to first token is from the submit or
the POST; inter-token gaps are between a request's tokens.
"""

import argparse
import asyncio
import json
import multiprocessing
import socket
import threading
import time

import httpx
import numpy as np

# JAX and the model load only in the parent: the spawned client process imports this module.


def make_engine(max_slots: int):
  import jax.numpy as jnp
  from flax import nnx

  from data import tokenizers
  from model import transformer as tfm
  from serve import engine as engine_lib

  cfg = tfm.TransformerConfig(vocab_size=384, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                              head_dim=64, mlp_dim=704, dtype=jnp.dtype('float32'),
                              param_dtype=jnp.dtype('float32'))
  with nnx.use_eager_sharding(False):
    model = nnx.jit(lambda: tfm.Transformer(cfg, rngs=nnx.Rngs(0)))()
  graphdef, params = nnx.split(model)
  return engine_lib.Engine(graphdef, params, cfg, tokenizers.ByteTokenizer(),
                           max_slots=max_slots, page_size=16, max_seq_len=512,
                           prefill_chunk=256, max_queue=1024)


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
  rng = np.random.default_rng(seed)
  return [([256, *rng.integers(32, 127, int(rng.integers(16, 257))).tolist()],
           int(rng.integers(16, 129))) for _ in range(n)]


def summary(impl, c, tokens, wall, ttft, itl) -> dict:
  return {'impl': impl, 'concurrency': c, 'tokens': tokens, 'wall_s': round(wall, 2),
          'tok_per_s': round(tokens / wall, 1),
          'ttft_p50_ms': round(1e3 * float(np.percentile(ttft, 50)), 1),
          'itl_p50_ms': round(1e3 * float(np.percentile(itl, 50)), 2),
          'itl_p99_ms': round(1e3 * float(np.percentile(itl, 99)), 2)}


def run_engine(engine, clients) -> tuple[float, list, list]:
  from serve import engine as engine_lib

  ttft, itl, lock = [], [], threading.Lock()

  def client(requests):
    for prompt, n in requests:
      t0 = last = time.perf_counter()
      stream = engine.submit(engine_lib.Request(prompt_ids=tuple(prompt), max_tokens=n,
                                                temperature=0.0))
      gaps = []
      for i, _ in enumerate(stream):
        now = time.perf_counter()
        gaps.append(now - (t0 if i == 0 else last))
        last = now
      with lock:
        ttft.append(gaps[0])
        itl.extend(gaps[1:])

  threads = [threading.Thread(target=client, args=(c,)) for c in clients]
  start = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return time.perf_counter() - start, ttft, itl


async def _http_clients(url: str, clients) -> tuple[list, list]:
  ttft, itl = [], []

  async def client(http, requests):
    for prompt, n in requests:
      body = {'prompt': prompt, 'max_tokens': n, 'temperature': 0, 'stream': True}
      t0 = last = time.perf_counter()
      first = True
      async with http.stream('POST', '/v1/completions', json=body) as r:
        async for line in r.aiter_lines():
          if not line.startswith('data: {'):
            continue
          if not json.loads(line[6:])['choices']:
            continue
          now = time.perf_counter()
          (ttft if first else itl).append(now - (t0 if first else last))
          first, last = False, now

  async with httpx.AsyncClient(base_url=url, timeout=600,
                               limits=httpx.Limits(max_connections=len(clients))) as http:
    await asyncio.gather(*(client(http, c) for c in clients))
  return ttft, itl


def _http_process(url: str, clients, out) -> None:
  start = time.perf_counter()
  ttft, itl = asyncio.run(_http_clients(url, clients))
  out.put((time.perf_counter() - start, ttft, itl))


def run_http(url: str, clients) -> tuple[float, list, list]:
  ctx = multiprocessing.get_context('spawn')
  out = ctx.Queue()
  process = ctx.Process(target=_http_process, args=(url, clients, out))
  process.start()
  result = out.get()
  process.join()
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--concurrency', default='1,8')
  parser.add_argument('--requests_per_client', type=int, default=2)
  args = parser.parse_args()
  import jax
  import uvicorn

  from data import tokenizers
  from serve import server as server_lib

  levels = [int(c) for c in args.concurrency.split(',')]
  engine = make_engine(max(levels))
  engine.start()
  app = server_lib.create_app(engine, tokenizers.ByteTokenizer(), model_name='bench')
  sock = socket.socket()
  sock.bind(('127.0.0.1', 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level='warning', lifespan='off'))
  thread = threading.Thread(target=server.run, kwargs={'sockets': [sock]}, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  url = f'http://127.0.0.1:{sock.getsockname()[1]}'
  print(f'devices: {jax.devices()}')
  # Compiles decode and every prefill bucket (prompts of 17 to 257 tokens).
  run_engine(engine, [[([256] + [65] * n, 2) for n in (16, 31, 63, 127, 255, 256)]])
  for c in levels:
    clients = [workload(args.requests_per_client, seed=1000 * c + i) for i in range(c)]
    tokens = sum(n for requests in clients for _, n in requests)
    for impl in ('engine', 'http'):
      wall, ttft, itl = run_engine(engine, clients) if impl == 'engine' else run_http(url, clients)
      print(json.dumps(summary(impl, c, tokens, wall, ttft, itl)), flush=True)
  server.should_exit = True
  thread.join()
  engine.shutdown()


if __name__ == '__main__':
  main()
