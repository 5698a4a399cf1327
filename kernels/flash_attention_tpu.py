"""Flash attention for TPU (Pallas, Mosaic TPU lowering): forward, dK/dV and dQ kernels.

Layout: q, o, do [B, H, L, D]; k, v [B, K, S, D]; log-sum-exp and delta
(rowsum(o * do)) [B, H, 1, L] float32. L and S are multiples of their block
sizes and the blocks of L and S multiples of 128 (the wrapper in
kernels/flash_attention.py pads).

TPU vector registers are [8 sublanes, 128 lanes], so per-row statistics live
lane-broadcast as [rows, 128] (the running max and sum), and segment ids come
in two broadcast forms: [*, 128] when they index rows, [8, *] when they index
columns. The backward computes with keys as rows (scores transposed, [bk, bq])
in the dK/dV kernel, so that the log-sum-exp and delta of the queries broadcast
along sublanes; the dQ kernel has queries as rows, like the forward.

Grid steps that a causal or sliding-window mask fully hides do no work, and
their index maps point at a block already in VMEM, so they issue no copy.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.block_mask import BlockMask, clamp

LANES = 128
SUBLANES = 8
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims, precision):
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _precision(dtype) -> jax.lax.Precision:
  # float32 inputs get float32 matmuls; bf16 inputs are exact in one MXU pass.
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _to_width(stat_Nx128: jax.Array, width: int) -> jax.Array:
  """A lane-broadcast [N, 128] statistic as [N, width]."""
  if width <= LANES:
    return stat_Nx128[:, :width]
  return jnp.tile(stat_Nx128, (1, width // LANES))


def _scores(a, b, *, scale, softcap, precision):
  """scale * a @ b.T, soft-capped; also tanh(./cap) for the backward (or None)."""
  s = _dot(a, b, NT, precision) * scale
  if softcap is None:
    return s, None
  t = jnp.tanh(s / softcap)
  return softcap * t, t


def segment_layouts(segment_ids_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Segment ids as [B, L, 128] (for rows) and [B, 8, L] (for columns), int32."""
  ids = segment_ids_BxL.astype(jnp.int32)
  b, length = ids.shape
  return (jnp.broadcast_to(ids[:, :, None], (b, length, LANES)),
          jnp.broadcast_to(ids[:, None, :], (b, SUBLANES, length)))


# ---------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref,
                    m_ref, l_ref, acc_ref, *, mask: BlockMask, scale, softcap, block_q, block_k,
                    element_mask: bool):
  i, j = pl.program_id(2), pl.program_id(3)
  head_dim = acc_ref.shape[-1]

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  first, last = mask.kv_blocks(i, block_q, block_k)

  @pl.when((j >= first) & (j <= last))
  def _step():
    q, v = q_ref[...], v_ref[...]
    s, _ = _scores(q, k_ref[...], scale=scale, softcap=softcap, precision=_precision(q.dtype))
    if element_mask or q_seg_ref is not None:
      ok = jnp.ones(s.shape, bool)
      if element_mask:
        rows = i * block_q + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        cols = j * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        ok = mask.visible(rows, cols)
      if q_seg_ref is not None:
        ok &= jnp.tile(q_seg_ref[...], (1, block_k // LANES)) == kv_seg_ref[:1, :]
      s = jnp.where(ok, s, -jnp.inf)

    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # A row that has seen no key yet keeps max -inf; 0 in its place gives p = alpha = 0.
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    p = jnp.exp(s - _to_width(m_safe, block_k))
    alpha = jnp.exp(m_prev - m_safe)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_next
    pv = _dot(p.astype(v.dtype), v, NN, _precision(v.dtype))
    acc_ref[...] = _to_width(alpha, head_dim) * acc_ref[...] + pv

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    total = l_ref[...]
    inv = 1.0 / jnp.where(total == 0.0, 1.0, total)  # rows that saw no key stay zero
    o_ref[...] = (acc_ref[...] * _to_width(inv, head_dim)).astype(o_ref.dtype)
    lse_Nx128 = m_ref[...] + jnp.log(total)  # -inf where no key was seen
    lse_ref[...] = jnp.transpose(lse_Nx128)[:1, :]


def forward(q_BxHxLxD, k_BxKxSxD, v_BxKxSxD, segments, *, mask: BlockMask, scale: float,
            softcap: float | None, block_q: int, block_k: int, interpret=False):
  """Returns (o_BxHxLxD, lse_BxHx1xL float32). `segments` is segment_layouts(...) or None."""
  b, h, q_len, d = q_BxHxLxD.shape
  kv_heads, kv_len = k_BxKxSxD.shape[1], k_BxKxSxD.shape[2]
  group = h // kv_heads
  nq, nk = q_len // block_q, kv_len // block_k

  def kv_index(b_, h_, i, j):
    first, last = mask.kv_blocks(i, block_q, block_k)
    return b_, jax.lax.div(h_, group), clamp(j, first, last, nk), 0

  def kv_seg_index(b_, h_, i, j):
    return b_, 0, kv_index(b_, h_, i, j)[2]

  q_spec = pl.BlockSpec((None, None, block_q, d), lambda b_, h_, i, j: (b_, h_, i, 0))
  kv_spec = pl.BlockSpec((None, None, block_k, d), kv_index)
  if segments is None:
    seg_specs, seg_args = [None, None], [None, None]
  else:
    seg_specs = [pl.BlockSpec((None, block_q, LANES), lambda b_, h_, i, j: (b_, i, 0)),
                 pl.BlockSpec((None, SUBLANES, block_k), kv_seg_index)]
    seg_args = [segments[0], segments[1]]
  kernel = functools.partial(
      _forward_kernel, mask=mask, scale=scale, softcap=softcap, block_q=block_q,
      block_k=block_k, element_mask=mask.needs_element_mask(kv_len))
  return pl.pallas_call(
      kernel,
      grid=(b, h, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
      out_specs=[q_spec,
                 pl.BlockSpec((None, None, 1, block_q), lambda b_, h_, i, j: (b_, h_, 0, i))],
      out_shape=[jax.ShapeDtypeStruct(q_BxHxLxD.shape, q_BxHxLxD.dtype),
                 jax.ShapeDtypeStruct((b, h, 1, q_len), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='kiln_flash_forward_tpu',
  )(q_BxHxLxD, k_BxKxSxD, v_BxKxSxD, *seg_args)


# ---------------------------------------------------------------------------
# Backward: dK and dV with keys as rows; queries of all G heads of the group reduce into them.
# ---------------------------------------------------------------------------


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
                dk_ref, dv_ref, dk_acc, dv_acc, *, mask: BlockMask, scale, softcap, block_q,
                block_k, element_mask: bool):
  j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  first, last = mask.q_blocks(j, block_k, block_q)

  @pl.when((i >= first) & (i <= last))
  def _step():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    precision = _precision(q.dtype)
    s_t, tanh_t = _scores(k, q, scale=scale, softcap=softcap, precision=precision)  # [bk, bq]
    if element_mask or q_seg_ref is not None:
      ok = jnp.ones(s_t.shape, bool)
      if element_mask:
        cols = i * block_q + jax.lax.broadcasted_iota(jnp.int32, s_t.shape, 1)
        rows = j * block_k + jax.lax.broadcasted_iota(jnp.int32, s_t.shape, 0)
        ok = mask.visible(cols, rows)
      if q_seg_ref is not None:
        ok &= jnp.tile(kv_seg_ref[...], (1, block_q // LANES)) == q_seg_ref[:1, :]
      s_t = jnp.where(ok, s_t, -jnp.inf)
    # lse is +inf (not -inf) for rows that saw no key, so p = 0 there.
    p_t = jnp.exp(s_t - lse_ref[...])
    dv_acc[...] += _dot(p_t.astype(do.dtype), do, NN, precision)
    dp_t = _dot(v, do, NT, precision)
    ds_t = p_t * (dp_t - delta_ref[...])
    if tanh_t is not None:
      ds_t = ds_t * (1.0 - tanh_t * tanh_t)
    dk_acc[...] += _dot(ds_t.astype(q.dtype), q, NN, precision)

  @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dkv(q, k, v, do, lse, delta, segments, *, mask, scale, softcap, block_q, block_k,
         interpret):
  b, h, q_len, d = q.shape
  kv_heads, kv_len = k.shape[1], k.shape[2]
  group = h // kv_heads
  nq, nk = q_len // block_q, kv_len // block_k

  def q_index(b_, kh, j, g, i):
    first, last = mask.q_blocks(j, block_k, block_q)
    return b_, kh * group + g, clamp(i, first, last, nq), 0

  def row_index(b_, kh, j, g, i):
    b_, h_, i_, _ = q_index(b_, kh, j, g, i)
    return b_, h_, 0, i_

  q_spec = pl.BlockSpec((None, None, block_q, d), q_index)
  kv_spec = pl.BlockSpec((None, None, block_k, d), lambda b_, kh, j, g, i: (b_, kh, j, 0))
  row_spec = pl.BlockSpec((None, None, 1, block_q), row_index)
  if segments is None:
    seg_specs, seg_args = [None, None], [None, None]
  else:
    seg_specs = [
        pl.BlockSpec((None, SUBLANES, block_q),
                     lambda b_, kh, j, g, i: (b_, 0, q_index(b_, kh, j, g, i)[2])),
        pl.BlockSpec((None, block_k, LANES), lambda b_, kh, j, g, i: (b_, j, 0)),
    ]
    seg_args = [segments[1], segments[0]]
  kernel = functools.partial(
      _dkv_kernel, mask=mask, scale=scale, softcap=softcap, block_q=block_q, block_k=block_k,
      element_mask=mask.needs_element_mask(kv_len))
  return pl.pallas_call(
      kernel,
      grid=(b, kv_heads, nk, group, nq),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32),
                      pltpu.VMEM((block_k, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary', 'arbitrary')),
      interpret=interpret,
      name='kiln_flash_dkv_tpu',
  )(q, k, v, do, lse, delta, *seg_args)


# ---------------------------------------------------------------------------
# Backward: dQ with queries as rows.
# ---------------------------------------------------------------------------


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
               dq_ref, dq_acc, *, mask: BlockMask, scale, softcap, block_q, block_k,
               element_mask: bool):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_acc[...] = jnp.zeros_like(dq_acc)

  first, last = mask.kv_blocks(i, block_q, block_k)

  @pl.when((j >= first) & (j <= last))
  def _step():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    precision = _precision(q.dtype)
    s, tanh_s = _scores(q, k, scale=scale, softcap=softcap, precision=precision)  # [bq, bk]
    if element_mask or q_seg_ref is not None:
      ok = jnp.ones(s.shape, bool)
      if element_mask:
        rows = i * block_q + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        cols = j * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        ok = mask.visible(rows, cols)
      if q_seg_ref is not None:
        ok &= jnp.tile(q_seg_ref[...], (1, block_k // LANES)) == kv_seg_ref[:1, :]
      s = jnp.where(ok, s, -jnp.inf)
    lse_col = jnp.expand_dims(lse_ref[0], -1)
    delta_col = jnp.expand_dims(delta_ref[0], -1)
    p = jnp.exp(s - lse_col)
    dp = _dot(do, v, NT, precision)
    ds = p * (dp - delta_col)
    if tanh_s is not None:
      ds = ds * (1.0 - tanh_s * tanh_s)
    dq_acc[...] += _dot(ds.astype(k.dtype), k, NN, precision)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_acc[...] * scale).astype(dq_ref.dtype)


def _dq(q, k, v, do, lse, delta, segments, *, mask, scale, softcap, block_q, block_k,
        interpret):
  b, h, q_len, d = q.shape
  kv_heads, kv_len = k.shape[1], k.shape[2]
  group = h // kv_heads
  nq, nk = q_len // block_q, kv_len // block_k

  def kv_index(b_, h_, i, j):
    first, last = mask.kv_blocks(i, block_q, block_k)
    return b_, jax.lax.div(h_, group), clamp(j, first, last, nk), 0

  q_spec = pl.BlockSpec((None, None, block_q, d), lambda b_, h_, i, j: (b_, h_, i, 0))
  kv_spec = pl.BlockSpec((None, None, block_k, d), kv_index)
  row_spec = pl.BlockSpec((None, None, 1, block_q), lambda b_, h_, i, j: (b_, h_, 0, i))
  if segments is None:
    seg_specs, seg_args = [None, None], [None, None]
  else:
    seg_specs = [
        pl.BlockSpec((None, block_q, LANES), lambda b_, h_, i, j: (b_, i, 0)),
        pl.BlockSpec((None, SUBLANES, block_k),
                     lambda b_, h_, i, j: (b_, 0, kv_index(b_, h_, i, j)[2])),
    ]
    seg_args = [segments[0], segments[1]]
  kernel = functools.partial(
      _dq_kernel, mask=mask, scale=scale, softcap=softcap, block_q=block_q, block_k=block_k,
      element_mask=mask.needs_element_mask(kv_len))
  return pl.pallas_call(
      kernel,
      grid=(b, h, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='kiln_flash_dq_tpu',
  )(q, k, v, do, lse, delta, *seg_args)


def backward(q_BxHxLxD, k_BxKxSxD, v_BxKxSxD, segments, o_BxHxLxD, lse_BxHx1xL, do_BxHxLxD, *,
             mask: BlockMask, scale: float, softcap: float | None, block_q_dkv: int,
             block_k_dkv: int, block_q_dq: int, block_k_dq: int, interpret=False):
  """Returns (dq, dk, dv) in the dtypes of q, k, v."""
  delta_BxHx1xL = jnp.sum(o_BxHxLxD.astype(jnp.float32) * do_BxHxLxD.astype(jnp.float32),
                          axis=-1)[:, :, None, :]
  # exp(s - lse) must be 0 for a row that saw no key (lse = -inf there).
  lse_BxHx1xL = jnp.where(lse_BxHx1xL == -jnp.inf, jnp.inf, lse_BxHx1xL)
  args = (q_BxHxLxD, k_BxKxSxD, v_BxKxSxD, do_BxHxLxD, lse_BxHx1xL, delta_BxHx1xL, segments)
  common = dict(mask=mask, scale=scale, softcap=softcap, interpret=interpret)
  dk, dv = _dkv(*args, block_q=block_q_dkv, block_k=block_k_dkv, **common)
  dq = _dq(*args, block_q=block_q_dq, block_k=block_k_dq, **common)
  return dq, dk, dv
