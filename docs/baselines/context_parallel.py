"""Per-device memory and step time of a long-sequence LM train step at mesh.context = 1, 2, 4,
8 (model/context_parallel.py), on fake CPU devices.

  JAX_NUM_CPU_DEVICES=8 python docs/baselines/context_parallel.py --seq_len=8192 --steps=0
  JAX_NUM_CPU_DEVICES=8 python docs/baselines/context_parallel.py --seq_len=4096 --steps=3

One row of `seq_len` tokens per step (batch 1: no data parallelism can split it), on C
devices for context = C. The memory is XLA's analysis of the compiled step (nothing is
allocated for it): each device keeps [L/C, L] attention scores per head instead of [L, L],
and L/C tokens of every other activation. The fake devices share this machine's cores, so
the step time shows the cost of the collectives and the split, not a C-fold speed-up.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import lm
from train import checkpoint, trainer
from train import mesh as mesh_lib
from train.state import setup_state
from train.tasks.lm import LMTask


def _config(seq_len: int, context: int, load_balance: bool):
  config = lm.get_config('tiny')
  config.unlock()
  config.update(batch_size=1)
  config.data.update(seq_len=seq_len, source='synthetic')
  config.model.update(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, dtype='float32',
                      context_load_balance=load_balance, remat='full', vocab_size=256)
  config.mesh.update(data=1, context=context)
  return config


def measure(seq_len: int, context: int, steps: int, load_balance: bool = True):
  """(arguments + temporaries GiB per device, seconds per step or None) of one config."""
  config = _config(seq_len, context, load_balance)
  task = LMTask(config)
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:context])
  rng, abstract, shardings, init = setup_state(task, config, mesh)
  train_step, _ = trainer.compile_step(task, shardings, mesh)
  state = checkpoint.abstract_with_shardings(abstract, shardings)
  tokens = {k: jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
            for k in ('inputs', 'targets', 'segment_ids', 'positions')}
  with jax.set_mesh(mesh):
    compiled = train_step.lower(state, tokens, {}).compile()
    stats = compiled.memory_analysis()
    gib = (stats.argument_size_in_bytes + stats.temp_size_in_bytes) / 2**30
    if not steps:
      return gib, None
    state = init(rng)
    row = np.random.default_rng(0).integers(0, 256, (1, seq_len + 1), dtype=np.int32)
    batch = trainer.global_batch(
        {'inputs': row[:, :-1], 'targets': row[:, 1:],
         'segment_ids': np.ones((1, seq_len), np.int32),
         'positions': np.arange(seq_len, dtype=np.int32)[None]},
        mesh_lib.batch_sharding(mesh))
    state, metrics = compiled(state, batch, {})  # the first step runs out of the timing
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch, {})
    jax.block_until_ready(metrics)
    return gib, (time.perf_counter() - start) / steps


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--seq_len', type=int, default=8192)
  parser.add_argument('--steps', type=int, default=0, help='timed steps; 0: memory only')
  parser.add_argument('--contexts', default='1,2,4,8')
  args = parser.parse_args()
  print(f'LM d_model 128, 2 layers, 4 heads, remat full, float32; one row of {args.seq_len} '
        f'tokens; {jax.devices()[0].platform} devices')
  print(f'{"context":>7s} {"GiB/device":>11s} {"s/step":>8s}')
  for context in (int(c) for c in args.contexts.split(',')):
    gib, seconds = measure(args.seq_len, context, args.steps)
    shown = f'{seconds:8.2f}' if seconds is not None else f'{"-":>8s}'
    print(f'{context:7d} {gib:11.3f} {shown}', flush=True)


if __name__ == '__main__':
  main()
