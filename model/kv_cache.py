"""A paged key/value cache: the memory that lets a transformer decode one token at a time.

Shape letters: N layers, G pages, S page size (slots per page), K key/value heads,
Dh head dim, B rows, T new tokens per row, P pages per row.

Every layer's keys and values live in fixed-size pages, `k[N, G, S, K, Dh]`. A row
(one sequence) owns a list of pages, its page table: position p of row b is slot
`p % S` of page `page_table[b, p // S]`. Memory then grows with the tokens in
flight, and rows may share the pages of a common prompt prefix (the serving
engine's prefix cache; a shared page is full and never written again).

Without a page table the layout is contiguous: row b owns pages [b*P, (b+1)*P) with
P = G // B, so its keys are a reshape of the pages (no gather) and the page axis
shards over the batch axes like any batch dimension. The jittable `generate` in
model/decode.py uses it.

The visibility rule is positional: a query at position p sees every cached key at
a position <= p of its row. Keys at later positions, left by a rejected
speculative token or by an earlier request that owned the page, are never seen;
the next write at that position replaces them, so nothing is ever rolled back.
Rows padded with position -1 write nothing and see nothing (zero output).
"""

import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model import attention as attention_lib

# Logical axis names of the cache arrays (model/transformer.py LOGICAL_AXIS_RULES).
LOGICAL_AXES = ('layers', 'batch', None, 'kv_heads', 'head_dim')


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer: k and v are [N, G, S, K, Dh]."""
  k: jax.Array
  v: jax.Array

  @property
  def page_size(self) -> int:
    return self.k.shape[2]

  @property
  def num_pages(self) -> int:
    return self.k.shape[1]


def init_cache(n_layers: int, n_kv_heads: int, head_dim: int, *, num_pages: int,
               page_size: int, dtype) -> KVCache:
  """An all-zero cache of `num_pages` pages of `page_size` slots per layer."""
  shape = (n_layers, num_pages, page_size, n_kv_heads, head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def constrain(cache: KVCache, rules, rows: int | None) -> KVCache:
  """The cache sharded by the logical-axis `rules` under the current mesh (as the
  training state is): key/value heads over the tensor axis and, in the contiguous layout
  of `rows` rows, the pages with their rows over the batch axes. An axis that does not
  divide its dimension is left whole; without a mesh the cache is returned as it is."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return cache
  rules = dict(rules)
  spec = []
  for dim, name in zip(cache.k.shape, LOGICAL_AXES, strict=True):
    axes = rules.get(name) if name else None
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ())
                 if a in mesh.axis_names)
    ways = math.prod(mesh.shape[a] for a in axes)
    if name == 'batch':  # pages follow their rows; a paged pool stays whole
      dim = rows or 1
    spec.append(axes if axes and (name != 'batch' or rows) and dim % ways == 0 else None)
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, P(*spec)), cache)


def _slots(positions_BxT: jax.Array, num_pages: int, page_size: int,
           page_table_BxP: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(page, slot) of every new token; padding (position < 0) points past the last page,
  which a scatter with mode='drop' ignores."""
  b = positions_BxT.shape[0]
  logical_BxT = jnp.maximum(positions_BxT, 0) // page_size
  if page_table_BxP is None:
    page_BxT = jnp.arange(b)[:, None] * (num_pages // b) + logical_BxT
  else:
    page_BxT = jnp.take_along_axis(page_table_BxP, logical_BxT, axis=1, mode='clip')
  page_BxT = jnp.where(positions_BxT >= 0, page_BxT, num_pages)
  return page_BxT, positions_BxT % page_size


def _rows(pages_GxSxKxD: jax.Array, batch: int, page_table_BxP: jax.Array | None) -> jax.Array:
  """Each row's keys (or values) in position order: [B, P * S, K, Dh]."""
  _, s, k, d = pages_GxSxKxD.shape
  if page_table_BxP is None:
    return pages_GxSxKxD.reshape(batch, -1, k, d)
  return pages_GxSxKxD[page_table_BxP].reshape(batch, -1, k, d)


def attend(
    q_BxTxHxD: jax.Array,
    k_BxTxKxD: jax.Array,
    v_BxTxKxD: jax.Array,
    positions_BxT: jax.Array,
    k_pages_GxSxKxD: jax.Array,
    v_pages_GxSxKxD: jax.Array,
    page_table_BxP: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Writes the new keys and values into one layer's pages, then attends every query to
  the cached keys at positions <= its own. Returns (out_BxTxHxD, k_pages, v_pages)."""
  num_pages, page_size = k_pages_GxSxKxD.shape[:2]
  page_BxT, slot_BxT = _slots(positions_BxT, num_pages, page_size, page_table_BxP)
  dtype = k_pages_GxSxKxD.dtype
  k_pages = k_pages_GxSxKxD.at[page_BxT, slot_BxT].set(k_BxTxKxD.astype(dtype), mode='drop')
  v_pages = v_pages_GxSxKxD.at[page_BxT, slot_BxT].set(v_BxTxKxD.astype(dtype), mode='drop')
  b = q_BxTxHxD.shape[0]
  keys_BxLxKxD = _rows(k_pages, b, page_table_BxP).astype(q_BxTxHxD.dtype)
  values_BxLxKxD = _rows(v_pages, b, page_table_BxP).astype(q_BxTxHxD.dtype)
  key_pos_L = jnp.arange(keys_BxLxKxD.shape[1])
  mask_BxTxL = key_pos_L[None, None, :] <= positions_BxT[:, :, None]
  out = attention_lib.masked_attention(q_BxTxHxD, keys_BxLxKxD, values_BxLxKxD, mask_BxTxL)
  return out, k_pages, v_pages
