"""Speculative decoding against plain decoding, greedy, on held-out stdlib code
(docs/benchmarks.md, Speculative decoding).

  python -m train --config=configs/lm.py --workdir=/tmp/spec_bench/target
  mkdir -p /tmp/spec_bench/draft && cp -r /tmp/spec_bench/target/tokenizer /tmp/spec_bench/draft/
  python -m train --config=configs/lm.py --workdir=/tmp/spec_bench/draft \\
    --config.model.n_layers=1 --config.model.d_model=64
  python docs/baselines/speculative_bench.py --target=/tmp/spec_bench/target \\
    --draft=/tmp/spec_bench/draft

From the project root. The target is the `tiny` LM (4 layers, d_model 128), the draft a
1-layer, d_model 64 LM trained the same way with the target's tokenizer (a run reuses a
tokenizer already in its workdir). Prompts are windows of the validation split's
documents (held out from training). Every method decodes the same prompts greedily in one
session, each compiled once and then timed best of `--repeats`, and the script checks that
each gives plain decoding's tokens. tokens/s counts generated tokens; acceptance is
accepted / proposed draft tokens; tokens/call is generated tokens per target call.
"""

import argparse
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
  """(best seconds of `repeats` calls after a compiling one, the last result)."""
  result = jax.block_until_ready(fn(*args, **kwargs))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args, **kwargs))
    best = min(best, time.perf_counter() - start)
  return best, result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--target', required=True, help='the target LM run directory')
  parser.add_argument('--draft', default='', help='a draft LM run with the same tokenizer')
  parser.add_argument('--batch', default='1,8', help='rows per call, comma-separated')
  parser.add_argument('--prompt_tokens', type=int, default=128)
  parser.add_argument('--new_tokens', type=int, default=128)
  parser.add_argument('--lookup_k', default='2,3,4,6,8')
  parser.add_argument('--draft_k', default='2,3,4')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  task, state, step = runs.load_latest(args.target)
  vocab_limit = task.tokenizer.vocab_size
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

  all_prompts = prompts(task, max(map(int, args.batch.split(','))), args.prompt_tokens)
  for batch in map(int, args.batch.split(',')):
    prompt = all_prompts[:batch]
    length = np.full(batch, args.prompt_tokens, np.int32)
    common = dict(max_new_tokens=args.new_tokens, vocab_limit=vocab_limit,
                  sampling_params=sampling.SamplingParams.make(batch, temperature=0.0),
                  seeds_B=np.zeros(batch, np.int32))
    print(f'\nbatch {batch}\n{"method":<14} {"tokens/s":>9} {"speedup":>8} '
          f'{"acceptance":>10} {"tokens/call":>11} {"same tokens":>11}')
    base_rate, want = None, None
    for name, spec in methods.items():
      if spec is None:
        fn = jax.jit(functools.partial(decode.generate, task.graphdef, **common))
        seconds, out = timed(fn, args.repeats, state.params, prompt, length)
        stats = None
      else:
        fn = jax.jit(functools.partial(speculative.generate, task.graphdef,
                                       num_speculative_tokens=spec[1], **common))
        seconds, (out, stats) = timed(fn, args.repeats, state.params, prompt, length,
                                      draft=spec[0])
      tokens = np.asarray(out.tokens)
      rate = int(np.asarray(out.lengths).sum()) / seconds
      if want is None:
        base_rate, want = rate, tokens
      same = f'{int((tokens == want).all(axis=1).sum())}/{batch}'
      accept = per_call = ''
      if stats is not None:
        accept = f'{int(stats.accepted.sum()) / max(int(stats.proposed.sum()), 1):.2f}'
        per_call = f'{int(np.asarray(out.lengths).sum()) / int(stats.rounds.sum()):.2f}'
      print(f'{name:<14} {rate:>9.1f} {rate / base_rate:>7.2f}x {accept:>10} '
            f'{per_call:>11} {same:>11}', flush=True)


if __name__ == '__main__':
  main()
