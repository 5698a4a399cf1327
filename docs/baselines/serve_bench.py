"""Kiln's inference engine against Hugging Face transformers' `generate`, on CPU
(docs/benchmarks.md, Serving).

  python docs/baselines/serve_bench.py                       # 1, 8 and 32 concurrent
  python docs/baselines/serve_bench.py --concurrency=32 --requests_per_client=2

On a shared machine set OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads otherwise spin
against JAX's threads in the same process, and transformers measured up to 10x slower.

From the project root. One random Llama (d_model 256, 4 layers, 4 heads over 2 KV heads,
vocab 4096, tied embeddings, float32) is made with transformers, saved with a SentencePiece
tokenizer trained on the stdlib corpus, and imported into Kiln with `train.convert`, so both
sides run the same weights. Prompts are stdlib text, 16 to 256 tokens; each request asks for
16 to 128 new tokens (no stop: every request runs to its length); all greedy.

At concurrency c, c clients each send their requests one after another:
- Kiln: `serve.load_engine` + `Engine.start()`, one thread per client, times taken from the
  client's stream (time to first token from submit; inter-token gaps between events).
- transformers: its best batching, padded batches of c concurrent requests (left padding,
  `generate(max_new_tokens=the batch's longest)`); a request's first token and gaps are
  timed by a streamer on `generate`'s steps, from the start of its batch. Tokens past a
  request's own length are not counted.
Throughput is requested tokens over wall time. Each side is warmed up first (compiles).
"""

import argparse
import os
import pathlib
import tempfile
import threading
import time

import ml_collections
import numpy as np
import torch
import transformers

from data import sources, tokenizers
from serve import engine as engine_lib
from train import convert

VOCAB, MAX_LEN = 4096, 512


def make_model(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, list[int]]:
  """(HF dir, Kiln workdir, a long stretch of tokenized stdlib text)."""
  text = ''.join(pathlib.Path(sources.stdlib_root(), rel).read_text(errors='replace')
                 for rel in sources.stdlib_modules()[:60])[:400_000]
  spec = ml_collections.ConfigDict(dict(vocab_size=VOCAB, model_type='bpe', train_chars=400_000))
  proto = tokenizers.train_sentencepiece(spec, lambda: [text])
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2))
  hf.save_pretrained(root / 'hf')
  (root / 'hf' / 'tokenizer.model').write_bytes(proto)
  convert.import_hf(str(root / 'hf'), str(root / 'kiln'), dtype='float32', seq_len=MAX_LEN)
  ids = tokenizers.SentencePieceTokenizer(proto).encode(text)
  return root / 'hf', root / 'kiln', ids


def workload(ids: list[int], n: int, seed: int) -> list[tuple[list[int], int]]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(rng.integers(16, 257))
    start = int(rng.integers(0, len(ids) - length))
    out.append((ids[start:start + length], int(rng.integers(16, 129))))
  return out


def summary(name, c, tokens, wall, ttft, itl) -> dict:
  return {'impl': name, 'concurrency': c, 'tokens': tokens, 'wall_s': wall,
          'tok_per_s': tokens / wall, 'ttft_p50_ms': 1e3 * np.percentile(ttft, 50),
          'itl_p50_ms': 1e3 * np.percentile(itl, 50), 'itl_p99_ms': 1e3 * np.percentile(itl, 99)}


def run_kiln(engine, clients: list[list[tuple[list[int], int]]], out: dict | None = None
             ) -> tuple[float, list, list]:
  """Wall time, TTFT and inter-token samples; `out` gets each prompt's tokens."""
  ttft, itl, lock = [], [], threading.Lock()

  def client(requests):
    for prompt, n in requests:
      t0 = time.perf_counter()
      stream = engine.submit(engine_lib.Request(tuple(prompt), max_tokens=n, temperature=0.0))
      events = [(time.perf_counter(), event.token_id) for event in stream]
      times = [t for t, _ in events]
      with lock:
        ttft.append(times[0] - t0)
        itl.extend(np.diff(times))
        if out is not None:
          out[tuple(prompt)] = [token for _, token in events]

  threads = [threading.Thread(target=client, args=(r,)) for r in clients]
  start = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return time.perf_counter() - start, ttft, itl


class _StepTimes(transformers.generation.streamers.BaseStreamer):
  """The time of each `generate` step (the first `put` is the prompt)."""

  def __init__(self):
    self.times = []

  def put(self, value):
    self.times.append(time.perf_counter())

  def end(self):
    pass


def run_hf(model, batches: list[list[tuple[list[int], int]]], out: dict | None = None
           ) -> tuple[float, list, list]:
  """As run_kiln, for padded batches through `generate`."""
  ttft, itl = [], []
  start = time.perf_counter()
  for batch in batches:
    longest = max(len(p) for p, _ in batch)
    ids = torch.zeros((len(batch), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (prompt, _) in enumerate(batch):
      ids[i, longest - len(prompt):] = torch.tensor(prompt)
      mask[i, longest - len(prompt):] = 1
    steps, t0 = _StepTimes(), time.perf_counter()
    new = max(n for _, n in batch)
    with torch.no_grad():
      generated = model.generate(
          input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
          do_sample=False, pad_token_id=0, streamer=steps)[:, longest:]
    times = steps.times[1:]
    for i, (prompt, n) in enumerate(batch):
      if out is not None:
        out[tuple(prompt)] = generated[i, :n].tolist()
      ttft.append(times[0] - t0)
      itl.extend(np.diff(times[:n]))
  return time.perf_counter() - start, ttft, itl


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--concurrency', default='1,8,32')
  parser.add_argument('--requests_per_client', type=int, default=2)
  parser.add_argument('--min_requests', type=int, default=4)
  parser.add_argument('--skip_hf', action='store_true')
  args = parser.parse_args()
  root = pathlib.Path(tempfile.mkdtemp(prefix='kiln-serve-bench-'))
  hf_dir, workdir, ids = make_model(root)
  # Pages for 32 requests of the longest prompt and output (256 + 128 tokens).
  engine, _ = engine_lib.load_engine(str(workdir), max_slots=32, page_size=16, num_pages=768,
                                     prefill_chunk=256, max_seq_len=MAX_LEN)
  engine.start()
  hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
  print(f'jax {__import__("jax").__version__} devices {__import__("jax").devices()}, torch '
        f'{torch.__version__} threads {torch.get_num_threads()}, cpus {os.cpu_count()}')

  # Warm-up: every prefill bucket and the decode programs (a lone client's, then a full
  # batch's, at every page-table width); HF's kernels.
  warm = [(ids[:n], 4) for n in (8, 24, 48, 100, 200, 256)]
  run_kiln(engine, [warm])
  run_kiln(engine, [warm] * 32)
  run_hf(hf, [warm[:2]])

  rows = []
  for c in (int(x) for x in args.concurrency.split(',')):
    total = max(args.min_requests, c * args.requests_per_client)
    requests = workload(ids, total, seed=c)
    clients = [requests[i::c] for i in range(c)]
    kiln_tokens, hf_tokens = {}, {}
    rows.append(summary('kiln', c, sum(n for _, n in requests),
                        *run_kiln(engine, clients, kiln_tokens)))
    print(rows[-1], flush=True)
    if not args.skip_hf:
      batches = [requests[i:i + c] for i in range(0, total, c)]
      rows.append(summary('transformers', c, sum(n for _, n in requests),
                          *run_hf(hf, batches, hf_tokens)))
      print(rows[-1], flush=True)
      # Greedy on the same weights: the same tokens (up to float ties on a random model).
      same = sum(kiln_tokens[k] == hf_tokens[k] for k in kiln_tokens)
      print(f'concurrency {c}: {same} of {len(kiln_tokens)} requests give transformers\' '
            'tokens exactly', flush=True)
  engine.shutdown()

  print('\n| concurrent | engine | requests tokens | wall s | tokens/s | TTFT p50 ms '
        '| inter-token p50 ms | p99 ms |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['concurrency']} | {r['impl']} | {r['tokens']} | {r['wall_s']:.1f} | "
          f"{r['tok_per_s']:.0f} | {r['ttft_p50_ms']:.0f} | {r['itl_p50_ms']:.1f} | "
          f"{r['itl_p99_ms']:.1f} |")
  for c in sorted({r['concurrency'] for r in rows}):
    pair = {r['impl']: r['tok_per_s'] for r in rows if r['concurrency'] == c}
    if len(pair) == 2:
      print(f'concurrency {c}: Kiln / transformers throughput = '
            f"{pair['kiln'] / pair['transformers']:.2f}x")


if __name__ == '__main__':
  main()
