"""The shared RL math (train/rl.py).

Oracles: numpy references written from the papers' formulas (the clipped surrogate with
each aggregation as TRL's GRPO trainer writes it, group normalisation with torch.std's
unbiased deviation, Schulman's k1/k2/k3); the exact KL of a toy categorical pair against
the sample means of k1 and k3 (unbiased) and k3 >= 0; teacher-forced log-probs against a
numpy log-softmax of the transformer's full forward pass, and against the sampling-time
log-probs `generate` reported for the same tokens.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from model import sampling, transformer
from train import rl

RNG = np.random.default_rng(0)


def _np_per_token(logp, old, adv, clip_low, clip_high):
  ratio = np.exp(logp - old)
  a = adv[:, None] if adv.ndim == 1 else adv
  return np.maximum(-a * ratio, -a * np.clip(ratio, 1 - clip_low, 1 + clip_high)), ratio, a


@pytest.mark.parametrize('aggregation', rl.AGGREGATIONS)
@pytest.mark.parametrize('per_token_adv', [False, True])
def test_clipped_loss_matches_numpy(aggregation, per_token_adv):
  b, length = 6, 9
  logp = RNG.normal(-2.0, 0.5, (b, length)).astype(np.float32)
  old = (logp + RNG.normal(0.0, 0.3, (b, length))).astype(np.float32)
  adv = RNG.normal(size=(b, length) if per_token_adv else (b,)).astype(np.float32)
  mask = np.zeros((b, length), np.float32)
  for i, (start, end) in enumerate([(1, 4), (2, 9), (3, 3), (1, 2), (4, 8), (1, 9)]):
    mask[i, start:end] = 1.0  # row 2 is empty: it must count as 0, never NaN
  loss, metrics = rl.clipped_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28,
                                         aggregation=aggregation, max_len=12)
  per_token, ratio, a = _np_per_token(logp, old, adv, 0.2, 0.28)
  if aggregation == 'sequence_mean':  # TRL 'grpo'
    expected = np.mean((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0))
  elif aggregation == 'token_mean':  # TRL 'dapo' / 'bnpo'
    expected = (per_token * mask).sum() / mask.sum()
  else:  # TRL 'dr_grpo'
    expected = (per_token * mask).sum() / (b * 12)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  mean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
  a = np.broadcast_to(a, ratio.shape)
  low = (ratio < 0.8) & (a < 0)
  high = (ratio > 1.28) & (a > 0)
  np.testing.assert_allclose(metrics['clip_ratio/low_mean'], mean(low), rtol=1e-6)
  np.testing.assert_allclose(metrics['clip_ratio/high_mean'], mean(high), rtol=1e-6)
  np.testing.assert_allclose(metrics['clip_ratio/region_mean'], mean(low | high), rtol=1e-6)
  assert 0 < metrics['clip_ratio/region_mean'] < 1  # the data exercise both branches
  clipped = -a * np.clip(ratio, 0.8, 1.28) > -a * ratio
  np.testing.assert_allclose(metrics['policy/clipfrac'], mean(clipped), rtol=1e-6)
  np.testing.assert_allclose(metrics['policy/approxkl'], mean(0.5 * (logp - old)**2), rtol=1e-5)


def test_clipped_loss_gradient_is_the_policy_gradient_inside_the_clip():
  """At ratio 1 nothing is clipped: d loss / d logp = -A * mask / count per row (GRPO)."""
  logp = jnp.asarray(RNG.normal(size=(3, 4)), jnp.float32)
  adv = jnp.asarray([1.0, -2.0, 0.5])
  mask = jnp.asarray([[0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 0, 0]], jnp.float32)
  grad = jax.grad(lambda lp: rl.clipped_policy_loss(
      lp, jax.lax.stop_gradient(lp), adv, mask, clip_low=0.2, clip_high=0.2,
      aggregation='sequence_mean')[0])(logp)
  expected = -np.asarray(adv)[:, None] * mask / mask.sum(-1, keepdims=True) / 3
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_group_advantages_match_numpy():
  rewards = RNG.integers(0, 2, 24).astype(np.float32)
  rewards[:4] = 1.0  # one group with zero spread: advantages 0, not NaN
  got = rl.group_advantages(jnp.asarray(rewards), 4)
  groups = rewards.reshape(-1, 4)
  mean, std = groups.mean(1, keepdims=True), groups.std(1, ddof=1, keepdims=True)
  np.testing.assert_allclose(got, ((groups - mean) / (std + 1e-4)).reshape(-1), rtol=1e-5)
  np.testing.assert_allclose(rl.group_advantages(jnp.asarray(rewards), 4, scale=False),
                             (groups - mean).reshape(-1), atol=1e-6)
  np.testing.assert_allclose(rl.group_std(jnp.asarray(rewards), 4), std[:, 0], rtol=1e-6)
  np.testing.assert_array_equal(got[:4], 0.0)


def test_kl_estimators_match_formulas_and_k3_is_unbiased_and_nonnegative():
  logp = RNG.normal(-3.0, 1.0, 1000)
  ref = RNG.normal(-3.0, 1.0, 1000)
  r = np.exp(ref - logp)
  np.testing.assert_allclose(rl.kl_estimate(logp, ref, 'k1'), -np.log(r), rtol=1e-5)
  np.testing.assert_allclose(rl.kl_estimate(logp, ref, 'k2'), 0.5 * np.log(r)**2, rtol=1e-5)
  np.testing.assert_allclose(rl.kl_estimate(logp, ref, 'k3'), r - 1 - np.log(r), rtol=1e-4,
                             atol=1e-6)
  assert np.all(np.asarray(rl.kl_estimate(logp, ref, 'k3')) >= 0)
  # Unbiased: sample means over tokens drawn from the policy p approach KL(p || q).
  p = np.array([0.5, 0.3, 0.15, 0.05])
  q = np.array([0.25, 0.25, 0.25, 0.25])
  exact = np.sum(p * np.log(p / q))
  draws = np.random.default_rng(1).choice(4, size=200_000, p=p)
  lp, lq = np.log(p)[draws], np.log(q)[draws]
  for kind in ('k1', 'k3'):
    est = np.asarray(rl.kl_estimate(jnp.asarray(lp), jnp.asarray(lq), kind))
    assert abs(est.mean() - exact) < 4 * est.std() / np.sqrt(draws.size), kind
  k2 = np.asarray(rl.kl_estimate(jnp.asarray(lp), jnp.asarray(lq), 'k2')).mean()
  assert abs(k2 - exact) > 0.01  # k2 is biased here (its own oracle: a different number)
  with pytest.raises(ValueError, match='k4'):
    rl.kl_estimate(logp, ref, 'k4')


# --- rollouts and teacher-forced scores --------------------------------------------


@pytest.fixture(scope='module')
def tiny_model():
  cfg = ml_collections.ConfigDict(dict(
      vocab_size=-1, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=-1, mlp_dim=-1,
      rope_theta=10_000.0, norm_eps=1e-5, dropout=0.0, dtype='float32', param_dtype='float32',
      remat='none', attention='xla', scan_unroll=1, norm='rmsnorm', mlp='swiglu',
      position='rope', max_positions=-1, qkv_bias=False, attn_out_bias=False, mlp_bias=False,
      tie_embeddings=True))
  model_cfg = transformer.TransformerConfig.from_config(cfg, 50)
  with nnx.use_eager_sharding(False):
    model = transformer.Transformer(model_cfg, rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.tree.map(lambda p: p * 3.0 if p.ndim > 1 else p, nnx.to_pure_dict(params))
  return graphdef, params


def test_rollout_layout_and_logprobs_match_a_full_forward(tiny_model):
  graphdef, params = tiny_model
  prompts = np.array([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]], np.int32)
  prompt_len = np.array([3, 2, 4], np.int32)
  b, m = 3, 6
  settings = sampling.SamplingParams.make(b, temperature=1.0)

  @jax.jit
  def run(params, seeds):
    ro = rl.rollout(graphdef, params, prompts, prompt_len, max_new_tokens=m,
                    sampling_params=settings, seeds_B=seeds, stop_ids=(3,), vocab_limit=50)
    lp, ent = rl.token_logprobs(graphdef, params, ro, vocab_limit=50, with_entropy=True)
    lp_t, _ = rl.token_logprobs(graphdef, params, ro, temperature=0.7, vocab_limit=50,
                                with_entropy=True)
    return ro, lp, ent, lp_t, nnx.merge(graphdef, params)(ro.tokens_BxL)

  ro, lp, ent, lp_t, logits = jax.device_get(run(params, np.array([1, 2, 3], np.int32)))
  assert ro.tokens_BxL.shape == (b, 4 + m)
  for i in range(b):
    p, n = prompt_len[i], ro.length_B[i]
    np.testing.assert_array_equal(ro.tokens_BxL[i, :p], prompts[i, :p])
    np.testing.assert_array_equal(ro.tokens_BxL[i, n:], 0)
    np.testing.assert_array_equal(ro.completion_mask_BxL[i], (np.arange(4 + m) >= p)
                                  & (np.arange(4 + m) < n))
    assert ro.stopped_B[i] == (ro.tokens_BxL[i, n - 1] == 3) or n - p == m
    assert ((ro.tokens_BxL[i, p:n] == 3).sum() == ro.stopped_B[i])  # stops at the first 3
  # Teacher-forced against numpy's log-softmax of the full forward, vocabulary masked.
  def np_logp(logits, temp):
    z = logits[:, :-1, :50] / temp
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  for temp, got in ((1.0, lp), (0.7, lp_t)):
    logp = np_logp(logits, temp)
    want = np.take_along_axis(logp, ro.tokens_BxL[:, 1:, None], -1)[..., 0]
    valid = np.arange(1, 4 + m)[None] < ro.length_B[:, None]
    np.testing.assert_allclose(got[:, 1:], np.where(valid, want, 0.0), atol=2e-5)
    np.testing.assert_array_equal(got[:, 0], 0.0)
  logp = np_logp(logits, 1.0)
  want_ent = -(np.exp(logp) * logp).sum(-1)
  valid = np.arange(1, 4 + m)[None] < ro.length_B[:, None]
  np.testing.assert_allclose(ent[:, 1:], np.where(valid, want_ent, 0.0), atol=2e-5)
  # The sampling-time log-probs are the same numbers, from the KV-cache path.
  mask = ro.completion_mask_BxL
  assert mask.sum() > b
  np.testing.assert_allclose(ro.logprobs_BxL, lp * mask, atol=1e-4)


def test_token_logprobs_are_differentiable(tiny_model):
  graphdef, params = tiny_model
  ro = rl.Rollout(tokens_BxL=jnp.asarray([[1, 2, 3, 4, 0]]), prompt_len_B=jnp.asarray([2]),
                  length_B=jnp.asarray([4]), completion_mask_BxL=jnp.asarray([[0, 0, 1, 1, 0.]]),
                  logprobs_BxL=jnp.zeros((1, 5)), stopped_B=jnp.asarray([True]))
  f = jax.jit(lambda p: jnp.sum(rl.token_logprobs(graphdef, p, ro) * ro.completion_mask_BxL))
  grads = jax.jit(jax.grad(f))(params)
  # A central difference along the unit gradient direction equals the gradient's norm.
  norm = np.sqrt(sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)))
  eps = 1e-2
  move = lambda sign: jax.tree.map(lambda p, g: p + sign * eps * g / norm, params, grads)  # noqa
  np.testing.assert_allclose((f(move(1)) - f(move(-1))) / (2 * eps), norm, rtol=0.02)
