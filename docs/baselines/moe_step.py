"""Train step time of a mixture-of-experts LM against a dense LM with the same ACTIVE
parameters, and the FLOPs and MFU they are credited with (docs/benchmarks.md).

  python docs/baselines/moe_step.py                      # moe_cpu (tiny, 8 experts top 2)
  python docs/baselines/moe_step.py --capacity_factors=0,1.25
  # One GPU: Mixtral-8x7B's layers, 2 of them, one device (no expert axis).
  python docs/baselines/moe_step.py --preset=mixtral_8x7b --n_layers=2 --batch=4 \\
      --seq_len=4096 --rounds=1

The dense twin is the same preset with model.moe.n_experts=0 and
mlp_dim = top_k * expert_mlp_dim + shared_mlp_dim: each token's MLP matmuls are the same
size, so it differs from the MoE in the router and in how tokens reach their weights
(sorting, grouped matmuls) alone, and both process the same tokens per step.

FLOPs per token are train_flops_per_token (model/transformer.py): PaLM's 6 * N + 12 * n_layers
* H * Dh * T with N the ACTIVE matmul weights (top_k experts, router, shared expert, head),
so the two models are credited with nearly the same FLOPs and an MoE step that is slower
shows a lower MFU. MFU = FLOPs per step / step time / the devices' peak (train/metrics.py);
on CPU, with no peak, the achieved model TFLOP/s is printed instead.

Kiln's compiled train step alone, on one random batch reused, best mean of 20 chained steps
over 6 tries (fewer with --reps / --steps); the variants alternate so machine noise falls on
all of them.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from cpu_step import best_ms

from configs import lm
from model import transformer
from train import mesh as mesh_lib
from train import metrics as metrics_lib
from train import trainer
from train.state import setup_state
from train.tasks.lm import LMTask


def variant_config(args, capacity_factor: float | None):
  """The preset as a MoE with `capacity_factor`, or (None) its dense twin."""
  config = lm.get_config(args.preset)
  config.unlock()
  if args.n_layers:
    config.model.n_layers = args.n_layers
  if args.batch:
    config.batch_size = args.batch
  if args.seq_len:
    config.data.seq_len = args.seq_len
  if config.model.vocab_size == -1:
    config.model.vocab_size = config.data.tokenizer.vocab_size
  config.mesh.update(data=-1, fsdp=1, expert=args.expert, tensor=1)
  moe = config.model.moe
  if not moe.n_experts:
    raise SystemExit(f'--preset={args.preset} is not a mixture of experts.')
  if capacity_factor is None:
    expert_dim = moe.expert_mlp_dim if moe.expert_mlp_dim > 0 else config.model.mlp_dim
    config.model.mlp_dim = moe.top_k * expert_dim + moe.shared_mlp_dim
    config.model.moe.n_experts = 0
    config.mesh.update(data=-1, expert=1)
  else:
    moe.capacity_factor = capacity_factor
  return config


def setup(config):
  task = LMTask(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  rng, _, shardings, init = setup_state(task, config, mesh)
  train_step, _ = trainer.compile_step(task, shardings, mesh)
  b, length = config.batch_size, config.data.seq_len
  vocab = config.data.tokenizer.vocab_size
  tokens = np.random.default_rng(0).integers(0, vocab, (b, length + 1)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'segment_ids': np.ones((b, length), np.int32),
           'positions': np.broadcast_to(np.arange(length, dtype=np.int32), (b, length))}
  batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()},
                         mesh_lib.batch_sharding(mesh))
  return task, mesh, lambda state: train_step(state, batch, {})[0], lambda: init(rng)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='moe_cpu', help='an MoE preset of configs/lm.py')
  parser.add_argument('--capacity_factors', default='0',
                      help='comma-separated; 0 is dropless')
  parser.add_argument('--n_layers', type=int, default=0, help="0: the preset's")
  parser.add_argument('--batch', type=int, default=0, help="0: the preset's")
  parser.add_argument('--seq_len', type=int, default=0, help="0: the preset's")
  parser.add_argument('--expert', type=int, default=1, help='mesh.expert of the MoE runs')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--reps', type=int, default=6)
  parser.add_argument('--steps', type=int, default=20)
  args = parser.parse_args()

  variants = {'dense': None, **{f'moe cf={cf}' if float(cf) else 'moe dropless': float(cf)
                                for cf in args.capacity_factors.split(',')}}
  setups = {name: setup(variant_config(args, cf)) for name, cf in variants.items()}
  best = dict.fromkeys(variants, float('inf'))
  for _ in range(args.rounds):
    for name, (_, mesh, fn, make_state) in setups.items():
      with jax.set_mesh(mesh):  # a fresh state: the step donates the one it is given
        best[name] = min(best[name], best_ms(fn, make_state(), args.reps, args.steps))

  config = variant_config(args, 0.0)
  print(f'{args.preset}: {config.model.n_layers} layers, d_model {config.model.d_model}, '
        f'batch {config.batch_size} x {config.data.seq_len}, {jax.device_count()} '
        f'{jax.devices()[0].device_kind} device(s), {config.model.dtype} compute')
  print(f'{"variant":16s} {"params":>14s} {"active":>14s} {"GFLOP/token":>12s} '
        f'{"ms/step":>9s} {"tokens/s":>10s}  throughput')
  for name, (task, _, _, _) in setups.items():
    cfg = task.model_cfg
    step_s = best[name] / 1000
    flops = task.flops_per_step()
    rate = metrics_lib.flops_metrics(flops, step_s, jax.devices())
    shown = (f'MFU {rate["train/mfu"]:.1%}' if 'train/mfu' in rate
             else f'{rate["train/model_tflops"] * 1000:.1f} model GFLOP/s')
    print(f'{name:16s} {transformer.count_params(cfg):14,d} '
          f'{transformer.count_params(cfg, active=True):14,d} '
          f'{transformer.train_flops_per_token(cfg, config.data.seq_len) / 1e9:12.4f} '
          f'{best[name]:9.1f} {task.items_per_step() / step_s:10,.0f}  {shown}')


if __name__ == '__main__':
  main()
