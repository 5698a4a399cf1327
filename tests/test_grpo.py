"""GRPO (train/tasks/grpo.py), its rewards (train/rewards.py) and problems (data/verifiable.py).

One tiny trainer run, sharded on a 2x2x2 mesh, with LoRA (the reference is the policy with
its adapters off), two optimisation iterations per rollout batch and the k3 KL, is checked
several ways: TRL's metrics present and finite; its LoRA base unchanged; the run cut after
2 steps and resumed equal to the straight run, parameter for parameter (the rollouts, the
host rewards and the prompt iterator resume exactly); a rollout from the jitted generate
equal to the serving engine's output for the same prompts and seeds (both draw from
model/sampling.request_keys). The loss math is tested in tests/test_rl.py; the rewards here
on hand-made cases, the sandboxed unit tests against a passing and a failing body.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import grpo as grpo_config
from data import sources, verifiable
from data.errors import ConfigError
from model import lora, sampling
from serve import engine as engine_lib
from train import checkpoint, rewards, rl, tasks, trainer

STEPS = 4
MESH = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}


def config(**overrides):
  """A model of width 32 from its seed, 8 prompts x 4 samples of up to 4 bytes per step. The
  reward (a digit anywhere) is met by about one random byte string in six, so groups
  differ and the policy gradient is not zero."""
  c = grpo_config.get_config()
  c.update(steps=STEPS, eval_every=STEPS, log_every=1, batch_size=8)
  c.grpo.update(num_generations=4, max_new_tokens=4, eval_prompts=16, num_iterations=2,
                reward='format:.*[0-9].*', beta=0.04)
  c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2)
  c.model.lora.update(rank=4, alpha=8.0)
  c.optimizer.update(lr=1e-2, warmup_steps=1, end_lr=1e-2)
  c.checkpoint.update(every=2, async_save=False)
  c.update_from_flattened_dict({**MESH, **overrides})
  return c


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('grpo_straight')
  return workdir, trainer.train_and_evaluate(config(), str(workdir))


def restore(workdir, step):
  task = tasks.get_task(config())
  task.setup_inference(str(workdir))  # the vocabulary, hence the shapes, of the run
  ckpt = checkpoint.Checkpointer(str(workdir), config().checkpoint)
  state = ckpt.restore(step, jax.eval_shape(task.init_state, jax.random.key(0)), None)
  ckpt.close()
  return state


# --- problems and rewards -------------------------------------------------------------


def test_addition_problems_split_by_prompt_hash_without_overlap():
  train = verifiable.problems('addition', 'train', 0.1)
  held_out = verifiable.problems('addition', 'validation', 0.1)
  assert len(train) + len(held_out) == 100 * 100
  assert not {p['prompt'] for p in train} & {p['prompt'] for p in held_out}
  assert all(sources.held_out(p['prompt'], 0.1) for p in held_out)
  row = next(p for p in train + held_out if p['prompt'] == '37+08=')
  assert row['answer'] == '45'


def test_rewards_on_hand_made_cases():
  em = rewards.get('exact_match')
  assert em('1+1=', ' 2\n', {'answer': '2'}) == 1.0
  assert em('q', 'Paris  France', {'answer': 'paris france'}) == 1.0
  assert em('1+1=', '22', {'answer': '2'}) == 0.0
  fmt = rewards.get('format:<think>.*</think>[0-9]+')
  assert fmt('', '<think>a\nb</think>12', {}) == 1.0  # DOTALL: the thought spans lines
  assert fmt('', '<think>a</think>12 and more', {}) == 0.0  # the whole completion must match
  with pytest.raises(ConfigError, match=r'grpo.reward=.*format:\(.*regex'):
    rewards.get('format:(')
  with pytest.raises(ConfigError, match=r"grpo.reward='nope'.*exact_match"):
    rewards.get('nope')


def test_unit_test_reward_runs_the_program_in_the_sandbox():
  prompt = 'def add(a, b):\n  """The sum."""\n'
  example = {'tests': 'assert add(2, 3) == 5\nassert add(-1, 1) == 0'}
  scores = rewards.batch_rewards(rewards.get('unit_tests'), [prompt] * 3,
                                 ['  return a + b\n', '  return a - b\n', '  while True: pass\n'],
                                 [example] * 3)
  assert scores == [1.0, 0.0, 0.0]


@pytest.mark.parametrize('overrides, key', [
    ({'grpo.reward': 'nope'}, 'grpo.reward'),
    ({'grpo.num_generations': 1}, 'grpo.num_generations'),
    ({'grpo.loss_aggregation': 'mean'}, 'grpo.loss_aggregation'),
    ({'grpo.clip_low': 1.5}, 'grpo.clip_low'),
    ({'data.source': 'stdlib'}, 'data.source'),
])
def test_config_errors_name_the_key(overrides, key):
  with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
    tasks.get_task(config(**overrides))


# --- the run ------------------------------------------------------------------------------


TRL_METRICS = ('reward', 'reward_std', 'frac_reward_zero_std', 'completions/mean_length',
               'completions/min_length', 'completions/max_length', 'completions/clipped_ratio',
               'kl', 'entropy', 'clip_ratio/low_mean', 'clip_ratio/high_mean',
               'clip_ratio/region_mean', 'rewards/format/mean', 'policy/clipfrac',
               'policy/approxkl', 'loss', 'grad_norm', 'lr')


def test_run_logs_trl_metrics_and_keeps_the_lora_base(straight):
  workdir, result = straight
  for name in TRL_METRICS:
    value = result.train[f'train/{name}']
    assert np.isfinite(value), name
  t = result.train
  assert 0 < t['train/reward'] < 1 and 0 <= t['train/frac_reward_zero_std'] < 1
  assert 1 <= t['train/completions/min_length'] <= t['train/completions/mean_length'] <= 4
  # Two iterations per batch: the second sees a moved policy (ratio != 1, KL > 0).
  assert t['train/policy/approxkl'] > 0 and t['train/kl'] > 0
  assert 0 <= result.eval['eval/accuracy'] <= 1 and 'eval/completions/mean_length' in result.eval
  assert sorted(result.losses) == list(range(1, STEPS + 1))
  first, last = restore(workdir, 2), restore(workdir, STEPS)
  moved = jax.tree_util.tree_map_with_path(
      lambda p, a, b: (jax.tree_util.keystr(p), bool(np.any(np.asarray(a) != np.asarray(b)))),
      first.params, last.params)
  for name, changed in jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)):
    if name.endswith((f"{lora.A}']", f"{lora.B}']")):
      continue
    assert not changed, name  # the base is frozen: shared by the policy and its reference
  assert any(changed for _, changed in jax.tree.leaves(
      moved, is_leaf=lambda x: isinstance(x, tuple)))


def test_resumed_run_equals_the_straight_run(straight, tmp_path):
  straight_dir, straight_result = straight
  first = trainer.train_and_evaluate(config(steps=2, eval_every=0), str(tmp_path))
  second = trainer.train_and_evaluate(config(), str(tmp_path))
  assert sorted(first.losses) == [1, 2] and sorted(second.losses) == [3, 4]
  for step, loss in {**first.losses, **second.losses}.items():
    assert loss == straight_result.losses[step], step
  a, b = restore(straight_dir, STEPS), restore(tmp_path, STEPS)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_array_equal(x, y)


def test_rollout_equals_the_engine_for_the_same_seeds(straight):
  """The serving engine and the jitted rollout sample the same tokens from the same model,
  prompts and seeds: both key token i of a request by fold_in(key(seed), i)."""
  workdir, _ = straight
  engine, tokenizer = engine_lib.load_engine(str(workdir), max_slots=4, page_size=4,
                                             prefill_chunk=16)
  task = tasks.get_task(config())
  task.setup_inference(str(workdir))
  graphdef, params = task.inference_graphdef, engine._params
  prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in ('12+07=', '03+40=', '99+01=')]
  seeds = [11, 2**31 - 5, 7]
  m = 6
  padded = np.zeros((3, 6), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p
  ro = jax.jit(lambda params: rl.rollout(
      graphdef, params, jnp.asarray(padded), jnp.asarray([len(p) for p in prompts]),
      max_new_tokens=m, sampling_params=sampling.SamplingParams.make(3, temperature=1.0),
      seeds_B=jnp.asarray(seeds, jnp.int32), stop_ids=task.stop_ids,
      vocab_limit=tokenizer.vocab_size))(params)
  streams = [engine.submit(engine_lib.Request(
      prompt_ids=tuple(p), max_tokens=m, temperature=1.0, seed=s, stop_token_ids=task.stop_ids,
      logprobs=0)) for p, s in zip(prompts, seeds, strict=True)]
  while not engine.idle:
    engine.step()
  for i, stream in enumerate(streams):
    events = stream.poll()
    got = [e.token_id for e in events]
    p, n = len(prompts[i]), int(ro.length_B[i])
    assert got == [int(t) for t in ro.tokens_BxL[i, p:n]], i
    np.testing.assert_allclose([e.logprob for e in events], ro.logprobs_BxL[i, p:n], atol=1e-4)
