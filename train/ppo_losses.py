"""The math of PPO for language models (Schulman et al. 2017; Ziegler et al. 2019), with TRL's
PPOTrainer semantics, as pure functions of [B, T] arrays over completion tokens.

One episode is one completion: token t is action a_t, the state is the prompt and the
tokens before it, and the episode ends after the completion's last token (a stop token or
the length limit). `mask_BxT` is 1 on completion tokens and 0 on the padding after them.

- `kl_penalized_rewards`: the per-token reward -kl_coef * KL_t (KL_t an estimate of
  KL(pi || ref) at token t, k1 or k3: `rl.kl_estimate`) with the sequence's score added at
  its last token.
- `gae`: generalised advantage estimation (Schulman et al. 2016) with gamma and lambda,
  terminating after the last token (its next value is 0).
- `masked_whiten`: TRL's normalisation of advantages (and, optionally, rewards).
- `clipped_value_loss`: PPO2's value loss, 0.5 * max((V - R)^2, (clip(V) - R)^2), clipped
  to `cliprange_value` around the rollout's values.
- `ppo_loss`: clipped policy loss (`rl.clipped_policy_loss`, the mean over tokens) +
  vf_coef * value loss - entropy_coef * entropy, with the statistics TRL logs.

The math shared with GRPO (KL estimators, the clipped surrogate) is train/rl.py's. Written
here rather than taken from a library: TRL is PyTorch and tunix's PPO is bound to its own
trainer, and each function is a few lines of jnp (tested against numpy loops).
"""

import jax
import jax.numpy as jnp

from train import rl

KL_ESTIMATORS = ('k1', 'k3')  # TRL's PPO offers these two (train/rl.py has k2 too)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """The mean of `x` where `mask` is 1 (0 where nothing is)."""
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
  """The unbiased (Bessel-corrected) variance of `x` where `mask` is 1, as TRL's."""
  mean = masked_mean(x, mask)
  n = jnp.sum(mask)
  var = masked_mean(jnp.square(x - mean), mask)
  return var * n / jnp.maximum(n - 1.0, 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
  """(x - mean) / sqrt(var + 1e-8) over the masked entries (the mean added back when not
  `shift_mean`); entries outside the mask come out 0."""
  mean = masked_mean(x, mask)
  white = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + 1e-8)
  if not shift_mean:
    white = white + mean
  return white * mask


def kl_penalized_rewards(scores_B: jax.Array, logprobs_BxT: jax.Array,
                         ref_logprobs_BxT: jax.Array, mask_BxT: jax.Array, *, kl_coef,
                         estimator: str = 'k1'):
  """(rewards_BxT, kl_BxT, non_score_reward_BxT): -kl_coef * KL_t on every completion token
  and the score added at each row's last one (0 outside the mask)."""
  kl_BxT = rl.kl_estimate(logprobs_BxT, ref_logprobs_BxT, estimator) * mask_BxT
  non_score_BxT = -kl_coef * kl_BxT
  t = mask_BxT.shape[1]
  last_B = jnp.sum(mask_BxT, axis=1).astype(jnp.int32) - 1
  at_last_BxT = (jnp.arange(t)[None] == last_B[:, None]).astype(scores_B.dtype)
  return non_score_BxT + scores_B[:, None] * at_last_BxT, kl_BxT, non_score_BxT


def gae(rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, *, gamma: float,
        lam: float):
  """(advantages_BxT, returns_BxT) by generalised advantage estimation:

    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t

  with V and r taken as 0 outside the mask, so the episode ends after each row's last
  token (its next value is 0). A reverse `lax.scan` over T.
  """
  rewards_BxT = rewards_BxT * mask_BxT
  values_BxT = values_BxT * mask_BxT
  next_values_BxT = jnp.pad(values_BxT[:, 1:], ((0, 0), (0, 1)))
  deltas_BxT = rewards_BxT + gamma * next_values_BxT - values_BxT

  def step(next_advantage_B, delta_B):
    advantage_B = delta_B + gamma * lam * next_advantage_B
    return advantage_B, advantage_B

  _, advantages_TxB = jax.lax.scan(step, jnp.zeros_like(deltas_BxT[:, 0]), deltas_BxT.T,
                                   reverse=True)
  advantages_BxT = advantages_TxB.T * mask_BxT
  return advantages_BxT, (advantages_BxT + values_BxT) * mask_BxT


def clipped_value_loss(values_BxT: jax.Array, old_values_BxT: jax.Array, returns_BxT: jax.Array,
                       mask_BxT: jax.Array, cliprange_value: float):
  """(loss, clipfrac): 0.5 * masked mean of max((V - R)^2, (V_clip - R)^2), where V_clip
  stays within cliprange_value of the rollout's values, and the share of tokens where the
  clipped term is the larger."""
  clipped_BxT = jnp.clip(values_BxT, old_values_BxT - cliprange_value,
                         old_values_BxT + cliprange_value)
  plain_BxT = jnp.square(values_BxT - returns_BxT)
  clip_BxT = jnp.square(clipped_BxT - returns_BxT)
  loss = 0.5 * masked_mean(jnp.maximum(plain_BxT, clip_BxT), mask_BxT)
  return loss, masked_mean((clip_BxT > plain_BxT).astype(jnp.float32), mask_BxT)


def ppo_loss(*, logprobs_BxT, old_logprobs_BxT, advantages_BxT, values_BxT, old_values_BxT,
             returns_BxT, entropy_BxT, mask_BxT, cliprange: float, cliprange_value: float,
             vf_coef: float, entropy_coef: float = 0.0):
  """(loss, stats): pg_loss + vf_coef * vf_loss - entropy_coef * mean entropy, and the
  minibatch statistics behind TRL's metrics."""
  pg_loss, pg_stats = rl.clipped_policy_loss(
      logprobs_BxT, old_logprobs_BxT, advantages_BxT, mask_BxT, clip_low=cliprange,
      clip_high=cliprange, aggregation='token_mean')  # TRL's PPO: the mean over tokens
  ratio = masked_mean(jnp.exp(logprobs_BxT - old_logprobs_BxT), mask_BxT)
  vf_loss, vf_clipfrac = clipped_value_loss(values_BxT, old_values_BxT, returns_BxT, mask_BxT,
                                            cliprange_value)
  entropy = masked_mean(entropy_BxT, mask_BxT)
  loss = pg_loss + vf_coef * vf_loss - entropy_coef * entropy
  stats = {'policy/approxkl_avg': pg_stats['policy/approxkl'],
           'policy/clipfrac_avg': pg_stats['policy/clipfrac'],
           'loss/policy_avg': pg_loss, 'loss/value_avg': vf_loss,
           'val/clipfrac_avg': vf_clipfrac, 'policy/entropy_avg': entropy, 'val/ratio': ratio}
  return loss, jax.tree.map(jax.lax.stop_gradient, stats)


def adaptive_kl_coef(kl_coef: jax.Array, kl: jax.Array, *, target: float, horizon: float,
                     n_steps: int) -> jax.Array:
  """Ziegler et al.'s adaptive KL controller (TRL's AdaptiveKLController): the coefficient
  times 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon, where `kl` is the mean
  summed KL of the batch and `n_steps` its episodes."""
  error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
  return kl_coef * (1.0 + error * n_steps / horizon)
