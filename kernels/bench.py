"""Attention speed: the Pallas kernels against XLA and cuDNN on the same inputs.

  python -m kernels.bench                       # the full table, written to docs/benchmarks.md
  python -m kernels.bench --seq_lens=512,1024 --impls=pallas,xla --nowrite

For every sequence length, head dim, causal or not, and grouped-query or not,
each implementation `config.model.attention` can select (model/attention.py)
runs the forward and the forward plus backward. Shapes follow the
FlashAttention papers: B * L = --tokens, H * D = --hidden, bf16; GQA has
H / --gqa_ratio key/value heads. FLOPs count the two matmuls of the forward
(4 * B * H * L * S * D) and 2.5 times that for the backward; causal counts
half. Each forward output is also checked against XLA's (when XLA fits in
memory), so a fast wrong kernel cannot pass as a result.

The table goes to stdout and, under "## Attention kernels" in
docs/benchmarks.md, to a subsection named for the device (rerunning on the
same device replaces it). On CPU the Pallas kernels run interpreted: the
numbers there check the bench, not the kernels' speed.
"""

import dataclasses
import datetime
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from model import attention as attention_lib

IMPLS = ('pallas', 'xla', 'cudnn')
SECTION = '## Attention kernels'


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  seq_len: int
  heads: int
  kv_heads: int
  head_dim: int
  causal: bool

  def forward_flops(self) -> float:
    flops = 4.0 * self.batch * self.heads * self.seq_len * self.seq_len * self.head_dim
    return flops / 2 if self.causal else flops


@dataclasses.dataclass
class Row:
  impl: str
  shape: Shape
  fwd_ms: float | None  # None: not run (see note)
  fwd_bwd_ms: float | None
  max_err: float | None  # forward, relative to XLA's output
  note: str = ''

  def tflops(self, ms: float | None, factor: float) -> float | None:
    return None if ms is None else factor * self.shape.forward_flops() / (ms * 1e-3) / 1e12


def shapes(seq_lens: Sequence[int], head_dims: Sequence[int], causal: Sequence[bool],
           gqa: Sequence[bool], tokens: int, hidden: int, gqa_ratio: int) -> list[Shape]:
  out = []
  for seq_len in seq_lens:
    for d in head_dims:
      heads = hidden // d
      for is_causal in causal:
        for grouped in gqa:
          kv_heads = max(heads // gqa_ratio, 1) if grouped else heads
          out.append(Shape(max(tokens // seq_len, 1), seq_len, heads, kv_heads, d, is_causal))
  return out


def time_ms(fn: Callable[[], object], repeats: int, iters: int) -> float:
  """Median milliseconds per call, after one warm-up call (which compiles)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      result = fn()
    jax.block_until_ready(result)
    times.append((time.perf_counter() - start) / iters * 1e3)
  return statistics.median(times)


def _skip_reason(impl: str) -> str | None:
  if impl == 'cudnn' and jax.default_backend() != 'gpu':
    return 'needs an NVIDIA GPU'
  return None


def _is_oom(error: Exception) -> bool:
  return 'RESOURCE_EXHAUSTED' in str(error) or 'out of memory' in str(error).lower()


def bench_shape(shape: Shape, impls: Sequence[str], dtype, repeats: int, iters: int) -> list[Row]:
  """Times every implementation on one set of random inputs."""
  rng = np.random.default_rng(0)
  b, length, h, kv, d = shape.batch, shape.seq_len, shape.heads, shape.kv_heads, shape.head_dim
  q = jnp.asarray(rng.normal(size=(b, length, h, d)), dtype)
  k = jnp.asarray(rng.normal(size=(b, length, kv, d)), dtype)
  v = jnp.asarray(rng.normal(size=(b, length, kv, d)), dtype)
  do = jnp.asarray(rng.normal(size=(b, length, h, d)), dtype)

  outputs, rows = {}, []
  for impl in ('xla', *[i for i in impls if i != 'xla']):  # XLA first: the others' check
    if (reason := _skip_reason(impl)) is not None:
      rows.append(Row(impl, shape, None, None, None, reason))
      continue

    def attend(q, k, v, impl=impl):
      return attention_lib.attention(q, k, v, causal=shape.causal, implementation=impl)

    forward = jax.jit(attend)
    grads = jax.jit(jax.grad(lambda q, k, v, a=attend: jnp.sum((a(q, k, v) * do).astype(
        jnp.float32)), argnums=(0, 1, 2)))
    try:
      outputs[impl] = np.asarray(forward(q, k, v), np.float32)
      fwd = time_ms(lambda f=forward: f(q, k, v), repeats, iters)
      fwd_bwd = time_ms(lambda g=grads: g(q, k, v), repeats, iters)
    except jax.errors.JaxRuntimeError as e:  # out of memory is a result; the bench goes on
      if not _is_oom(e):
        raise
      rows.append(Row(impl, shape, None, None, None, 'out of memory'))
      continue
    err = None
    if 'xla' in outputs:
      want = outputs['xla']
      err = float(np.max(np.abs(outputs[impl] - want)) / np.max(np.abs(want)))
    rows.append(Row(impl, shape, fwd, fwd_bwd, err))
  return [r for r in rows if r.impl in impls]


def _fmt(x: float | None) -> str:
  return '-' if x is None else f'{x:.4g}'


def table(rows: Sequence[Row]) -> str:
  lines = ['| impl | L | D | causal | heads q/kv | batch | fwd ms | fwd TFLOP/s | fwd+bwd ms '
           '| fwd+bwd TFLOP/s | max rel err vs xla | note |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    s = r.shape
    err = '-' if r.max_err is None else f'{r.max_err:.1e}'
    lines.append(
        f'| {r.impl} | {s.seq_len} | {s.head_dim} | {"yes" if s.causal else "no"} '
        f'| {s.heads}/{s.kv_heads} | {s.batch} | {_fmt(r.fwd_ms)} '
        f'| {_fmt(r.tflops(r.fwd_ms, 1.0))} | {_fmt(r.fwd_bwd_ms)} '
        f'| {_fmt(r.tflops(r.fwd_bwd_ms, 3.5))} | {err} | {r.note} |')
  return '\n'.join(lines)


def write_section(path: str, device: str, command: str, body: str, *, section: str = SECTION,
                  program: str = 'kernels.bench') -> None:
  """Puts `body` under '### `python -m <program>` on <device>' in `section` (a '## ' heading,
  added at the end if missing), replacing that device's last."""
  with open(path) as f:
    text = f.read()
  if section not in text:
    text = text.rstrip('\n') + f'\n\n{section}\n'
  start = text.index(section) + len(section)
  nxt = text.find('\n## ', start)
  end = len(text) if nxt == -1 else nxt + 1
  part = text[start:end]
  heading = f'### `python -m {program}` on {device}'
  block = (f'{heading}\n\n{datetime.date.today().isoformat()}, jax {jax.__version__}. '
           f'Command:\n\n```bash\n{command}\n```\n\n{body}\n')
  pattern = re.compile(re.escape(heading) + r'\n.*?(?=\n### |\Z)', re.S)
  if pattern.search(part):
    part = pattern.sub(lambda _: block, part)
  else:
    part = part.rstrip('\n') + '\n\n' + block
  rest = text[end:].lstrip('\n')
  with open(path, 'w') as f:
    f.write(text[:start] + '\n\n' + part.strip('\n') + '\n' + ('\n' + rest if rest else ''))


def _bools(values: Sequence[str]) -> list[bool]:
  allowed = {'true': True, 'false': False}
  for value in values:
    if value.lower() not in allowed:
      raise app.UsageError(f'{value!r} is not true or false.')
  return [allowed[v.lower()] for v in values]


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  impls = list(f.impls)
  if unknown := sorted(set(impls) - set(IMPLS)):
    raise app.UsageError(f'Unknown --impls {unknown}; choose from {", ".join(IMPLS)}.')
  device = jax.devices()[0].device_kind
  if jax.default_backend() == 'cpu':
    print('Note: on CPU the Pallas kernels run in interpret mode; these numbers only check that '
          'the bench runs.')
  rows = []
  for shape in shapes([int(x) for x in f.seq_lens], [int(x) for x in f.head_dims],
                      _bools(f.causal), _bools(f.gqa), f.tokens, f.hidden, f.gqa_ratio):
    new = bench_shape(shape, impls, jnp.dtype(f.dtype), f.repeats, f.iters)
    for r in new:
      print(table([r]).splitlines()[-1], flush=True)
    rows.extend(new)
  body = table(rows)
  print(f'\n{device}\n{body}')
  if f.write:
    write_section(f.output, device, 'python -m kernels.bench ' + ' '.join(sys.argv[1:]), body)
    print(f'Wrote {f.output}.')


def _define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program, so that
  importing its functions never clashes with another program's flags."""
  flags.DEFINE_list('seq_lens', ['512', '1024', '2048', '4096', '8192', '16384'],
                    'Sequence lengths (queries = keys).')
  flags.DEFINE_list('head_dims', ['64', '128'], 'Head dims.')
  flags.DEFINE_list('impls', list(IMPLS), 'Implementations to time.')
  flags.DEFINE_list('causal', ['false', 'true'], 'Causal settings to time.')
  flags.DEFINE_list('gqa', ['false', 'true'], 'Grouped-query settings to time.')
  flags.DEFINE_integer('tokens', 16384, 'Batch size times sequence length.')
  flags.DEFINE_integer('hidden', 2048, 'Query heads times head dim.')
  flags.DEFINE_integer('gqa_ratio', 4, 'Query heads per key/value head with --gqa.')
  flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float16', 'float32'], 'Inputs.')
  flags.DEFINE_integer('repeats', 5, 'Timed repeats; the median is reported.')
  flags.DEFINE_integer('iters', 10, 'Calls per timed repeat.')
  flags.DEFINE_bool('write', True, 'Write the table into --output.')
  flags.DEFINE_string('output', 'docs/benchmarks.md', 'Markdown file to update.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
