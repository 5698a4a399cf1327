"""Context parallelism (model/context_parallel.py) on 8 fake CPU devices, at a long row.

Oracles: the plain jnp attention reference on the unsplit row (causal, with documents);
the trainer on one device (the same losses over a few steps); a numpy count of each
device's visible (query, key) pairs for the load balance.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_train import small_config

from data.errors import ConfigError
from kernels.attention_reference import attention_reference
from model import context_parallel, transformer
from serve import engine
from train import mesh as mesh_lib
from train import trainer

LENGTH = 2048


def _mesh(**axes) -> jax.sharding.Mesh:
  cfg = ml_collections.ConfigDict({a: axes.get(a, 1) for a in mesh_lib.AXES})
  return mesh_lib.make_mesh(cfg)


def _packed_segments(rng, batch: int, length: int) -> np.ndarray:
  """Rows of several documents of random lengths, as packing makes them."""
  seg = np.zeros((batch, length), np.int32)
  for b in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length), size=6, replace=False))
    seg[b] = np.searchsorted(cuts, np.arange(length), side='right')
  return seg


def test_attention_matches_reference():
  """Causal attention over packed documents with grouped heads, zig-zag split 4 ways (with
  data 2), equals the jnp reference over the whole row, outputs and gradients. (The row in
  order, without load balancing, is test_checkpoint_serves_at_context_one's.)"""
  load_balance, length = True, LENGTH
  rng = np.random.default_rng(0)
  b, h, k, d = 2, 2, 1, 8
  q = jnp.asarray(rng.normal(size=(b, length, h, d)), jnp.float32)
  kv = jnp.asarray(rng.normal(size=(2, b, length, k, d)), jnp.float32)
  seg = jnp.asarray(_packed_segments(rng, b, length))
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def reference(q, k, v):
    out = attention_reference(q, k, v, segment_ids_BxL=seg, causal=True)[0]
    return out, jnp.sum(out * cot)

  def split(q, k, v):
    layout = context_parallel.plan(length, load_balance)
    out = layout.join(context_parallel.attention(
        layout.split(q), layout.split(k), layout.split(v), layout,
        segment_ids_BxL=layout.split(seg), causal=True))
    return out, jnp.sum(out * cot)

  grads = lambda f: jax.grad(lambda *a: f(*a)[1], argnums=(0, 1, 2))  # noqa: E731
  want_out, want_grads = reference(q, *kv)[0], grads(reference)(q, *kv)
  with jax.set_mesh(_mesh(data=2, context=4)):
    got_out = jax.jit(split)(q, *kv)[0]
    got_grads = jax.jit(grads(split))(q, *kv)
  np.testing.assert_allclose(got_out, want_out, atol=2e-5)
  for got, want in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_load_balance_equalises_causal_work():
  """Each device's count of visible (query, key) pairs, counted in numpy from the tokens it
  holds: equal with the zig-zag split, and C-1 pairs apart from a whole chunk without."""
  c = 4
  for balance in (True, False):
    order = context_parallel.token_order(LENGTH, c, balance)
    assert sorted(order) == list(range(LENGTH))
    per_device = order.reshape(c, -1)
    # A query at row index i sees keys 0..i: i + 1 pairs.
    pairs = [int(np.sum(q + 1)) for q in per_device]
    if balance:
      chunk = LENGTH // (2 * c)
      for i, q in enumerate(per_device):
        np.testing.assert_array_equal(
            q, np.r_[i * chunk:(i + 1) * chunk, (2 * c - 1 - i) * chunk:(2 * c - i) * chunk])
      assert len(set(pairs)) == 1, pairs
      assert sum(pairs) == LENGTH * (LENGTH + 1) // 2
    else:
      assert pairs == sorted(pairs) and pairs[-1] > 6 * pairs[0], pairs


# --- training: the same losses as one device ----------------------------------------------


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> pathlib.Path:
  """Documents of 100 to 700 characters in a JSONL file, so rows of 2048 pack several."""
  import textwrap
  text = pathlib.Path(textwrap.__file__).read_text()
  rng = np.random.default_rng(0)
  docs, start = [], 0
  while start + 700 < len(text):
    n = int(rng.integers(100, 700))
    docs.append(text[start:start + n])
    start += n
  path = tmp_path_factory.mktemp('corpus') / 'docs.jsonl'
  path.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
  return path


def _config(corpus: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
  """test_train's small LM on the JSONL documents at LENGTH tokens a row."""
  return small_config(corpus, **{
      'batch_size': 2, 'eval_steps': 0, 'data.source': 'jsonl', 'data.seq_len': LENGTH,
      'model.d_model': 32, 'model.n_heads': 2, 'model.n_kv_heads': 2, **overrides})


def _one_device(config: ml_collections.ConfigDict, workdir: str) -> dict[int, dict]:
  """The metrics of every step, trained on one device with the trainer's own parts."""
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
  task = trainer.validate(config, 1, 1)
  train_iter = task.setup_data(workdir, 0, 1)
  rng, _, shardings, init = trainer.setup_state(task, config, mesh)
  train_step, _ = trainer.compile_step(task, shardings, mesh)
  out = {}
  with jax.set_mesh(mesh):
    state = init(rng)
    for step in range(1, config.steps + 1):
      batch = trainer.global_batch(next(train_iter), mesh_lib.batch_sharding(mesh))
      state, metrics = train_step(state, batch, {})
      out[step] = jax.device_get(metrics)
  return out


@pytest.fixture(scope='module')
def single(corpus, tmp_path_factory):
  return _one_device(_config(corpus), str(tmp_path_factory.mktemp('one')))


def _train(corpus, workdir, **axes) -> trainer.Result:
  mesh = {'mesh.data': 1, **{f'mesh.{a}': n for a, n in axes.items()}}
  return trainer.train_and_evaluate(_config(corpus, **mesh), str(workdir))


@pytest.fixture(scope='module')
def context4(corpus, tmp_path_factory):
  """(result, workdir) of a run at data=2, context=4."""
  workdir = tmp_path_factory.mktemp('context4')
  return _train(corpus, workdir, data=2, context=4), workdir


def _assert_matches(result: trainer.Result, single) -> None:
  """Losses within 1e-4 relative, and the last gradient norm (a sum where a mean belongs
  would be C times off)."""
  assert sorted(result.losses) == sorted(single)
  for step, metrics in single.items():
    np.testing.assert_allclose(result.losses[step], metrics['loss'], rtol=1e-4, err_msg=step)
  np.testing.assert_allclose(result.train['train/grad_norm'], single[3]['grad_norm'], rtol=1e-4)
  assert single[3]['loss'] < single[1]['loss']


def test_context_training_matches_one_device(context4, single):
  _assert_matches(context4[0], single)


def test_checkpoint_serves_at_context_one(context4):
  """The context-parallel run's checkpoint loads in the engine's loader, and its model there
  (no context axis) gives the logits the split path gives under the run's mesh, in the
  zig-zag layout and in the row's order."""
  loaded = engine.load_model(str(context4[1]))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 100, (2, 256)), jnp.int32)
  forward = jax.jit(lambda graphdef, params, t: nnx.merge(graphdef, params)(t),
                    static_argnums=0)
  plain = forward(loaded.graphdef, loaded.params, tokens)
  in_order = transformer.graphdef(
      dataclasses.replace(loaded.model_cfg, context_load_balance=False))
  with jax.set_mesh(_mesh(data=2, context=4)):
    for graphdef in (loaded.graphdef, in_order):
      np.testing.assert_allclose(forward(graphdef, loaded.params, tokens), plain, atol=1e-5)


@pytest.mark.parametrize('overrides, message', [
    ({'mesh.context': 4, 'mesh.data': 2, 'data.seq_len': 2044}, 'divisible by 8'),
    ({'mesh.context': 4, 'mesh.data': 2, 'data.seq_len': 2042,
      'model.context_load_balance': False}, 'divisible by 4'),
    ({'mesh.context': 8, 'mesh.data': 1, 'model.attention': 'pallas'}, "model.attention='pallas'"),
], ids=['balanced', 'unbalanced', 'pallas'])
def test_config_errors(corpus, overrides, message):
  with pytest.raises(ConfigError, match=message):
    trainer.validate(_config(corpus, **overrides), 8, 1)
