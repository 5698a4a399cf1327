"""The trainer in process, on 8 fake CPU devices.

Oracles: every mesh against one device (equivalent paths), a hand-written
sharding table, a plain-jnp transformer and the closed form of AdamW's first
step (golden one-step metrics), one batch against microbatches, a poisoned
step against the step before it, and compiled memory against the FSDP size.
"""

import functools
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_run import restore, scalars

from configs import lm
from data import lm_pipeline
from data.errors import ConfigError
from train import checkpoint, optim, trainer
from train import mesh as mesh_lib
from train.state import setup_state
from train.tasks.lm import LMTask

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_corpus(tmp_path_factory) -> pathlib.Path:
  """~40 KB of real Python source, in a text file."""
  import json
  import textwrap
  text = ''.join(pathlib.Path(m.__file__).read_text() for m in (textwrap, json.decoder))
  path = tmp_path_factory.mktemp('corpus') / 'input.txt'
  path.write_text(text[:40_000])
  return path


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> pathlib.Path:
  return write_corpus(tmp_path_factory)


def small_config(corpus: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
  """A char-level LM small enough to compile in seconds; fp32 so meshes agree tightly."""
  c = lm.get_config('tiny')
  c.unlock()
  c.update(steps=3, batch_size=8, log_every=1, eval_every=0)
  c.checkpoint.update(every=1000, async_save=False)
  c.data.update(source='text', path=str(corpus), seq_len=32)
  c.data.tokenizer.update(kind='char')
  c.model.update(d_model=64, n_layers=2, n_heads=8, n_kv_heads=8, dtype='float32')
  c.optimizer.update(warmup_steps=1)
  c.update_from_flattened_dict(overrides)
  c.lock()
  return c


# --- every mesh trains to the same losses as one device --------------------------------


def test_meshes_match_one_device(corpus, tmp_path):
  steps = 3
  # Pure data parallelism is (2, 2, 2)'s data axis and tests/test_run.py's two processes;
  # FSDP over all 8 devices is the large-preset compile below (its arguments split 8 ways).
  meshes = [(1, 1, 8), (2, 2, 2)]
  results = {}
  for shape in meshes:
    config = small_config(corpus, **{'mesh.data': shape[0], 'mesh.fsdp': shape[1],
                                     'mesh.tensor': shape[2], 'steps': steps})
    results[shape] = trainer.train_and_evaluate(config, str(tmp_path / str(shape))).losses

  # One device: a process of its own, since this one has eight.
  one = tmp_path / 'one'
  flags = [f'--config.{k}={v}' for k, v in {
      'steps': steps, 'batch_size': 8, 'log_every': 1, 'eval_every': 0, 'data.source': 'text',
      'data.path': corpus, 'data.seq_len': 32, 'data.tokenizer.kind': 'char',
      'model.d_model': 64, 'model.n_layers': 2, 'model.n_heads': 8, 'model.n_kv_heads': 8,
      'model.dtype': 'float32', 'optimizer.warmup_steps': 1}.items()]
  proc = subprocess.run(
      [sys.executable, '-m', 'train', '--config=configs/lm.py', f'--workdir={one}', *flags],
      cwd=REPO, env={**_env(), 'JAX_NUM_CPU_DEVICES': '1'}, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  single = scalars(one, 'train/loss')

  assert sorted(single) == list(range(1, steps + 1))
  for shape, losses in results.items():
    assert sorted(losses) == sorted(single), shape
    for step in single:
      np.testing.assert_allclose(losses[step], single[step], rtol=1e-4, err_msg=f'{shape} {step}')
  assert single[steps] < single[1]  # it trains

  # AdamW with clipping barely reacts to a gradient scaled by an axis size, so the losses
  # alone would let a sum instead of a mean over fsdp or tensor through; the gradient norm
  # of every step would not (it would be 2 to 8 times off). Largest differences measured
  # against one device (2026-12-01): 2.8e-7 relative in grad_norm, 2.4e-7 absolute in the
  # final state (parameters and Adam's moments); the tolerances are 7x and 4x those.
  single_norms, single_state = scalars(one, 'train/grad_norm'), restore(one, steps)
  for shape in results:
    norms = scalars(tmp_path / str(shape), 'train/grad_norm')
    assert sorted(norms) == sorted(single_norms), shape
    for step in single_norms:
      np.testing.assert_allclose(norms[step], single_norms[step], rtol=2e-6,
                                 err_msg=f'{shape} {step}')
    assert_trees_close(restore(tmp_path / str(shape), steps), single_state, atol=1e-6,
                       msg=str(shape))


def assert_trees_close(a, b, atol: float, msg: str = '') -> None:
  """Same structure; integer leaves equal, floating leaves within `atol`."""
  assert jax.tree.structure(a) == jax.tree.structure(b), msg
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b),
                          strict=True):
    name = f'{msg} {jax.tree_util.keystr(path)}'
    assert x.shape == y.shape and x.dtype == y.dtype, name
    if np.issubdtype(x.dtype, np.floating):
      np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=name)
    else:
      np.testing.assert_array_equal(x, y, err_msg=name)


def _env() -> dict[str, str]:
  import os
  return {**os.environ, 'JAX_PLATFORMS': 'cpu'}


# --- shardings follow the table ---------------------------------------------------------

# The layout the rules in model/transformer.py promise, written out by hand:
# FSDP shards d_model, tensor parallelism heads, MLP hidden and vocab, pipeline stages the
# stacked layers (size 1 here; tests/test_pipeline.py splits them); head_dim and norm scales
# are never split.
EXPECTED_SPECS = {
    'embedding': P('tensor', 'fsdp'),
    'blocks/attn/wq': P('stage', 'fsdp', 'tensor', None),
    'blocks/attn/wk': P('stage', 'fsdp', 'tensor', None),
    'blocks/attn/wv': P('stage', 'fsdp', 'tensor', None),
    'blocks/attn/wo': P('stage', 'tensor', None, 'fsdp'),
    'blocks/mlp/w_gate': P('stage', 'fsdp', 'tensor'),
    'blocks/mlp/w_up': P('stage', 'fsdp', 'tensor'),
    'blocks/mlp/w_down': P('stage', 'tensor', 'fsdp'),
    'blocks/attn_norm/scale': P('stage', None),
    'blocks/mlp_norm/scale': P('stage', None),
    'final_norm/scale': P(None),
    'lm_head': P('fsdp', 'tensor'),
}


def _path(key_path) -> str:
  return '/'.join(str(k.key) for k in key_path)


@pytest.mark.parametrize('tie', [True, False])
def test_state_shardings_follow_the_table(corpus, tie):
  config = small_config(corpus, **{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2,
                                   'model.tie_embeddings': tie})
  task = LMTask(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  rng, _, _, init = setup_state(task, config, mesh)
  state = init(rng)

  params = jax.tree_util.tree_flatten_with_path(state.params)[0]
  assert {_path(p) for p, _ in params} == set(EXPECTED_SPECS) - ({'lm_head'} if tie else set())
  adam = state.opt_state.inner_state[1][0]
  for tree in (state.params, adam.mu, adam.nu):  # Adam's moments shard like their params
    for key_path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      expected = NamedSharding(mesh, EXPECTED_SPECS[_path(key_path)])
      assert x.sharding.is_equivalent_to(expected, x.ndim), (_path(key_path), x.sharding)
      # Each device holds exactly its block.
      block = tuple(d // mesh_lib._axes_size(mesh, a) if a else d
                    for d, a in zip(x.shape, list(expected.spec) + [None] * x.ndim,
                                    strict=False))
      assert x.addressable_shards[0].data.shape == block, _path(key_path)
  for x in (state.step, state.rng, adam.count):
    assert x.sharding.is_fully_replicated


# --- one step against a plain-jnp transformer and AdamW's closed form -------------------


def reference_logits(params, inputs_L, positions_L, segment_ids_L, n_heads, n_kv_heads):
  """The Llama-style transformer written out plainly for one row, layer by layer, head by head."""
  def rms(x, scale):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * scale

  def rope(x_LxD, pos_L):
    half = x_LxD.shape[-1] // 2
    freq = 10_000.0 ** (-jnp.arange(half) / half)
    angle = pos_L[:, None] * freq[None]
    a, b = x_LxD[:, :half], x_LxD[:, half:]
    return jnp.concatenate([a * jnp.cos(angle) - b * jnp.sin(angle),
                            b * jnp.cos(angle) + a * jnp.sin(angle)], -1)

  blocks = params['blocks']
  n_layers = blocks['attn']['wq'].shape[0]
  group = n_heads // n_kv_heads
  length = len(inputs_L)
  allowed = jnp.tril(jnp.ones((length, length), bool)) & (
      segment_ids_L[:, None] == segment_ids_L[None, :])
  h = params['embedding'][inputs_L]
  for i in range(n_layers):
    a = rms(h, blocks['attn_norm']['scale'][i])
    heads = []
    for head in range(n_heads):
      q = rope(a @ blocks['attn']['wq'][i][:, head], positions_L)
      k = rope(a @ blocks['attn']['wk'][i][:, head // group], positions_L)
      v = a @ blocks['attn']['wv'][i][:, head // group]
      s = jnp.where(allowed, q @ k.T / math.sqrt(q.shape[-1]), -jnp.inf)
      heads.append(jax.nn.softmax(s, -1) @ v)
    h = h + sum(heads[j] @ blocks['attn']['wo'][i][j] for j in range(n_heads))
    m = rms(h, blocks['mlp_norm']['scale'][i])
    gate, up = m @ blocks['mlp']['w_gate'][i], m @ blocks['mlp']['w_up'][i]
    h = h + (jax.nn.silu(gate) * up) @ blocks['mlp']['w_down'][i]
  h = rms(h, params['final_norm']['scale'])
  return h @ (params['lm_head'] if 'lm_head' in params else params['embedding'].T)


def test_one_step_golden_metrics(corpus, tmp_path):
  lr, b1, b2, eps, wd, clip = 3e-3, 0.9, 0.95, 1e-8, 0.1, 0.5
  config = small_config(corpus, **{
      'steps': 1, 'checkpoint.every': 1, 'model.n_heads': 4, 'model.n_kv_heads': 2,
      'model.tie_embeddings': False, 'optimizer.warmup_steps': 0, 'optimizer.lr': lr,
      'optimizer.b1': b1, 'optimizer.b2': b2, 'optimizer.eps': eps,
      'optimizer.weight_decay': wd, 'optimizer.clip_norm': clip})
  workdir = str(tmp_path)
  result = trainer.train_and_evaluate(config, workdir)

  # The inputs of that step, rebuilt independently: the seed's init and the first batch.
  task = LMTask(config)
  data = lm_pipeline.build_lm_data(config.data, seed=config.seed, global_batch_size=8,
                                   eval_steps=0, workdir=workdir, process_index=0,
                                   process_count=1)
  task._set_tokenizer(data.tokenizer)
  params0 = jax.jit(task.init_state)(jax.random.key(config.seed)).params
  batch = {k: jnp.asarray(v) for k, v in next(data.train).items()}

  def loss_fn(params):
    rows = jax.vmap(reference_logits, in_axes=(None, 0, 0, 0, None, None))
    logits_BxLxV = rows(params, batch['inputs'], batch['positions'], batch['segment_ids'], 4, 2)
    logp = jax.nn.log_softmax(logits_BxLxV, -1)
    return -jnp.mean(jnp.take_along_axis(logp, batch['targets'][..., None], -1))

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params0)
  grad_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
  # At init the logits are near zero: the loss is that of a uniform guess over the
  # (padded) vocabulary.
  assert abs(float(loss) - math.log(task.model_cfg.vocab_size)) < 0.05
  assert float(grad_norm) > clip  # so that clipping is exercised

  np.testing.assert_allclose(result.losses[1], loss, rtol=1e-5)
  np.testing.assert_allclose(result.train['train/grad_norm'], grad_norm, rtol=1e-4)
  np.testing.assert_allclose(result.train['train/lr'], lr, rtol=1e-6)
  assert result.train['train/skipped'] == 0

  # AdamW's first step in closed form: bias correction makes m_hat = g and
  # v_hat = g^2, so the update is -lr * (g / (|g| + eps) + wd * p) on decayed
  # parameters (not norms or the embedding), on the clipped gradient g.
  def expected(path, p, g):
    g = g * min(1.0, clip / float(grad_norm))
    decay = 0.0 if any(w in _path(path) for w in ('norm', 'embed')) else wd
    return p - lr * (g / (jnp.abs(g) + eps) + decay * p)

  want = jax.tree_util.tree_map_with_path(expected, params0, grads)
  state = checkpoint.Checkpointer(workdir, config.checkpoint)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_shapes(task))
  got = state.restore(1, abstract, None).params
  state.close()
  # |g| / (|g| + eps) is ill-conditioned only where 0 < |g| ~ eps: compare elsewhere
  # (rows of unseen tokens have g = 0 exactly).
  for (path, w), g, x in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                             jax.tree.leaves(grads), jax.tree.leaves(got), strict=True):
    g = np.abs(np.asarray(g))
    ok = (g == 0) | (g > 10 * eps)
    assert ok.mean() > 0.95, _path(path)
    np.testing.assert_allclose(np.asarray(x)[ok], np.asarray(w)[ok], atol=lr * 1e-3,
                               err_msg=_path(path))


def state_shapes(task):
  return jax.eval_shape(task.init_state, jax.random.key(0))


# --- gradient accumulation ----------------------------------------------------------------


def test_grad_accumulation_matches_one_batch(corpus, tmp_path):
  config = small_config(corpus, **{'optimizer.warmup_steps': 0})
  task = LMTask(config)
  data = lm_pipeline.build_lm_data(config.data, seed=0, global_batch_size=8, eval_steps=0,
                                   workdir=str(tmp_path), process_index=0, process_count=1)
  task._set_tokenizer(data.tokenizer)
  state = jax.jit(task.init_state)(jax.random.key(0))
  batch = next(data.train)

  # Four microbatches through the config key, against the whole batch at once.
  loss_fn = functools.partial(task._loss, dropout_key=None)
  (loss, _), grads = jax.jit(lambda p, b: optim.value_and_grad_accumulated(loss_fn, p, b, 1))(
      state.params, batch)
  config.unlock()
  config.grad_accum = 4
  config.lock()
  _, metrics = jax.jit(task.train_step)(state, batch, {})
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['grad_norm'], optax.tree.norm(grads), rtol=1e-5)


# --- non-finite steps ----------------------------------------------------------------------


def poison_steps(monkeypatch, first: int, last: int) -> None:
  """Makes the loss of steps first..last (1-based) NaN, the way bad data would: targets
  out of the vocabulary read as NaN logits."""
  original = LMTask.train_step

  def train_step(self, state, batch, frozen):
    step = state.step + 1
    bad = (step >= first) & (step <= last)
    batch = dict(batch, targets=jnp.where(bad, 10**6, batch['targets']))
    return original(self, state, batch, frozen)

  monkeypatch.setattr(LMTask, 'train_step', train_step)


def restore_state(workdir, config, step):
  task = LMTask(config)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
  data = lm_pipeline.build_lm_data(config.data, seed=0, global_batch_size=8, eval_steps=0,
                                   workdir=workdir, process_index=0, process_count=1)
  task._set_tokenizer(data.tokenizer)
  state = ckpt.restore(step, state_shapes(task), None)
  ckpt.close()
  return state


def test_nonfinite_steps_are_skipped(corpus, tmp_path, monkeypatch):
  poison_steps(monkeypatch, 3, 4)
  config = small_config(corpus, **{'steps': 6, 'checkpoint.every': 2})
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert np.isnan(result.losses[3]) and np.isnan(result.losses[4])
  assert all(np.isfinite(result.losses[s]) for s in (1, 2, 5, 6))
  two, four = (restore_state(str(tmp_path), config, s) for s in (2, 4))
  # Neither poisoned step changed the parameters or Adam's moments.
  for a, b in ((two.params, four.params),
               (two.opt_state.inner_state, four.opt_state.inner_state)):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  assert int(four.opt_state.total_notfinite) == 2
  six = restore_state(str(tmp_path), config, 6)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(six.params))
  assert not np.array_equal(six.params['embedding'], four.params['embedding'])


def test_too_many_nonfinite_steps_stop_the_run(corpus, tmp_path, monkeypatch):
  poison_steps(monkeypatch, 3, 10**9)
  config = small_config(corpus, **{'steps': 50, 'checkpoint.every': 2,
                                   'max_nonfinite_steps': 3})
  with pytest.raises(trainer.NonFiniteError, match='3 consecutive steps'):
    trainer.train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps and steps[-1] < 10
  last = restore_state(str(tmp_path), config, steps[-1])
  good = restore_state(str(tmp_path), config, 2)
  jax.tree.map(np.testing.assert_array_equal, last.params, good.params)


# --- config errors, before anything compiles --------------------------------------------


@pytest.mark.parametrize('overrides, message', [
    ({'mesh.data': 3}, r'mesh \(mesh.data=3, mesh.fsdp=1, mesh.tensor=1\) needs 3 devices'),
    ({'mesh.data': 3, 'mesh.fsdp': -1}, r'does not divide the 8 devices'),
    ({'mesh.data': 4, 'mesh.fsdp': 2, 'batch_size': 12},
     r'batch_size=12 .* divisible by the data-parallel size mesh.data\*mesh.fsdp\*mesh.expert = 8'),
    ({'mesh.data': 2, 'mesh.tensor': 4, 'model.n_kv_heads': 2},
     r"wk'\] has shape .* cannot be split over mesh axis 'tensor' of size 4"),
    ({'model.n_kv_heads': 3}, r'model.n_kv_heads=3 must divide model.n_heads=8'),
    ({'model.dtype': 'fp8'}, r"model.dtype='fp8' is not allowed; choose one of"),
    ({'data.source': 'csv'}, r"data.source='csv' is not allowed; choose one of stdlib"),
    ({'grad_accum': 3}, r'batch_size=8 must be divisible by grad_accum=3'),
    ({'optimizer.b2': 1.0}, r'optimizer.b2=1.0 must be in \[0, 1\)'),
])
def test_bad_configs_fail_before_any_data_or_compile(corpus, tmp_path, overrides, message):
  config = small_config(corpus, **overrides)
  with pytest.raises(ConfigError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'tokenizer').exists()  # nothing was read or trained


@pytest.mark.parametrize('flag, message', [
    ('--config.model.n_layer=2', 'n_layer'),  # unknown key: a typo of n_layers
    ('--config.mesh.tensor=16', 'does not divide the 8 devices'),
])
def test_cli_reports_config_errors_without_traceback(corpus, tmp_path, flag, message):
  proc = subprocess.run(
      [sys.executable, '-m', 'train', '--config=configs/lm.py', f'--workdir={tmp_path}', flag],
      cwd=REPO, env={**_env(), 'JAX_NUM_CPU_DEVICES': '8'}, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]


# --- the large presets compile, and FSDP shrinks their per-device memory ------------------


def test_large_preset_compiles_and_fsdp_saves_memory():
  """llama_1b (gpt2_124m's twin check went when tests/test_compile.py began holding a small
  model's per-device arguments to a hand count)."""
  config = lm.get_config('llama_1b')
  config.unlock()
  config.batch_size = 8
  config.data.seq_len = 128
  task = LMTask(config)
  per_device = {}
  for fsdp in (1, 8):
    config.mesh.update(data=8 // fsdp, fsdp=fsdp, tensor=1)
    lowered, (state, _) = trainer.lower_train_step(task, config, mesh_lib.make_mesh(config.mesh))
    stats = lowered.compile().memory_analysis()
    per_device[fsdp] = (stats.argument_size_in_bytes, stats.temp_size_in_bytes)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  # Parameters and two Adam moments in fp32, 12 bytes per parameter, replicated
  # without FSDP: the program's arguments hold that much, and 1/fsdp of it with FSDP.
  for fsdp, (args, _) in per_device.items():
    assert abs(args - 12 * n_params / fsdp) < 0.01 * 12 * n_params / fsdp, (fsdp, args)
  total = {fsdp: args + temp for fsdp, (args, temp) in per_device.items()}
  assert total[1] > total[8], per_device
