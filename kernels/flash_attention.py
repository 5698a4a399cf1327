"""Fused (flash) attention: one entry point over the Pallas kernels for TPU and GPU.

`flash_attention` takes the model's layout (q [B, L, H, D], k/v [B, S, K, D]),
picks a kernel for the device, pads the shapes the kernel cannot take, and
differentiates through `jax.custom_vjp` with Pallas backward kernels that
recompute the scores from the saved log-sum-exp (no [L, S] matrix is ever
stored). Semantics are those of kernels/attention_reference.py.

Backends:
  tpu     kernels/flash_attention_tpu.py (Mosaic TPU);
  triton  kernels/flash_attention_triton.py (CUDA and ROCm GPUs).
On CPU the kernels run in Pallas interpret mode (slow: for tests).

Shapes the kernels cannot take (head dim above 256, dtypes other than
float32/bfloat16/float16) run the reference instead, with the reason logged
once; nothing silently computes something else.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental.pallas import tpu as pltpu

from kernels import flash_attention_tpu, flash_attention_triton
from kernels.attention_reference import attention_reference, normalize_window
from kernels.block_mask import BlockMask

BACKENDS = ('tpu', 'triton')
MAX_HEAD_DIM = 256
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Rows (q) and keys (k) per block, for the forward, dK/dV and dQ kernels.

  TPU blocks are multiples of 128, Triton blocks powers of two >= 16. Blocks
  longer than the (padded) sequence are shortened to it.
  """
  block_q: int
  block_k: int
  block_q_dkv: int
  block_k_dkv: int
  block_q_dq: int
  block_k_dq: int

  @classmethod
  def uniform(cls, block_q: int, block_k: int) -> 'BlockSizes':
    return cls(block_q, block_k, block_q, block_k, block_q, block_k)


# Starting points per device kind (first match of a substring of jax's device_kind, lower
# case). They follow the public splash/flash defaults; docs/benchmarks.md records what has
# been measured.
_DEFAULT_BLOCKS: dict[str, tuple[tuple[str, BlockSizes], ...]] = {
    'tpu': (
        ('v5 lite', BlockSizes(512, 512, 512, 512, 512, 512)),
        ('v6', BlockSizes(512, 1024, 512, 1024, 512, 1024)),
        ('', BlockSizes(512, 512, 512, 512, 512, 512)),
    ),
    'triton': (
        ('h100', BlockSizes(128, 64, 64, 64, 64, 64)),
        ('h200', BlockSizes(128, 64, 64, 64, 64, 64)),
        ('a100', BlockSizes(128, 64, 64, 64, 64, 64)),
        ('cpu', BlockSizes.uniform(128, 128)),  # interpret mode: fewer, larger steps are faster
        ('', BlockSizes(64, 64, 32, 32, 32, 32)),
    ),
}


def default_block_sizes(backend: str, device_kind: str) -> BlockSizes:
  """The block sizes `flash_attention` uses on `device_kind` when none are given."""
  kind = device_kind.lower()
  for needle, blocks in _DEFAULT_BLOCKS[backend]:
    if needle in kind:
      return blocks
  raise AssertionError('every table ends with a catch-all')


def target_device() -> tuple[str, str]:
  """(platform, device kind) of the devices the program being traced is for: those of the
  mesh set with `jax.set_mesh` (so an ahead-of-time compile for a TPU topology on a CPU host,
  launch/compile.py, gets the TPU kernels), else this process's default devices."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  if device is not None and device.platform:
    return device.platform, device.device_kind
  return jax.default_backend(), jax.devices()[0].device_kind


def default_backend() -> str:
  """tpu on TPU; triton on GPUs and (interpreted) on CPU."""
  return 'tpu' if target_device()[0] == 'tpu' else 'triton'


_warned: set[str] = set()


def warn_once(message: str) -> None:
  """Logs `message` as a warning the first time it comes (calls repeat at every trace)."""
  if message not in _warned:
    _warned.add(message)
    logging.warning('%s', message)


# ---------------------------------------------------------------------------
# The plan: everything static about one call.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
  backend: str
  mask: BlockMask
  scale: float
  softcap: float | None
  blocks: BlockSizes
  q_len: int  # padded
  kv_len: int  # padded
  head_dim: int  # padded
  interpret: bool


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _fit_block(block: int, length: int, backend: str) -> int:
  """`block` checked for the backend and shortened to the sequence when that is shorter."""
  if backend == 'tpu':
    if block <= 0 or block % 128:
      raise ValueError(f'TPU attention blocks must be multiples of 128; got {block}.')
    return min(block, _round_up(length, 128))
  if block < 16 or block & (block - 1):
    raise ValueError(f'Triton attention blocks must be powers of two >= 16; got {block}.')
  return min(block, max(16, 1 << (length - 1).bit_length()))


def _padded_head_dim(d: int, backend: str) -> int:
  if backend == 'tpu':
    return d if d <= 128 else _round_up(d, 128)
  return max(16, 1 << (d - 1).bit_length())


def _make_plan(q_shape, kv_shape, *, backend, blocks, causal, window, scale, softcap,
               segmented, interpret) -> _Plan:
  q_len, d = q_shape[1], q_shape[3]
  kv_len = kv_shape[1]
  fit = functools.partial(_fit_block, backend=backend)
  blocks = BlockSizes(
      fit(blocks.block_q, q_len), fit(blocks.block_k, kv_len),
      fit(blocks.block_q_dkv, q_len), fit(blocks.block_k_dkv, kv_len),
      fit(blocks.block_q_dq, q_len), fit(blocks.block_k_dq, kv_len))
  q_multiple = math.lcm(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq)
  kv_multiple = math.lcm(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq)
  if segmented:  # one array of segment ids serves queries and keys, so one padded length
    q_multiple = kv_multiple = math.lcm(q_multiple, kv_multiple)
  return _Plan(
      backend=backend,
      mask=BlockMask(q_len=q_len, kv_len=kv_len, causal=causal, window=window),
      scale=scale, softcap=softcap, blocks=blocks,
      q_len=_round_up(q_len, q_multiple), kv_len=_round_up(kv_len, kv_multiple),
      head_dim=_padded_head_dim(d, backend), interpret=interpret)


# ---------------------------------------------------------------------------
# Kernel calls in each backend's layout, and their custom VJP.
# ---------------------------------------------------------------------------


def _interpret_arg(plan: _Plan):
  if not plan.interpret:
    return False
  return pltpu.InterpretParams() if plan.backend == 'tpu' else True


def _kernel_args(plan: _Plan) -> dict:
  return dict(mask=plan.mask, scale=plan.scale, softcap=plan.softcap,
              interpret=_interpret_arg(plan))


def _to_kernel_layout(x_BxLxHxD, backend):
  return x_BxLxHxD.swapaxes(1, 2) if backend == 'tpu' else x_BxLxHxD


def _segments(segment_ids_BxL, backend):
  if segment_ids_BxL is None:
    return None
  if backend == 'tpu':
    return flash_attention_tpu.segment_layouts(segment_ids_BxL)
  return segment_ids_BxL.astype(jnp.int32)


def _forward(q, k, v, segment_ids, plan: _Plan):
  b = plan.blocks
  segments = _segments(segment_ids, plan.backend)
  if plan.backend == 'tpu':
    return flash_attention_tpu.forward(q, k, v, segments, block_q=b.block_q, block_k=b.block_k,
                                       **_kernel_args(plan))
  return flash_attention_triton.forward(q, k, v, segments, block_q=b.block_q, block_k=b.block_k,
                                        **_kernel_args(plan))


def _backward(q, k, v, segment_ids, o, lse, do, plan: _Plan):
  b = plan.blocks
  blocks = dict(block_q_dkv=b.block_q_dkv, block_k_dkv=b.block_k_dkv, block_q_dq=b.block_q_dq,
                block_k_dq=b.block_k_dq)
  segments = _segments(segment_ids, plan.backend)
  if plan.backend == 'tpu':
    return flash_attention_tpu.backward(q, k, v, segments, o, lse, do, **blocks,
                                        **_kernel_args(plan))
  return flash_attention_triton.backward(q, k, v, segments, o, lse, do, **blocks,
                                         **_kernel_args(plan))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, segment_ids, plan: _Plan):
  return _forward(q, k, v, segment_ids, plan)[0]


def _attend_fwd(q, k, v, segment_ids, plan: _Plan):
  o, lse = _forward(q, k, v, segment_ids, plan)
  return o, (q, k, v, segment_ids, o, lse)


def _attend_bwd(plan: _Plan, residuals, do):
  q, k, v, segment_ids, o, lse = residuals
  dq, dk, dv = _backward(q, k, v, segment_ids, o, lse, do, plan)
  return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


# ---------------------------------------------------------------------------
# Public entry point.
# ---------------------------------------------------------------------------


def _check_inputs(q, k, v, segment_ids) -> None:
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f'flash_attention needs q [B, L, H, D] and k, v [B, S, K, D] of one shape; '
                     f'got q {q.shape}, k {k.shape}, v {v.shape}.')
  b, q_len, h, d = q.shape
  kb, kv_len, kh, kd = k.shape
  if (kb, kd) != (b, d) or h % kh:
    raise ValueError(f'q {q.shape} and k/v {k.shape} must share batch and head dim, and the '
                     'k/v head count must divide the query head count.')
  if q_len == 0 or kv_len == 0:
    raise ValueError(f'flash_attention got an empty sequence: q {q.shape}, k {k.shape}.')
  if segment_ids is not None and (segment_ids.shape != (b, q_len) or kv_len != q_len):
    raise ValueError(f'segment_ids {segment_ids.shape} must be [batch, length] = {(b, q_len)}, '
                     f'and need queries and keys of one length (got L={q_len}, S={kv_len}).')
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f'q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.')


def _unsupported(q, backend: str) -> str | None:
  """Why the kernels cannot take this call, or None."""
  if jnp.dtype(q.dtype) not in KERNEL_DTYPES:
    return f'the kernels take float32, bfloat16 or float16, not {q.dtype}'
  if backend == 'tpu' and q.dtype == jnp.float16:
    return 'the TPU kernels take float32 or bfloat16, not float16'
  if q.shape[-1] > MAX_HEAD_DIM:
    return f'head dim {q.shape[-1]} is above the kernels\' {MAX_HEAD_DIM}'
  return None


def _padded_call(q, k, v, segment_ids, plan: _Plan):
  """Pads to the plan's shapes, runs the kernels in their layout, and cuts the padding off."""
  d = q.shape[-1]

  def pad(x, length):
    """Zeros after the sequence (axis 1) and, for q/k/v, after the head dim."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - x.shape[1])
    if x.ndim == 4:
      widths[3] = (0, plan.head_dim - d)
    return jnp.pad(x, widths)

  q_pad = _to_kernel_layout(pad(q, plan.q_len), plan.backend)
  k_pad = _to_kernel_layout(pad(k, plan.kv_len), plan.backend)
  v_pad = _to_kernel_layout(pad(v, plan.kv_len), plan.backend)
  seg = None if segment_ids is None else pad(segment_ids, plan.q_len)
  out = _to_kernel_layout(_attend(q_pad, k_pad, v_pad, seg, plan), plan.backend)  # self-inverse
  return out[:, :q.shape[1], :, :d]


def flash_attention(
    q_BxLxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    *,
    segment_ids_BxL: jax.Array | None = None,
    causal: bool = False,
    sliding_window: int | tuple[int, int] | None = None,
    logit_softcap: float | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
  """Fused attention with grouped-query heads; differentiable. Returns out_BxLxHxD.

  Args:
    q_BxLxHxD: queries.
    k_BxSxKxD: keys; K divides H (grouped-query attention).
    v_BxSxKxD: values.
    segment_ids_BxL: integer document ids of a packed row; queries attend only to keys with
      the same id. Needs L == S.
    causal: query i sees keys j <= i + (S - L).
    sliding_window: (left, right), or w for (w, w): query i sees keys within
      [pos - left, pos + right], as jax.nn.dot_product_attention's local_window_size.
    logit_softcap: c for logits = c * tanh(logits / c), or None.
    scale: logit scale; default 1 / sqrt(D).
    block_sizes: default `default_block_sizes(backend, device kind)`.
    backend: one of BACKENDS; default `default_backend()`.
    interpret: run the kernel in Pallas interpret mode; default True exactly on CPU (the
      platform of `target_device`).
  """
  q, k, v = q_BxLxHxD, k_BxSxKxD, v_BxSxKxD
  _check_inputs(q, k, v, segment_ids_BxL)
  if backend is None:
    backend = default_backend()
  if backend not in BACKENDS:
    raise ValueError(f'Unknown flash_attention backend {backend!r}; allowed: '
                     f'{", ".join(BACKENDS)}.')
  window = normalize_window(sliding_window)
  if logit_softcap is not None and logit_softcap <= 0:
    raise ValueError(f'logit_softcap={logit_softcap} must be positive (or None).')
  d = q.shape[-1]
  scale = d ** -0.5 if scale is None else float(scale)

  reason = _unsupported(q, backend)
  if reason is not None:
    warn_once(f'flash_attention runs the jnp reference instead of a kernel: {reason}.')
    return attention_reference(q, k, v, segment_ids_BxL=segment_ids_BxL, causal=causal,
                               sliding_window=window, logit_softcap=logit_softcap,
                               scale=scale)[0]
  platform, device_kind = target_device()
  if interpret is None:
    interpret = platform == 'cpu'
  if block_sizes is None:
    block_sizes = default_block_sizes(backend, device_kind)
  plan = _make_plan(q.shape, k.shape, backend=backend, blocks=block_sizes, causal=causal,
                    window=window, scale=scale, softcap=logit_softcap,
                    segmented=segment_ids_BxL is not None, interpret=interpret)
  return _padded_call(q, k, v, segment_ids_BxL, plan)
