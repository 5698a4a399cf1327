"""Paged decode attention: queries of a few tokens per row against a paged KV cache.

`paged_attention` takes the cache of model/kv_cache.py (pages k, v [K, G, S, Dh], a
page table per row, each query's position) and runs the Pallas kernel that jax
itself ships and maintains for the device:
  triton  jax.experimental.pallas.ops.gpu.paged_attention (CUDA and ROCm GPUs; split-k
          over the row's pages, so one long row still fills the GPU);
  tpu     jax.experimental.pallas.ops.tpu.paged_attention (Mosaic TPU; pages copied
          into VMEM by DMA, double-buffered).
On CPU the triton kernel runs in Pallas interpret mode (slow: for tests).

Why these and not a kernel of our own: both take exactly the layout kv_cache keeps
(heads, pages, slots, head dim), so the cache is read in place, and jax keeps them
working across releases. jax also ships `tpu.ragged_paged_attention` (mixed prefill
and decode over one flat token axis), but it wants keys and values interleaved in one
[G, S, 2K, Dh] array, which the gather path and the GPU kernel cannot share; and
`gpu.decode_attention` takes contiguous [B, S, K, Dh] keys, not pages.

Both kernels attend one query per row to the first `length` keys of its pages. A row
of T queries at positions p_0..p_{T-1} is the same as T rows with lengths p_t + 1 that
share the row's page table, so `paged_attention` flattens (B, T) into kernel rows: a
decode step (T = 1) and a speculative block (small T) are one call. Each kernel row
reads its pages once, so for long chunks (prompts) the gather path in
model/kv_cache.py is cheaper. A padding query (position < 0) has length 0 and gets
zeros, as in kv_cache's gather path.

Semantics: out = softmax(q k^T / sqrt(Dh)) v over the row's keys at positions <= p.

Limits of the jax 0.10 ops, handled here: the TPU op lowers only head dims that are
multiples of 128 (`unsupported` says so, and kv_cache then gathers: llama_1b's 64 does
on TPU), and only groups of query heads that are multiples of 8 (zero queries pad them).
Status: tests run both ops interpreted on CPU and lower them to Triton IR and Mosaic; no
GPU or TPU has run them yet (`python -m kernels.bench_decode` is the first check).
"""

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_paged

from kernels import flash_attention

BACKENDS = ('tpu', 'triton')
# Triton: query heads per key/value head are padded up to this many rows (a tensor-core
# tile); split-k partitions per row; pages per inner block (a power of two, so that a
# block of keys is too when the page size is).
TRITON_BLOCK_H = 16
TRITON_MAX_SPLITS = 16
MAX_PAGES_PER_BLOCK = 8
TPU_GROUP_MULTIPLE = 8
TPU_HEAD_DIM_MULTIPLE = 128


def paged_attention(
    q_BxTxHxD: jax.Array,
    k_pages_KxGxSxD: jax.Array,
    v_pages_KxGxSxD: jax.Array,
    positions_BxT: jax.Array,
    page_table_BxP: jax.Array | None,
    *,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
  """Each query attends to the cached keys of its row at positions <= its own.

  Args:
    q_BxTxHxD: queries; K divides H (grouped-query attention).
    k_pages_KxGxSxD: key pages (model/kv_cache.py), new keys already written.
    v_pages_KxGxSxD: value pages.
    positions_BxT: each query's position; < 0 marks padding (zero output).
    page_table_BxP: row b's i-th page; None for the contiguous layout (row b owns pages
      [b*P, (b+1)*P) with P = G // B).
    backend: one of BACKENDS; default flash_attention.default_backend().
    interpret: Pallas interpret mode; default True exactly on CPU.

  Returns:
    out_BxTxHxD in the dtype of q.
  """
  b, t, h, d = q_BxTxHxD.shape
  kh, g, _, kd = k_pages_KxGxSxD.shape
  if k_pages_KxGxSxD.shape != v_pages_KxGxSxD.shape:
    raise ValueError(f'k and v pages differ: {k_pages_KxGxSxD.shape} vs '
                     f'{v_pages_KxGxSxD.shape}.')
  if kd != d or h % kh:
    raise ValueError(f'Incompatible q {q_BxTxHxD.shape} and pages {k_pages_KxGxSxD.shape}: '
                     'head dims must match and the k/v head count must divide H.')
  backend = backend or flash_attention.default_backend()
  if backend not in BACKENDS:
    raise ValueError(f'Unknown paged_attention backend {backend!r}; allowed: '
                     f'{", ".join(BACKENDS)}.')
  reason = unsupported(d, k_pages_KxGxSxD.dtype, backend)
  if reason is not None:
    raise ValueError(f'paged_attention: {reason}; check `unsupported` first.')
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  if page_table_BxP is None:
    page_table_BxP = jnp.arange(g, dtype=jnp.int32).reshape(b, g // b)

  # (B, T) -> B*T kernel rows that share their row's pages; the kernels do not scale q.
  q_RxHxD = (q_BxTxHxD * jnp.asarray(d ** -0.5, q_BxTxHxD.dtype)).reshape(b * t, h, d)
  q_RxHxD = q_RxHxD.astype(k_pages_KxGxSxD.dtype)
  lengths_R = (jnp.maximum(positions_BxT, -1) + 1).reshape(b * t).astype(jnp.int32)
  table_RxP = jnp.repeat(page_table_BxP.astype(jnp.int32), t, axis=0)
  if backend == 'tpu':
    out_RxHxD = _tpu(q_RxHxD, k_pages_KxGxSxD, v_pages_KxGxSxD, lengths_R, table_RxP,
                     interpret)
  else:
    out_RxHxD = _triton(q_RxHxD, k_pages_KxGxSxD, v_pages_KxGxSxD, lengths_R, table_RxP,
                        interpret)
  # The TPU kernel skips empty rows without writing them; both get zeros here.
  out_RxHxD = jnp.where(lengths_R[:, None, None] > 0, out_RxHxD, 0)
  return out_RxHxD.reshape(b, t, h, d).astype(q_BxTxHxD.dtype)


def unsupported(head_dim: int, dtype, backend: str | None = None) -> str | None:
  """Why the kernel for `backend` cannot take this call, or None."""
  backend = backend or flash_attention.default_backend()
  if jnp.dtype(dtype) not in flash_attention.KERNEL_DTYPES:
    return f'the kernels take float32, bfloat16 or float16, not {jnp.dtype(dtype)}'
  if backend == 'tpu' and head_dim % TPU_HEAD_DIM_MULTIPLE:
    # The op's softmax-statistics outputs take the query block's last dim, which Mosaic
    # accepts only as a multiple of 128 (jax 0.10).
    return f'the TPU paged kernel needs a head dim that is a multiple of 128, not {head_dim}'
  if backend == 'tpu' and jnp.dtype(dtype) == jnp.float16:
    return 'the TPU paged kernel takes float32 or bfloat16, not float16'
  return None


def _pad_pages(table_RxP: jax.Array, multiple: int) -> jax.Array:
  """Pads each row's page list to a multiple of `multiple` with page 0, which no length
  reaches, so the kernels' block and split counts divide it."""
  pages = table_RxP.shape[1]
  return jnp.pad(table_RxP, ((0, 0), (0, -pages % multiple)))


def _pages_per_block(pages: int) -> int:
  """The largest power of two <= min(pages, MAX_PAGES_PER_BLOCK)."""
  return 1 << (min(pages, MAX_PAGES_PER_BLOCK).bit_length() - 1)


def _triton(q_RxHxD, k_pages, v_pages, lengths_R, table_RxP, interpret):
  pages = table_RxP.shape[1]
  splits = min(TRITON_MAX_SPLITS, pages)
  per_block = _pages_per_block(math.ceil(pages / splits))
  table_RxP = _pad_pages(table_RxP, splits * per_block)
  return gpu_paged.paged_attention(
      q_RxHxD, k_pages, v_pages, table_RxP, lengths_R, block_h=TRITON_BLOCK_H,
      pages_per_compute_block=per_block, k_splits=splits, interpret=interpret)


def _tpu(q_RxHxD, k_pages, v_pages, lengths_R, table_RxP, interpret):
  r, h, d = q_RxHxD.shape
  kh = k_pages.shape[0]
  group = h // kh
  # jax 0.10's TPU op builds its softmax-statistics outputs with the query block spec when
  # the group is not a multiple of 8, which Mosaic rejects (llama_1b's group is 4); zero
  # queries pad each group to 8 and are cut off after.
  group_pad = -group % TPU_GROUP_MULTIPLE
  q_RxKxGxD = jnp.pad(q_RxHxD.reshape(r, kh, group, d), ((0, 0), (0, 0), (0, group_pad), (0, 0)))
  per_block = _pages_per_block(table_RxP.shape[1])
  table_RxP = _pad_pages(table_RxP, per_block)

  def call():
    return tpu_paged(q_RxKxGxD.reshape(r, -1, d), k_pages, v_pages, lengths_R, table_RxP,
                     pages_per_compute_block=per_block)

  if interpret:
    with pltpu.force_tpu_interpret_mode():  # the TPU op takes no interpret argument
      out = call()
  else:
    out = call()
  return out.reshape(r, kh, group + group_pad, d)[:, :, :group].reshape(r, h, d)
