"""Tests for model/transformer.py and model/attention.py (oracles, not snapshots)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import lm
from model import attention as attention_lib
from model import rope
from model import transformer as tfm

VOCAB = 61
# GPT-2's block: LayerNorm, GELU-tanh MLP, learned positions, biases everywhere.
GPT2_STYLE = dict(norm='layernorm', mlp='gelu_tanh', position='learned', max_positions=16,
                  qkv_bias=True, attn_out_bias=True, mlp_bias=True)


def _cfg(**overrides) -> tfm.TransformerConfig:
  base = dict(
      vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
      mlp_dim=64, dtype=jnp.dtype('float32'), param_dtype=jnp.dtype('float32'))
  base.update(overrides)
  return tfm.TransformerConfig(**base)


@functools.cache
def _init_params(cfg: tfm.TransformerConfig) -> nnx.State:
  # The trainer's idiom: no eager sharding (there is no mesh here), jitted init.
  # Cached because compiling the RNG of an init costs seconds on CPU.
  with nnx.use_eager_sharding(False):
    return nnx.state(nnx.jit(lambda: tfm.Transformer(cfg, rngs=nnx.Rngs(0)))())


def _init(cfg: tfm.TransformerConfig) -> tfm.Transformer:
  """A model with `cfg`; its parameters depend only on the shape-defining fields."""
  model = _abstract(cfg)
  shape_cfg = dataclasses.replace(
      cfg, dtype=jnp.dtype('float32'), remat='none', dropout=0.0, attention='xla')
  nnx.update(model, _init_params(shape_cfg))
  return model


def _abstract(cfg: tfm.TransformerConfig) -> tfm.Transformer:
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: tfm.Transformer(cfg, rngs=nnx.Rngs(0)))


@nnx.jit
def _forward(model, tokens_BxL, positions_BxL=None, segment_ids_BxL=None):
  return model(tokens_BxL, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL)


def _tokens(shape, seed=0):
  # numpy RNG: compiling jax.random costs seconds on CPU for no benefit here.
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


def _param_count(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------
# Model oracles.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('switches', [{}, GPT2_STYLE], ids=['llama', 'gpt2'])
def test_causality(switches):
  model = _init(_cfg(**switches))
  tokens = _tokens((2, 12))
  logits = _forward(model, tokens)
  for t in (0, 4, 10):
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % VOCAB)
    new_logits = _forward(model, changed)
    np.testing.assert_allclose(new_logits[:, :t + 1], logits[:, :t + 1], atol=1e-6)
    # The oracle is sensitive: the changed position itself does move.
    assert not np.allclose(new_logits[:, t + 1], logits[:, t + 1], atol=1e-4)


def test_packed_segments_match_separate_documents():
  model = _init(_cfg())
  doc_a, doc_b = _tokens((1, 5), seed=1), _tokens((1, 7), seed=2)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segment_ids = jnp.array([[0] * 5 + [1] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  logits = _forward(model, packed, positions, segment_ids)
  np.testing.assert_allclose(logits[:, 5:], _forward(model, doc_b), atol=1e-5)
  np.testing.assert_allclose(logits[:, :5], _forward(model, doc_a), atol=1e-5)
  # Without segment ids the second document sees the first, so logits differ.
  unmasked = _forward(model, packed, positions)
  assert not np.allclose(unmasked[:, 5:], logits[:, 5:], atol=1e-4)


def test_features_are_what_the_head_reads():
  # Tied head: logits = features @ embedding^T, so a scalar head on features sees exactly the
  # hidden state the LM head does.
  model = _init(_cfg())
  tokens = _tokens((2, 6), seed=3)
  features = nnx.jit(lambda m, t: m(t, features=True))(model, tokens)
  assert features.shape == (2, 6, 32)
  np.testing.assert_allclose(features @ model.embedding[...].T, _forward(model, tokens),
                             atol=1e-4)


def test_remat_policies_match_none():
  cfg = _cfg()
  tokens = _tokens((2, 10))

  def loss_and_grads(remat):
    model = _init(dataclasses.replace(cfg, remat=remat))  # same seed, same params
    graphdef, params = nnx.split(model)

    @jax.jit
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.value_and_grad(loss_fn)(params)

  ref_loss, ref_grads = loss_and_grads('none')
  # full and dots, and the names-based offloading policy (it checks where the block names its
  # checkpoints); offload_dots and outputs differ from these only in what they keep where.
  assert {'full', 'dots', 'offload_outputs'} < set(tfm.REMAT_POLICIES)
  for remat in ('full', 'dots', 'offload_outputs'):
    model = _abstract(dataclasses.replace(cfg, remat=remat))
    assert 'remat' in str(jax.make_jaxpr(lambda m: m(tokens))(model))  # really checkpointed
    loss, grads = loss_and_grads(remat)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads, ref_grads)


def test_bf16_compute_keeps_fp32_params_and_logits():
  cfg16 = _cfg(dtype=jnp.dtype('bfloat16'))
  model16 = _init(cfg16)
  for param in jax.tree.leaves(nnx.state(model16, nnx.Param)):
    assert param.dtype == jnp.float32
  tokens = _tokens((2, 8))
  logits16 = _forward(model16, tokens)
  assert logits16.dtype == jnp.float32
  # The matmuls really run in bf16.
  jaxpr = str(jax.make_jaxpr(lambda m: m(tokens))(model16))
  assert 'bf16' in jaxpr
  # Same params in fp32 compute give nearly the same logits: the largest difference
  # measured here is 1.70e-3 (mean 4.2e-4, logits up to 0.80); bf16's 8-bit mantissa
  # allows about that, and fp16 or a dropped upcast would not stay within 3x of it.
  logits32 = _forward(_init(_cfg()), tokens)
  np.testing.assert_allclose(logits16, logits32, atol=5e-3)
  assert np.abs(np.asarray(logits16) - np.asarray(logits32)).max() > 0  # bf16 did round


def test_dropout():
  cfg = _cfg(dropout=0.5)
  model = _init(cfg)
  tokens = _tokens((2, 8))
  deterministic = _forward(model, tokens)
  np.testing.assert_allclose(deterministic, _forward(_init(_cfg()), tokens), atol=1e-6)
  run = nnx.jit(lambda m, t, rngs: m(t, deterministic=False, rngs=rngs))
  a = run(model, tokens, nnx.Rngs(dropout=1))
  b = run(model, tokens, nnx.Rngs(dropout=2))
  assert not np.allclose(a, deterministic, atol=1e-4)
  assert not np.allclose(a, b, atol=1e-4)
  with pytest.raises(ValueError, match='rngs'):
    model(tokens, deterministic=False)


def test_scan_keeps_program_size_constant_in_depth():
  tokens = _tokens((1, 4))

  def n_eqns(n_layers):
    model = _abstract(_cfg(n_layers=n_layers, remat='dots'))
    graphdef, params = nnx.split(model)
    loss = lambda p: nnx.merge(graphdef, p)(tokens).sum()
    return len(jax.make_jaxpr(jax.grad(loss))(params).jaxpr.eqns)

  assert n_eqns(2) == n_eqns(6)


def test_llama_1b_has_llama_3_2_1b_parameter_count():
  # The whole train step of the large presets compiles in tests/test_train.py.
  cfg = tfm.TransformerConfig.from_config(lm.get_config('llama_1b').model, vocab_size=32000)
  assert _param_count(_abstract(cfg)) == tfm.count_params(cfg) == 1_235_814_400


def test_llama_7b_has_llama_2_7b_parameter_count():
  cfg = tfm.TransformerConfig.from_config(lm.get_config('llama_7b').model, vocab_size=32000)
  assert _param_count(_abstract(cfg)) == tfm.count_params(cfg) == 6_738_415_616


# ---------------------------------------------------------------------------
# Attention and RoPE.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames='causal')
def _naive_attention(q, k, v, segment_ids, causal):
  """Per-head loop with K/V repeated to H heads."""
  b, length, h, d = q.shape
  group = h // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  allowed = jnp.ones((b, length, length), bool)
  if causal:
    allowed &= jnp.tril(jnp.ones((length, length), bool))[None]
  if segment_ids is not None:
    allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
  heads = []
  for i in range(h):
    scores = jnp.einsum('bld,bsd->bls', q[:, :, i], k[:, :, i]) / np.sqrt(d)
    scores = jnp.where(allowed, scores, -jnp.inf)
    heads.append(jnp.einsum('bls,bsd->bld', jax.nn.softmax(scores, axis=-1), v[:, :, i]))
  return jnp.stack(heads, axis=2)


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('n_kv_heads', [1, 2, 4])
def test_xla_attention_matches_naive(causal, n_kv_heads):
  attention = jax.jit(attention_lib.attention, static_argnames=('causal', 'implementation'))
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 6, n_kv_heads, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 6, n_kv_heads, 8)), jnp.float32)
  segment_ids = jnp.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 2]])
  for seg in (None, segment_ids):
    out = attention(q, k, v, segment_ids_BxL=seg, causal=causal)
    np.testing.assert_allclose(out, _naive_attention(q, k, v, seg, causal), atol=1e-5)


def test_attention_rejects_unknown_implementation():
  x = jnp.zeros((1, 2, 2, 4))
  with pytest.raises(ValueError, match='xla'):
    attention_lib.attention(x, x, x, implementation='flash')


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(m, n):
    rq = rope.apply_rope(q, jnp.array([[m]]), 10_000.0)
    rk = rope.apply_rope(k, jnp.array([[n]]), 10_000.0)
    return float(jnp.sum(rq * rk))

  for m, n in ((3, 1), (0, 5), (7, 7)):
    for shift in (1, 13, 100):
      np.testing.assert_allclose(score(m + shift, n + shift), score(m, n), rtol=1e-4, atol=1e-5)
  assert abs(score(3, 1) - score(1, 3)) > 1e-3  # it does depend on m - n


# ---------------------------------------------------------------------------
# Parameters, metadata, accounting.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('switches', [{}, GPT2_STYLE, dict(qkv_bias=True, mlp_bias=True)])
@pytest.mark.parametrize('tie', [True, False])
def test_every_param_has_logical_names_in_rules(tie, switches):
  model = _abstract(_cfg(tie_embeddings=tie, **switches))
  rule_names = {name for name, _ in tfm.LOGICAL_AXIS_RULES}
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  params = nnx.state(model, nnx.Param)
  for (path, spec), param in zip(jax.tree_util.tree_leaves_with_path(specs),
                                 jax.tree.leaves(params), strict=True):
    assert isinstance(spec, jax.sharding.PartitionSpec), path
    assert len(spec) == param.ndim, (path, spec, param.shape)
    assert set(spec) <= rule_names, (path, spec)
  paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(specs)}
  assert any('lm_head' in p for p in paths) != tie


def test_jitted_init_matches_abstract_shapes():
  cfg = _cfg()
  abstract = nnx.state(_abstract(cfg))
  concrete = _init_params(cfg)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
      lambda x: (x.shape, x.dtype), concrete)


@pytest.mark.parametrize('overrides', [
    {}, dict(tie_embeddings=False), dict(n_kv_heads=4), GPT2_STYLE, dict(qkv_bias=True),
    dict(attn_out_bias=True, mlp_bias=True, norm='layernorm')])
def test_count_params_matches_model(overrides):
  cfg = _cfg(**overrides)
  assert tfm.count_params(cfg) == _param_count(_abstract(cfg))


def test_tied_and_untied_differ_by_vocab_times_d_model():
  tied, untied = _cfg(), _cfg(tie_embeddings=False)
  expected = VOCAB * tied.d_model
  assert tfm.count_params(untied) - tfm.count_params(tied) == expected
  assert _param_count(_abstract(untied)) - _param_count(_abstract(tied)) == expected


def test_train_flops_per_token():
  cfg = _cfg()
  d, v = cfg.d_model, cfg.vocab_size
  per_layer = 2 * d * 4 * 8 + 2 * d * 2 * 8 + 3 * d * 64  # q,o + k,v + gate,up,down
  n = 2 * per_layer + d * v
  assert tfm.train_flops_per_token(cfg, 10) == 6 * n + 12 * 2 * 4 * 8 * 10


def test_train_flops_per_token_gelu_mlp_has_two_matrices():
  swiglu, gelu = _cfg(), _cfg(**GPT2_STYLE)
  d, f = swiglu.d_model, swiglu.mlp_dim
  assert (tfm.train_flops_per_token(swiglu, 10) - tfm.train_flops_per_token(gelu, 10)
          == 6 * swiglu.n_layers * d * f)


def test_layernorm_and_gelu_mlp_match_numpy():
  cfg = _cfg(**GPT2_STYLE)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, cfg.d_model)).astype(np.float32)
  with nnx.use_eager_sharding(False):
    norm, mlp = tfm.Norm(cfg), tfm.Mlp(cfg, rngs=nnx.Rngs(0))
  norm.scale[...] = rng.normal(size=cfg.d_model).astype(np.float32)
  norm.bias[...] = rng.normal(size=cfg.d_model).astype(np.float32)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  want = (x - mean) / np.sqrt(var + cfg.norm_eps) * norm.scale[...] + norm.bias[...]
  np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)

  mlp.up_bias[...] = rng.normal(size=cfg.mlp_dim).astype(np.float32)
  mlp.down_bias[...] = rng.normal(size=cfg.d_model).astype(np.float32)
  h = x @ np.asarray(mlp.w_up[...]) + mlp.up_bias[...]
  gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  want = gelu @ np.asarray(mlp.w_down[...]) + mlp.down_bias[...]
  np.testing.assert_allclose(mlp(jnp.asarray(x)), want, rtol=1e-4, atol=1e-5)
  assert not hasattr(mlp, 'w_gate')


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------


def _model_cfg(**overrides):
  cfg = lm.base().model
  cfg.update(overrides)
  return cfg


def test_from_config_resolves_defaults():
  cfg = tfm.TransformerConfig.from_config(_model_cfg(), vocab_size=100)
  # The vocabulary rounds up to a multiple of 128; mlp 8/3*256=682.7 -> 704.
  assert (cfg.vocab_size, cfg.head_dim, cfg.mlp_dim) == (128, 64, 704)
  assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32
  tiny = tfm.TransformerConfig.from_config(lm.get_config('tiny').model, vocab_size=2048)
  assert (tiny.head_dim, tiny.mlp_dim, tiny.dtype) == (32, 384, jnp.float32)  # 8/3*128=341.3 -> 384
  padded = tfm.TransformerConfig.from_config(_model_cfg(vocab_size=128), vocab_size=100)
  assert padded.vocab_size == 128


@pytest.mark.parametrize('overrides, message', [
    (dict(n_heads=4, n_kv_heads=3), 'model.n_kv_heads=3 must divide model.n_heads=4'),
    (dict(d_model=30, n_heads=4), 'model.d_model=30 must be divisible by model.n_heads=4'),
    (dict(dtype='bf16'), "model.dtype='bf16'.*bfloat16, float32, float16"),
    (dict(param_dtype='fp32'), "model.param_dtype='fp32'.*float32"),
    (dict(remat='some'), "model.remat='some'.*none, full, dots"),
    (dict(attention='flash'), "model.attention='flash'.*xla"),
    (dict(vocab_size=50), r'model.vocab_size=50 is smaller than the tokenizer vocabulary \(100\)'),
    (dict(head_dim=7), 'model.head_dim=7'),
    (dict(norm='batchnorm'), "model.norm='batchnorm'.*rmsnorm, layernorm"),
    (dict(mlp='relu'), "model.mlp='relu'.*swiglu, gelu_tanh"),
    (dict(position='learned'), "model.position='learned' needs model.max_positions > 0"),
])
def test_config_errors_name_the_key(overrides, message):
  with pytest.raises(ValueError, match=message):
    tfm.TransformerConfig.from_config(_model_cfg(**overrides), vocab_size=100)
