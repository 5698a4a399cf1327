"""Dot-product attention: the single dispatch point for every implementation.

Shape letters: B batch, L query length, S key/value length, H query heads,
K key/value heads (K divides H), G = H // K query heads per key/value head,
D head dim.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('xla',)


def attention(
    q_BxLxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    *,
    segment_ids_BxL: jax.Array | None = None,
    causal: bool = True,
    implementation: str = 'xla',
) -> jax.Array:
  """Scaled dot-product attention with grouped-query heads.

  Args:
    q_BxLxHxD: queries.
    k_BxSxKxD: keys; K must divide H.
    v_BxSxKxD: values.
    segment_ids_BxL: optional integer document ids; a query attends only to
      keys with the same id. Needs L == S (self-attention over a packed row).
    causal: if True, query i attends only to keys j <= i + (S - L), i.e. the
      queries are the last L positions of the key sequence.
    implementation: one of IMPLEMENTATIONS.

  Returns:
    out_BxLxHxD in the dtype of q.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f'Unknown attention implementation {implementation!r}; allowed: '
        f'{", ".join(IMPLEMENTATIONS)}.')
  _check_shapes(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL)
  return _xla_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL, causal)


def _check_shapes(q, k, v, segment_ids) -> None:
  if k.shape != v.shape:
    raise ValueError(f'k and v shapes differ: {k.shape} vs {v.shape}.')
  b, q_len, h, d = q.shape
  kb, s, kh, kd = k.shape
  if (kb, kd) != (b, d) or h % kh:
    raise ValueError(
        f'Incompatible q {q.shape} and k/v {k.shape}: batch and head dim must match '
        'and the k/v head count must divide the query head count.')
  if segment_ids is not None and (segment_ids.shape != (b, q_len) or s != q_len):
    raise ValueError(
        f'segment_ids {segment_ids.shape} must be [batch, length] = {(b, q_len)} '
        f'and queries and keys must have the same length (got L={q_len}, S={s}).')


def make_mask(
    q_len: int, s: int, segment_ids_BxL: jax.Array | None, causal: bool
) -> jax.Array | None:
  """Boolean mask, True where attention is allowed; [B|1, 1, 1, L, S] or None."""
  mask = None
  if causal:
    q_pos = jnp.arange(q_len)[:, None] + (s - q_len)
    mask_LxS = q_pos >= jnp.arange(s)[None, :]
    mask = mask_LxS[None, None, None]
  if segment_ids_BxL is not None:
    same_BxLxS = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    same = same_BxLxS[:, None, None]
    mask = same if mask is None else mask & same
  return mask


def _xla_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL, causal):
  b, q_len, h, d = q_BxLxHxD.shape
  s, kh = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  # Group the query heads by the k/v head they share, so K/V are never repeated.
  q_BxLxKxGxD = q_BxLxHxD.reshape(b, q_len, kh, h // kh, d)
  scores_BxKxGxLxS = jnp.einsum(
      'blkgd,bskd->bkgls', q_BxLxKxGxD, k_BxSxKxD,
      preferred_element_type=jnp.float32)
  scores_BxKxGxLxS = scores_BxKxGxLxS * (d ** -0.5)
  mask = make_mask(q_len, s, segment_ids_BxL, causal)
  if mask is not None:
    # finfo.min rather than -inf keeps fully masked rows finite (uniform, not NaN).
    scores_BxKxGxLxS = jnp.where(
        mask, scores_BxKxGxLxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS, axis=-1)
  out_BxLxKxGxD = jnp.einsum(
      'bkgls,bskd->blkgd', probs_BxKxGxLxS.astype(v_BxSxKxD.dtype), v_BxSxKxD)
  return out_BxLxKxGxD.reshape(b, q_len, h, d).astype(q_BxLxHxD.dtype)
