"""Per-device memory of the LM train step with and without frozen parameters, from the
compiled program (no step runs), on fake CPU devices.

  JAX_NUM_CPU_DEVICES=8 python docs/baselines/freeze_memory.py --preset=gpt2_124m

Frozen leaves (`optimizer.freeze`) get no gradient and no Adam moments, so the program's
arguments shrink by 8 bytes per frozen float32 parameter (two moments) and its temporaries
by the gradients it no longer computes.
"""

import argparse

import jax
import jax.numpy as jnp

from configs import lm
from train import checkpoint, trainer
from train import mesh as mesh_lib
from train.state import setup_state
from train.tasks.lm import LMTask


def compiled_step(config, batch: int, seq_len: int):
  """(task, abstract state, XLA's memory analysis, trainable parameter count) of the LM
  train step that `config` describes, FSDP over every device, compiled and never run."""
  config.unlock()
  config.update(batch_size=batch)
  config.data.seq_len = seq_len
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  task = LMTask(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, abstract, shardings, _ = setup_state(task, config, mesh)
  train_step, _ = trainer.compile_step(task, shardings, mesh)
  state = checkpoint.abstract_with_shardings(abstract, shardings)
  tokens = {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
            for k in ('inputs', 'targets', 'segment_ids', 'positions')}
  with jax.set_mesh(mesh):
    stats = train_step.lower(state, tokens, {}).compile().memory_analysis()
  trainable = sum(x.size for x, keep in zip(jax.tree.leaves(abstract.params),
                                            jax.tree.leaves(task.opt.trainable), strict=True)
                  if keep)
  return task, abstract, stats, trainable


def measure(preset: str, freeze: str, batch: int, seq_len: int) -> tuple[int, int, int]:
  config = lm.get_config(preset)
  config.unlock()
  config.optimizer.freeze = freeze
  _, _, stats, trainable = compiled_step(config, batch, seq_len)
  return stats.argument_size_in_bytes, stats.temp_size_in_bytes, trainable


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='gpt2_124m')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=128)
  args = parser.parse_args()
  print(f'{args.preset}, batch {args.batch} x {args.seq_len}, FSDP over '
        f'{jax.device_count()} devices; MiB per device')
  print(f'{"optimizer.freeze":32s} {"trainable":>12s} {"arguments":>10s} {"temporaries":>12s}')
  for freeze in ('', 'embedding', 'embedding|blocks/attn/.*', 'embedding|blocks/.*'):
    args_b, temp_b, trainable = measure(args.preset, freeze, args.batch, args.seq_len)
    print(f'{freeze or "(nothing)":32s} {trainable:12,d} {args_b / 2**20:10.1f} '
          f'{temp_b / 2**20:12.1f}')


if __name__ == '__main__':
  main()
