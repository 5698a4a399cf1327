"""CPU time per train step of the `tiny` LM: full fine-tuning against LoRA and QLoRA, in one
session (docs/benchmarks.md).

  python docs/baselines/lora_step.py
  python docs/baselines/lora_step.py --rank=8 --d_model=512 --n_layers=4

Kiln's compiled train step alone, on one random batch reused (tokens in the tiny preset's
vocabulary of 2048), best mean of 20 chained steps over 6 tries; the variants alternate
so that machine noise falls on all of them.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from cpu_step import best_ms

from configs import lm
from train import mesh as mesh_lib
from train import trainer
from train.state import setup_state
from train.tasks.lm import LMTask


def step_fn(mode: str, args):
  config = lm.get_config('tiny')
  config.model.update(vocab_size=2048, d_model=args.d_model, n_layers=args.n_layers)
  if mode != 'full':
    config.model.lora.update(rank=args.rank, base_quant='nf4' if mode == 'qlora' else 'none')
  task = LMTask(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  rng, _, shardings, init = setup_state(task, config, mesh)
  train_step, _ = trainer.compile_step(task, shardings, mesh)
  b, length = config.batch_size, config.data.seq_len
  tokens = np.random.default_rng(0).integers(0, 2048, (b, length + 1)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'segment_ids': np.ones((b, length), np.int32),
           'positions': np.broadcast_to(np.arange(length, dtype=np.int32), (b, length))}
  batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()},
                         mesh_lib.batch_sharding(mesh))
  trainable = sum(x.size for x, keep in zip(
      jax.tree.leaves(jax.eval_shape(task.init_state, rng).params),
      jax.tree.leaves(task.opt.trainable), strict=True) if keep)
  return mesh, lambda state: train_step(state, batch, {})[0], lambda: init(rng), trainable


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rank', type=int, default=8)
  parser.add_argument('--d_model', type=int, default=128)
  parser.add_argument('--n_layers', type=int, default=4)
  parser.add_argument('--rounds', type=int, default=2)
  args = parser.parse_args()
  modes = ('full', 'lora', 'qlora')
  setups = {m: step_fn(m, args) for m in modes}
  best = dict.fromkeys(modes, float('inf'))
  for _ in range(args.rounds):
    for m in modes:
      mesh, fn, make_state, _ = setups[m]
      with jax.set_mesh(mesh):  # a fresh state: the step donates the one it is given
        best[m] = min(best[m], best_ms(fn, make_state()))
  print(f'tiny LM (d_model {args.d_model}, {args.n_layers} layers), batch 16 x 128, '
        f'{jax.device_count()} CPU device(s), LoRA rank {args.rank} on every projection')
  for m in modes:
    print(f'{m:6s} trainable {setups[m][3]:10,d}  {best[m]:7.1f} ms/step')


if __name__ == '__main__':
  main()
