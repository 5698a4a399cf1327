"""Paged decode attention (kernels/paged_attention.py) and its dispatch in
model/kv_cache.py, on CPU.

Oracles: kv_cache's jnp gather path (itself checked against the full forward pass in
tests/test_decode.py), the same decode run with attention 'xla', and the sharded call
against the unsharded one. The kernels run in Pallas interpret mode; lowering checks
export them for TPU and CUDA at llama_1b's head shapes without the hardware.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kernels import paged_attention
from model import decode, kv_cache, sampling, transformer

H, K, D, S = 4, 2, 32, 8  # query heads, key/value heads, head dim, page size
B, PAGES_PER_ROW, POOL = 3, 4, 17


def _case(t: int, seed: int = 0, d: int = D):
  """Random pages in a pool larger than the rows need, shuffled page tables, ragged
  positions: row 0 mid-page, row 1 padding only, row 2 at the end of its last page
  (and for t > 1 its last query padding)."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, t, H, d)), jnp.float32)
  k_pages = jnp.asarray(rng.normal(size=(K, POOL, S, d)), jnp.float32)
  v_pages = jnp.asarray(rng.normal(size=(K, POOL, S, d)), jnp.float32)
  table = rng.permutation(POOL)[:B * PAGES_PER_ROW].reshape(B, PAGES_PER_ROW)
  ends = np.array([13, -1, PAGES_PER_ROW * S - 1])
  positions = ends[:, None] - np.arange(t)[::-1][None]
  positions[1] = -1
  if t > 1:
    positions[2, -1] = -1
  return q, k_pages, v_pages, jnp.asarray(positions, jnp.int32), jnp.asarray(table, jnp.int32)


@pytest.mark.parametrize('t, paged', [(1, True), (3, False)])
def test_kernel_equals_the_gather_path(t, paged):
  """Ragged rows, GQA, padding queries -> exact zeros; a shuffled page table, or the
  contiguous layout (row b owns pages [b*P, (b+1)*P))."""
  q, k_pages, v_pages, positions, table = _case(t)
  if not paged:
    k_pages, v_pages, table = k_pages[:, :B * PAGES_PER_ROW], v_pages[:, :B * PAGES_PER_ROW], None
  want = kv_cache.gather_attend(q, k_pages, v_pages, positions, table)
  got = paged_attention.paged_attention(q, k_pages, v_pages, positions, table,
                                        backend='triton')
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  padding = np.asarray(positions) < 0
  assert np.all(np.asarray(got)[padding] == 0)
  assert np.all(np.abs(np.asarray(got)[~padding]).sum(axis=-1) > 0)


def test_tpu_kernel_interpreted_equals_the_gather_path():
  """The TPU kernel in TPU interpret mode. Its softmax runs at lower precision than the
  float32 reference (seen ~8e-3 on unit-variance inputs), hence the tolerance."""
  q, k_pages, v_pages, positions, table = _case(1, seed=2, d=128)
  want = kv_cache.gather_attend(q, k_pages, v_pages, positions, table)
  got = paged_attention.paged_attention(q, k_pages, v_pages, positions, table, backend='tpu')
  np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2)
  assert np.all(np.asarray(got)[1] == 0)


def test_sharded_kernel_equals_unsharded():
  """Under a (data 2, tensor 2) mesh with a page table: heads split, rows whole on every
  device (any row may point at any page)."""
  q, k_pages, v_pages, positions, table = _case(1, seed=3)
  want = kv_cache.gather_attend(q, k_pages, v_pages, positions, table)
  mesh = jax.make_mesh((2, 2), ('data', 'tensor'), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    got = jax.jit(kv_cache._kernel_attend)(q, k_pages, v_pages, positions, table)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('implementation, t, expected', [
    ('pallas', 1, True), ('pallas', kv_cache.MAX_KERNEL_QUERIES + 1, False),
    ('auto', 1, False),  # CPU: auto keeps the gather path
    ('xla', 1, False), ('cudnn', 1, False)])
def test_dispatch(implementation, t, expected):
  assert kv_cache.uses_kernel(implementation, t, D, jnp.bfloat16) is expected


def test_shapes_the_kernel_cannot_take_are_gathered(monkeypatch):
  """The TPU op lowers only head dims that are multiples of 128 (see the lowering test)."""
  monkeypatch.setattr(paged_attention.flash_attention, 'default_backend', lambda: 'tpu')
  assert not kv_cache.uses_kernel('pallas', 1, 64, jnp.bfloat16)
  assert kv_cache.uses_kernel('pallas', 1, 128, jnp.bfloat16)
  assert not kv_cache.uses_kernel('pallas', 1, 128, jnp.int8)
  with pytest.raises(ValueError, match='multiple of 128'):
    paged_attention.paged_attention(*_case(1), backend='tpu')


@pytest.mark.parametrize('backend, platform, head_dim', [
    ('tpu', 'tpu', 128), ('triton', 'cuda', 64), ('triton', 'cuda', 128)])
def test_kernels_lower_for_their_hardware(backend, platform, head_dim):
  """llama_1b's heads in bf16 (32 query heads, 8 key/value heads, Dh 64; on TPU Dh 128,
  the kernel's minimum), pages of 64, a decode step of 8 rows over 1024 positions, lower
  to Mosaic TPU / Triton IR."""
  q = jax.ShapeDtypeStruct((8, 1, 32, head_dim), jnp.bfloat16)
  pages = jax.ShapeDtypeStruct((8, 8 * 16, 64, head_dim), jnp.bfloat16)
  positions = jax.ShapeDtypeStruct((8, 1), jnp.int32)
  table = jax.ShapeDtypeStruct((8, 16), jnp.int32)
  call = functools.partial(paged_attention.paged_attention, backend=backend, interpret=False)
  unchecked = [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
  exported = jax.export.export(jax.jit(call), platforms=[platform],
                               disabled_checks=unchecked)(q, pages, pages, positions, table)
  text = exported.mlir_module()
  assert ('tpu_custom_call' in text) if backend == 'tpu' else ('triton' in text)


# ---------------------------------------------------------------------------
# The model's decode with attention 'pallas' against 'xla'.
# ---------------------------------------------------------------------------


def _model(attention: str):
  cfg = ml_collections.ConfigDict(dict(
      vocab_size=-1, d_model=32, n_layers=2, n_heads=4, head_dim=-1, mlp_dim=-1,
      rope_theta=10_000.0, norm_eps=1e-5, dropout=0.0, dtype='float32', param_dtype='float32',
      remat='none', attention=attention, scan_unroll=1, norm='rmsnorm', mlp='swiglu',
      position='rope', max_positions=-1, qkv_bias=False, attn_out_bias=False, mlp_bias=False,
      n_kv_heads=2, tie_embeddings=True))
  model_cfg = transformer.TransformerConfig.from_config(cfg, 128)
  with nnx.use_eager_sharding(False):
    return nnx.split(transformer.Transformer(model_cfg, rngs=nnx.Rngs(params=0)))


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, tokens, positions, cache, table):
  return nnx.merge(graphdef, state).decode(tokens, positions, cache, table)


def test_model_decode_with_pallas_equals_xla():
  """A prompt (gather path for both), then ragged single steps and a speculative block of
  3 over a shuffled page table: every logit and the cache agree."""
  runs = {}
  for attention in ('xla', 'pallas'):
    graphdef, state = _model(attention)
    cfg = nnx.merge(graphdef, state).cfg
    cache = kv_cache.init_cache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_pages=9,
                                page_size=4, dtype=jnp.float32)
    table = jnp.asarray([[7, 2, 5, 0], [3, 8, 1, 6]], jnp.int32)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 128, (2, 20)), jnp.int32)
    prompt_pos = jnp.asarray([np.arange(17), np.r_[np.arange(9), -np.ones(8)]], jnp.int32)
    logits, cache = _decode(graphdef, state, tokens[:, :17], prompt_pos, cache, table)
    outs = [logits]
    for step in (jnp.asarray([[17], [9]]), jnp.asarray([[-1], [10]]),
                 jnp.asarray([[18, 19, -1], [11, 12, 13]])):
      logits, cache = _decode(graphdef, state, tokens[:, :step.shape[1]], step, cache, table)
      outs.append(logits)
    runs[attention] = outs, cache
  for want, got in zip(runs['xla'][0], runs['pallas'][0], strict=True):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  # Layer 0's keys are the same writes; later layers' follow from the attention outputs.
  np.testing.assert_array_equal(runs['pallas'][1].k[0], runs['xla'][1].k[0])
  np.testing.assert_allclose(runs['pallas'][1].v, runs['xla'][1].v, rtol=2e-5, atol=2e-5)


def test_generate_under_a_mesh_with_pallas_equals_xla():
  """model/decode.generate (the contiguous layout: rows and their pages split over 'data',
  heads over 'tensor') inside jit under a (data 2, tensor 2) mesh, ragged prompts: the
  same greedy tokens and log-probs as with 'xla'."""
  prompt = jnp.asarray(np.random.default_rng(6).integers(0, 128, (4, 6)), jnp.int32)
  lengths = jnp.asarray([6, 3, 5, 1], jnp.int32)
  greedy = jax.tree.map(jnp.asarray, sampling.SamplingParams.make(4, temperature=0.0))
  mesh = jax.make_mesh((2, 2), ('data', 'tensor'), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)  # as train/mesh.py's
  outs = {}
  for attention in ('xla', 'pallas'):
    graphdef, state = _model(attention)

    def run(params, prompt, graphdef=graphdef):
      return decode.generate(graphdef, params, prompt, lengths, max_new_tokens=4,
                             sampling_params=greedy, seeds_B=jnp.zeros(4, jnp.int32),
                             page_size=4)

    with jax.set_mesh(mesh):
      outs[attention] = jax.jit(run)(nnx.to_pure_dict(state), prompt)
  np.testing.assert_array_equal(outs['pallas'].tokens, outs['xla'].tokens)
  np.testing.assert_allclose(outs['pallas'].logprobs, outs['xla'].logprobs, rtol=1e-4,
                             atol=1e-4)
