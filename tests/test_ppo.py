"""PPO (train/tasks/ppo.py, train/ppo_losses.py).

Oracles: GAE against numbers derived by hand and against TRL's reverse loop in numpy; the
KL-penalised per-token rewards against a hand computation (k1 and k3); the clipped value
loss and the full PPO loss against numpy transcriptions of TRL's PPOTrainer; whitening
against numpy's moments. Trainer runs: ...
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from train import ppo_losses

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
