"""Dot-product attention: the single dispatch point for every implementation.

Shape letters: B batch, L query length, S key/value length, H query heads,
K key/value heads (K divides H), G = H // K query heads per key/value head,
D head dim.

Implementations (`config.model.attention`):
  xla     grouped einsums and a softmax; materialises the [L, S] scores.
  cudnn   jax.nn.dot_product_attention(implementation='cudnn'); NVIDIA GPUs.
  pallas  the fused kernels of kernels/flash_attention.py (TPU, GPU; interpreted on CPU),
          run per device through jax.shard_map under a mesh.
  auto    pallas on TPU and GPU for sequences of at least AUTO_PALLAS_MIN_LENGTH, else xla.

Attention over a KV cache while decoding takes the same setting but chooses between the
paged decode kernel and a jnp gather itself (model/kv_cache.py).

All of them follow the semantics of kernels/attention_reference.py.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels import flash_attention as flash
from kernels.attention_reference import normalize_window, visible_mask

IMPLEMENTATIONS = ('xla', 'cudnn', 'pallas', 'auto')
# Below this many queries the [L, S] scores are small and XLA's fused softmax is as fast.
AUTO_PALLAS_MIN_LENGTH = 1024
# The mesh axes that split activations' batch and heads (the transformer's
# LOGICAL_AXIS_RULES map 'batch' and 'heads'/'kv_heads' to these).
BATCH_AXES = ('data', 'fsdp', 'expert')
HEAD_AXIS = 'tensor'


def attention(
    q_BxLxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    *,
    segment_ids_BxL: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | tuple[int, int] | None = None,
    logit_softcap: float | None = None,
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
    sliding_window: (left, right) or w for (w, w): query i sees keys within
      [pos - left, pos + right] (jax.nn.dot_product_attention's local_window_size).
    logit_softcap: c for logits = c * tanh(logits / c) (not with cudnn).
    implementation: one of IMPLEMENTATIONS.

  Returns:
    out_BxLxHxD in the dtype of q; a query that sees no key gets zeros.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f'Unknown attention implementation {implementation!r}; allowed: '
        f'{", ".join(IMPLEMENTATIONS)}.')
  check_available(implementation)
  _check_shapes(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL)
  window = normalize_window(sliding_window)
  args = (q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL, causal, window, logit_softcap)
  implementation = resolve(implementation, q_BxLxHxD.shape[1])
  if implementation == 'pallas':
    return _pallas_attention(*args)
  if implementation == 'cudnn':
    return _cudnn_attention(*args)
  return _xla_attention(*args)


def check_available(implementation: str) -> None:
  """Raises ValueError if `implementation` cannot run on this platform."""
  platform = jax.default_backend()
  if implementation == 'cudnn' and platform != 'gpu':
    raise ValueError(f"attention implementation 'cudnn' needs an NVIDIA GPU with cuDNN; this "
                     f"process runs on {platform}. Use 'auto', 'pallas' or 'xla'.")


def resolve(implementation: str, q_len: int) -> str:
  """The implementation `auto` stands for on this platform and length (others unchanged)."""
  if implementation != 'auto':
    return implementation
  on_accelerator = jax.default_backend() in ('tpu', 'gpu')
  return 'pallas' if on_accelerator and q_len >= AUTO_PALLAS_MIN_LENGTH else 'xla'


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


def _xla_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL, causal, window, softcap):
  mask_BxLxS = None
  if causal or window is not None or segment_ids_BxL is not None:
    mask_BxLxS = visible_mask(q_BxLxHxD.shape[1], k_BxSxKxD.shape[1],
                              segment_ids_BxL=segment_ids_BxL, causal=causal,
                              sliding_window=window)
  return masked_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxLxS, softcap)


def masked_attention(
    q_BxLxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    mask_BxLxS: jax.Array | None,
    logit_softcap: float | None = None,
) -> jax.Array:
  """Grouped einsums and a softmax under an explicit visibility mask (None: all visible).

  The xla implementation, and decoding over a KV cache (model/kv_cache.py), whose mask
  comes from the cached positions rather than from the query layout.
  """
  b, q_len, h, d = q_BxLxHxD.shape
  kh = k_BxSxKxD.shape[2]
  # Group the query heads by the k/v head they share, so K/V are never repeated.
  q_BxLxKxGxD = q_BxLxHxD.reshape(b, q_len, kh, h // kh, d)
  scores_BxKxGxLxS = jnp.einsum(
      'blkgd,bskd->bkgls', q_BxLxKxGxD, k_BxSxKxD,
      preferred_element_type=jnp.float32)
  scores_BxKxGxLxS = scores_BxKxGxLxS * (d ** -0.5)
  if logit_softcap is not None:
    scores_BxKxGxLxS = logit_softcap * jnp.tanh(scores_BxKxGxLxS / logit_softcap)
  if mask_BxLxS is not None:
    # finfo.min rather than -inf keeps fully masked rows finite; they are zeroed below.
    scores_BxKxGxLxS = jnp.where(
        mask_BxLxS[:, None, None], scores_BxKxGxLxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS, axis=-1)
  out_BxLxKxGxD = jnp.einsum(
      'bkgls,bskd->blkgd', probs_BxKxGxLxS.astype(v_BxSxKxD.dtype), v_BxSxKxD)
  out_BxLxHxD = out_BxLxKxGxD.reshape(b, q_len, h, d)
  if mask_BxLxS is not None:
    seen_BxL = jnp.any(mask_BxLxS, axis=-1)
    out_BxLxHxD = jnp.where(seen_BxL[:, :, None, None], out_BxLxHxD, 0)
  return out_BxLxHxD.astype(q_BxLxHxD.dtype)


def _cudnn_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL, causal, window, softcap):
  if softcap is not None:
    raise ValueError('attention implementation cudnn has no logit soft-cap; use pallas or xla.')
  mask = None
  if segment_ids_BxL is not None:
    flash.warn_once('cudnn attention takes segment ids as a dense [B, 1, L, S] mask.')
    mask = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
  return jax.nn.dot_product_attention(
      q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask, is_causal=causal,
      local_window_size=window, implementation='cudnn')


def _pallas_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL, causal, window, softcap):
  """The kernel, per device under a mesh: batch over BATCH_AXES, heads over HEAD_AXIS."""
  kernel_args = dict(causal=causal, sliding_window=window, logit_softcap=softcap)

  def per_device(q, k, v, segment_ids):
    return flash.flash_attention(q, k, v, segment_ids_BxL=segment_ids, **kernel_args)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return per_device(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL)
  batch, heads = kernel_shards(mesh, q_BxLxHxD.shape[0], q_BxLxHxD.shape[2],
                               k_BxSxKxD.shape[2])
  qkv_spec = P(batch, None, heads, None)
  seg_spec = None if segment_ids_BxL is None else P(batch, None)
  return jax.shard_map(
      per_device, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec), out_specs=qkv_spec,
      check_vma=False,  # pallas_call outputs carry no varying-axes types
  )(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL)


def kernel_shards(mesh, batch: int, heads: int, kv_heads: int):
  """Mesh axes for the batch and head dims; an axis that does not divide is left whole."""
  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  batch_ways = math.prod(mesh.shape[a] for a in batch_axes)
  if batch % batch_ways:
    flash.warn_once(
        f'pallas attention: batch {batch} does not split over mesh axes {batch_axes} '
        f'({batch_ways} ways); every device computes the whole batch.')
    batch_axes = ()
  head_axis = HEAD_AXIS if HEAD_AXIS in mesh.axis_names else None
  if head_axis is not None and (heads % mesh.shape[head_axis] or kv_heads % mesh.shape[head_axis]):
    flash.warn_once(
        f'pallas attention: {heads} query / {kv_heads} key-value heads do not split over mesh '
        f'axis {head_axis!r} ({mesh.shape[head_axis]} ways); every device computes all heads.')
    head_axis = None
  return (batch_axes or None), head_axis
