"""Decoding with a KV cache (model/kv_cache.py, model/decode.py) and sampling
(model/sampling.py).

Oracles: the transformer's full forward pass (cached logits equal recomputed ones,
greedy generation equals an argmax loop over full recomputes, scores equal its
log-softmax), numpy references for every sampling filter, and the same request
alone vs in a batch. Parity with transformers' generate is in tests/test_convert.py.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from model import decode, kv_cache, sampling, transformer

VOCAB = 200  # the model pads to 256: ids 200..255 are never sampled

BLOCKS = {
    'llama': dict(n_kv_heads=2, tie_embeddings=False),
    'gpt2': dict(n_kv_heads=4, norm='layernorm', mlp='gelu_tanh', position='learned',
                 max_positions=64, qkv_bias=True, attn_out_bias=True, mlp_bias=True),
}


def _model(kind: str):
  cfg = ml_collections.ConfigDict(dict(
      vocab_size=-1, d_model=32, n_layers=2, n_heads=4, head_dim=-1, mlp_dim=-1,
      rope_theta=10_000.0, norm_eps=1e-5, dropout=0.0, dtype='float32', param_dtype='float32',
      remat='none', attention='xla', scan_unroll=1, norm='rmsnorm', mlp='swiglu',
      position='rope', max_positions=-1, qkv_bias=False, attn_out_bias=False, mlp_bias=False,
      n_kv_heads=4, tie_embeddings=True))
  cfg.update(BLOCKS[kind])
  model_cfg = transformer.TransformerConfig.from_config(cfg, VOCAB)
  with nnx.use_eager_sharding(False):
    model = transformer.Transformer(model_cfg, rngs=nnx.Rngs(params=0))
  # Larger than the init, so that argmaxes are far apart and float noise cannot flip them.
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.tree.map(lambda p: p * 4.0 if p.ndim > 1 else p, nnx.to_pure_dict(params))
  return graphdef, params


@pytest.fixture(scope='module', params=sorted(BLOCKS))
def model(request):
  return _model(request.param)


@pytest.fixture(scope='module')
def llama():
  return _model('llama')


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, params, tokens, positions, cache, page_table):
  return decode.forward(graphdef, params, tokens, positions, cache, page_table)


def _tokens(shape, seed):
  return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def test_chunked_paged_decoding_equals_full_recompute(model):
  """Two rows whose pages are scattered over a shared pool, fed in chunks of 5, 1, 3 and
  1 tokens (row 1 padded where it is shorter): every logit equals the full forward's."""
  graphdef, params = model
  cfg = nnx.merge(graphdef, params).cfg
  tokens = _tokens((2, 10), seed=0)
  want = np.asarray(_full_logits(graphdef, params, tokens))
  page_size, pages = 4, 7
  cache = kv_cache.init_cache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_pages=pages,
                              page_size=page_size, dtype=jnp.float32)
  table = np.array([[5, 0, 3], [2, 6, 1]], np.int32)  # row b's i-th page
  start = 0
  for chunk in (5, 1, 3, 1):
    positions = np.arange(start, start + chunk)[None].repeat(2, 0)
    positions[1, chunk - 1:] = -1 if chunk > 1 else positions[1, chunk - 1:]  # row 1 lags
    if chunk > 1:
      row1 = np.arange(start, start + chunk - 1)
      positions[1, :chunk - 1] = row1
    logits, cache = _decode(graphdef, params, tokens[:, start:start + chunk], positions, cache,
                            table)
    for b in range(2):
      for t in range(chunk):
        if positions[b, t] >= 0:
          np.testing.assert_allclose(logits[b, t], want[b, positions[b, t]], rtol=2e-5,
                                     atol=2e-5)
    # Row 1 gets its skipped token at the start of the next chunk.
    if chunk > 1:
      lag = np.array([[start + chunk - 1]]), tokens[1:2, start + chunk - 1:start + chunk]
      logits1, cache = _decode(graphdef, params, np.concatenate([tokens[:1, :1], lag[1]]),
                               np.array([[-1], [start + chunk - 1]]), cache, table)
      np.testing.assert_allclose(logits1[1, 0], want[1, start + chunk - 1], rtol=2e-5, atol=2e-5)
    start += chunk


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(graphdef, params, prompt, lengths, max_new, stop_ids=(), top_n=0, *,
              temperature=0.0, seeds=None, top_k=0, top_p=1.0, min_p=0.0, penalty=1.0):
  b = prompt.shape[0]
  params_s = sampling.SamplingParams(
      temperature=jnp.full((b,), temperature, jnp.float32), top_k=jnp.full((b,), top_k),
      top_p=jnp.full((b,), top_p, jnp.float32), min_p=jnp.full((b,), min_p, jnp.float32),
      repetition_penalty=jnp.full((b,), penalty, jnp.float32))
  seeds = jnp.zeros((b,), jnp.int32) if seeds is None else seeds
  return decode.generate(graphdef, params, prompt, lengths, max_new_tokens=max_new,
                         sampling_params=params_s, seeds_B=seeds, stop_ids=stop_ids,
                         top_n=top_n, vocab_limit=VOCAB, page_size=4)


def test_greedy_generate_equals_argmax_over_full_recomputes(model):
  graphdef, params = model
  prompt = _tokens((3, 6), seed=1)
  lengths = np.array([6, 2, 4], np.int32)
  out = _generate(graphdef, params, prompt, lengths, 9, (), 3)
  for b in range(3):
    ids = list(prompt[b, :lengths[b]])
    for i in range(9):
      window = np.zeros((1, 16), np.int32)  # one shape, one compile; causal, so padding
      window[0, :len(ids)] = ids             # after the last token changes nothing
      logits = np.asarray(_full_logits(graphdef, params, window))[0, len(ids) - 1, :VOCAB]
      token = int(np.argmax(logits))
      assert int(out.tokens[b, i]) == token
      logp = logits - np.logaddexp.reduce(logits)
      np.testing.assert_allclose(out.logprobs[b, i], logp[token], atol=1e-4)
      np.testing.assert_array_equal(out.top_ids[b, i], np.argsort(-logp)[:3])
      ids.append(token)
  np.testing.assert_array_equal(out.lengths, [9, 9, 9])
  assert int(np.max(out.tokens)) < VOCAB


def test_stop_ids_end_a_row_and_pad_the_rest(llama):
  graphdef, params = llama
  prompt = _tokens((2, 4), seed=2)
  lengths = np.array([4, 4], np.int32)
  free = np.asarray(_generate(graphdef, params, prompt, lengths, 8).tokens)
  stop = int(free[0, 2])  # row 0's third token
  out = _generate(graphdef, params, prompt, lengths, 8, (stop,))
  first = int(np.argmax(free[0] == stop))
  np.testing.assert_array_equal(out.tokens[0, :first + 1], free[0, :first + 1])
  assert np.all(np.asarray(out.tokens[0, first + 1:]) == -1)
  assert int(out.lengths[0]) == first + 1 and bool(out.stopped[0])


def test_seeded_sampling_does_not_depend_on_the_batch(llama):
  """A request's sampled tokens depend on its prompt and seed only."""
  graphdef, params = llama
  prompt = _tokens((4, 5), seed=3)
  lengths = np.array([5, 3, 5, 4], np.int32)
  seeds = np.array([11, 12, 13, 11], np.int32)
  kw = dict(temperature=1.0, top_k=50, top_p=0.9)
  batch = np.asarray(_generate(graphdef, params, prompt, lengths, 12, seeds=seeds, **kw).tokens)
  for b in (0, 1):
    alone = _generate(graphdef, params, prompt[b:b + 1], lengths[b:b + 1], 12,
                      seeds=seeds[b:b + 1], **kw).tokens
    np.testing.assert_array_equal(batch[b], alone[0])
  assert not np.array_equal(batch[0], batch[2])  # other seeds, other text
  other = _generate(graphdef, params, prompt, lengths, 12, seeds=seeds + 100, **kw).tokens
  assert not np.array_equal(batch, np.asarray(other))


def _filter_reference(logits, temperature, top_k, top_p, min_p, penalty, seen):
  """The filters one by one in numpy, in Hugging Face's order."""
  x = logits.astype(np.float64).copy()
  x = np.where(seen, np.where(x > 0, x / penalty, x * penalty), x)
  x = x / (temperature if temperature > 0 else 1.0)
  if top_k > 0:
    x[x < np.sort(x)[::-1][top_k - 1]] = -np.inf
  if top_p < 1.0:
    order = np.argsort(-x, kind='stable')
    p = np.exp(x[order] - np.max(x))
    p /= p.sum()
    mass_before = np.cumsum(p) - p
    x[order[1:][mass_before[1:] >= top_p]] = -np.inf
  if min_p > 0:
    p = np.exp(x - np.max(x))
    x[p < min_p] = -np.inf
  return x


@pytest.mark.parametrize('temperature,top_k,top_p,min_p,penalty', [
    (1.0, 0, 1.0, 0.0, 1.0), (0.7, 5, 1.0, 0.0, 1.0), (1.3, 0, 0.8, 0.0, 1.0),
    (1.0, 0, 1.0, 0.2, 1.0), (0.9, 8, 0.7, 0.05, 1.5)])
def test_filters_equal_numpy(temperature, top_k, top_p, min_p, penalty):
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 2, (3, 32)).astype(np.float32)
  seen = rng.random((3, 32)) < 0.3
  params = sampling.SamplingParams.make(3, temperature=temperature, top_k=top_k, top_p=top_p,
                                        min_p=min_p, repetition_penalty=penalty)
  got = np.asarray(sampling.filter_logits(logits, params, seen))
  for b in range(3):
    want = _filter_reference(logits[b], temperature, top_k, top_p, min_p, penalty, seen[b])
    np.testing.assert_array_equal(np.isinf(got[b]), np.isinf(want))
    kept = ~np.isinf(want)
    np.testing.assert_allclose(got[b][kept], want[kept], rtol=1e-5)
    assert kept.sum() >= 1


def test_sampling_follows_the_filtered_distribution():
  """Frequencies over many keys match softmax of the filtered logits (a 4-sigma band)."""
  logits = np.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]], np.float32)
  params = sampling.SamplingParams.make(1, temperature=0.8, top_k=4)
  n = 20_000
  keys = sampling.request_keys(jnp.arange(n), jnp.zeros(n, jnp.int32))
  draws = jax.jit(jax.vmap(lambda k: sampling.sample(
      jnp.asarray(logits), params, k[None])[0]))(keys)
  freq = np.bincount(np.asarray(draws), minlength=6) / n
  want = np.exp(_filter_reference(logits[0], 0.8, 4, 1.0, 0.0, 1.0, np.zeros(6, bool)))
  want /= want.sum()
  assert freq[4] == freq[5] == 0
  np.testing.assert_array_less(np.abs(freq - want), 4 * np.sqrt(want * (1 - want) / n) + 1e-9)


def test_score_equals_log_softmax_of_the_forward_pass(model):
  graphdef, params = model
  tokens = _tokens((2, 7), seed=5)
  lengths = np.array([7, 4], np.int32)
  lp, top_ids, top_lp = jax.jit(decode.score, static_argnums=(0, 4, 5))(
      graphdef, params, tokens, lengths, 2, VOCAB)
  logits = np.asarray(_full_logits(graphdef, params, tokens))[..., :VOCAB]
  logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  for b in range(2):
    for i in range(7):
      want = logp[b, i - 1, tokens[b, i]] if 0 < i < lengths[b] else 0.0
      np.testing.assert_allclose(lp[b, i], want, atol=1e-5)
    np.testing.assert_array_equal(top_ids[b, 1], np.argsort(-logp[b, 0])[:2])


def test_generate_on_a_mesh_equals_one_device(llama):
  """Parameters sharded as in training (heads over tensor, embed over fsdp), prompts and
  the cache's rows over the batch axes: the same tokens as on one device."""
  from train import mesh as mesh_lib
  graphdef, params = llama
  cfg = nnx.merge(graphdef, params).cfg
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(nnx.merge(graphdef, params))))
  shardings = mesh_lib.shardings(params, specs, mesh, transformer.LOGICAL_AXIS_RULES)
  prompt, lengths = _tokens((4, 5), seed=6), np.array([5, 2, 4, 3], np.int32)
  want = np.asarray(_generate(graphdef, params, prompt, lengths, 6).tokens)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, shardings)
    got = _generate(graphdef, sharded, prompt, lengths, 6).tokens
    cache = jax.jit(lambda: kv_cache.constrain(kv_cache.init_cache(
        cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, num_pages=8, page_size=4,
        dtype=jnp.float32), transformer.LOGICAL_AXIS_RULES, rows=4))()
  np.testing.assert_array_equal(got, want)
  want_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, ('data', 'fsdp'), None, 'tensor', None))
  assert cache.k.sharding.is_equivalent_to(want_sharding, 5), cache.k.sharding
