"""Plain jnp attention, written for clarity: the oracle every attention kernel is tested against.

It materialises the whole [B, H, L, S] score matrix, so it is only for tests
and for the rare shapes the kernels hand back (kernels/flash_attention.py).

Shape letters: B batch, L query length, S key/value length, H query heads,
K key/value heads (K divides H), D head dim.

Semantics, shared by every implementation in kernels/ and model/attention.py:
  * Query i sits at position i + (S - L): the queries are the last L
    positions of the key sequence (the usual layout for causal attention with
    a prefix of cached keys; with L == S it is simply position i).
  * Key j is visible to query i when every enabled rule allows it:
      causal          j <= pos(i)
      sliding window  pos(i) - left <= j <= pos(i) + right
                      (jax.nn.dot_product_attention's `local_window_size`)
      segment ids     segment_ids[i] == segment_ids[j]
  * logits = scale * q.k (scale defaults to 1/sqrt(D)); with a soft-cap c,
    logits = c * tanh(logits / c) before masking (Gemma 2).
  * A query that sees no key at all gets a zero output row (and a
    log-sum-exp of -inf), never NaN and never a uniform average.
"""

import jax
import jax.numpy as jnp


def normalize_window(sliding_window: int | tuple[int, int] | None) -> tuple[int, int] | None:
  """An int w means (w, w), as in jax.nn.dot_product_attention; None means no window."""
  if sliding_window is None:
    return None
  if isinstance(sliding_window, int):
    left = right = sliding_window
  else:
    left, right = sliding_window
  if left < 0 or right < 0:
    raise ValueError(f'sliding_window={sliding_window!r} must be non-negative.')
  return int(left), int(right)


def visible_mask(
    q_len: int,
    kv_len: int,
    *,
    segment_ids_BxL: jax.Array | None = None,
    causal: bool = False,
    sliding_window: int | tuple[int, int] | None = None,
) -> jax.Array:
  """True where query i may attend to key j: bool [B or 1, L, S]."""
  q_pos_L = jnp.arange(q_len) + (kv_len - q_len)
  k_pos_S = jnp.arange(kv_len)
  allowed_LxS = jnp.ones((q_len, kv_len), bool)
  if causal:
    allowed_LxS &= k_pos_S[None, :] <= q_pos_L[:, None]
  window = normalize_window(sliding_window)
  if window is not None:
    left, right = window
    allowed_LxS &= k_pos_S[None, :] >= q_pos_L[:, None] - left
    allowed_LxS &= k_pos_S[None, :] <= q_pos_L[:, None] + right
  allowed_BxLxS = allowed_LxS[None]
  if segment_ids_BxL is not None:
    allowed_BxLxS = allowed_BxLxS & (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
  return allowed_BxLxS


def attention_reference(
    q_BxLxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    *,
    segment_ids_BxL: jax.Array | None = None,
    causal: bool = False,
    sliding_window: int | tuple[int, int] | None = None,
    logit_softcap: float | None = None,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Returns (out_BxLxHxD in q's dtype, lse_BxHxL float32 log-sum-exp of the logits).

  Everything after the input cast runs in float32. Segment ids need L == S.
  """
  b, q_len, h, d = q_BxLxHxD.shape
  kv_len, kv_heads = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  scale = d ** -0.5 if scale is None else scale
  # Every query head reads the key/value head of its group.
  k_BxSxHxD = jnp.repeat(k_BxSxKxD, h // kv_heads, axis=2).astype(jnp.float32)
  v_BxSxHxD = jnp.repeat(v_BxSxKxD, h // kv_heads, axis=2).astype(jnp.float32)
  q = q_BxLxHxD.astype(jnp.float32)

  logits_BxHxLxS = scale * jnp.einsum('blhd,bshd->bhls', q, k_BxSxHxD,
                                      precision=jax.lax.Precision.HIGHEST)
  if logit_softcap is not None:
    logits_BxHxLxS = logit_softcap * jnp.tanh(logits_BxHxLxS / logit_softcap)
  allowed_Bx1xLxS = visible_mask(
      q_len, kv_len, segment_ids_BxL=segment_ids_BxL, causal=causal,
      sliding_window=sliding_window)[:, None]
  masked_BxHxLxS = jnp.where(allowed_Bx1xLxS, logits_BxHxLxS, -jnp.inf)

  # Softmax with the row max subtracted; a row with no visible key has max -inf,
  # replaced by 0 so that its weights come out zero (and its gradients finite).
  max_BxHxL = jnp.max(masked_BxHxLxS, axis=-1)
  max_BxHxL = jax.lax.stop_gradient(jnp.where(jnp.isfinite(max_BxHxL), max_BxHxL, 0.0))
  weights_BxHxLxS = jnp.where(
      allowed_Bx1xLxS, jnp.exp(masked_BxHxLxS - max_BxHxL[..., None]), 0.0)
  total_BxHxL = jnp.sum(weights_BxHxLxS, axis=-1)
  lse_BxHxL = max_BxHxL + jnp.log(total_BxHxL)
  probs_BxHxLxS = weights_BxHxLxS / jnp.where(total_BxHxL == 0, 1.0, total_BxHxL)[..., None]
  out_BxLxHxD = jnp.einsum('bhls,bshd->blhd', probs_BxHxLxS, v_BxSxHxD,
                           precision=jax.lax.Precision.HIGHEST)
  return out_BxLxHxD.astype(q_BxLxHxD.dtype), lse_BxHxL
