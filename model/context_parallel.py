"""Context parallelism: the sequence of activations split over the mesh's 'context' axis.

Shape letters: B batch, L length (the whole row), C context-parallel ways, M = L / C tokens
per device, H query heads, K key/value heads, D head dim.

Every layer but attention works token by token, so a [B, L, ...] activation sharded along
L over 'context' needs no communication there; parameters do not change. Attention gathers
the keys and values of the whole row on every device (`jax.lax.all_gather` over 'context',
inside `jax.shard_map`), and each device attends with its own M queries: its scores are
[M, L] instead of [L, L], which is what context parallelism buys. This is MaxText's default
("all-gathered KV"); ring attention (K/V blocks passed round by `ppermute` with an online
softmax) is not built: it saves the [L, K, D] gathered keys and values per device but
differentiates through its loop only at the memory of all the blocks unless it gets its own
backward pass, and the all-gather's transpose (a reduce-scatter) is exact and free of code.

Causal load balancing: with the row in order, device C-1's queries see all L keys and device
0's only the first M. Split the row into 2C chunks and give device i chunks i and 2C-1-i
(zig-zag): every device then has the same number of visible (query, key) pairs. The model
moves its inputs (tokens, positions, segment ids) into that order once, at the input, and its
final hidden states back, before the head, so callers see logits in the row's own order.
The move is two `ppermute`s of one activation (no gather). The mask of each device follows
the tokens' original indices, so causality, document (segment) masks and RoPE positions
are those of the unsplit row.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kernels import flash_attention
from model import attention as attention_lib

AXIS = 'context'


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one row of `length` tokens lies over the `size` devices of the 'context' axis."""
  length: int
  size: int
  load_balance: bool

  @property
  def chunks(self) -> int:
    return 2 * self.size if self.load_balance else self.size

  def order(self) -> np.ndarray:
    """int32 [L]: the row index of the token at each place of the split row; device i holds
    places [i * M, (i + 1) * M)."""
    return token_order(self.length, self.size, self.load_balance)

  def split(self, x_BxL: jax.Array) -> jax.Array:
    """The row `x_BxL...` (any trailing dims) in this layout, sharded over 'context'."""
    return _relayout(x_BxL, self, to_split=True)

  def join(self, x_BxL: jax.Array) -> jax.Array:
    """Back to the row's own order (still sharded over 'context' along L)."""
    return _relayout(x_BxL, self, to_split=False)


def token_order(length: int, size: int, load_balance: bool) -> np.ndarray:
  """The row index of each place in the split row (see Layout.order)."""
  if not load_balance:
    return np.arange(length, dtype=np.int32)
  chunk = length // (2 * size)
  chunks = [c for i in range(size) for c in (i, 2 * size - 1 - i)]
  return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks]).astype(np.int32)


def context_size() -> int:
  """Ways of the 'context' axis of the mesh in scope (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(AXIS, 1)


def plan(length: int, load_balance: bool) -> Layout | None:
  """The layout of a row of `length` tokens under the current mesh; None when the mesh has no
  'context' axis, or when the row does not split into its chunks (then every device runs the
  whole row, correct but without the saving: evaluation prompts of any length do this)."""
  size = context_size()
  if size == 1:
    return None
  layout = Layout(length, size, load_balance)
  if length % layout.chunks:
    flash_attention.warn_once(f'context parallelism: a row of {length} tokens does not split into '
          f'{layout.chunks} chunks over mesh axis {AXIS!r}; every device runs the whole row.')
    return None
  return layout


def _batch_axes(batch: int):
  """The mesh axes that split the batch dim here (None if they do not divide it)."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in attention_lib.BATCH_AXES if a in mesh.axis_names)
  if batch % math.prod(mesh.shape[a] for a in axes):
    return None
  return axes or None


def _relayout(x: jax.Array, layout: Layout, to_split: bool) -> jax.Array:
  """Moves the L dim of `x` between the row order and `layout`'s, per device.

  Without load balancing the orders agree and only the sharding changes. With it, device i
  holds chunks (2i, 2i+1) of the row in order and chunks (i, 2C-1-i) split. The chunks of
  one parity go to distinct devices in both directions, so each direction is two ppermutes,
  one per parity, and a select by the device's own parity.
  """
  batch = _batch_axes(x.shape[0])
  spec = P(batch, AXIS)
  if not layout.load_balance:
    return jax.lax.with_sharding_constraint(x, spec)
  c = layout.size
  # Where chunk `k` of the row lies in the split layout: (device, slot).
  dev = [k if k < c else 2 * c - 1 - k for k in range(2 * c)]

  def per_device(x_local):
    b, m = x_local.shape[:2]
    slots = x_local.reshape(b, 2, m // 2, *x_local.shape[2:])
    i = jax.lax.axis_index(AXIS)
    even = i % 2 == 0
    if to_split:
      # Device i sends row chunk 2i+p (slot p) to the device that holds it when split.
      recv = [jax.lax.ppermute(slots[:, p], AXIS, [(j, dev[2 * j + p]) for j in range(c)])
              for p in (0, 1)]
      # Device i holds chunks i and 2C-1-i, of opposite parities: slot 0 is chunk i.
      first, second = (jnp.where(even, recv[0], recv[1]), jnp.where(even, recv[1], recv[0]))
    else:
      # Row chunk 2j+p goes home to device j from the device that holds it split; that device
      # sends whichever of its two chunks has parity p.
      sends = [jnp.where(even == (p == 0), slots[:, 0], slots[:, 1]) for p in (0, 1)]
      first, second = (jax.lax.ppermute(sends[p], AXIS, [(dev[2 * j + p], j) for j in range(c)])
                       for p in (0, 1))
    return jnp.stack([first, second], axis=1).reshape(x_local.shape)

  return jax.shard_map(per_device, in_specs=(spec,), out_specs=spec)(x)


def attention(
    q_BxLxHxD: jax.Array,
    k_BxLxKxD: jax.Array,
    v_BxLxKxD: jax.Array,
    layout: Layout,
    *,
    segment_ids_BxL: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | tuple[int, int] | None = None,
    logit_softcap: float | None = None,
    implementation: str = 'xla',
) -> jax.Array:
  """Self-attention over a row split by `layout` (inputs and output in its order).

  The semantics of model/attention.attention with L == S; the mask is built from the
  tokens' row indices, so it is the unsplit row's. Only the xla implementation runs per
  device ('auto' picks it): the Pallas kernel and cuDNN take a causal band of contiguous
  queries (and segment ids only with as many keys as queries), not a zig-zag pair of
  chunks against the whole row.
  """
  if implementation not in ('xla', 'auto'):
    raise ValueError(
        f'attention implementation {implementation!r} does not run with context parallelism '
        f'(mesh.context={layout.size}); use xla (or auto, which picks it).')
  window = attention_lib.normalize_window(sliding_window)
  mesh = jax.sharding.get_abstract_mesh()
  batch = _batch_axes(q_BxLxHxD.shape[0])
  heads = attention_lib.kernel_shards(mesh, q_BxLxHxD.shape[0], q_BxLxHxD.shape[2],
                                      k_BxLxKxD.shape[2])[1]
  qkv_spec = P(batch, AXIS, heads, None)
  seg_spec = None if segment_ids_BxL is None else P(batch, AXIS)
  order_L = jnp.asarray(layout.order())
  m = layout.length // layout.size

  def per_device(q_BxMxHxD, k_BxMxKxD, v_BxMxKxD, seg_BxM):
    k_BxLxKxD = jax.lax.all_gather(k_BxMxKxD, AXIS, axis=1, tiled=True)
    v_BxLxKxD = jax.lax.all_gather(v_BxMxKxD, AXIS, axis=1, tiled=True)
    q_idx_M = jax.lax.dynamic_slice_in_dim(order_L, jax.lax.axis_index(AXIS) * m, m)
    mask_BxMxL = _mask(q_idx_M, order_L, causal, window)[None]
    if seg_BxM is not None:
      seg_BxL = jax.lax.all_gather(seg_BxM, AXIS, axis=1, tiled=True)
      mask_BxMxL = mask_BxMxL & (seg_BxM[:, :, None] == seg_BxL[:, None, :])
    return attention_lib.masked_attention(q_BxMxHxD, k_BxLxKxD, v_BxLxKxD, mask_BxMxL,
                                          logit_softcap)

  return jax.shard_map(
      per_device, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec), out_specs=qkv_spec,
  )(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL)


def _mask(q_idx_M, k_idx_L, causal, window):
  """bool [M, L]: key j visible to query i by their row indices (causal, sliding window)."""
  allowed_MxL = jnp.ones((q_idx_M.shape[0], k_idx_L.shape[0]), bool)
  delta_MxL = k_idx_L[None, :] - q_idx_M[:, None]
  if causal:
    allowed_MxL &= delta_MxL <= 0
  if window is not None:
    left, right = window
    allowed_MxL &= (delta_MxL >= -left) & (delta_MxL <= right)
  return allowed_MxL
