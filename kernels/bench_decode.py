"""Decode speed: the paged attention kernel against the jnp gather path, and whole
generations of a llama_1b-shaped model.

  python -m kernels.bench_decode                  # one H100/H200, a few minutes; writes docs
  python -m kernels.bench_decode --smoke --nowrite  # tiny sizes: checks the bench runs (CPU)

(a) Attention. One layer's decode step (one query per row) over a paged cache with
    llama_1b's heads (32 query heads, 8 key/value heads, head dim 64) in bf16, pages of
    --page_size slots in a shuffled pool, every row at the full context: the kernel
    (kernels/paged_attention.py, what kv_cache.attend runs under 'pallas') against the
    gather path (kv_cache.gather_attend, 'xla'), for every --batches x --contexts. GB/s
    counts the keys and values read once; the error is the kernel's largest difference
    from the gather path, relative to the gather path's largest output.
(b) Generation. configs/lm.py:llama_1b's model with random bf16 weights, greedy through
    model/decode.generate (the jitted while loop) from a --prompt_len prompt to
    --new_tokens tokens, per batch size and attention implementation. The prefill (the
    prompt's pass, which takes the gather path under both; time to first token) and one
    decode step after it (the forward pass of one token per row, on a cache it cannot
    update in place, so it also copies the cache) are timed on their own; tokens/s counts
    the generated tokens of the whole generation, prefill included.

Results go to stdout and, under "## Decoding on accelerators" in docs/benchmarks.md, to a subsection
named for the device. On CPU the kernel runs interpreted: those numbers only check that
the bench runs.
"""

import dataclasses
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from configs import lm as lm_config
from kernels import bench, paged_attention
from model import decode, kv_cache, sampling, transformer

SECTION = '## Decoding on accelerators'
IMPLS = ('pallas', 'xla')
# Smoke sizes: every code path at a size that runs interpreted on CPU in seconds.
SMOKE = dict(batches=[1, 2], contexts=[64, 128], heads=4, kv_heads=2, head_dim=16,
             page_size=16, prompt_len=16, new_tokens=4,
             model=dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                        mlp_dim=128, vocab_size=512))


@dataclasses.dataclass
class AttentionRow:
  impl: str
  batch: int
  context: int
  ms: float | None
  gb_per_s: float | None
  max_err: float | None
  note: str = ''


@dataclasses.dataclass
class GenerateRow:
  impl: str
  batch: int
  prefill_ms: float | None
  step_ms: float | None
  total_ms: float | None
  new_tokens: int
  note: str = ''

  @property
  def tokens_per_s(self) -> float | None:
    if self.total_ms is None:
      return None
    return self.batch * self.new_tokens / (self.total_ms * 1e-3)


def _attention_inputs(batch, context, heads, kv_heads, head_dim, page_size, dtype, seed=0):
  """q [B, 1, H, Dh], pages [K, G, S, Dh] with G = B * P shuffled over rows, positions at
  the last slot of each row's context, and the page table."""
  rng = np.random.default_rng(seed)
  pages_per_row = math.ceil(context / page_size)
  pool = batch * pages_per_row
  k = jax.random.normal(jax.random.key(seed), (kv_heads, pool, page_size, head_dim), dtype)
  v = jax.random.normal(jax.random.key(seed + 1), (kv_heads, pool, page_size, head_dim), dtype)
  q = jnp.asarray(rng.normal(size=(batch, 1, heads, head_dim)), dtype)
  table = jnp.asarray(rng.permutation(pool).reshape(batch, pages_per_row), jnp.int32)
  positions = jnp.full((batch, 1), context - 1, jnp.int32)
  return q, k, v, positions, table


def bench_attention(batch, context, impls, *, heads, kv_heads, head_dim, page_size, dtype,
                    repeats, iters) -> list[AttentionRow]:
  q, k, v, positions, table = _attention_inputs(batch, context, heads, kv_heads, head_dim,
                                                page_size, dtype)
  calls = {'pallas': jax.jit(paged_attention.paged_attention),
           'xla': jax.jit(kv_cache.gather_attend)}
  kv_bytes = 2 * batch * context * kv_heads * head_dim * jnp.dtype(dtype).itemsize
  outputs, rows = {}, []
  for impl in ('xla', *[i for i in impls if i != 'xla']):  # the gather path first: the check
    reason = paged_attention.unsupported(head_dim, dtype) if impl == 'pallas' else None
    if reason is not None:
      rows.append(AttentionRow(impl, batch, context, None, None, None, reason))
      continue
    call = calls[impl]
    try:
      outputs[impl] = np.asarray(call(q, k, v, positions, table), np.float32)
      ms = bench.time_ms(lambda c=call: c(q, k, v, positions, table), repeats, iters)
    except jax.errors.JaxRuntimeError as e:  # out of memory is a result; the bench goes on
      if not bench._is_oom(e):
        raise
      rows.append(AttentionRow(impl, batch, context, None, None, None, 'out of memory'))
      continue
    err = None
    if 'xla' in outputs:
      want = outputs['xla']
      err = float(np.max(np.abs(outputs[impl] - want)) / np.max(np.abs(want)))
    rows.append(AttentionRow(impl, batch, context, ms, kv_bytes / (ms * 1e-3) / 1e9, err))
  return [r for r in rows if r.impl in impls]


def model_config(smoke: bool):
  """configs/lm.py:llama_1b's model in bf16 (smoke: a tiny one of the same kind)."""
  cfg = lm_config.get_config('llama_1b').model
  cfg.update(dtype='bfloat16', param_dtype='bfloat16', remat='none')
  if smoke:
    cfg.update(**SMOKE['model'])
  return cfg


def models(cfg, impls: Sequence[str]) -> dict[str, tuple[nnx.GraphDef, dict]]:
  """(graphdef, params) per attention implementation: one set of random weights, made on
  the device without an init graph, shared by every implementation."""
  out, params = {}, None
  for impl in impls:
    impl_cfg = cfg.copy_and_resolve_references()
    impl_cfg.attention = impl
    model_cfg = transformer.TransformerConfig.from_config(impl_cfg, int(cfg.vocab_size))
    with nnx.use_eager_sharding(False):
      model = nnx.eval_shape(
          lambda c=model_cfg: transformer.Transformer(c, rngs=nnx.Rngs(params=0)))
    graphdef, abstract = nnx.split(model, nnx.Param)
    if params is None:
      leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(abstract))
      keys = jax.random.split(jax.random.key(0), len(leaves))
      params = jax.tree.unflatten(treedef, [
          0.02 * jax.random.normal(key, x.shape, x.dtype)
          for key, x in zip(keys, leaves, strict=True)])
    out[impl] = graphdef, params
  return out


def bench_generate(models_by_impl, batch: int, *, vocab: int, prompt_len: int,
                   new_tokens: int, page_size: int, repeats: int) -> list[GenerateRow]:
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(0, vocab, (batch, prompt_len)), jnp.int32)
  lengths = jnp.full((batch,), prompt_len, jnp.int32)
  greedy = jax.tree.map(jnp.asarray, sampling.SamplingParams.make(batch, temperature=0.0))
  seeds = jnp.zeros((batch,), jnp.int32)
  rows, prefill_ms = [], None
  for impl, (graphdef, params) in models_by_impl.items():

    @jax.jit
    def generate(params, prompt, graphdef=graphdef):
      return decode.generate(graphdef, params, prompt, lengths, max_new_tokens=new_tokens,
                             sampling_params=greedy, seeds_B=seeds, page_size=page_size).tokens

    @jax.jit
    def prefill(params, prompt, graphdef=graphdef):
      """generate's prompt pass alone: the cache written, the next token chosen."""
      m = nnx.merge(graphdef, params).cfg
      total = prompt_len + new_tokens
      size = min(page_size, total)
      cache = kv_cache.init_cache(m.n_layers, m.n_kv_heads, m.head_dim,
                                  num_pages=batch * math.ceil(total / size), page_size=size,
                                  dtype=m.dtype)
      positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), prompt.shape)
      logits, cache = decode.forward(graphdef, params, prompt, positions, cache)
      return logits[:, -1].argmax(-1).astype(jnp.int32), cache

    @jax.jit
    def step(params, token, cache, graphdef=graphdef):
      """One decode step after the prompt: the next token's logits."""
      positions = jnp.full((batch, 1), prompt_len, jnp.int32)
      return decode.forward(graphdef, params, token[:, None], positions, cache)[0]

    try:
      if prefill_ms is None:  # the prompt's pass is the gather path under every impl
        prefill_ms = bench.time_ms(lambda f=prefill, p=params: f(p, prompt), repeats, 1)
      token, cache = prefill(params, prompt)
      step_ms = bench.time_ms(lambda f=step, p=params, t=token, c=cache: f(p, t, c),
                              repeats, 1)
      total_ms = bench.time_ms(lambda f=generate, p=params: f(p, prompt), repeats, 1)
    except jax.errors.JaxRuntimeError as e:
      if not bench._is_oom(e):
        raise
      rows.append(GenerateRow(impl, batch, None, None, None, new_tokens, 'out of memory'))
      continue
    rows.append(GenerateRow(impl, batch, prefill_ms, step_ms, total_ms, new_tokens))
  return rows


def _fmt(x: float | None) -> str:
  return '-' if x is None else f'{x:.4g}'


def attention_table(rows: Sequence[AttentionRow], heads, kv_heads, head_dim, page_size) -> str:
  lines = [f'Decode attention, one layer, one query per row; {heads}/{kv_heads} heads, '
           f'head dim {head_dim}, pages of {page_size}.', '',
           '| impl | batch | context | ms | KV GB/s | max rel err vs xla | note |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    err = '-' if r.max_err is None else f'{r.max_err:.1e}'
    lines.append(f'| {r.impl} | {r.batch} | {r.context} | {_fmt(r.ms)} | {_fmt(r.gb_per_s)} '
                 f'| {err} | {r.note} |')
  return '\n'.join(lines)


def generate_table(rows: Sequence[GenerateRow], prompt_len: int, new_tokens: int) -> str:
  lines = [f'Greedy generation, prompt {prompt_len}, {new_tokens} new tokens.', '',
           '| attention | batch | prefill ms | step ms | generation ms | tokens/s | note |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r.impl} | {r.batch} | {_fmt(r.prefill_ms)} | {_fmt(r.step_ms)} '
                 f'| {_fmt(r.total_ms)} | {_fmt(r.tokens_per_s)} | {r.note} |')
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  impls = list(f.impls)
  if unknown := sorted(set(impls) - set(IMPLS)):
    raise app.UsageError(f'Unknown --impls {unknown}; choose from {", ".join(IMPLS)}.')
  sizes = dict(batches=[int(x) for x in f.batches], contexts=[int(x) for x in f.contexts],
               heads=32, kv_heads=8, head_dim=64, page_size=f.page_size,
               prompt_len=f.prompt_len, new_tokens=f.new_tokens)
  if f.smoke:
    sizes.update({k: v for k, v in SMOKE.items() if k != 'model'})
  device = jax.devices()[0].device_kind
  if jax.default_backend() == 'cpu':
    print('Note: on CPU the kernel runs in interpret mode; these numbers only check that the '
          'bench runs.')
  dtype = jnp.dtype(f.dtype)
  head = dict(heads=sizes['heads'], kv_heads=sizes['kv_heads'], head_dim=sizes['head_dim'],
              page_size=sizes['page_size'])
  attention_rows = []
  for batch in sizes['batches']:
    for context in sizes['contexts']:
      new = bench_attention(batch, context, impls, **head, dtype=dtype, repeats=f.repeats,
                            iters=f.iters)
      for r in new:
        print(attention_table([r], **head).splitlines()[-1], flush=True)
      attention_rows.extend(new)
  cfg = model_config(f.smoke)
  models_by_impl = models(cfg, impls)
  generate_rows = []
  for batch in sizes['batches'] if f.smoke else [int(x) for x in f.generate_batches]:
    new = bench_generate(models_by_impl, batch, vocab=int(cfg.vocab_size),
                         prompt_len=sizes['prompt_len'], new_tokens=sizes['new_tokens'],
                         page_size=sizes['page_size'], repeats=f.generate_repeats)
    for r in new:
      print(generate_table([r], sizes['prompt_len'], sizes['new_tokens']).splitlines()[-1],
            flush=True)
    generate_rows.extend(new)
  shape = ('smoke model' if f.smoke else 'llama_1b') + (
      f' ({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads}/{cfg.n_kv_heads} heads, '
      f'head dim {cfg.head_dim}, vocab {cfg.vocab_size}), random bf16 weights')
  body = '\n\n'.join([
      attention_table(attention_rows, **head),
      f'{shape}. ' + generate_table(generate_rows, sizes['prompt_len'], sizes['new_tokens'])])
  print(f'\n{device}\n{body}')
  if f.write:
    bench.write_section(f.output, device, 'python -m kernels.bench_decode ' + ' '.join(
        sys.argv[1:]), body, section=SECTION, program='kernels.bench_decode')
    print(f'Wrote {f.output}.')


def _define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program."""
  flags.DEFINE_bool('smoke', False, 'Tiny sizes (a tiny model too): checks the bench runs.')
  flags.DEFINE_list('batches', ['1', '8', '32', '128'], 'Rows per attention call.')
  flags.DEFINE_list('contexts', ['512', '2048', '8192'], 'Cached positions per row.')
  flags.DEFINE_list('generate_batches', ['1', '8', '32', '128'], 'Rows per generation.')
  flags.DEFINE_list('impls', list(IMPLS), 'pallas (the kernel) and/or xla (the gather path).')
  flags.DEFINE_integer('page_size', 64, 'KV cache page size.')
  flags.DEFINE_integer('prompt_len', 128, 'Prompt length of each generation.')
  flags.DEFINE_integer('new_tokens', 128, 'Tokens generated per row.')
  flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float16', 'float32'],
                    'Query and cache dtype of the attention part.')
  flags.DEFINE_integer('repeats', 5, 'Timed attention repeats; the median is reported.')
  flags.DEFINE_integer('iters', 10, 'Attention calls per timed repeat.')
  flags.DEFINE_integer('generate_repeats', 3, 'Timed generations per row; the median.')
  flags.DEFINE_bool('write', True, 'Write the tables into --output.')
  flags.DEFINE_string('output', 'docs/benchmarks.md', 'Markdown file to update.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
