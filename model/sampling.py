"""Choosing the next token: greedy, temperature, top-k, top-p (nucleus), min-p and a
repetition penalty, each set per row, and the log-probabilities servers report.

Every knob is a [B] array, so one compiled program serves any mix of requests.
The filters run in Hugging Face's order: repetition penalty, temperature, top-k,
top-p, min-p. A row with temperature 0 is greedy (the argmax after the penalty).

Randomness is per request: the key of a request's i-th sampled token is
`fold_in(key(seed), i)`, so a seed gives the same text whatever else shares the batch.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class SamplingParams:
  """Per-row sampling settings, each a [B] array."""
  temperature: jax.Array
  top_k: jax.Array  # int32; 0 disables
  top_p: jax.Array  # 1 disables
  min_p: jax.Array  # 0 disables
  repetition_penalty: jax.Array  # 1 disables

  @classmethod
  def make(cls, batch: int, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
           repetition_penalty=1.0) -> 'SamplingParams':
    """Host arrays from scalars (the same for every row) or length-`batch` sequences."""
    def col(value, dtype):
      return np.broadcast_to(np.asarray(value, dtype), (batch,)).copy()
    return cls(temperature=col(temperature, np.float32), top_k=col(top_k, np.int32),
               top_p=col(top_p, np.float32), min_p=col(min_p, np.float32),
               repetition_penalty=col(repetition_penalty, np.float32))


def request_keys(seeds_B: jax.Array, counts_B: jax.Array) -> jax.Array:
  """The key of each row's next token: fold_in(key(seed), tokens it has sampled so far)."""
  return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(
      seeds_B.astype(jnp.uint32), counts_B)


def penalize(logits_BxV: jax.Array, penalty_B: jax.Array, seen_BxV: jax.Array) -> jax.Array:
  """The CTRL / Hugging Face repetition penalty: a seen token's positive logit is divided by
  the penalty, a negative one multiplied."""
  p = penalty_B[:, None]
  penalized = jnp.where(logits_BxV > 0, logits_BxV / p, logits_BxV * p)
  return jnp.where(seen_BxV, penalized, logits_BxV)


def filter_logits(logits_BxV: jax.Array, params: SamplingParams,
                  seen_BxV: jax.Array | None = None) -> jax.Array:
  """Logits scaled by the temperature with every filtered-out token at -inf (float32).

  Rows with temperature 0 are scaled by 1 (their sample is the argmax anyway).
  """
  logits = logits_BxV.astype(jnp.float32)
  if seen_BxV is not None:
    logits = penalize(logits, params.repetition_penalty, seen_BxV)
  t = params.temperature[:, None]
  logits = logits / jnp.where(t > 0, t, 1.0)
  vocab = logits.shape[-1]
  sorted_BxV = -jnp.sort(-logits, axis=-1)  # descending
  # Top-k: keep logits >= the k-th largest.
  k = params.top_k[:, None]
  kth_Bx1 = jnp.take_along_axis(sorted_BxV, jnp.clip(k - 1, 0, vocab - 1), axis=-1)
  keep_k = (k <= 0) | (logits >= kth_Bx1)
  sorted_BxV = jnp.where((k <= 0) | (jnp.arange(vocab)[None] < k), sorted_BxV, -jnp.inf)
  logits = jnp.where(keep_k, logits, -jnp.inf)
  # Top-p: the smallest prefix of the sorted tokens whose mass reaches p (at least one).
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  top_p = params.top_p[:, None]
  in_nucleus = (before_BxV < top_p) | (top_p >= 1.0) | (jnp.arange(vocab)[None] == 0)
  cutoff_Bx1 = jnp.min(jnp.where(in_nucleus, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits >= cutoff_Bx1, logits, -jnp.inf)
  # Min-p: keep tokens whose probability is at least min_p times the largest one's.
  top_Bx1 = jnp.max(logits, axis=-1, keepdims=True)
  floor_Bx1 = top_Bx1 + jnp.log(jnp.maximum(params.min_p[:, None], 1e-30))
  keep_min_p = (params.min_p[:, None] <= 0) | (logits >= floor_Bx1)
  return jnp.where(keep_min_p, logits, -jnp.inf)


def sample(logits_BxV: jax.Array, params: SamplingParams, keys_B: jax.Array,
           seen_BxV: jax.Array | None = None) -> jax.Array:
  """One token per row (int32 [B])."""
  filtered_BxV = filter_logits(logits_BxV, params, seen_BxV)
  drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV)
  greedy_B = jnp.argmax(filtered_BxV, axis=-1)
  return jnp.where(params.temperature > 0, drawn_B, greedy_B).astype(jnp.int32)


def token_logprobs(logits_BxV: jax.Array, tokens_B: jax.Array, top_n: int):
  """(log p of each row's token, top-n ids [B, n], their log p [B, n]) under the raw
  logits' softmax, as OpenAI-style servers report them."""
  logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  chosen_B = jnp.take_along_axis(logp_BxV, tokens_B[:, None], axis=-1)[:, 0]
  if top_n <= 0:
    b = logits_BxV.shape[0]
    return chosen_B, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), jnp.float32)
  top_lp, top_ids = jax.lax.top_k(logp_BxV, top_n)
  return chosen_B, top_ids.astype(jnp.int32), top_lp
