"""The math that every on-policy RL method shares: rollouts, teacher-forced log-probs,
KL estimators, the clipped policy loss and its aggregations, group advantages.

GRPO (train/tasks/grpo.py) and PPO build on these; each function is pure and jittable, so
a task calls them inside its jitted step (rollouts from `model/decode.generate`, no copy of
the weights to another engine).

Conventions, shared with `model/decode.score`: a row of `tokens_BxL` is prompt then
completion, left-aligned, zero-padded; a per-token array `x_BxL` at position t is about
token t as a *target*: `logp_BxL[b, t] = log p(tokens[b, t] | tokens[b, :t])`. Position 0
has no target (it is always a prompt token). `completion_mask_BxL[b, t]` is 1.0 where
token t is a completion token (prompt_len[b] <= t < length[b]), so a loss sums
`x_BxL * completion_mask_BxL` over exactly the sampled tokens.

Shape letters: B rows, L = P + M positions, P prompt positions (padded), M new tokens.
"""

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from model import decode, sampling

AGGREGATIONS = ('sequence_mean', 'token_mean', 'dr_grpo')
KL_KINDS = ('k1', 'k2', 'k3')


@flax.struct.dataclass
class Rollout:
  """Sampled completions of a batch of prompts, ready to be scored teacher-forced.

  tokens_BxL: int32, prompt then completion, left-aligned, 0 after `length_B`.
  prompt_len_B: int32, prompt tokens in each row.
  length_B: int32, prompt + completion tokens (a stop token, when sampled, included).
  completion_mask_BxL: float32, 1.0 at position t when token t is a completion token
    (prompt_len <= t < length): position t scores token t as a target.
  logprobs_BxL: float32, the sampling-time log p(token t | tokens before t) under the raw
    logits (before temperature and filters, as `generate` reports it) on the completion
    positions, 0 elsewhere.
  stopped_B: bool, the completion ended on a stop token (else it ran to M tokens).
  """
  tokens_BxL: jax.Array
  prompt_len_B: jax.Array
  length_B: jax.Array
  completion_mask_BxL: jax.Array
  logprobs_BxL: jax.Array
  stopped_B: jax.Array

  @property
  def completion_len_B(self) -> jax.Array:
    return self.length_B - self.prompt_len_B


def rollout_seeds(key: jax.Array, n: int) -> jax.Array:
  """`n` per-row sampling seeds (int32 in [0, 2**31), the range the engine's seeds live in,
  so a row's seed means the same to `generate` and to serve/engine.py)."""
  return (jax.random.bits(key, (n,), jnp.uint32) >> 1).astype(jnp.int32)


def rollout(graphdef, params, prompt_BxP: jax.Array, prompt_len_B: jax.Array, *,
            max_new_tokens: int, sampling_params: sampling.SamplingParams,
            seeds_B: jax.Array, stop_ids: tuple[int, ...] = (),
            vocab_limit: int | None = None) -> Rollout:
  """Samples up to `max_new_tokens` tokens after each prompt with `decode.generate` and
  lays prompt and completion out as one row (jittable; L = P + max_new_tokens).

  A row's tokens depend only on its prompt, its sampling settings and its seed (the
  per-request keys of model/sampling.py), as in the serving engine.
  """
  out = decode.generate(graphdef, params, prompt_BxP, prompt_len_B,
                        max_new_tokens=max_new_tokens, sampling_params=sampling_params,
                        seeds_B=seeds_B, stop_ids=stop_ids, vocab_limit=vocab_limit)
  b, p = prompt_BxP.shape
  m = max_new_tokens
  arange_P = jnp.arange(p)[None]
  prompt_BxP = jnp.where(arange_P < prompt_len_B[:, None], prompt_BxP, 0).astype(jnp.int32)
  tokens_BxL = jnp.concatenate([prompt_BxP, jnp.zeros((b, m), jnp.int32)], axis=1)
  where_BxM = prompt_len_B[:, None] + jnp.arange(m)[None]  # position of new token j
  live_BxM = jnp.arange(m)[None] < out.lengths[:, None]
  rows_BxM = jnp.broadcast_to(jnp.arange(b)[:, None], (b, m))
  tokens_BxL = tokens_BxL.at[rows_BxM, where_BxM].set(jnp.where(live_BxM, out.tokens, 0))
  mask_BxL = jnp.zeros((b, p + m), jnp.float32).at[rows_BxM, where_BxM].set(
      live_BxM.astype(jnp.float32))
  logprobs_BxL = jnp.zeros((b, p + m), jnp.float32).at[rows_BxM, where_BxM].set(
      jnp.where(live_BxM, out.logprobs, 0.0))
  return Rollout(tokens_BxL=tokens_BxL, prompt_len_B=prompt_len_B.astype(jnp.int32),
                 length_B=(prompt_len_B + out.lengths).astype(jnp.int32),
                 completion_mask_BxL=mask_BxL, logprobs_BxL=logprobs_BxL,
                 stopped_B=out.stopped)


def token_logprobs(graphdef, params, rollout_: Rollout, *, temperature: float = 1.0,
                   vocab_limit: int | None = None, with_entropy: bool = False):
  """Teacher-forced log p(token t | tokens before t) of every row, float32 [B, L]
  (differentiable in `params`; 0 at position 0 and from `length_B` on), under the logits
  divided by `temperature` (as TRL scores a policy that samples at that temperature).

  With `with_entropy`, also the entropy of the distribution that predicts token t,
  float32 [B, L] (0 where the log-prob is 0), from the same forward pass.

  The policy, the rollout-time (old) policy and a frozen reference are all scored here.
  """
  model = nnx.merge(graphdef, params)
  tokens_BxL = rollout_.tokens_BxL
  b, length = tokens_BxL.shape
  logits_BxLxV = model(tokens_BxL).astype(jnp.float32)[:, :-1] / temperature
  logits_BxLxV = decode.mask_vocab(logits_BxLxV, vocab_limit)
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  lp_BxL = jnp.take_along_axis(logp_BxLxV, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
  valid_BxL = jnp.arange(1, length)[None] < rollout_.length_B[:, None]
  pad = ((0, 0), (1, 0))
  lp_BxL = jnp.pad(jnp.where(valid_BxL, lp_BxL, 0.0), pad)
  if not with_entropy:
    return lp_BxL
  p_BxLxV = jnp.exp(logp_BxLxV)
  ent_BxL = -jnp.sum(jnp.where(p_BxLxV > 0, p_BxLxV * logp_BxLxV, 0.0), axis=-1)
  return lp_BxL, jnp.pad(jnp.where(valid_BxL, ent_BxL, 0.0), pad)


def entropy(graphdef, params, rollout_: Rollout, *, temperature: float = 1.0,
            vocab_limit: int | None = None) -> jax.Array:
  """The entropy of the next-token distribution at every target position, float32 [B, L]
  (see `token_logprobs`)."""
  return token_logprobs(graphdef, params, rollout_, temperature=temperature,
                        vocab_limit=vocab_limit, with_entropy=True)[1]


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str = 'k3') -> jax.Array:
  """Per-token estimate of KL(policy || reference) from tokens sampled from the policy
  (Schulman, "Approximating KL divergence", 2020), with log r = ref_logp - logp:

    k1 = -log r                 unbiased, high variance, can be negative
    k2 = (log r)^2 / 2          biased (low variance), >= 0
    k3 = (r - 1) - log r        unbiased, >= 0 (GRPO's estimator)
  """
  log_r = ref_logp - logp
  if kind == 'k1':
    return -log_r
  if kind == 'k2':
    return 0.5 * jnp.square(log_r)
  if kind == 'k3':
    return jnp.expm1(log_r) - log_r
  raise ValueError(f'kind={kind!r}: choose one of {", ".join(KL_KINDS)}.')


def aggregate(x_BxL: jax.Array, mask_BxL: jax.Array, aggregation: str,
              max_len: int | None = None) -> jax.Array:
  """A per-token loss reduced to a scalar over the masked tokens:

    sequence_mean  each row's mean over its tokens, then the mean over rows (GRPO);
                   long completions weigh no more than short ones in the batch
    token_mean     the mean over every token of the batch (DAPO)
    dr_grpo        the sum over tokens divided by B * max_len (Dr. GRPO): a constant
                   normaliser, so no length bias; `max_len` defaults to L
  """
  masked_BxL = x_BxL * mask_BxL
  if aggregation == 'sequence_mean':
    per_row_B = jnp.sum(masked_BxL, -1) / jnp.maximum(jnp.sum(mask_BxL, -1), 1.0)
    return jnp.mean(per_row_B)
  if aggregation == 'token_mean':
    return jnp.sum(masked_BxL) / jnp.maximum(jnp.sum(mask_BxL), 1.0)
  if aggregation == 'dr_grpo':
    b, length = x_BxL.shape
    return jnp.sum(masked_BxL) / (b * (length if max_len is None else max_len))
  raise ValueError(f'aggregation={aggregation!r}: choose one of {", ".join(AGGREGATIONS)}.')


def masked_mean(x_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """The mean of `x` over the masked tokens of the whole batch (0 when there are none)."""
  return jnp.sum(x_BxL * mask_BxL) / jnp.maximum(jnp.sum(mask_BxL), 1.0)


def clipped_policy_loss(logp_BxL: jax.Array, old_logp_BxL: jax.Array, advantages: jax.Array,
                        mask_BxL: jax.Array, *, clip_low: float, clip_high: float,
                        aggregation: str, max_len: int | None = None):
  """PPO's clipped surrogate per token, aggregated: (loss, metrics).

  ratio = exp(logp - old_logp); per token, max(-A ratio, -A clip(ratio, 1 - clip_low,
  1 + clip_high)), with A the advantage of the token (`advantages` [B] is one per sequence,
  as GRPO's; [B, L] per token, as PPO's GAE). clip_high > clip_low is DAPO's clip-higher.

  Metrics (masked means over the batch's tokens): `policy/clipfrac` (tokens whose clipped
  term is the larger, TRL PPO's), `policy/approxkl` (mean of (log ratio)^2 / 2),
  `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean` (tokens clipped
  below with A < 0, above with A > 0, either: TRL GRPO's).
  """
  adv_BxL = advantages[:, None] if advantages.ndim == 1 else advantages
  log_ratio_BxL = logp_BxL - old_logp_BxL
  ratio_BxL = jnp.exp(log_ratio_BxL)
  unclipped_BxL = -adv_BxL * ratio_BxL
  clipped_BxL = -adv_BxL * jnp.clip(ratio_BxL, 1.0 - clip_low, 1.0 + clip_high)
  per_token_BxL = jnp.maximum(unclipped_BxL, clipped_BxL)
  loss = aggregate(per_token_BxL, mask_BxL, aggregation, max_len)
  sg = jax.lax.stop_gradient
  ratio_BxL, adv_BxL = sg(ratio_BxL), sg(jnp.broadcast_to(adv_BxL, ratio_BxL.shape))
  low_BxL = (ratio_BxL < 1.0 - clip_low) & (adv_BxL < 0)
  high_BxL = (ratio_BxL > 1.0 + clip_high) & (adv_BxL > 0)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  metrics = {
      'policy/clipfrac': masked_mean(f32(sg(clipped_BxL) > sg(unclipped_BxL)), mask_BxL),
      'policy/approxkl': masked_mean(0.5 * jnp.square(sg(log_ratio_BxL)), mask_BxL),
      'clip_ratio/low_mean': masked_mean(f32(low_BxL), mask_BxL),
      'clip_ratio/high_mean': masked_mean(f32(high_BxL), mask_BxL),
      'clip_ratio/region_mean': masked_mean(f32(low_BxL | high_BxL), mask_BxL),
  }
  return loss, metrics


def group_advantages(rewards_B: jax.Array, group_size: int, *, scale: bool = True,
                     eps: float = 1e-4) -> jax.Array:
  """GRPO's advantages [B]: each reward minus the mean of its group (rows g*G .. g*G+G-1
  are the G samples of one prompt), divided by the group's standard deviation (unbiased,
  as torch.std, plus `eps`, as TRL) when `scale`; Dr. GRPO sets scale=False."""
  r_NxG = rewards_B.reshape(-1, group_size)
  centred_NxG = r_NxG - jnp.mean(r_NxG, axis=1, keepdims=True)
  if scale:
    centred_NxG = centred_NxG / (group_std(rewards_B, group_size)[:, None] + eps)
  return centred_NxG.reshape(-1)


def group_std(rewards_B: jax.Array, group_size: int) -> jax.Array:
  """Each group's unbiased standard deviation of its rewards, [B / group_size]."""
  return jnp.std(rewards_B.reshape(-1, group_size), axis=1, ddof=1)
