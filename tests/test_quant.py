"""Weight-only quantization (model/quant.py).

Oracles: the NF4 levels rebuilt from their definition (normal quantiles); round-trip
errors against closed-form bounds computed here in numpy from the float weights (half a
step of each channel or group for int8 and int4, half the local gap between NF4 levels
times the block absmax for NF4); the quantized model against the float model run on the
dequantized weights (equivalent paths), and near the float model itself.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from model import quant, transformer

CFG = transformer.TransformerConfig(
    vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128,
    tie_embeddings=False, dtype=jnp.dtype('float32'))


def _weights(shape, seed=0):
  """Normal weights with a few large outliers, as trained projections have."""
  rng = np.random.default_rng(seed)
  w = rng.normal(0, 0.02, shape).astype(np.float32)
  w.flat[rng.choice(w.size, 20, replace=False)] *= 30
  return w


def _blocks(w, axis, b):
  """numpy: [..., n, ...] -> [..., n / b, b, ...] at `axis`, and the blocks' absmax."""
  blocks = w.reshape(w.shape[:axis] + (w.shape[axis] // b, b) + w.shape[axis + 1:])
  return blocks, np.max(np.abs(blocks), axis=axis + 1, keepdims=True)


def _round_trip(w, name, scheme):
  """(stored arrays, dequantized weight) as numpy."""
  def fn(w):
    stored = quant.quantize(w, name, scheme)
    return stored, quant.dequantize(stored, name, scheme)
  return jax.tree.map(np.asarray, jax.jit(fn)(w))


def test_nf4_levels_are_the_normal_quantiles():
  """QLoRA's construction: 8 positive quantiles of N(0, 1) between offset 0.9677 and 1/2,
  7 negative ones likewise, and zero, scaled to [-1, 1]."""
  offset = 0.9677083
  positive = stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
  negative = -stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
  levels = np.sort(np.concatenate([positive, [0.0], negative]))
  np.testing.assert_allclose(quant.NF4_LEVELS, levels / levels.max(), atol=1e-6)


def _local_half_gap(v):
  """Half the gap between the two NF4 levels that enclose each value v in [-1, 1]."""
  levels = quant.NF4_LEVELS.astype(np.float64)
  hi = np.clip(np.searchsorted(levels, v), 1, 15)
  return (levels[hi] - levels[hi - 1]) / 2


@pytest.mark.parametrize('name, shape', [('wq', (2, 128, 4, 16)), ('wo', (2, 4, 128, 64)),
                                         ('w_down', (256, 64))])
def test_nf4_round_trip_is_within_the_nf4_bound(name, shape):
  w = _weights(shape)
  stored, w_hat = _round_trip(w, name, quant.Scheme('nf4', double=False))
  axis = len(shape) + quant.CONTRACTION_AXES[name][-1]
  blocks, absmax = _blocks(w, axis, 64)
  bound = _local_half_gap(blocks / absmax) * absmax
  err = np.abs(blocks - _blocks(w_hat, axis, 64)[0])
  assert np.all(err <= bound * (1 + 1e-5) + 1e-9)
  largest_gap = np.max(np.diff(quant.NF4_LEVELS))  # between -1 and the next level
  assert np.all(err <= largest_gap / 2 * absmax * (1 + 1e-5))
  # Stored: two codes a byte, a float32 absmax per block of 64.
  assert stored[''].dtype == np.uint8 and stored[''].shape[axis] == shape[axis] // 2
  np.testing.assert_array_equal(stored['_scale'], np.squeeze(absmax, axis + 1))


def test_nf4_double_quantization_stays_within_the_bound_of_its_scales():
  w = _weights((1, 4096, 2, 4), seed=1)  # 64 blocks along the contraction axis: DQ blocks of 64
  scheme = quant.Scheme('nf4', double=True)
  stored, w_hat = _round_trip(w, 'wq', scheme)
  assert set(stored) == {'', '_scale', '_scale_scale', '_scale_mean'}
  assert stored['_scale'].dtype == np.int8 and stored['_scale'].shape == (1, 64, 2, 4)
  assert stored['_scale_scale'].shape == (1, 1, 2, 4)
  blocks, absmax = _blocks(w, 1, 64)
  # The int8 scales: within half a step of the block absmax around their block's mean.
  scale_hat = (stored['_scale'].astype(np.float32) * np.asarray(stored['_scale_scale'])
               + np.asarray(stored['_scale_mean']))[:, :, None]
  step = np.asarray(stored['_scale_scale'])[:, :, None]
  assert np.all(np.abs(scale_hat - absmax) <= step / 2 * (1 + 1e-4) + 1e-9)
  # The codes are taken against the stored scale, so the bound is NF4's over it, plus
  # what a scale stored below the block's absmax clips.
  v = np.clip(blocks / scale_hat, -1, 1)
  bound = _local_half_gap(v) * scale_hat + np.maximum(np.abs(blocks) - scale_hat, 0)
  assert np.all(np.abs(blocks - _blocks(w_hat, 1, 64)[0]) <= bound * (1 + 1e-5) + 1e-8)


@pytest.mark.parametrize('name, shape', [('wq', (2, 64, 4, 16)), ('wo', (4, 16, 64)),
                                         ('lm_head', (64, 256))])
def test_int8_round_trip_is_within_half_a_step_per_output_channel(name, shape):
  w = _weights(shape)
  stored, w_hat = _round_trip(w, name, quant.Scheme('int8'))
  axes = tuple(len(shape) + a for a in quant.CONTRACTION_AXES[name])
  step = np.max(np.abs(w), axis=axes, keepdims=True) / 127
  assert stored[''].dtype == np.int8 and stored[''].shape == shape
  assert stored['_scale'].shape == step.shape
  assert np.all(np.abs(w - w_hat) <= step / 2 * (1 + 1e-5))


@pytest.mark.parametrize('group', [32, 128])
def test_int4_round_trip_is_within_half_a_step_per_group(group):
  shape = (2, 256, 4, 8)
  w = _weights(shape)
  stored, w_hat = _round_trip(w, 'wk', quant.Scheme('int4', group=group))
  blocks, absmax = _blocks(w, 1, group)
  step = absmax / 7
  assert np.all(np.abs(blocks - _blocks(w_hat, 1, group)[0]) <= step / 2 * (1 + 1e-5))
  # Memory: half a byte per weight plus a float32 scale per group.
  assert quant.weight_bytes(stored) == w.size // 2 + 4 * w.size // group


def test_a_group_that_does_not_split_the_axis_is_refused():
  with pytest.raises(ValueError, match='does not split into blocks of 48'):
    quant.quantize(jnp.zeros((100, 8)), 'w_up', quant.Scheme('int4', group=48))
  with pytest.raises(ValueError, match='positive even number'):
    quant.Scheme('int4', group=7)


# --- the quantized model ------------------------------------------------------------------


def _build(cfg):
  with nnx.use_eager_sharding(False):
    model = transformer.Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
  return nnx.split(model, nnx.Param)


def _logits(graphdef, params, tokens):
  return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens))


@pytest.fixture(scope='module')
def float_model():
  graphdef, _ = jax.eval_shape(lambda: _build(CFG))
  params = jax.jit(lambda: nnx.to_pure_dict(_build(CFG)[1]))()
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16))
  return params, tokens, _logits(graphdef, params, tokens)


@pytest.mark.parametrize('mode, group, tolerance', [('int8', 0, 0.02), ('int4', 32, 0.2),
                                                    ('nf4', 0, 0.2)])
def test_quantized_model_computes_the_float_model_on_its_dequantized_weights(
    float_model, mode, group, tolerance):
  params, tokens, logits = float_model
  cfg = dataclasses.replace(CFG, quant=mode, quant_group=group)
  graphdef, state = jax.eval_shape(lambda: _build(cfg))
  stored = jax.jit(quant.quantize_params, static_argnums=1)(params, cfg.quant_scheme)
  # quantize_params gives exactly the tree the quantized model holds, dtypes included.
  built = nnx.to_pure_dict(state)
  assert jax.tree.structure(stored) == jax.tree.structure(built)
  for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(built), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
  assert stored['blocks']['attn']['wq'].dtype == (np.int8 if mode == 'int8' else np.uint8)
  assert stored['embedding'].dtype == np.float32  # embeddings stay float
  quantized = _logits(graphdef, stored, tokens)
  float_graphdef, _ = jax.eval_shape(lambda: _build(CFG))
  dequantized = jax.jit(quant.dequantize_params, static_argnums=(1, 2))(
      stored, cfg.quant_scheme, jnp.float32)
  on_dequantized = _logits(float_graphdef, dequantized, tokens)
  np.testing.assert_allclose(quantized, on_dequantized, rtol=0, atol=1e-5)
  assert np.max(np.abs(quantized - logits)) < tolerance * np.max(np.abs(logits))


def test_nf4_weight_memory_is_near_half_a_byte_per_parameter():
  cfg = dataclasses.replace(CFG, d_model=2048, n_heads=32, n_kv_heads=8, head_dim=64,
                            mlp_dim=8192, quant='nf4')
  abstract = jax.eval_shape(lambda: nnx.to_pure_dict(_build(cfg)[1]))
  projections = [x for path, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
                 if path[-1].key.startswith(tuple(quant.CONTRACTION_AXES))]
  numel = sum(x.size for x in projections if x.dtype == np.uint8) * 2
  per_param = quant.weight_bytes(projections) / numel
  # 0.5 for the codes, 1/64 for the int8 block scales, 1/256 for the DQ constants (D / 64 = 32
  # scales a block).
  assert 0.5 < per_param < 0.53, per_param
