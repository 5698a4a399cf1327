"""Flash attention for GPUs (Pallas, Triton lowering): forward, dK/dV and dQ kernels.

Layout: the model's own, q, o, do [B, L, H, D] and k, v [B, S, K, D], so no
transposes; log-sum-exp and delta (rowsum(o * do)) [B, H, L] float32. L and S
are multiples of their block sizes, blocks and D powers of two >= 16 (the
wrapper in kernels/flash_attention.py pads).

One program owns one block of rows and walks the blocks of the other sequence
in a loop whose bounds skip the blocks a causal or sliding-window mask hides:
the forward and dQ programs own query blocks, the dK/dV program owns a key
block and also walks the G query heads that share it (grouped-query
attention), so dK and dV need no atomics and no second reduction.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kernels.block_mask import BlockMask


def _dot(a, b, *, trans_b=False):
  """a @ b (or a @ b.T) in float32; float32 inputs get full float32 products, not tf32."""
  allow_tf32 = False if a.dtype == jnp.float32 else None
  return pltr.dot(a, b, trans_b=trans_b, allow_tf32=allow_tf32)


def _scores(a, b, *, scale, softcap):
  """scale * a @ b.T in float32, soft-capped; also tanh(./cap) for the backward (or None)."""
  s = _dot(a, b, trans_b=True) * scale
  if softcap is None:
    return s, None
  t = jnp.tanh(s / softcap)
  return softcap * t, t


def _visible(mask: BlockMask, element_mask, q_row, k_col, q_seg, k_seg):
  """Element mask from broadcastable positions and segment ids, or None if all are visible."""
  ok = None
  if element_mask:
    ok = mask.visible(q_row, k_col)
  if q_seg is not None:
    same = q_seg == k_seg
    ok = same if ok is None else ok & same
  return ok


def _params(head_dim: int) -> pltr.CompilerParams:
  # Triton's usual choice for attention tiles: more warps for the wider head dims.
  return pltr.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


# ---------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *,
                    mask: BlockMask, scale, softcap, block_q, block_k, element_mask):
  i = pl.program_id(0)
  q = q_ref[...]
  rows = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
  q_seg = None if q_seg_ref is None else q_seg_ref[...][:, None]
  first, last = mask.kv_blocks(i, block_q, block_k)

  def body(j, carry):
    acc, m_prev, l_prev = carry
    keys = pl.ds(j * block_k, block_k)
    s, _ = _scores(q, k_ref[keys, :], scale=scale, softcap=softcap)
    cols = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
    ok = _visible(mask, element_mask, rows[:, None], cols[None, :], q_seg,
                  None if kv_seg_ref is None else kv_seg_ref[keys][None, :])
    if ok is not None:
      s = jnp.where(ok, s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # A row that has seen no key yet keeps max -inf; 0 in its place gives p = alpha = 0.
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m_prev - m_safe)
    v = v_ref[keys, :]
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_next, l_prev * alpha + jnp.sum(p, axis=1)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, total = jax.lax.fori_loop(first, last + 1, body, init)
  o_ref[...] = (acc / jnp.where(total == 0.0, 1.0, total)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(total)  # -inf for a row that saw no key


def forward(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL, *, mask: BlockMask, scale: float,
            softcap: float | None, block_q: int, block_k: int, interpret=False):
  """Returns (o_BxLxHxD, lse_BxHxL float32)."""
  b, q_len, h, d = q_BxLxHxD.shape
  kv_len, kv_heads = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  group = h // kv_heads
  q_spec = pl.BlockSpec((None, block_q, None, d), lambda i, b_, h_: (b_, i, h_, 0))
  kv_spec = pl.BlockSpec((None, kv_len, None, d),
                         lambda i, b_, h_: (b_, 0, jax.lax.div(h_, group), 0))
  seg_specs = [None, None]
  if segment_ids_BxL is not None:
    seg_specs = [pl.BlockSpec((None, block_q), lambda i, b_, h_: (b_, i)),
                 pl.BlockSpec((None, kv_len), lambda i, b_, h_: (b_, 0))]
  kernel = functools.partial(
      _forward_kernel, mask=mask, scale=scale, softcap=softcap, block_q=block_q,
      block_k=block_k, element_mask=mask.needs_element_mask(kv_len))
  return pl.pallas_call(
      kernel,
      grid=(q_len // block_q, b, h),
      in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
      out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, b_, h_: (b_, h_, i))],
      out_shape=[jax.ShapeDtypeStruct(q_BxLxHxD.shape, q_BxLxHxD.dtype),
                 jax.ShapeDtypeStruct((b, h, q_len), jnp.float32)],
      compiler_params=_params(d),
      interpret=interpret,
      name='kiln_flash_forward_triton',
  )(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL, segment_ids_BxL)


# ---------------------------------------------------------------------------
# Backward.
# ---------------------------------------------------------------------------


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
                dk_ref, dv_ref, *, mask: BlockMask, scale, softcap, block_q, block_k,
                element_mask):
  """Keys as rows: scores transposed, [bk, bq]; q_ref and do_ref hold all G heads [L, G, D]."""
  j = pl.program_id(0)
  group = q_ref.shape[1]
  k, v = k_ref[...], v_ref[...]
  cols = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[...][:, None]
  first, last = mask.q_blocks(j, block_k, block_q)

  def body(step, carry):
    dk, dv = carry
    g, i = jax.lax.rem(step, group), first + jax.lax.div(step, group)
    queries = pl.ds(i * block_q, block_q)
    q, do = q_ref[queries, g, :], do_ref[queries, g, :]
    s_t, tanh_t = _scores(k, q, scale=scale, softcap=softcap)
    rows = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
    ok = _visible(mask, element_mask, rows[None, :], cols[:, None],
                  None if q_seg_ref is None else q_seg_ref[queries][None, :], kv_seg)
    if ok is not None:
      s_t = jnp.where(ok, s_t, -jnp.inf)
    # lse is +inf (not -inf) for rows that saw no key, so p = 0 there.
    p_t = jnp.exp(s_t - lse_ref[g, queries][None, :])
    dv += _dot(p_t.astype(do.dtype), do)
    dp_t = _dot(v, do, trans_b=True)
    ds_t = p_t * (dp_t - delta_ref[g, queries][None, :])
    if tanh_t is not None:
      ds_t = ds_t * (1.0 - tanh_t * tanh_t)
    dk += _dot(ds_t.astype(q.dtype), q)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  num_steps = jnp.maximum(last - first + 1, 0) * group
  dk, dv = jax.lax.fori_loop(0, num_steps, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dq_ref, *,
               mask: BlockMask, scale, softcap, block_q, block_k, element_mask):
  i = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  rows = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
  q_seg = None if q_seg_ref is None else q_seg_ref[...][:, None]
  first, last = mask.kv_blocks(i, block_q, block_k)

  def body(j, dq):
    keys = pl.ds(j * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s, tanh_s = _scores(q, k, scale=scale, softcap=softcap)
    cols = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
    ok = _visible(mask, element_mask, rows[:, None], cols[None, :], q_seg,
                  None if kv_seg_ref is None else kv_seg_ref[keys][None, :])
    if ok is not None:
      s = jnp.where(ok, s, -jnp.inf)
    p = jnp.exp(s - lse[:, None])
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
    if tanh_s is not None:
      ds = ds * (1.0 - tanh_s * tanh_s)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(first, last + 1, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv(q, k, v, do, lse, delta, seg, *, mask, scale, softcap, block_q, block_k, interpret):
  """One program per (key block, batch, kv head); the G query heads of the group come along."""
  b, q_len, h, d = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = h // kv_heads
  grouped = lambda x: x.reshape(b, q_len, kv_heads, group, d)  # noqa: E731
  by_group = lambda x: x.reshape(b, kv_heads, group, q_len)  # noqa: E731
  q_group_spec = pl.BlockSpec((None, q_len, None, group, d), lambda j, b_, kh: (b_, 0, kh, 0, 0))
  row_group_spec = pl.BlockSpec((None, None, group, q_len), lambda j, b_, kh: (b_, kh, 0, 0))
  kv_spec = pl.BlockSpec((None, block_k, None, d), lambda j, b_, kh: (b_, j, kh, 0))
  seg_specs = [None, None]
  if seg is not None:
    seg_specs = [pl.BlockSpec((None, q_len), lambda j, b_, kh: (b_, 0)),
                 pl.BlockSpec((None, block_k), lambda j, b_, kh: (b_, j))]
  return pl.pallas_call(
      functools.partial(_dkv_kernel, mask=mask, scale=scale, softcap=softcap, block_q=block_q,
                        block_k=block_k, element_mask=mask.needs_element_mask(kv_len)),
      grid=(kv_len // block_k, b, kv_heads),
      in_specs=[q_group_spec, kv_spec, kv_spec, q_group_spec, row_group_spec, row_group_spec,
                *seg_specs],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(d),
      interpret=interpret,
      name='kiln_flash_dkv_triton',
  )(grouped(q), k, v, grouped(do), by_group(lse), by_group(delta), seg, seg)


def _dq(q, k, v, do, lse, delta, seg, *, mask, scale, softcap, block_q, block_k, interpret):
  """One program per (query block, batch, head)."""
  b, q_len, h, d = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = h // kv_heads
  q_spec = pl.BlockSpec((None, block_q, None, d), lambda i, b_, h_: (b_, i, h_, 0))
  kv_spec = pl.BlockSpec((None, kv_len, None, d),
                         lambda i, b_, h_: (b_, 0, jax.lax.div(h_, group), 0))
  row_spec = pl.BlockSpec((None, None, block_q), lambda i, b_, h_: (b_, h_, i))
  seg_specs = [None, None]
  if seg is not None:
    seg_specs = [pl.BlockSpec((None, block_q), lambda i, b_, h_: (b_, i)),
                 pl.BlockSpec((None, kv_len), lambda i, b_, h_: (b_, 0))]
  return pl.pallas_call(
      functools.partial(_dq_kernel, mask=mask, scale=scale, softcap=softcap, block_q=block_q,
                        block_k=block_k, element_mask=mask.needs_element_mask(kv_len)),
      grid=(q_len // block_q, b, h),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(d),
      interpret=interpret,
      name='kiln_flash_dq_triton',
  )(q, k, v, do, lse, delta, seg, seg)


def backward(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL, o_BxLxHxD, lse_BxHxL, do_BxLxHxD,
             *, mask: BlockMask, scale: float, softcap: float | None, block_q_dkv: int,
             block_k_dkv: int, block_q_dq: int, block_k_dq: int, interpret=False):
  """Returns (dq, dk, dv) in the dtypes of q, k, v."""
  delta_BxHxL = jnp.einsum('blhd,blhd->bhl', o_BxLxHxD.astype(jnp.float32),
                           do_BxLxHxD.astype(jnp.float32))
  # exp(s - lse) must be 0 for a row that saw no key (lse = -inf there).
  lse_BxHxL = jnp.where(lse_BxHxL == -jnp.inf, jnp.inf, lse_BxHxL)
  args = (q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, do_BxLxHxD, lse_BxHxL, delta_BxHxL, segment_ids_BxL)
  common = dict(mask=mask, scale=scale, softcap=softcap, interpret=interpret)
  dk, dv = _dkv(*args, block_q=block_q_dkv, block_k=block_k_dkv, **common)
  dq = _dq(*args, block_q=block_q_dq, block_k=block_k_dq, **common)
  return dq, dk, dv
