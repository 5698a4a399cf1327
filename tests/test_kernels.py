"""Tests for kernels/: the flash attention kernels against the jnp reference, on CPU.

The kernels run in Pallas interpret mode: the Triton kernels through the HLO
interpreter, the TPU kernels through TPU interpret mode (which simulates VMEM,
DMAs and the megacore's two cores, and detects races). The reference itself is
checked against a float64 numpy loop written from the documented semantics.
Lowering checks export the kernels for TPU and CUDA, which runs Pallas's own
lowering to Mosaic and Triton without the hardware.
"""

import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels import block_mask, flash_attention
from kernels.attention_reference import attention_reference
from kernels.flash_attention import BlockSizes

RNG = np.random.default_rng(20240605)


def _inputs(b, q_len, kv_len, h, kv_heads, d, dtype, segments=0):
  """Fresh normal q, k, v, do (and sorted segment ids with `segments` documents)."""
  def normal(*shape):
    return jnp.asarray(RNG.normal(size=shape), dtype)
  q, do = normal(b, q_len, h, d), normal(b, q_len, h, d)
  k, v = normal(b, kv_len, kv_heads, d), normal(b, kv_len, kv_heads, d)
  seg = None
  if segments:
    seg = jnp.asarray(np.sort(RNG.integers(0, segments, size=(b, q_len)), axis=1), jnp.int32)
  return q, k, v, do, seg


def _out_and_grads(attend, q, k, v, do):
  """attend's output and the gradients of sum(out * do) in one jitted program."""
  def run(q, k, v, do):
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(do))
  return jax.jit(run)(q, k, v, do)


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _assert_close(got, want, dtype, what=''):
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  names = ('out', 'dq', 'dk', 'dv')
  for name, g, w in zip(names, got, want, strict=True):
    assert g.dtype == dtype, (what, name, g.dtype)
    err = _rel_err(g, w)
    assert err <= tol, f'{what} {name}: relative error {err:.2e} > {tol:.0e}'


def _reference_out_and_grads(q, k, v, do, **kw):
  # The oracle runs in float32 from the same (possibly bf16) inputs.
  f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
  return _out_and_grads(lambda q, k, v: attention_reference(q, k, v, **kw)[0], *f32)


# ---------------------------------------------------------------------------
# The reference against a float64 loop over the documented rules.
# ---------------------------------------------------------------------------


def _numpy_attention(q, k, v, seg, causal, window, softcap, scale):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, q_len, h, d = q.shape
  kv_len, group = k.shape[1], h // k.shape[2]
  out, lse = np.zeros(q.shape), np.full((b, h, q_len), -np.inf)
  for bi, hi, i in itertools.product(range(b), range(h), range(q_len)):
    pos = i + kv_len - q_len
    keys = [j for j in range(kv_len)
            if (not causal or j <= pos)
            and (window is None or pos - window[0] <= j <= pos + window[1])
            and (seg is None or seg[bi, i] == seg[bi, j])]
    if not keys:
      continue
    logits = np.array([scale * q[bi, i, hi] @ k[bi, j, hi // group] for j in keys])
    if softcap is not None:
      logits = softcap * np.tanh(logits / softcap)
    weights = np.exp(logits - logits.max())
    out[bi, i, hi] = weights @ v[bi, keys, hi // group] / weights.sum()
    lse[bi, hi, i] = logits.max() + np.log(weights.sum())
  return out, lse


@pytest.mark.parametrize('q_len, kv_len, causal, window, softcap, segments', [
    (7, 7, True, None, None, 3),
    (5, 9, True, (2, 0), 3.0, 0),  # queries are the last 5 positions
    (9, 5, True, None, None, 0),  # the first 4 queries see no key: zero rows, lse -inf
    (8, 8, False, (1, 2), None, 2),
])
def test_reference_matches_a_float64_loop(q_len, kv_len, causal, window, softcap, segments):
  q, k, v, _, seg = _inputs(2, q_len, kv_len, 4, 2, 8, jnp.float32, segments)
  out, lse = attention_reference(q, k, v, segment_ids_BxL=seg, causal=causal,
                                 sliding_window=window, logit_softcap=softcap, scale=0.3)
  want_out, want_lse = _numpy_attention(q, k, v, None if seg is None else np.asarray(seg),
                                        causal, window, softcap, 0.3)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
  assert np.isneginf(np.asarray(lse)).any() == (q_len > kv_len)


# ---------------------------------------------------------------------------
# Block ranges against the element mask.
# ---------------------------------------------------------------------------


def _visible_blocks(mask, q_pad, kv_pad, bq, bk):
  rows, cols = np.arange(q_pad)[:, None], np.arange(kv_pad)[None, :]
  vis = np.asarray(mask.visible(rows, cols)) & (rows < mask.q_len)
  return vis.reshape(q_pad // bq, bq, kv_pad // bk, bk).any(axis=(1, 3))


@pytest.mark.parametrize('causal, window', [
    (False, None), (True, None), (True, (37, 0)), (False, (5, 70)), (False, (0, 0))])
def test_block_ranges_are_exactly_the_blocks_with_a_visible_key(causal, window):
  for q_len, kv_len, bq, bk in [(200, 200, 32, 64), (100, 250, 64, 32), (250, 100, 16, 16),
                                (128, 128, 128, 128)]:
    mask = block_mask.BlockMask(q_len=q_len, kv_len=kv_len, causal=causal, window=window)
    q_pad, kv_pad = -(-q_len // bq) * bq, -(-kv_len // bk) * bk
    blocks = _visible_blocks(mask, q_pad, kv_pad, bq, bk)
    for i in range(q_pad // bq):
      first, last = (int(x) for x in mask.kv_blocks(i, bq, bk))
      want = np.flatnonzero(blocks[i])
      if want.size:  # a query block of padding rows may compute more; it may not skip
        assert (first, last) == (want[0], want[-1]), (q_len, kv_len, bq, bk, i)
    for j in range(kv_pad // bk):
      first, last = (int(x) for x in mask.q_blocks(j, bk, bq))
      want = np.flatnonzero(blocks[:, j])
      got = np.arange(first, last + 1)
      np.testing.assert_array_equal(got, want, err_msg=f'{(q_len, kv_len, bq, bk, j)}')


# ---------------------------------------------------------------------------
# The Triton kernels (HLO interpreter) against the reference.
# ---------------------------------------------------------------------------

# (b, q_len, kv_len, h, kv_heads, d, causal, window, softcap, segments, dtype, blocks)
CASES = {
    'causal_gqa2_ragged': (2, 75, 75, 4, 2, 32, True, None, None, 0, jnp.float32, (32, 16)),
    'full_gqa4_segments': (1, 45, 45, 4, 1, 16, False, None, None, 4, jnp.float32, (16, 32)),
    'causal_mha_segments': (2, 64, 64, 2, 2, 16, True, None, None, 3, jnp.float32, (16, 16)),
    'window_causal_softcap': (1, 80, 80, 4, 2, 16, True, (20, 0), 2.0, 0, jnp.float32, (16, 16)),
    'window_both_sides': (1, 64, 64, 2, 1, 16, False, (9, 13), None, 2, jnp.float32, (16, 32)),
    'suffix_queries_head_dim_40': (1, 24, 70, 4, 2, 40, True, None, None, 0, jnp.float32,
                                   (16, 16)),
    'bf16_causal_gqa2': (2, 70, 70, 4, 2, 32, True, None, None, 2, jnp.bfloat16, (32, 32)),
    'bf16_full_softcap': (1, 48, 48, 4, 4, 16, False, (30, 30), 5.0, 0, jnp.bfloat16, (16, 16)),
}


@pytest.mark.parametrize('case', CASES)
def test_triton_kernel_matches_reference(case):
  b, q_len, kv_len, h, kvh, d, causal, window, softcap, segments, dtype, blocks = CASES[case]
  q, k, v, do, seg = _inputs(b, q_len, kv_len, h, kvh, d, dtype, segments)
  kw = dict(segment_ids_BxL=seg, causal=causal, sliding_window=window, logit_softcap=softcap)
  got = _out_and_grads(
      lambda q, k, v: flash_attention.flash_attention(
          q, k, v, **kw, backend='triton', block_sizes=BlockSizes.uniform(*blocks)), q, k, v, do)
  _assert_close(got, _reference_out_and_grads(q, k, v, do, **kw), dtype, case)


def test_backward_blocks_differ_from_forward_blocks():
  q, k, v, do, seg = _inputs(1, 100, 100, 2, 1, 16, jnp.float32, 3)
  kw = dict(segment_ids_BxL=seg, causal=True)
  blocks = BlockSizes(block_q=64, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32,
                      block_k_dq=64)
  got = _out_and_grads(lambda q, k, v: flash_attention.flash_attention(
      q, k, v, **kw, backend='triton', block_sizes=blocks), q, k, v, do)
  _assert_close(got, _reference_out_and_grads(q, k, v, do, **kw), jnp.float32)


def test_queries_that_see_no_key_get_zeros_and_finite_gradients():
  q, k, v, do, _ = _inputs(1, 40, 20, 2, 1, 16, jnp.float32)  # first 20 queries see nothing
  got = _out_and_grads(lambda q, k, v: flash_attention.flash_attention(
      q, k, v, causal=True, backend='triton', block_sizes=BlockSizes.uniform(16, 16)),
      q, k, v, do)
  assert all(np.isfinite(np.asarray(x)).all() for x in got)
  np.testing.assert_array_equal(got[0][:, :20], 0.0)
  np.testing.assert_array_equal(got[1][:, :20], 0.0)
  _assert_close(got, _reference_out_and_grads(q, k, v, do, causal=True), jnp.float32)


# ---------------------------------------------------------------------------
# The TPU kernels under TPU interpret mode, with race detection.
# ---------------------------------------------------------------------------

TPU_CASES = {
    # Three query and key blocks: causal skipping, ragged tail, GQA, segments.
    'causal_gqa2_segments': (1, 300, 300, 2, 1, 32, True, None, None, 3, jnp.float32),
    'bf16_window_softcap': (1, 200, 200, 2, 1, 64, False, (100, 40), 4.0, 0, jnp.bfloat16),
}


@pytest.mark.parametrize('case', TPU_CASES)
def test_tpu_kernel_in_tpu_interpret_mode_without_races(case, capsys):
  b, q_len, kv_len, h, kvh, d, causal, window, softcap, segments, dtype = TPU_CASES[case]
  q, k, v, do, seg = _inputs(b, q_len, kv_len, h, kvh, d, dtype, segments)
  kw = dict(segment_ids_BxL=seg, causal=causal, sliding_window=window, logit_softcap=softcap)
  # Two cores (a megacore chip) take the 'parallel' grid axes in a shuffled order.
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=7)
  try:
    with pltpu.force_tpu_interpret_mode(params):
      got = _out_and_grads(lambda q, k, v: flash_attention.flash_attention(
          q, k, v, **kw, backend='tpu', block_sizes=BlockSizes.uniform(128, 128)), q, k, v, do)
      jax.block_until_ready(got)
  finally:
    pltpu.reset_tpu_interpret_mode_state()
  # The detector prints this exactly when it records a race (the public signal).
  assert 'RACE DETECTED' not in capsys.readouterr().out
  _assert_close(got, _reference_out_and_grads(q, k, v, do, **kw), dtype, case)


def test_tpu_race_detector_is_live(capsys):
  """The detector flags two cores writing one output block (so the test above can fail)."""
  from jax.experimental import pallas as pl

  def racy(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0

  x = jnp.ones((2, 8, 128), jnp.float32)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  try:
    pl.pallas_call(
        racy, grid=(2,), in_specs=[pl.BlockSpec((None, 8, 128), lambda i: (i, 0, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32), interpret=params,
        compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel',)))(x).block_until_ready()
  finally:
    pltpu.reset_tpu_interpret_mode_state()
  assert 'RACE DETECTED' in capsys.readouterr().out


# ---------------------------------------------------------------------------
# Lowering for the real hardware (no device needed).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('backend, platform', [('tpu', 'tpu'), ('triton', 'cuda')])
def test_kernels_lower_for_their_hardware(backend, platform):
  """Pallas lowers the forward and both backward kernels to Mosaic TPU / Triton IR."""
  q = jax.ShapeDtypeStruct((2, 512, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 512, 2, 128), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 512), jnp.int32)
  blocks = flash_attention.default_block_sizes(backend, 'TPU v5p' if backend == 'tpu' else 'H100')

  def loss(q, k, v, seg):
    out = flash_attention.flash_attention(q, k, v, segment_ids_BxL=seg, causal=True,
                                          sliding_window=(256, 0), logit_softcap=30.0,
                                          backend=backend, block_sizes=blocks, interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  # The Triton custom call has no serialization guarantee; we only read the lowered text.
  unchecked = [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform],
                               disabled_checks=unchecked)(q, kv, kv, seg)
  text = exported.mlir_module()
  for name in ('forward', 'dkv', 'dq'):
    assert f'kiln_flash_{name}_{backend}' in text


# ---------------------------------------------------------------------------
# Fallbacks and errors.
# ---------------------------------------------------------------------------


def test_head_dims_above_the_kernels_fall_back_to_the_reference(caplog):
  q, k, v, do, _ = _inputs(1, 12, 12, 2, 1, 264, jnp.float32)
  with caplog.at_level(logging.WARNING):
    got = _out_and_grads(lambda q, k, v: flash_attention.flash_attention(
        q, k, v, causal=True, backend='triton'), q, k, v, do)
  assert 'runs the jnp reference instead of a kernel: head dim 264' in caplog.text
  _assert_close(got, _reference_out_and_grads(q, k, v, do, causal=True), jnp.float32)


@pytest.mark.parametrize('kwargs, message', [
    (dict(k=jnp.ones((1, 8, 3, 16))), 'k/v head count must divide'),
    (dict(segment_ids_BxL=jnp.ones((1, 7), jnp.int32)), r'segment_ids \(1, 7\)'),
    (dict(backend='cuda'), "Unknown flash_attention backend 'cuda'"),
    (dict(backend='tpu', block_sizes=BlockSizes.uniform(100, 128)), 'multiples of 128; got 100'),
    (dict(backend='triton', block_sizes=BlockSizes.uniform(48, 16)), 'powers of two >= 16'),
    (dict(sliding_window=(-1, 0)), 'must be non-negative'),
    (dict(logit_softcap=0.0), 'logit_softcap=0.0 must be positive'),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
  args = dict(q=jnp.ones((1, 8, 4, 16)), k=jnp.ones((1, 8, 2, 16)), v=None)
  args.update({key: kwargs.pop(key) for key in ('k',) if key in kwargs})
  args['v'] = args['k']
  with pytest.raises(ValueError, match=message):
    flash_attention.flash_attention(args['q'], args['k'], args['v'], **kwargs)


def test_default_blocks_follow_the_device_kind():
  assert flash_attention.default_block_sizes('tpu', 'TPU v6 lite').block_k == 1024
  assert flash_attention.default_block_sizes('tpu', 'TPU v5p').block_k == 512
  assert flash_attention.default_block_sizes('triton', 'NVIDIA H100 80GB HBM3').block_q == 128
  assert flash_attention.default_block_sizes('triton', 'cpu').block_q == 128
  assert flash_attention.default_backend() == 'triton'  # this machine: CPU, interpreted
