"""Speculative decoding against plain decoding, greedy, on held-out stdlib code
(docs/benchmarks.md, Speculative decoding).

  python -m train --config=configs/lm.py --workdir=/tmp/spec_bench/target
  mkdir -p /tmp/spec_bench/draft && cp -r /tmp/spec_bench/target/tokenizer /tmp/spec_bench/draft/
  python -m train --config=configs/lm.py --workdir=/tmp/spec_bench/draft \\
    --config.model.n_layers=1 --config.model.d_model=64
  python docs/baselines/speculative_bench.py --target=/tmp/spec_bench/target \\
    --draft=/tmp/spec_bench/draft

From the project root; about 8 + 5 minutes of training and 10 of benchmark on 2 CPU cores.
The target is the `tiny` LM (4 layers, d_model 128), the draft a 1-layer, d_model 64 LM
trained the same way with the target's tokenizer (a run reuses a tokenizer already in its
workdir). Prompts are windows of validation documents (held out from training). Every
method decodes the same prompts greedily in one session, `--batch` rows a call (batch 1
runs the prompts one by one); each call is compiled once, then timed best of `--repeats`,
and the script checks that every method gives plain decoding's tokens. tokens/s counts
generated tokens; acceptance is accepted / proposed draft tokens; tokens/call is generated
tokens per target call. tokens/s is wall time, tok/cpu-s this process's CPU time (XLA's
threads included): on a shared machine the second is the steadier.
"""

import argparse
import collections
import functools
import time

import jax
import numpy as np
from etils import epath

from data import sources, tokenizers
from data.errors import ConfigError
from model import decode, sampling, speculative
from train import runs


def prompts(task, rows: int, length: int, skip: int = 64) -> np.ndarray:
  """`rows` windows of `length` tokens, each from its own validation document (after its
  first `skip` tokens, past the license headers many stdlib files share)."""
  out = []
  for doc in sources.read_documents(task.config.data, 'validation'):
    ids = task.tokenizer.encode(doc)
    if len(ids) >= skip + length:
      out.append(ids[skip:skip + length])
    if len(out) == rows:
      return np.array(out, np.int32)
  raise ConfigError(f'The validation split has fewer than {rows} documents of '
                    f'{skip + length} tokens.')


def timed(fn, repeats: int, *args, **kwargs):
  """(best wall seconds, best CPU seconds of this process, the result) of `repeats` calls
  after a compiling one. CPU time is what a busy shared machine distorts least."""
  result = jax.block_until_ready(fn(*args, **kwargs))
  wall = cpu = float('inf')
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    result = jax.block_until_ready(fn(*args, **kwargs))
    wall = min(wall, time.perf_counter() - start)
    cpu = min(cpu, time.process_time() - start_cpu)
  return wall, cpu, result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--target', required=True, help='the target LM run directory')
  parser.add_argument('--draft', default='', help='a draft LM run with the same tokenizer')
  parser.add_argument('--prompts', type=int, default=8, help='held-out prompts')
  parser.add_argument('--batch', default='1,8', help='rows per call, comma-separated')
  parser.add_argument('--prompt_tokens', type=int, default=128)
  parser.add_argument('--new_tokens', type=int, default=128)
  parser.add_argument('--lookup_k', default='2,3,4,6,8')
  parser.add_argument('--draft_k', default='2,3,4')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  task, state, step = runs.load_latest(args.target)
  methods = {'plain': None}
  methods.update({f'lookup k={k}': (speculative.PromptLookup(max_ngram=3, min_ngram=1), k)
                  for k in map(int, args.lookup_k.split(','))})
  if args.draft:
    same = [(epath.Path(d) / 'tokenizer' / tokenizers.SPM_FILE).read_bytes()
            for d in (args.target, args.draft)]
    if same[0] != same[1]:
      raise ConfigError(f'{args.draft} has another tokenizer than {args.target}.')
    draft_task, draft_state, _ = runs.load_latest(args.draft)
    draft = speculative.DraftModel(draft_task.graphdef, draft_state.params)
    methods.update({f'draft k={k}': (draft, k) for k in map(int, args.draft_k.split(','))})
  print(f'target {args.target} (step {step}), {jax.devices()[0].platform}; '
        f'{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy')

  all_prompts = prompts(task, args.prompts, args.prompt_tokens)
  for batch in map(int, args.batch.split(',')):
    print(f'\nbatch {batch} ({args.prompts // batch} calls)\n{"method":<14} {"tokens/s":>9} '
          f'{"speedup":>8} {"tok/cpu-s":>9} {"speedup":>8} {"acceptance":>10} '
          f'{"tokens/call":>11} {"same tokens":>11}')
    base, want = None, None
    for name, spec in methods.items():
      seconds, tokens, counts = measure(task, state.params, spec, all_prompts, batch, args)
      rates = [counts['generated'] / s for s in seconds]
      if want is None:
        base, want = rates, tokens
      same = f'{int((tokens == want).all(axis=1).sum())}/{len(tokens)}'
      accept = per_call = ''
      if spec is not None:
        accept = f'{counts["accepted"] / max(counts["proposed"], 1):.2f}'
        per_call = f'{counts["generated"] / counts["rounds"]:.2f}'
      print(f'{name:<14} {rates[0]:>9.1f} {rates[0] / base[0]:>7.2f}x {rates[1]:>9.1f} '
            f'{rates[1] / base[1]:>7.2f}x {accept:>10} {per_call:>11} {same:>11}', flush=True)


def measure(task, params, spec, all_prompts: np.ndarray, batch: int, args):
  """((wall, CPU) seconds, tokens [P, M], counts) of one method over every prompt, `batch`
  rows a call: the sums over calls of each call's best times."""
  if all_prompts.shape[0] % batch:
    raise ConfigError(f'--batch={batch} must divide --prompts={all_prompts.shape[0]}.')
  common = dict(max_new_tokens=args.new_tokens, vocab_limit=task.tokenizer.vocab_size,
                sampling_params=sampling.SamplingParams.make(batch, temperature=0.0),
                seeds_B=np.zeros(batch, np.int32))
  if spec is None:
    fn = jax.jit(functools.partial(decode.generate, task.graphdef, **common))
  else:
    fn = jax.jit(functools.partial(speculative.generate, task.graphdef, draft=spec[0],
                                   num_speculative_tokens=spec[1], **common))
  length = np.full(batch, all_prompts.shape[1], np.int32)
  seconds, tokens, counts = np.zeros(2), [], collections.Counter()
  for start in range(0, all_prompts.shape[0], batch):
    wall, cpu, result = timed(fn, args.repeats, params, all_prompts[start:start + batch],
                              length)
    out, stats = (result, None) if spec is None else result
    seconds += (wall, cpu)
    tokens.append(np.asarray(out.tokens))
    counts['generated'] += int(np.asarray(out.lengths).sum())
    if stats is not None:
      for key in ('proposed', 'accepted', 'rounds'):
        counts[key] += int(np.asarray(getattr(stats, key)).sum())
  return seconds, np.concatenate(tokens), counts

if __name__ == '__main__':
  main()
