"""Weight-only quantization against fp32 and bf16 on a small trained stdlib LM: weight memory,
decode tokens per second and held-out perplexity (docs/benchmarks.md, Quantized serving).

  python -m train --config=configs/lm.py --workdir=/tmp/quant_base --config.steps=600
  python docs/baselines/quant_bench.py --workdir=/tmp/quant_base

From the project root. Every variant is built from the run's newest checkpoint in one
session (model/quant.py's conversion, as `python -m serve --quant` does at load):
- fp32: the checkpoint as trained (float32 weights and compute);
- bf16: weights and compute in bfloat16;
- int8 (per output channel), int4 (groups of 128), nf4 (blocks of 64, int8 block scales;
  QLoRA's storage, for reference): projection weights stored quantized and dequantized
  layer by layer inside the scan, compute in --quant_dtype (float32 by default, so the
  perplexity column shows the weights' rounding alone).
Weight memory: bytes of the projection weights (wq wk wv wo w_gate w_up w_down, lm_head when
untied) with their scales, and of every parameter. Decode: `model.decode.generate`, --batch
prompts of --prompt_tokens tokens from validation documents, --new_tokens new tokens each,
greedy and without stop tokens, compiled once and then timed --repeats times, the variants
interleaved within each repeat so a busy machine slows them alike; the median is reported
(tokens/s of wall time, and per CPU-second of this process, the steadier on a shared
machine). Perplexity: the run's own validation windows (its `eval_steps` batches, as
training's evaluation reads them). `same tokens` is the fraction of decoded tokens equal to
fp32's at the same position.
"""

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import lm_pipeline, sources
from data.errors import ConfigError
from model import decode, quant, sampling, scoring, transformer
from train import runs

VARIANTS = ('fp32', 'bf16', 'int8', 'int4', 'nf4')


def variant(name: str, cfg: transformer.TransformerConfig, params: dict, quant_dtype):
  """(config, parameters) of one variant, from the float32 checkpoint."""
  if name == 'fp32':
    return cfg, params
  if name == 'bf16':
    bf16 = jnp.dtype('bfloat16')
    cast = jax.jit(lambda p: jax.tree.map(
        lambda x: x.astype(bf16) if jnp.issubdtype(x.dtype, jnp.floating) else x, p))
    return dataclasses.replace(cfg, dtype=bf16, param_dtype=bf16), cast(params)
  cfg_q = dataclasses.replace(cfg, quant=name, quant_group=0, dtype=quant_dtype)
  return cfg_q, jax.jit(quant.quantize_params, static_argnums=1)(params, cfg_q.quant_scheme)


def projection_bytes(params: dict) -> int:
  """Bytes of the projection weights and of what each stores beside it (scales)."""
  stored = {name + suffix for name in quant.CONTRACTION_AXES
            for suffix in quant.Scheme('nf4').suffixes()}  # every suffix any mode stores

  def is_projection(key: str) -> bool:
    return key in stored
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return quant.weight_bytes([x for path, x in leaves if is_projection(path[-1].key)])


def prompts(task, rows: int, length: int, skip: int = 64) -> np.ndarray:
  """`rows` windows of `length` tokens, each from its own validation document (past its
  first `skip` tokens: license headers repeat across the stdlib)."""
  out = []
  for doc in sources.read_documents(task.config.data, 'validation'):
    ids = task.tokenizer.encode(doc)
    if len(ids) >= skip + length:
      out.append(ids[skip:skip + length])
    if len(out) == rows:
      return np.array(out, np.int32)
  raise ConfigError(f'The validation split has fewer than {rows} documents of '
                    f'{skip + length} tokens.')


def perplexity(graphdef, params, batches) -> float:
  """exp(mean next-token NLL) over the validation windows, as the LM task's eval sums it."""
  @jax.jit
  def nll_sum(params, batch):
    model = nnx.merge(graphdef, params)
    logits = model(batch['inputs'], positions_BxL=batch['positions'],
                   segment_ids_BxL=batch['segment_ids'])
    return jnp.sum(scoring.token_nll(logits, batch['targets']))
  total = sum(float(nll_sum(params, b)) for b in batches)
  return float(np.exp(total / sum(b['targets'].size for b in batches)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a trained Kiln LM run')
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--prompt_tokens', type=int, default=16)
  parser.add_argument('--new_tokens', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--quant_dtype', default='float32', help='compute dtype of int8/int4/nf4')
  args = parser.parse_args()

  task, state, step = runs.load_latest(args.workdir)
  cfg, params = task.model_cfg, state.params
  if cfg != cfg.base():
    raise ConfigError(f'{args.workdir} has adapters or quantized weights; give a plain run.')
  config = task.config
  data = lm_pipeline.build_lm_data(config.data, seed=config.seed,
                                   global_batch_size=config.batch_size,
                                   eval_steps=max(config.eval_steps, 1), workdir=args.workdir,
                                   process_index=0, process_count=1)
  batches = list(data.eval_batches())
  batch_prompts = prompts(task, args.batch, args.prompt_tokens)
  length_B = np.full(args.batch, args.prompt_tokens, np.int32)
  names = args.variants.split(',')
  print(f'{args.workdir} (step {step}): d_model {cfg.d_model}, {cfg.n_layers} layers, '
        f'vocab {cfg.vocab_size}, tied embeddings {cfg.tie_embeddings}; '
        f'{jax.devices()[0].platform}, {jax.device_count()} device(s). Decode: batch '
        f'{args.batch}, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, '
        f'greedy; perplexity over {sum(b["targets"].size for b in batches)} validation tokens.')

  models, fns, results = {}, {}, {}
  for name in names:
    cfg_v, params_v = variant(name, cfg, params, jnp.dtype(args.quant_dtype))
    graphdef = transformer.graphdef(cfg_v)
    models[name] = (graphdef, params_v)
    fns[name] = jax.jit(functools.partial(
        decode.generate, graphdef, max_new_tokens=args.new_tokens,
        sampling_params=sampling.SamplingParams.make(args.batch, temperature=0.0),
        seeds_B=np.zeros(args.batch, np.int32), vocab_limit=task.tokenizer.vocab_size))
    out = jax.block_until_ready(fns[name](params_v, batch_prompts, length_B))  # compiles
    results[name] = dict(tokens=np.asarray(out.tokens), wall=[], cpu=[],
                         ppl=perplexity(graphdef, params_v, batches))
  # The fp32 perplexity is the one training's evaluation reports (the task's own eval_step).
  eval_step = jax.jit(lambda st, b: task.eval_step(st, b, None))
  sums = [eval_step(state, b) for b in batches]
  want = float(np.exp(sum(float(s['nll_sum']) for s in sums) / sum(float(s['tokens'])
                                                                    for s in sums)))
  if 'fp32' in results and not np.isclose(results['fp32']['ppl'], want, rtol=1e-4):
    raise AssertionError(f'fp32 perplexity {results["fp32"]["ppl"]} != the eval path\'s {want}')
  for _ in range(args.repeats):
    for name in names:
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fns[name](models[name][1], batch_prompts, length_B))
      results[name]['wall'].append(time.perf_counter() - start)
      results[name]['cpu'].append(time.process_time() - start_cpu)

  generated = args.batch * args.new_tokens
  ref = results[names[0]]
  print(f'\n{"weights":<8} {"proj MiB":>9} {"total MiB":>10} {"tokens/s":>9} {"tok/cpu-s":>10} '
        f'{"perplexity":>10} {"same tokens":>11}  (vs {names[0]})')
  for name in names:
    r, params_v = results[name], models[name][1]
    same = float(np.mean(r['tokens'] == ref['tokens']))
    print(f'{name:<8} {projection_bytes(params_v) / 2**20:>9.3f} '
          f'{quant.weight_bytes(params_v) / 2**20:>10.3f} '
          f'{generated / np.median(r["wall"]):>9.1f} {generated / np.median(r["cpu"]):>10.1f} '
          f'{r["ppl"]:>10.3f} {same:>11.3f}', flush=True)


if __name__ == '__main__':
  main()
