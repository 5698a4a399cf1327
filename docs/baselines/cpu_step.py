"""Where the `nanogpt_cpu` step's time goes on a CPU (docs/benchmarks.md, Training loop).

  python docs/baselines/cpu_step.py step --scan_unroll=-1
  python docs/baselines/cpu_step.py step --scan_unroll=1
  JAX_NUM_CPU_DEVICES=2 python docs/baselines/cpu_step.py step
  python docs/baselines/cpu_step.py plain
  python docs/baselines/cpu_step.py loop --steps=600

From the project root; `--data` defaults to ../shared/data/tinyshakespeare.txt.
`step` times Kiln's compiled train step alone (one real batch, reused), `plain` the same
setting written as one plain JAX file (GPT-2 blocks, optax AdamW, no Kiln code), and
`loop` runs the real trainer with timers around its parts: the grain iterator,
`global_batch`, the jitted call (dispatch) and the one-step-late `device_get` (waiting
for the device). Run the variants back to back; the machine's noise is larger than
some of the differences.
"""

import argparse
import collections
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import lm
from train import mesh as mesh_lib
from train import trainer
from train.state import setup_state


def nanogpt_config(data: str, steps: int = 2000, scan_unroll: int = -1):
  c = lm.get_config('nanogpt_cpu')
  c.data.path = data
  c.steps = steps
  c.model.scan_unroll = scan_unroll
  return c


def best_ms(step_fn, carry, reps: int = 6, n: int = 20) -> float:
  """Best mean time of `n` chained steps over `reps` tries; the first call compiles."""
  carry = step_fn(carry)
  jax.block_until_ready(carry)
  best = float('inf')
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(n):
      carry = step_fn(carry)
    jax.block_until_ready(carry)
    best = min(best, (time.perf_counter() - start) / n)
  return best * 1000


def kiln_step(args) -> None:
  config = nanogpt_config(args.data, scan_unroll=args.scan_unroll)
  task = trainer.validate(config, jax.device_count(), 1)
  mesh = mesh_lib.make_mesh(config.mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  with tempfile.TemporaryDirectory() as workdir:
    batch = trainer.global_batch(next(task.setup_data(workdir, 0, 1)), batch_sharding)
  rng, _, shardings, init = setup_state(task, config, mesh)
  train_step, _ = trainer.compile_step(task, shardings, mesh)
  with jax.set_mesh(mesh):
    ms = best_ms(lambda state: train_step(state, batch, {})[0], init(rng))
  print(f'kiln step, scan_unroll={args.scan_unroll}, {jax.device_count()} device(s): '
        f'{ms:.1f} ms/step')


def plain_step(args) -> None:
  del args
  vocab, seq, d, heads, layers, batch = 65, 64, 128, 4, 4, 12
  keys = iter(jax.random.split(jax.random.key(0), 6 * layers + 2))
  normal = lambda *shape: jax.random.normal(next(keys), shape) * 0.02
  params = dict(tok=normal(vocab, d), pos=normal(seq, d), norm=jnp.ones(d), blocks=[
      dict(ln1=jnp.ones(d), qkv=normal(d, 3 * d), proj=normal(d, d), ln2=jnp.ones(d),
           up=normal(d, 4 * d), down=normal(4 * d, d)) for _ in range(layers)])

  def layer_norm(x, w):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean)**2).mean(-1, keepdims=True) + 1e-5) * w

  def loss_fn(p, x, y):
    h = p['tok'][x] + p['pos'][None]
    for b in p['blocks']:
      q, k, v = (t.reshape(batch, seq, heads, d // heads)
                 for t in jnp.split(layer_norm(h, b['ln1']) @ b['qkv'], 3, -1))
      h = h + jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(h.shape) @ b['proj']
      h = h + jax.nn.gelu(layer_norm(h, b['ln2']) @ b['up']) @ b['down']
    logits = layer_norm(h, p['norm']) @ p['tok'].T
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b2=0.99, weight_decay=0.1))
  tokens = np.random.default_rng(0).integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  x, y = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])

  @jax.jit
  def step(carry):
    p, s = carry
    grads = jax.grad(loss_fn)(p, x, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  print(f'plain JAX step: {best_ms(step, (params, tx.init(params))):.1f} ms/step')


def loop_breakdown(args) -> None:
  totals = collections.Counter()

  def timed(name, fn):
    calls = [0]

    def wrapper(*a, **k):
      start = time.perf_counter()
      out = fn(*a, **k)
      calls[0] += 1
      totals[name if calls[0] > 1 else 'first calls (compile)'] += time.perf_counter() - start
      return out
    return wrapper

  compile_step = trainer.compile_step
  global_batch = trainer.global_batch
  device_get = jax.device_get
  get_task = trainer.get_task
  with tempfile.TemporaryDirectory() as workdir:
    config = nanogpt_config(args.data, steps=args.steps)
    config.eval_every = 0
    config.checkpoint.every = 10**9
    task = get_task(config)
    setup_data = task.setup_data

    def timed_data(*a):
      iterator = setup_data(*a)
      iterator.__class__ = type('Timed', (iterator.__class__,), {
          '__next__': timed('next(iterator)', iterator.__class__.__next__)})
      return iterator

    try:
      def timed_compile(*a):
        train_step, eval_step = compile_step(*a)
        return timed('jitted call (dispatch)', train_step), eval_step

      trainer.compile_step = timed_compile
      trainer.global_batch = timed('global_batch', global_batch)
      trainer.get_task = lambda c: task
      task.setup_data = timed_data
      jax.device_get = timed('device_get (waiting)', device_get)
      start = time.perf_counter()
      trainer.train_and_evaluate(config, workdir)
      total = time.perf_counter() - start
    finally:
      trainer.compile_step, trainer.global_batch, trainer.get_task, jax.device_get = (
          compile_step, global_batch, get_task, device_get)
  for name, seconds in totals.items():
    print(f'{name:24s} {seconds / args.steps * 1000:7.2f} ms/step')
  print(f'{"whole run":24s} {total / args.steps * 1000:7.2f} ms/step (compile and setup included)')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('what', choices=['step', 'plain', 'loop'])
  parser.add_argument('--data', default='../shared/data/tinyshakespeare.txt')
  parser.add_argument('--scan_unroll', type=int, default=-1)
  parser.add_argument('--steps', type=int, default=600)
  args = parser.parse_args()
  {'step': kiln_step, 'plain': plain_step, 'loop': loop_breakdown}[args.what](args)


if __name__ == '__main__':
  main()
