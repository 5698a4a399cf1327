"""One PPO step on CPU, split between generation, scoring and the update (docs/benchmarks.md).

  python docs/baselines/ppo_step.py --workdir=/tmp/kiln_ppo
  python docs/baselines/ppo_step.py --workdir=/tmp/kiln_ppo --batch_size=64

Reads a PPO run's config (its policy, reward model, prompts and `ppo.*` settings) and times
three jitted programs on one batch of its prompts, from a fresh state of that config:

  generate  rl.rollout alone: the KV-cache sampler (model/decode.py)
  collect   the trainer's `collect`: generation, then the policy's, the reference's and the
            reward model's forward passes and GAE
  step      `collect` then `train_step` (num_ppo_epochs x num_mini_batches updates): the
            program the trainer runs

Scoring is collect - generate and the update step - collect. Each is the best of
`--tries` timed calls after one warm-up call. Rollout tokens per second count the new
tokens sampled; train tokens per second count prompt + completion positions processed by
the updates (each of the epochs).
"""

import argparse
import time

import jax
import numpy as np

from data.errors import exit_on_user_error
from model import sampling
from train import mesh as mesh_lib
from train import rl, runs
from train.state import setup_state
from train.tasks import get_task


def best_seconds(fn, tries: int) -> float:
  jax.block_until_ready(fn())  # compile and warm up
  best = float('inf')
  for _ in range(tries):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='a PPO run (its config.json is read)')
  parser.add_argument('--batch_size', type=int, default=0, help='0: the run\'s')
  parser.add_argument('--tries', type=int, default=3)
  args = parser.parse_args()

  config = runs.load_run_config(args.workdir)
  if args.batch_size:
    config.batch_size = args.batch_size
  config.init_from = ''  # a fresh policy of the run's shape: the timing does not depend on it
  task = get_task(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  train_iter = task.setup_data(args.workdir, 0, 1)
  batch = jax.device_put(next(train_iter), mesh_lib.batch_sharding(mesh))
  rng, _, _, init = setup_state(task, config, mesh)
  state, frozen = init(rng), task.load_frozen(mesh)
  p = config.ppo
  b = config.batch_size

  def generate(state, batch):
    settings = sampling.SamplingParams.make(b, temperature=p.temperature)
    return rl.rollout(task.graphdef, state.params, batch['prompt'], batch['prompt_len'],
                      max_new_tokens=p.response_length, sampling_params=settings,
                      seeds_B=rl.rollout_seeds(jax.random.key(0), b),
                      stop_ids=task._stop_ids(),  # noqa: SLF001
                      vocab_limit=task.tokenizer.vocab_size)

  gen_fn = jax.jit(generate)
  collect_fn = jax.jit(task.collect)
  step_fn = jax.jit(lambda s, bt, f: task.train_step(s, task.collect(s, bt, f), f))
  with jax.set_mesh(mesh):
    out = gen_fn(state, batch)
    new_tokens = int(np.asarray(out.completion_len_B).sum())
    t_gen = best_seconds(lambda: gen_fn(state, batch), args.tries)
    t_collect = best_seconds(lambda: collect_fn(state, batch, frozen), args.tries)
    t_step = best_seconds(lambda: step_fn(state, batch, frozen), args.tries)
  positions = b * (config.data.max_prompt_len + p.response_length) * p.num_ppo_epochs
  print(f'batch {b}, prompts padded to {config.data.max_prompt_len}, up to '
        f'{p.response_length} new tokens ({new_tokens} sampled), {p.num_ppo_epochs} epochs x '
        f'{p.num_mini_batches} minibatches, {jax.device_count()} devices')
  print('| part | ms | share |\n|---|---:|---:|')
  for name, t in (('generate', t_gen), ('score (forwards, GAE)', t_collect - t_gen),
                  ('update', t_step - t_collect), ('whole step', t_step)):
    print(f'| {name} | {1000 * t:.0f} | {100 * t / t_step:.0f}% |')
  print(f'rollout tokens/s {new_tokens / t_gen:,.0f}; train tokens/s '
        f'{positions / max(t_step - t_collect, 1e-9):,.0f}')


if __name__ == '__main__':
  exit_on_user_error(main)
