"""The encoder-decoder model (model/seq2seq.py): what sees what, padding, meshes, the cached
generation against recomputation, and the presets' sizes against the published T5 ones."""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import seq2seq as seq2seq_config
from model import seq2seq

VOCAB = 100  # the model rounds it up to 128 rows
B, S, T = 4, 8, 6  # one shape for most tests: each compiles once per model


def _cfg(**overrides) -> seq2seq.Seq2SeqConfig:
  m = seq2seq_config.base().model
  m.update(d_model=32, num_heads=4, head_dim=8, mlp_dim=64, encoder_layers=2, decoder_layers=2)
  m.update(overrides)
  return seq2seq.Seq2SeqConfig.from_config(m, vocab_size=VOCAB)


@functools.cache
def _model(cfg: seq2seq.Seq2SeqConfig):
  """(graphdef, params) of a model with random weights (jitted init: no eager sharding)."""
  with nnx.use_eager_sharding(False):
    model = nnx.jit(lambda: seq2seq.Seq2Seq(cfg, rngs=nnx.Rngs(0)))()
  graphdef, params = nnx.split(model)
  return graphdef, nnx.to_pure_dict(params)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, params, tokens, mask):
  return nnx.merge(graphdef, params).encode(tokens, mask)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens, mask, decoder_tokens):
  return nnx.merge(graphdef, params)(tokens, mask, decoder_tokens)


def _tokens(shape, seed=0, low=2):
  return np.random.RandomState(seed).randint(low, VOCAB, shape).astype(np.int32)


@pytest.mark.parametrize('position', ['relative', 'rope'])
def test_encoder_sees_both_ways_and_decoder_only_back(position):
  """Perturbation oracle: changing the last input token changes the first encoder output
  (and the first changes the last); changing decoder token j changes no logits before j and
  the logits at j."""
  gd, params = _model(_cfg(position=position))
  inputs, mask = _tokens((B, S)), np.ones((B, S), bool)
  dec = _tokens((B, T), seed=1)
  enc = np.asarray(_encode(gd, params, inputs, mask))
  for changed, watched in ((S - 1, 0), (0, S - 1)):
    other = inputs.copy()
    other[:, changed] = (other[:, changed] + 1 - 2) % (VOCAB - 2) + 2
    diff = np.abs(np.asarray(_encode(gd, params, other, mask)) - enc)[:, watched]
    assert diff.max() > 1e-3, (changed, watched)

  logits = np.asarray(_forward(gd, params, inputs, mask, dec))
  j = 3
  other = dec.copy()
  other[:, j] = (other[:, j] + 1 - 2) % (VOCAB - 2) + 2
  changed = np.asarray(_forward(gd, params, inputs, mask, other))
  np.testing.assert_allclose(changed[:, :j], logits[:, :j], atol=1e-6, rtol=0)
  assert np.abs(changed[:, j] - logits[:, j]).max() > 1e-3


def test_encoder_padding_changes_nothing_at_real_positions():
  """Rows of 5 tokens padded to 8 (with random pad ids, masked out) give the same encoder
  outputs at their 5 real positions and the same decoder logits as the unpadded rows."""
  gd, params = _model(_cfg())
  short, dec = _tokens((B, 5), seed=3), _tokens((B, T), seed=4)
  padded = np.concatenate([short, _tokens((B, S - 5), seed=5)], axis=1)
  mask = np.broadcast_to(np.arange(S)[None] < 5, (B, S))
  enc_short = np.asarray(_encode(gd, params, short, np.ones((B, 5), bool)))
  enc_padded = np.asarray(_encode(gd, params, padded, mask))
  np.testing.assert_allclose(enc_padded[:, :5], enc_short, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(_forward(gd, params, padded, mask, dec)),
      np.asarray(_forward(gd, params, short, np.ones((B, 5), bool), dec)), atol=1e-5, rtol=1e-5)


def _greedy_by_recompute(gd, params, inputs, mask, steps):
  """The oracle: at step i re-run the teacher-forced decoder on the tokens so far (a fixed
  [B, steps] buffer: the decoder is causal, so position i reads only tokens <= i)."""
  cfg = nnx.merge(gd, params).cfg
  buf = np.full((inputs.shape[0], steps), cfg.decoder_start_id, np.int32)
  out = []
  for i in range(steps):
    logits = np.asarray(_forward(gd, params, inputs, mask, buf))[:, i, :VOCAB]
    token = logits.argmax(-1).astype(np.int32)
    out.append(token)
    if i + 1 < steps:
      buf[:, i + 1] = token
  return np.stack(out, 1)


@pytest.mark.parametrize('position', ['relative', 'rope'])
def test_cached_generation_equals_recomputation(position):
  """Greedy decoding from the encoder cache and the self-attention KV cache gives the
  tokens of re-running the whole decoder on the growing prefix; after a row's eos come
  pads; top-k 1 sampling is greedy."""
  gd, params = _model(_cfg(position=position))
  inputs = _tokens((B, S), seed=7)
  mask = np.arange(S)[None] < np.array([[8], [5], [3], [7]])
  steps = T
  want = _greedy_by_recompute(gd, params, inputs, mask, steps)
  eos = int(want[0, 2])  # row 0 stops at its third token (or earlier)
  want_stopped = want.copy()
  for row in want_stopped:
    hits = np.flatnonzero(row == eos)
    if hits.size:
      row[hits[0] + 1:] = 0
  got = seq2seq.generate((gd, params), inputs, mask, max_new_tokens=steps, eos_id=eos,
                         vocab_limit=VOCAB)
  np.testing.assert_array_equal(np.asarray(got), want_stopped)
  sampled = seq2seq.generate((gd, params), inputs, mask, max_new_tokens=steps, eos_id=eos,
                             key=jax.random.key(1), temperature=0.7, top_k=1, vocab_limit=VOCAB)
  np.testing.assert_array_equal(np.asarray(sampled), want_stopped)


def test_sharded_equals_unsharded():
  """Parameters sharded by LOGICAL_AXIS_RULES over 8 fake devices (fsdp 4 x tensor 2) and
  the batch over fsdp: the logits and the generated tokens of one device."""
  from train import mesh as mesh_lib
  gd, params = _model(_cfg())
  inputs, dec = _tokens((B, S), seed=8), _tokens((B, T), seed=9)
  mask = np.arange(S)[None] < np.array([[8], [6], [4], [7]])
  want = np.asarray(_forward(gd, params, inputs, mask, dec))
  want_tokens = np.asarray(seq2seq.generate((gd, params), inputs, mask, max_new_tokens=T,
                                            eos_id=1))
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(nnx.merge(gd, params))))
  shardings = mesh_lib.shardings(params, specs, mesh, seq2seq.LOGICAL_AXIS_RULES)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, shardings)
    assert sharded['embedding'].sharding.spec == jax.sharding.PartitionSpec('tensor', 'fsdp')
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp'))
    args = [jax.device_put(x, batch) for x in (inputs, mask, dec)]
    got = np.asarray(_forward(gd, sharded, *args))
    got_tokens = np.asarray(seq2seq.generate((gd, sharded), args[0], args[1],
                                             max_new_tokens=T, eos_id=1))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(got_tokens, want_tokens)


@pytest.mark.parametrize('preset,published', [
    ('t5_small', 76_961_152),  # google/t5-v1_1-small
    ('flan_t5_base', 247_577_856),  # google/flan-t5-base
])
def test_presets_have_the_published_parameter_counts(preset, published):
  """count_params and the built model's parameters equal the released checkpoints' sizes
  (HF's num_parameters() of the models, 32100-token SentencePiece with 32128 rows)."""
  m = seq2seq_config.get_config(preset).model
  cfg = seq2seq.Seq2SeqConfig.from_config(m, vocab_size=32100)
  assert seq2seq.count_params(cfg) == published
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: seq2seq.Seq2Seq(cfg, rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == published


@pytest.mark.parametrize('overrides', [
    dict(tie_embeddings=True, mlp='relu'), dict(position='rope', mlp='gated-silu')])
def test_every_param_has_logical_names_in_the_rules(overrides):
  cfg = _cfg(**overrides)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: seq2seq.Seq2Seq(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
  names = dict(seq2seq.LOGICAL_AXIS_RULES)
  for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
    assert all(n in names for n in spec), spec
  assert sum(x.size for x in jax.tree.leaves(state)) == seq2seq.count_params(cfg)


@pytest.mark.parametrize('key,value,message', [
    ('mlp', 'gelu', 'model.mlp'),
    ('position', 'alibi', 'model.position'),
    ('num_heads', 0, 'model.num_heads'),
    ('relative_buckets', 7, 'model.relative_buckets'),
    ('dropout', 1.0, 'model.dropout'),
    ('attention', 'pallas', 'model.attention'),
    ('remat', 'dots', 'model.remat'),
])
def test_config_errors_name_the_key(key, value, message):
  with pytest.raises(ValueError, match=message):
    _cfg(**{key: value})


def test_unknown_preset_is_an_error():
  with pytest.raises(ValueError, match='Unknown preset'):
    seq2seq_config.get_config('t5_huge')


def test_dropout_needs_a_key_and_is_off_without_one():
  """dropout > 0: no key gives the dropout-free logits; a key gives other logits."""
  gd, params = _model(_cfg())
  inputs, mask, dec = _tokens((B, S)), np.ones((B, S), bool), _tokens((B, T), seed=2)
  want = np.asarray(_forward(gd, params, inputs, mask, dec))

  @jax.jit
  def both(params, key):
    model = nnx.merge(seq2seq.graphdef(_cfg(dropout=0.3)), params)
    return model(inputs, mask, dec), model(inputs, mask, dec, dropout_key=key)

  plain, dropped = (np.asarray(x) for x in both(params, jax.random.key(0)))
  np.testing.assert_allclose(plain, want, atol=1e-5)
  assert np.abs(dropped - want).max() > 1e-3
  assert np.isfinite(dropped).all()
