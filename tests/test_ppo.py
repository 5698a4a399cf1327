"""PPO (train/tasks/ppo.py, train/ppo_losses.py).

Oracles: GAE against numbers derived by hand and against TRL's reverse loop in numpy; the
KL-penalised per-token rewards against a hand computation (k1 and k3); the clipped value
loss and the full PPO loss against numpy transcriptions of TRL's PPOTrainer; whitening
against numpy's moments. Trainer runs (tiny: width 32, bytes, 8 prompts, 8 new tokens, 2
epochs of 2 minibatches) against a 2-step reward model: one sharded run (data, fsdp and
tensor axes of 2) checked for TRL's metrics, a first step at the reference (KL exactly 0),
its rlhf_reward identity, and resumed from its step-2 checkpoint (what a kill after it
leaves) against itself; it is a LoRA run, whose reference is its own base (no second copy)
and whose base never moves. Without LoRA: a separate critic that starts as the reward model
and a reference that is the starting policy.
"""

import itertools
import json
import math
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from configs import ppo as ppo_config
from configs import reward as reward_config
from data import preference_data
from data.errors import ConfigError
from model import lora
from train import mesh as mesh_lib
from train import ppo_losses, runs, tasks, trainer
from train.state import setup_state
from train.tasks import reward

# --- GAE -----------------------------------------------------------------------------


def test_gae_matches_a_hand_computation():
  # Row 0, gamma = 1, lam = 0.5, rewards (0, 0, 1), values (0.5, 0.25, 0.5), three tokens:
  #   delta_2 = 1 + 0 - 0.5 = 0.5          A_2 = 0.5
  #   delta_1 = 0 + 0.5 - 0.25 = 0.25      A_1 = 0.25 + 0.5 * 0.5 = 0.5
  #   delta_0 = 0 + 0.25 - 0.5 = -0.25     A_0 = -0.25 + 0.5 * 0.5 = 0
  #   returns = A + V = (0.5, 0.75, 1.0)
  # Row 1, two tokens then padding (values there are garbage and must be ignored):
  #   rewards (0, 2), values (1, 1):
  #   delta_1 = 2 + 0 (episode over) - 1 = 1       A_1 = 1
  #   delta_0 = 0 + 1 - 1 = 0                      A_0 = 0 + 0.5 * 1 = 0.5
  #   returns = (1.5, 2), then zeros on the padding.
  rewards = jnp.array([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
  values = jnp.array([[0.5, 0.25, 0.5], [1.0, 1.0, 9.0]])
  mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
  advantages, returns = ppo_losses.gae(rewards, values, mask, gamma=1.0, lam=0.5)
  np.testing.assert_allclose(advantages, [[0.0, 0.5, 0.5], [0.5, 1.0, 0.0]], atol=1e-7)
  np.testing.assert_allclose(returns, [[0.5, 0.75, 1.0], [1.5, 2.0, 0.0]], atol=1e-7)


def test_gae_discounts_with_gamma():
  # gamma = 0.5, lam = 1 (Monte Carlo advantages), four tokens, rewards (1, 0, 0, 8), V = 0:
  #   A_3 = 8, A_2 = 0.5 * 8 = 4, A_1 = 2, A_0 = 1 + 0.5 * 2 = 2: the discounted return.
  advantages, returns = ppo_losses.gae(jnp.array([[1.0, 0.0, 0.0, 8.0]]), jnp.zeros((1, 4)),
                                       jnp.ones((1, 4)), gamma=0.5, lam=1.0)
  np.testing.assert_allclose(advantages, [[2.0, 2.0, 4.0, 8.0]])
  np.testing.assert_allclose(returns, [[2.0, 2.0, 4.0, 8.0]])


def _trl_gae(rewards, values, gamma, lam):
  """TRL PPOTrainer's loop (values already zero past each row's end)."""
  last = np.zeros(rewards.shape[0])
  out = []
  t_len = rewards.shape[1]
  for t in reversed(range(t_len)):
    next_values = values[:, t + 1] if t < t_len - 1 else 0.0
    delta = rewards[:, t] + gamma * next_values - values[:, t]
    last = delta + gamma * lam * last
    out.append(last)
  advantages = np.stack(out[::-1], axis=1)
  return advantages, advantages + values


def test_gae_matches_trls_loop_on_ragged_rows():
  rng = np.random.default_rng(0)
  b, t = 6, 9
  lengths = np.array([9, 1, 4, 7, 2, 9])
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  rewards = rng.normal(size=(b, t)).astype(np.float32) * mask
  values = rng.normal(size=(b, t)).astype(np.float32)
  advantages, returns = ppo_losses.gae(jnp.asarray(rewards), jnp.asarray(values),
                                       jnp.asarray(mask), gamma=0.9, lam=0.8)
  ref_adv, ref_ret = _trl_gae(rewards, values * mask, 0.9, 0.8)
  np.testing.assert_allclose(advantages, ref_adv * mask, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(returns, ref_ret * mask, rtol=1e-5, atol=1e-6)


# --- rewards -------------------------------------------------------------------------


def test_kl_penalised_rewards_match_a_hand_computation():
  # kl_coef 0.1. Row 0: three tokens, log pi (-1, -2, -0.5), log ref (-1.5, -1, -0.5),
  # score 2. Row 1: two tokens then padding, the same log-probs, score -1.
  #   k1 = log pi - log ref = (0.5, -1, 0)          rewards = -0.1 * k1 (+ score at the end)
  #   row 0: (-0.05, 0.1, 2.0);  row 1: (-0.05, 0.1 - 1, 0)
  #   k3 = (r - 1) - log r with log r = log ref - log pi = (-0.5, 1, 0):
  #   (e^-0.5 - 0.5, e - 2, 0) = (0.10653066, 0.71828183, 0)
  logp = jnp.array([[-1.0, -2.0, -0.5]] * 2)
  ref = jnp.array([[-1.5, -1.0, -0.5]] * 2)
  mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
  scores = jnp.array([2.0, -1.0])
  rewards, kl, non_score = ppo_losses.kl_penalized_rewards(scores, logp, ref, mask,
                                                           kl_coef=0.1, estimator='k1')
  np.testing.assert_allclose(kl, [[0.5, -1.0, 0.0], [0.5, -1.0, 0.0]], atol=1e-7)
  np.testing.assert_allclose(non_score, [[-0.05, 0.1, 0.0], [-0.05, 0.1, 0.0]], atol=1e-7)
  np.testing.assert_allclose(rewards, [[-0.05, 0.1, 2.0], [-0.05, -0.9, 0.0]], atol=1e-7)
  rewards, kl, _ = ppo_losses.kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.1,
                                                   estimator='k3')
  k3 = [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]
  np.testing.assert_allclose(kl, [k3, k3[:2] + [0.0]], rtol=1e-6)
  np.testing.assert_allclose(rewards, [[-0.1 * k3[0], -0.1 * k3[1], 2.0],
                                       [-0.1 * k3[0], -0.1 * k3[1] - 1.0, 0.0]], rtol=1e-6)


def test_whitening_matches_numpy_moments():
  rng = np.random.default_rng(1)
  x = rng.normal(3.0, 2.0, size=(4, 5)).astype(np.float32)
  mask = (rng.random((4, 5)) < 0.7).astype(np.float32)
  kept = x[mask > 0]
  expected = (x - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-8)  # TRL: unbiased variance
  out = ppo_losses.masked_whiten(jnp.asarray(x), jnp.asarray(mask))
  np.testing.assert_allclose(out, expected * mask, rtol=1e-5, atol=1e-5)
  out = ppo_losses.masked_whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False)
  np.testing.assert_allclose(out, (expected + kept.mean()) * mask, rtol=1e-5, atol=1e-5)


# --- losses --------------------------------------------------------------------------


def _masked_mean(x, mask):
  return (x * mask).sum() / mask.sum()


def _trl_losses(new_logp, old_logp, adv, vpred, old_values, returns, mask, cliprange,
                cliprange_value):
  """TRL PPOTrainer's minibatch losses, in numpy."""
  vpredclipped = np.clip(vpred, old_values - cliprange_value, old_values + cliprange_value)
  vf_losses1 = np.square(vpred - returns)
  vf_losses2 = np.square(vpredclipped - returns)
  vf_loss = 0.5 * _masked_mean(np.maximum(vf_losses1, vf_losses2), mask)
  vf_clipfrac = _masked_mean((vf_losses2 > vf_losses1).astype(float), mask)
  diff = new_logp - old_logp
  ratio = np.exp(diff)
  pg_losses = -adv * ratio
  pg_losses2 = -adv * np.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
  pg_loss = _masked_mean(np.maximum(pg_losses, pg_losses2), mask)
  pg_clipfrac = _masked_mean((pg_losses2 > pg_losses).astype(float), mask)
  approxkl = 0.5 * _masked_mean(diff**2, mask)
  return dict(pg_loss=pg_loss, vf_loss=vf_loss, vf_clipfrac=vf_clipfrac,
              pg_clipfrac=pg_clipfrac, approxkl=approxkl, ratio=_masked_mean(ratio, mask))


@pytest.fixture(scope='module')
def minibatch():
  rng = np.random.default_rng(2)
  b, t = 5, 7
  lengths = np.array([7, 3, 1, 5, 6])
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  old_logp = rng.normal(-2.0, 0.5, (b, t)).astype(np.float32)
  old_values = rng.normal(size=(b, t)).astype(np.float32)
  return dict(
      mask=mask, old_logp=old_logp, old_values=old_values,
      new_logp=(old_logp + rng.normal(0.0, 0.3, (b, t))).astype(np.float32),
      adv=rng.normal(size=(b, t)).astype(np.float32),
      vpred=(old_values + rng.normal(0.0, 0.4, (b, t))).astype(np.float32),
      returns=rng.normal(size=(b, t)).astype(np.float32),
      entropy=rng.uniform(0.0, 3.0, (b, t)).astype(np.float32))


def test_clipped_value_loss_matches_trl(minibatch):
  m = minibatch
  loss, clipfrac = ppo_losses.clipped_value_loss(
      jnp.asarray(m['vpred']), jnp.asarray(m['old_values']), jnp.asarray(m['returns']),
      jnp.asarray(m['mask']), 0.2)
  ref = _trl_losses(m['new_logp'], m['old_logp'], m['adv'], m['vpred'], m['old_values'],
                    m['returns'], m['mask'], 0.2, 0.2)
  np.testing.assert_allclose(loss, ref['vf_loss'], rtol=1e-5)
  np.testing.assert_allclose(clipfrac, ref['vf_clipfrac'], rtol=1e-6)
  assert 0.0 < clipfrac < 1.0  # both branches are exercised


def test_full_ppo_loss_matches_trl(minibatch):
  m = minibatch
  cliprange, cliprange_value, vf_coef, entropy_coef = 0.2, 0.3, 0.1, 0.01
  loss, stats = ppo_losses.ppo_loss(
      logprobs_BxT=jnp.asarray(m['new_logp']), old_logprobs_BxT=jnp.asarray(m['old_logp']),
      advantages_BxT=jnp.asarray(m['adv']), values_BxT=jnp.asarray(m['vpred']),
      old_values_BxT=jnp.asarray(m['old_values']), returns_BxT=jnp.asarray(m['returns']),
      entropy_BxT=jnp.asarray(m['entropy']), mask_BxT=jnp.asarray(m['mask']),
      cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef,
      entropy_coef=entropy_coef)
  ref = _trl_losses(m['new_logp'], m['old_logp'], m['adv'], m['vpred'], m['old_values'],
                    m['returns'], m['mask'], cliprange, cliprange_value)
  entropy = _masked_mean(m['entropy'], m['mask'])
  np.testing.assert_allclose(
      loss, ref['pg_loss'] + vf_coef * ref['vf_loss'] - entropy_coef * entropy, rtol=1e-5)
  expected = {'loss/policy_avg': ref['pg_loss'], 'loss/value_avg': ref['vf_loss'],
              'policy/clipfrac_avg': ref['pg_clipfrac'], 'val/clipfrac_avg': ref['vf_clipfrac'],
              'policy/approxkl_avg': ref['approxkl'], 'val/ratio': ref['ratio'],
              'policy/entropy_avg': entropy}
  for key, value in expected.items():
    np.testing.assert_allclose(stats[key], value, rtol=1e-5, err_msg=key)
  assert 0.0 < stats['policy/clipfrac_avg'] < 1.0


def test_adaptive_kl_controller_matches_ziegler():
  # kl 3 against target 2: error clip(0.5, -0.2, 0.2) = 0.2; 64 episodes over horizon 640:
  # 0.1 * (1 + 0.2 * 0.1) = 0.102. Below target (kl 1.9): error -0.05 -> 0.1 * 0.995.
  up = ppo_losses.adaptive_kl_coef(jnp.float32(0.1), jnp.float32(3.0), target=2.0,
                                   horizon=640, n_steps=64)
  down = ppo_losses.adaptive_kl_coef(jnp.float32(0.1), jnp.float32(1.9), target=2.0,
                                     horizon=640, n_steps=64)
  np.testing.assert_allclose([up, down], [0.102, 0.0995], rtol=1e-6)


# --- trainer runs --------------------------------------------------------------------

TRL_METRICS = ('objective/kl', 'objective/entropy', 'objective/non_score_reward',
               'objective/rlhf_reward', 'objective/scores', 'policy/approxkl_avg',
               'policy/clipfrac_avg', 'loss/policy_avg', 'loss/value_avg', 'val/clipfrac_avg',
               'policy/entropy_avg', 'val/ratio', 'val/ratio_var', 'val/num_eos_tokens',
               'loss', 'grad_norm', 'lr', 'skipped')
TINY = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2)


@pytest.fixture(scope='module')
def prefs(tmp_path_factory) -> str:
  """64 pairs of the embedded rule set as jsonl (reading all of it takes seconds)."""
  path = tmp_path_factory.mktemp('ppo_data') / 'prefs.jsonl'
  pairs = itertools.islice(preference_data.rule_pairs('train', 0.1), 64)
  path.write_text(''.join(json.dumps(pair) + '\n' for pair in pairs))
  return str(path)


@pytest.fixture(scope='module')
def reward_run(prefs, tmp_path_factory):
  """A reward model of 2 steps on rule-set pairs: a fixed, non-trivial scorer."""
  c = reward_config.get_config('rules')
  c.update(steps=2, batch_size=8, eval_every=0, eval_steps=0, log_every=1)
  c.data.update(source='jsonl', path=prefs)
  c.checkpoint.update(every=2, async_save=False)
  c.model.update(**TINY)
  workdir = tmp_path_factory.mktemp('ppo_reward')
  trainer.train_and_evaluate(c, str(workdir))
  return str(workdir)


def config(reward_dir: str, prefs: str = '', **overrides) -> ml_collections.ConfigDict:
  """The `rules` preset made tiny, scored by `reward_dir`, prompts from `prefs` (jsonl)."""
  c = ppo_config.get_config('rules')
  c.update(steps=4, batch_size=8, log_every=1, eval_every=0, eval_steps=0)
  if prefs:
    c.data.update(source='jsonl', path=prefs)
  c.checkpoint.update(every=2, async_save=False)
  c.model.update(**TINY)
  c.data.update(max_prompt_len=40, seq_len=48)
  c.ppo.update(reward_model=reward_dir, response_length=8, num_ppo_epochs=2,
               num_mini_batches=2)
  c.optimizer.update(lr=1e-3, end_lr=1e-3)  # constant: the schedule ignores `steps`
  c.sample.update(max_new_tokens=2)
  c.update_from_flattened_dict(overrides)
  return c


def scalars(workdir) -> dict[str, dict[int, float]]:
  acc = EventAccumulator(str(workdir), size_guidance={'scalars': 0})
  acc.Reload()
  return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()['scalars']}


def flat(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in leaves}


@pytest.fixture(scope='module')
def sharded_run(reward_run, prefs, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('ppo_sharded')
  c = config(reward_run, prefs, **{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2,
                            'model.lora.rank': 4})
  return c, workdir, trainer.train_and_evaluate(c, str(workdir))


def test_run_logs_trls_metrics_and_starts_at_the_reference(sharded_run):
  _, workdir, result = sharded_run
  logged = scalars(workdir)
  for key in TRL_METRICS:
    steps = logged[f'train/{key}']
    assert sorted(steps) == [1, 2, 3, 4], key
    assert all(np.isfinite(v) for v in steps.values()), (key, steps)
  kl, scores = logged['train/objective/kl'], logged['train/objective/scores']
  assert kl[1] == 0.0  # the policy is its reference until the first update (LoRA B = 0)
  assert logged['train/objective/non_score_reward'][1] == 0.0
  assert abs(kl[4]) > 0.0  # and it moved after
  for step in range(1, 5):
    np.testing.assert_allclose(logged['train/objective/rlhf_reward'][step],
                               scores[step] + logged['train/objective/non_score_reward'][step],
                               rtol=1e-5, atol=1e-6)
  assert len(set(scores.values())) == 4  # the reward model scores each step's new samples
  assert logged['train/val/num_eos_tokens'][1] <= 8
  assert result.losses.keys() == {1, 2, 3, 4}


def test_resume_from_a_checkpoint_equals_the_straight_run(reward_run, sharded_run, tmp_path):
  """What a kill after step 2 leaves (its config, tokenizer and step-2 checkpoint), rerun,
  reaches the straight run's step 4 bit for bit: rollouts draw from the state's key."""
  c, straight, _ = sharded_run
  resumed = tmp_path / 'resumed'
  shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns('4', 'events.*'))
  assert sorted(p.name for p in (resumed / 'checkpoints').iterdir()) == ['2']
  trainer.train_and_evaluate(c, str(resumed))
  logged, again = scalars(straight), scalars(resumed)
  assert sorted(again['train/loss']) == [3, 4]
  for step in (3, 4):
    assert again['train/loss'][step] == logged['train/loss'][step]
    assert again['train/objective/scores'][step] == logged['train/objective/scores'][step]
  _, a, _ = runs.load_latest(str(straight))
  _, b, _ = runs.load_latest(str(resumed))
  fa, fb = flat((a.params, a.extras, a.opt_state)), flat((b.params, b.extras, b.opt_state))
  assert fa.keys() == fb.keys()
  for key in fa:
    np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


def test_lora_policy_and_reference_share_one_frozen_base(sharded_run):
  """The run's reference is its own policy with the adapters off: no reference parameters
  are loaded, KL is exactly 0 before the first update, and the base never moves."""
  _, workdir, _ = sharded_run
  task, state, _ = runs.load_latest(str(workdir))
  mesh = mesh_lib.make_mesh(task.config.mesh)
  assert set(task.load_frozen(mesh)) == {'reward'}  # no reference copy: lora.disabled(params)
  rng, _, _, init = setup_state(task, task.config, mesh)
  start, end = flat(init(rng).params), flat(state.params)
  adapters = [k for k in end if k.endswith((f"{lora.A}']", f"{lora.B}']"))]
  assert adapters and any(not np.array_equal(start[k], end[k]) for k in adapters)
  for key in end.keys() - set(adapters):
    np.testing.assert_array_equal(start[key], end[key], err_msg=key)


def test_separate_critic_starts_as_the_reward_model(reward_run, prefs, tmp_path):
  c = config(reward_run, prefs, **{'ppo.critic': 'separate'})
  task = tasks.get_task(c)
  task.setup_data(str(tmp_path), 0, 1)
  mesh = mesh_lib.make_mesh(c.mesh)
  rng, _, _, init = setup_state(task, c, mesh)
  value = task.warm_start(init(rng)).extras['value']
  _, rm_params, _ = reward.load_reward_model(reward_run, mesh=mesh)
  got, want = flat(value), flat(rm_params)
  assert got.keys() == want.keys() and any(v.any() for k, v in want.items() if 'head' in k)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # Without LoRA the reference is a frozen copy of the starting policy (here the seed's).
  ref, start = flat(task.load_frozen(mesh)['ref']), flat(init(rng).params)
  assert ref.keys() == start.keys()
  for key in ref:
    np.testing.assert_array_equal(ref[key], start[key], err_msg=key)


def test_config_errors_name_the_key(reward_run):
  with pytest.raises(ConfigError, match='ppo.reward_fn'):
    tasks.get_task(config(''))
  with pytest.raises(ConfigError, match='ppo.critic'):
    tasks.get_task(config(reward_run, **{'ppo.critic': 'twin'}))
  with pytest.raises(ConfigError, match='ppo.num_mini_batches'):
    tasks.get_task(config(reward_run, **{'ppo.num_mini_batches': 3}))
  with pytest.raises(ConfigError, match='ppo.num_mini_batches instead'):
    tasks.get_task(config(reward_run, grad_accum=2))
  with pytest.raises(ConfigError, match='data.seq_len'):
    tasks.get_task(config(reward_run, **{'data.seq_len': 40}))


def test_reward_function_reads_the_decoded_completion_and_the_prompts_record(tmp_path):
  """ppo.reward_fn: exact_match of train/rewards.py against each prompt's jsonl `answer`,
  on the text between the prompt and the stop token (BOS and the stop left out)."""
  rows = [{'prompt': f'{a}+{b}=', 'answer': str(a + b)} for a in range(10) for b in range(3)]
  path = tmp_path / 'sums.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  c = config('', **{'ppo.reward_fn': 'exact_match', 'data.source': 'jsonl',
                    'data.path': str(path), 'data.val_fraction': 0.3, 'eval_steps': 0})
  task = tasks.get_task(c)
  task.setup_data(str(tmp_path / 'run'), 0, 1)
  tok = task.tokenizer
  picked = [0, 1, 2]
  tokens, plens, lengths, wants = [], [], [], []
  for i, completion in zip(picked, ('{}', 'x{}', '{}\n'), strict=True):
    record = task.data.record(i)
    prompt = [tok.bos_id, *tok.encode(record['prompt'])]
    body = list(tok.encode(completion.format(record['answer'])))
    row = prompt + body
    tokens.append(row + [0] * (24 - len(row)))
    plens.append(len(prompt))
    lengths.append(len(row))
    wants.append(1.0 if completion != 'x{}' else 0.0)  # exact_match strips the newline
  scores = task._python_scores(np.asarray(tokens, np.int32), np.asarray(plens, np.int32),
                               np.asarray(lengths, np.int32), np.asarray(picked, np.int32))
  np.testing.assert_array_equal(scores, wants)
  with pytest.raises(ConfigError, match='ppo.reward_fn'):
    tasks.get_task(config('', **{'ppo.reward_fn': 'no_such_reward'}))
