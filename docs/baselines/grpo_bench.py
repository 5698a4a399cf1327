"""One GRPO step split into its parts, on the machine at hand: rollout tokens per second
against train tokens per second, and the starting model's held-out accuracy.

  python docs/baselines/grpo_bench.py --init_from=/tmp/kiln_add_sft [--reps=5] \
    [--override grpo.num_generations=8 ...]

On a GPU, a llama_1b-shaped policy (configs/lm.py:llama_1b's model, random weights, its
128k-row embedding and head; the addition prompts; an estimated 5 minutes on one H100 with the
compiles):

  python docs/baselines/grpo_bench.py --model_preset=llama_1b --override \
    batch_size=16 grpo.num_generations=8 grpo.max_new_tokens=128 data.seq_len=160

The parts are jitted on their own, on the trainer's mesh and with its shardings:
  rollout   `rl.rollout` alone (prefill + the decode loop of `generate`);
  collect   the task's whole `collect`: rollout, host rewards (pure_callback), advantages,
            the reference's (and the old policy's) teacher-forced log-probs;
  step      collect + update, the program the trainer runs (train.trainer.compile_step).
update = step - collect. Rollout tokens/s counts sampled completion tokens (prompt tokens
are prefilled, not sampled); train tokens/s counts the rows' positions the update scores,
(prompt + completion) * rows * num_iterations, over the update's time.
"""

import argparse
import ast
import tempfile
import time

import jax
import numpy as np

from configs import grpo as grpo_config
from configs import lm as lm_config
from train import mesh as mesh_lib
from train import rl, tasks, trainer
from train.state import setup_state
from train.tasks import grpo


def timed(fn, reps: int) -> float:
  """Median seconds of `fn()` (blocked on its outputs) after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--init_from', default='')
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--model_preset', default='',
                      help="a configs/lm.py preset whose model to use (e.g. llama_1b)")
  parser.add_argument('--override', nargs='*', default=[], help='key=value config overrides')
  args = parser.parse_args()
  config = grpo_config.get_config()
  config.init_from = args.init_from
  if args.model_preset:
    config.model = lm_config.get_config(args.model_preset).model
  for item in args.override:
    key, value = item.split('=', 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a string
    config.update_from_flattened_dict({key: value})
  task = tasks.get_task(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  workdir = tempfile.mkdtemp(prefix='grpo_bench_')
  train_iter = task.setup_data(workdir, 0, 1)
  rng, _, shardings, init = setup_state(task, config, mesh)
  state = task.warm_start(init(rng))
  frozen = task.load_frozen(mesh)
  step_fn, _ = trainer.compile_step(task, shardings, mesh, trainer.shardings_of(frozen))
  g = config.grpo
  rows = config.batch_size * g.num_generations
  with jax.set_mesh(mesh):
    start_eval = task.eval_summary({}, state)
    batch = trainer.global_batch(next(train_iter), mesh_lib.batch_sharding(mesh))

    def rollout_only(state, batch):
      n = g.num_generations
      return rl.rollout(task.graphdef, state.params, grpo.repeat_rows(batch['prompt'], n),
                        grpo.repeat_rows(batch['prompt_len'], n),
                        max_new_tokens=g.max_new_tokens,
                        sampling_params=task._sampling_params(rows),
                        seeds_B=jax.numpy.arange(rows, dtype=jax.numpy.int32),
                        stop_ids=task.stop_ids, vocab_limit=task.tokenizer.vocab_size)

    rollout_fn = jax.jit(rollout_only)
    collect_fn = jax.jit(task.collect)
    ro = rollout_fn(state, batch)
    new_tokens = float(np.sum(np.asarray(ro.length_B - ro.prompt_len_B)))
    t_rollout = timed(lambda: rollout_fn(state, batch), args.reps)
    t_collect = timed(lambda: collect_fn(state, batch, frozen), args.reps)
    # The step donates its state: feed each call the state the last one returned.
    holder = {'state': state}

    def one_step():
      holder['state'], metrics = step_fn(holder['state'], batch, frozen)
      return metrics
    t_step = timed(one_step, args.reps)
  t_update = t_step - t_collect
  positions = ro.tokens_BxL.shape[1]
  print(f'model d_model={task.model_cfg.d_model} n_layers={task.model_cfg.n_layers}, '
        f'{rows} rows = {config.batch_size} prompts x {g.num_generations}, '
        f'{positions} positions ({g.max_new_tokens} new), num_iterations={g.num_iterations}, '
        f'beta={g.beta}, devices={jax.device_count()} ({jax.devices()[0].platform})')
  print(f'the starting model on {min(g.eval_prompts, len(task.eval_prompts))} held-out '
        f'prompts: {start_eval}')
  print('| part | ms | share of step |')
  print('|---|---|---|')
  for name, t in (('rollout (generate)', t_rollout), ('collect (rollout, rewards, ref/old '
                  'log-probs)', t_collect), ('update', t_update), ('whole step', t_step)):
    print(f'| {name} | {1000 * t:.0f} | {100 * t / t_step:.0f}% |')
  print(f'rollout: {new_tokens / t_rollout:,.0f} sampled tokens/s '
        f'({new_tokens / rows:.1f} per completion); update: '
        f'{rows * positions * g.num_iterations / t_update:,.0f} train tokens/s')


if __name__ == '__main__':
  main()
