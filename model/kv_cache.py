"""A paged key/value cache: the memory that lets a transformer decode one token at a time.

Shape letters: N layers, K key/value heads, G pages, S page size (slots per page),
Dh head dim, B rows, T new tokens per row, P pages per row.

Every layer's keys and values live in fixed-size pages, `k[N, K, G, S, Dh]`. A row
(one sequence) owns a list of pages, its page table: position p of row b is slot
`p % S` of page `page_table[b, p // S]`. Memory then grows with the tokens in
flight, and rows may share the pages of a common prompt prefix (the serving
engine's prefix cache; a shared page is full and never written again). Heads come
before pages because that is the layout of the maintained Pallas paged-attention
kernels (kernels/paged_attention.py): a head's pages are one contiguous block, so the
kernels read the cache in place, with no per-step transpose.

Without a page table the layout is contiguous: row b owns pages [b*P, (b+1)*P) with
P = G // B, so its keys are a reshape of the pages (no gather) and the page axis
shards over the batch axes like any batch dimension. The jittable `generate` in
model/decode.py uses it.

The visibility rule is positional: a query at position p sees every cached key at
a position <= p of its row (and, for a model with a sliding window w, > p - w: the
paged kernels take no window, so such a model always takes the gather path below; its
pages before the window stay allocated). Keys at later positions, left by a rejected
speculative token or by an earlier request that owned the page, are never seen;
the next write at that position replaces them, so nothing is ever rolled back.
Rows padded with position -1 write nothing and see nothing (zero output).

Attention over the cache runs one of two paths (`attend`'s `implementation`, the
model's `config.model.attention`):
  kernel  the paged decode kernel of kernels/paged_attention.py, for queries of at
          most MAX_KERNEL_QUERIES tokens per row (decode steps, speculative blocks):
          'pallas' anywhere (interpreted on CPU), 'auto' on GPU and TPU. Whether the
          kernel beats the gather path there is not measured yet (no device has been
          lent); `python -m kernels.bench_decode` measures it, and 'auto' follows the
          result once recorded in docs/benchmarks.md.
  gather  each row's pages gathered with jnp into [K, B, P * S, Dh] (the cache's
          head-major order), then masked attention: prompts and long chunks, CPU under
          'auto', and 'xla' / 'cudnn'.

The layer scan carries the whole cache, and each layer writes and reads its own slice
by index (`write`, `_rows`): XLA updates the donated cache in place, so a step costs
what it writes and reads, not the size of the pool.
"""

import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels import flash_attention
from kernels import paged_attention as paged_kernel
from model import attention as attention_lib

# Logical axis names of the cache arrays (model/transformer.py LOGICAL_AXIS_RULES).
LOGICAL_AXES = ('layers', 'kv_heads', 'batch', None, 'head_dim')
# The kernel repeats a row's page reads for each of its queries, so it pays for decode
# steps and speculative blocks; longer chunks (prompts) take the gather path.
MAX_KERNEL_QUERIES = 16


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer: k and v are [N, K, G, S, Dh]."""
  k: jax.Array
  v: jax.Array

  @property
  def page_size(self) -> int:
    return self.k.shape[3]

  @property
  def num_pages(self) -> int:
    return self.k.shape[2]


def init_cache(n_layers: int, n_kv_heads: int, head_dim: int, *, num_pages: int,
               page_size: int, dtype) -> KVCache:
  """An all-zero cache of `num_pages` pages of `page_size` slots per layer."""
  shape = (n_layers, n_kv_heads, num_pages, page_size, head_dim)
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


def _rows(pages_NxKxGxSxD: jax.Array, layer: jax.Array, batch: int,
          page_table_BxP: jax.Array | None) -> jax.Array:
  """Each row's keys (or values) of layer `layer` in position order, heads first:
  [K, B, P * S, Dh]. With a page table this gathers only the rows' pages, never the whole
  layer; the cache's own head-major order needs no transpose."""
  _, k, _, _, d = pages_NxKxGxSxD.shape
  pages_KxGxSxD = jax.lax.dynamic_index_in_dim(pages_NxKxGxSxD, layer, keepdims=False)
  if page_table_BxP is not None:
    pages_KxGxSxD = jnp.take(pages_KxGxSxD, page_table_BxP, axis=1)  # [K, B, P, S, Dh]
  return pages_KxGxSxD.reshape(k, batch, -1, d)


def write(k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, positions_BxT: jax.Array,
          k_pages_NxKxGxSxD: jax.Array, v_pages_NxKxGxSxD: jax.Array,
          page_table_BxP: jax.Array | None, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The whole cache with layer `layer`'s new keys and values written at their positions.
  It takes and returns every layer so that the layer scan can carry the cache and XLA
  updates it in place: a step then costs what it writes, not the size of the cache."""
  _, _, num_pages, page_size, _ = k_pages_NxKxGxSxD.shape
  page_BxT, slot_BxT = _slots(positions_BxT, num_pages, page_size, page_table_BxP)
  dtype = k_pages_NxKxGxSxD.dtype
  # A scalar and arrays apart index [B, T, K, Dh] (the indexed dims first): no transpose.
  k_pages = k_pages_NxKxGxSxD.at[layer, :, page_BxT, slot_BxT].set(
      k_BxTxKxD.astype(dtype), mode='drop')
  v_pages = v_pages_NxKxGxSxD.at[layer, :, page_BxT, slot_BxT].set(
      v_BxTxKxD.astype(dtype), mode='drop')
  return k_pages, v_pages


def uses_kernel(implementation: str, queries_per_row: int, head_dim: int, dtype) -> bool:
  """Whether `attend` runs the paged kernel for this implementation, query count, head
  dim and cache dtype; a shape the kernel cannot take is logged once and gathered."""
  if queries_per_row > MAX_KERNEL_QUERIES:
    return False
  if implementation == 'auto':
    wanted = jax.default_backend() in ('gpu', 'tpu')
  else:
    wanted = implementation == 'pallas'
  reason = paged_kernel.unsupported(head_dim, dtype) if wanted else None
  if reason is not None:
    flash_attention.warn_once(f'KV cache attention takes the jnp gather path: {reason}.')
  return wanted and reason is None


def attend(
    q_BxTxHxD: jax.Array,
    k_BxTxKxD: jax.Array,
    v_BxTxKxD: jax.Array,
    positions_BxT: jax.Array,
    k_pages_NxKxGxSxD: jax.Array,
    v_pages_NxKxGxSxD: jax.Array,
    page_table_BxP: jax.Array | None,
    layer: jax.Array,
    implementation: str = 'xla',
    sliding_window: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Writes the new keys and values into layer `layer` of the cache, then attends every
  query to that layer's cached keys at positions <= its own (and, with a `sliding_window`
  w > 0, > its own - w). Returns (out_BxTxHxD, k_pages, v_pages), the pages of every layer
  (see `write`).

  `implementation` is the model's attention setting (model/attention.py IMPLEMENTATIONS);
  the module docstring says which path each one takes. The paged kernels read every key
  of a row from position 0, so a sliding window takes the gather path.
  """
  k_pages, v_pages = write(k_BxTxKxD, v_BxTxKxD, positions_BxT, k_pages_NxKxGxSxD,
                           v_pages_NxKxGxSxD, page_table_BxP, layer)
  if sliding_window:
    out = _gather_attend(q_BxTxHxD, k_pages, v_pages, positions_BxT, page_table_BxP, layer,
                         sliding_window)
  elif uses_kernel(implementation, q_BxTxHxD.shape[1], k_pages.shape[-1], k_pages.dtype):
    layer_pages = [jax.lax.dynamic_index_in_dim(x, layer, keepdims=False)
                   for x in (k_pages, v_pages)]
    out = _kernel_attend(q_BxTxHxD, *layer_pages, positions_BxT, page_table_BxP)
  else:
    out = _gather_attend(q_BxTxHxD, k_pages, v_pages, positions_BxT, page_table_BxP, layer)
  return out, k_pages, v_pages


def gather_attend(q_BxTxHxD: jax.Array, k_pages_KxGxSxD: jax.Array,
                  v_pages_KxGxSxD: jax.Array, positions_BxT: jax.Array,
                  page_table_BxP: jax.Array | None) -> jax.Array:
  """The jnp path over one layer's pages: gathers each row's pages, then masked
  attention over them (the reference for the kernel)."""
  return _gather_attend(q_BxTxHxD, k_pages_KxGxSxD[None], v_pages_KxGxSxD[None],
                        positions_BxT, page_table_BxP, jnp.int32(0))


def _gather_attend(q_BxTxHxD, k_pages_NxKxGxSxD, v_pages_NxKxGxSxD, positions_BxT,
                   page_table_BxP, layer, sliding_window=0):
  """gather_attend over layer `layer` of the whole cache (with a sliding window w > 0,
  only keys at positions > the query's - w).

  The same math as attention.masked_attention, written here in the cache's head-major
  order ([K, B, L, Dh] keys, batch dims leading): XLA:CPU then runs the two einsums on
  the gathered pages as they are, where the [B, L, K, Dh] order cost a transpose of every
  row's keys and values per layer (3-5x slower decode attention at 32 rows).
  """
  b, t, h, d = q_BxTxHxD.shape
  keys_KxBxLxD = _rows(k_pages_NxKxGxSxD, layer, b, page_table_BxP).astype(q_BxTxHxD.dtype)
  values_KxBxLxD = _rows(v_pages_NxKxGxSxD, layer, b, page_table_BxP).astype(
      q_BxTxHxD.dtype)
  kh = keys_KxBxLxD.shape[0]
  q_KxBxGxTxD = q_BxTxHxD.reshape(b, t, kh, h // kh, d).transpose(2, 0, 3, 1, 4)
  scores_KxBxGxTxL = jnp.einsum('kbgtd,kbld->kbgtl', q_KxBxGxTxD, keys_KxBxLxD,
                                preferred_element_type=jnp.float32) * (d ** -0.5)
  key_pos_L = jnp.arange(keys_KxBxLxD.shape[2])
  mask_BxTxL = key_pos_L[None, None, :] <= positions_BxT[:, :, None]
  if sliding_window:
    mask_BxTxL &= key_pos_L[None, None, :] > positions_BxT[:, :, None] - sliding_window
  # finfo.min rather than -inf keeps rows that see nothing (padding) finite; zeroed below.
  scores_KxBxGxTxL = jnp.where(mask_BxTxL[None, :, None], scores_KxBxGxTxL,
                               jnp.finfo(jnp.float32).min)
  probs_KxBxGxTxL = jax.nn.softmax(scores_KxBxGxTxL, axis=-1).astype(values_KxBxLxD.dtype)
  out_KxBxGxTxD = jnp.einsum('kbgtl,kbld->kbgtd', probs_KxBxGxTxL, values_KxBxLxD)
  out_BxTxHxD = out_KxBxGxTxD.transpose(1, 3, 0, 2, 4).reshape(b, t, h, d)
  out_BxTxHxD = jnp.where((positions_BxT >= 0)[:, :, None, None], out_BxTxHxD, 0)
  return out_BxTxHxD.astype(q_BxTxHxD.dtype)


def _kernel_attend(q_BxTxHxD, k_pages_KxGxSxD, v_pages_KxGxSxD, positions_BxT,
                   page_table_BxP):
  """The kernel, per device under a mesh: heads over the tensor axis; rows and pages over
  the batch axes when the layout is contiguous (a row's pages are then on its device).
  With a page table any row may point at any page, so rows stay whole on every device."""
  def per_device(q, k_pages, v_pages, positions, table):
    return paged_kernel.paged_attention(q, k_pages, v_pages, positions, table)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return per_device(q_BxTxHxD, k_pages_KxGxSxD, v_pages_KxGxSxD, positions_BxT,
                      page_table_BxP)
  batch, heads = attention_lib.kernel_shards(
      mesh, q_BxTxHxD.shape[0], q_BxTxHxD.shape[2], k_pages_KxGxSxD.shape[0])
  if page_table_BxP is not None:
    batch = None
  q_spec = P(batch, None, heads, None)
  pages_spec = P(heads, batch, None, None)
  table_spec = None if page_table_BxP is None else P(None, None)
  specs = (q_spec, pages_spec, pages_spec, P(batch, None), table_spec)
  args = (q_BxTxHxD, k_pages_KxGxSxD, v_pages_KxGxSxD, positions_BxT, page_table_BxP)
  # Kiln's meshes have Auto axes (train/mesh.py), so shard_map moves its inputs into
  # these specs itself.
  return jax.shard_map(
      per_device, in_specs=specs, out_specs=q_spec,
      check_vma=False,  # pallas_call outputs carry no varying-axes types
  )(*args)
