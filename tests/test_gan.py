"""The GAN family: losses, R1, spectral norm, the train step, resume and meshes.

Oracles: closed forms of the losses on hand-picked logits; a float64 numpy
discriminator (its logits, and R1 by central finite differences of it); numpy's
SVD for spectral normalisation; the step's own inputs (a zero learning rate
changes no parameter, a poisoned batch is skipped); zero EMA weights that
must give zero images; equivalent paths (a run stopped and resumed against one
straight through, every mesh against one device in losses, gradient norms and
weights); a real run's last evaluation in its TensorBoard events (FD, KID,
cond_acc, the sample grid), and `train.sample --out` drawing that same grid.
"""

import io
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import gan as gan_config
from data.errors import ConfigError
from model import gan
from tests.test_run import assert_trees_equal, flat, restore, scalars
from train import optim, trainer
from train.tasks.gan import GANTask

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6

# A conditional GAN with spectral norm, R1 and two D steps per G step, small enough to
# compile in seconds; every sharded dimension divides 8.
SMALL = {
    'steps': STEPS, 'batch_size': 16, 'log_every': 1, 'eval_every': 0,
    'checkpoint.every': 3, 'checkpoint.async_save': False,
    'model.latent_dim': 8, 'model.g_channels': (16, 8), 'model.d_channels': (8, 16),
    # Non-saturating: with the hinge, every term is active at init, so the read-out bias
    # gradient is a sum of +-1/m that cancels to rounding noise, which Adam's first step
    # (about lr * sign) can turn into a different bias on each mesh.
    'gan.loss': 'non_saturating', 'gan.d_steps': 2, 'gan.r1_gamma': 1.0,
}


def small_config(**overrides) -> ml_collections.ConfigDict:
  c = gan_config.get_config('digits')
  c.update_from_flattened_dict({**SMALL, **overrides})
  return c


# --- losses against closed forms ------------------------------------------------------


def softplus(x):
  return np.log1p(np.exp(x))


def test_losses_match_closed_forms():
  real = np.array([2.0, -0.5, 0.0, 3.0], np.float32)
  fake = np.array([-1.5, 0.5, 1.2, -3.0], np.float32)
  # Non-saturating: D minimises -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))).
  sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  expected_d = np.mean(-np.log(sigmoid(real))) + np.mean(-np.log(1 - sigmoid(fake)))
  np.testing.assert_allclose(gan.d_loss('non_saturating', real, fake), expected_d, rtol=1e-6)
  np.testing.assert_allclose(gan.g_loss('non_saturating', fake), np.mean(softplus(-fake)),
                             rtol=1e-6)
  # Hinge, written out term by term: relu(1 - r) = [0, 1.5, 1, 0]; relu(1 + f) = [0, 1.5, 2.2, 0].
  np.testing.assert_allclose(gan.d_loss('hinge', real, fake), 2.5 / 4 + 3.7 / 4, rtol=1e-6)
  np.testing.assert_allclose(gan.g_loss('hinge', fake), -(-1.5 + 0.5 + 1.2 - 3.0) / 4, rtol=1e-6)
  with pytest.raises(ValueError, match='wasserstein'):
    gan.d_loss('wasserstein', real, fake)


# --- a numpy discriminator: logits and R1 ------------------------------------------------


def np_conv_same(x_BxHxWxC, k_HxWxIxO, stride):
  """XLA's 'SAME' convolution in float64: out = ceil(in / stride), padding split low-first."""
  b, h, w, _ = x_BxHxWxC.shape
  kh, kw, _, o = k_HxWxIxO.shape
  out_h, out_w = -(-h // stride), -(-w // stride)
  pad_h = max((out_h - 1) * stride + kh - h, 0)
  pad_w = max((out_w - 1) * stride + kw - w, 0)
  x = np.pad(x_BxHxWxC, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                         (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
  out = np.zeros((b, out_h, out_w, o))
  for i in range(out_h):
    for j in range(out_w):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j, :] = np.einsum('bhwc,hwco->bo', patch, k_HxWxIxO)
  return out


def np_spectral(w, u):
  """One power-iteration round from u (Miyato et al. algorithm 1): w / sigma."""
  m = w.reshape(-1, w.shape[-1])
  v = m @ u
  v = v / np.linalg.norm(v)
  u = m.T @ v
  u = u / np.linalg.norm(u)
  return w / (v @ m @ u)


def np_discriminator(d: gan.Discriminator, x, labels):
  get = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
  weight = lambda sn: np_spectral(get(sn.layer.kernel), get(sn.u))  # noqa: E731
  h = x.astype(np.float64)
  for i in range(len(d.cfg.d_channels)):
    conv = getattr(d, f'conv{i}')
    h = np_conv_same(h, weight(conv), 2) + get(conv.layer.bias)
    h = np.where(h >= 0, h, gan.LEAKY_SLOPE * h)
  logits = np.einsum('bhwc,hwc->b', h, weight(d.read)[..., 0]) + get(d.read.layer.bias)[0]
  scores = np.einsum('bhwc,hwck->bk', h, weight(d.project))
  return logits + scores[np.arange(len(labels)), labels]


def tiny_cfg(**kw) -> gan.GANConfig:
  base = dict(image_size=4, channels=1, num_classes=3, latent_dim=4, g_channels=(4, 2),
              d_channels=(2,), spectral_norm=True, power_iterations=1)
  return gan.GANConfig(**{**base, **kw})


def test_discriminator_and_r1_match_numpy():
  with nnx.use_eager_sharding(False):
    d = gan.Discriminator(tiny_cfg(), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 4, 4, 1))
  labels = np.array([0, 2])
  logits = d(jnp.asarray(x, jnp.float32), jnp.asarray(labels))
  np.testing.assert_allclose(logits, np_discriminator(d, x, labels), rtol=1e-4, atol=1e-5)

  # R1 = mean over examples of |dD/dx|^2, by central differences of the float64 reference.
  eps, grad = 1e-5, np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[idx] = eps
    grad[idx] = (np_discriminator(d, x + step, labels)[idx[0]]
                 - np_discriminator(d, x - step, labels)[idx[0]]) / (2 * eps)
  expected = np.mean(np.sum(grad ** 2, axis=(1, 2, 3)))
  r1 = gan.r1_penalty(lambda im: d(im, jnp.asarray(labels)), jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(r1, expected, rtol=1e-3)


# --- spectral normalisation against the SVD ----------------------------------------------


def test_spectral_norm_matches_svd():
  with nnx.use_eager_sharding(False):
    rngs = nnx.Rngs(1)
    conv = nnx.Conv(4, 8, (3, 3), kernel_init=nnx.initializers.normal(1.0), rngs=rngs)
    layer = gan.SpectralNorm(conv, enabled=True, power_iterations=1, rngs=rngs)
  raw = np.asarray(layer.layer.kernel[...]).reshape(-1, 8)
  u0 = np.asarray(layer.u[...])
  np.asarray(layer.kernel(update=False))
  np.testing.assert_array_equal(layer.u[...], u0)  # update=False keeps the vector
  for _ in range(60):
    normalised = np.asarray(layer.kernel(update=True)).reshape(-1, 8)
  singular = np.linalg.svd(raw, compute_uv=False)
  assert singular[1] < 0.95 * singular[0]  # a gap, so that 60 rounds converge
  np.testing.assert_allclose(np.linalg.svd(normalised, compute_uv=False)[0], 1.0, rtol=1e-4)
  sigma, _, _ = gan.power_iteration(jnp.asarray(raw), layer.u[...], 1)
  np.testing.assert_allclose(sigma, singular[0], rtol=1e-4)
  # The vector converged to the top right singular vector (up to sign).
  top = np.linalg.svd(raw)[2][0]
  np.testing.assert_allclose(abs(np.dot(np.asarray(layer.u[...]), top)), 1.0, rtol=1e-4)


# --- the train step -----------------------------------------------------------------------


def random_batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {'images': rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32),
          'labels': (np.arange(n) % 10).astype(np.int32)}


def changed(a, b) -> dict[str, bool]:
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  return {jax.tree_util.keystr(p): not np.array_equal(x, y)
          for (p, x), y in zip(flat_a, jax.tree.leaves(b), strict=True)}


def sn_vectors_changed(before, after) -> list[bool]:
  """For each power-iteration vector longer than 1 (a 1-vector is always +-1)."""
  return [changed_ for changed_, u in zip(changed(before, after).values(), jax.tree.leaves(after),
                                          strict=True) if u.size > 1]


def run_one_step(config_or_task, batch):
  task = config_or_task
  if isinstance(task, ml_collections.ConfigDict):
    task = GANTask(task)
  state = jax.jit(task.init_state)(jax.random.key(0))
  before = jax.device_get(state)
  after, metrics = jax.jit(task.train_step)(state, batch, {})
  return task, before, jax.device_get(after), jax.device_get(metrics)


def test_one_step_changes_both_networks_and_lr_zero_changes_neither():
  _, before, after, metrics = run_one_step(small_config(), random_batch())
  assert metrics['skipped'] == 0 and np.isfinite(metrics['loss'])
  assert metrics['loss'] == metrics['g_loss'] and metrics['r1'] > 0
  g_changed = changed(before.params, after.params)
  assert all(g_changed.values()), g_changed
  # Every D weight moves (a bias can see a zero gradient: the hinge terms of real and fake
  # cancel when all are active, as at init).
  d_changed = changed(before.extras['d_params'], after.extras['d_params'])
  assert all(v for k, v in d_changed.items() if k.endswith("['kernel']")), d_changed
  assert all(sn_vectors_changed(before.extras['sn'], after.extras['sn']))
  assert any(changed(before.extras['ema'], after.extras['ema']).values())
  assert int(after.step) == 1

  # Learning rates zero. The config checks want lr > 0, so the task gets its optimizers
  # from a zero-lr copy of its config after it is built.
  task = GANTask(small_config())
  zero = small_config(**{'optimizer.lr': 0.0, 'optimizer.end_lr': 0.0,
                         'd_optimizer.lr': 0.0, 'd_optimizer.end_lr': 0.0})
  task.g_opt = optim.make_optimizer(zero.optimizer, zero.steps, zero.max_nonfinite_steps,
                                    task._g_specs)
  task.d_opt = optim.make_optimizer(zero.d_optimizer, zero.steps, zero.max_nonfinite_steps,
                                    task._d_specs)
  _, before, after, metrics = run_one_step(task, random_batch())
  assert metrics['skipped'] == 0 and metrics['lr'] == 0 and metrics['d_lr'] == 0
  assert metrics['grad_norm'] > 0 and metrics['d_grad_norm'] > 0  # gradients, not applied
  assert not any(changed(before.params, after.params).values())
  assert not any(changed(before.extras['d_params'], after.extras['d_params']).values())
  # Power iteration is not learning: the vectors still advance.
  assert all(sn_vectors_changed(before.extras['sn'], after.extras['sn']))
  # The EMA of an unchanged G is G again, up to the rounding of s*g + (1-s)*g.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               before.extras['ema'], after.extras['ema'])


def test_non_finite_batch_is_skipped():
  batch = random_batch()
  # Rows 2 and 3: one NaN in each of the two strided slices, so both D updates see one.
  batch['images'][2:4, 2, 2, 0] = np.nan
  _, before, after, metrics = run_one_step(small_config(), batch)
  assert metrics['skipped'] == 1
  assert not any(changed(before.extras['d_params'], after.extras['d_params']).values())
  assert not any(changed(before.extras['sn'], after.extras['sn']).values())
  # G's loss involves no real image: its update goes ahead against the unchanged D.
  assert np.isfinite(metrics['g_loss'])
  assert all(changed(before.params, after.params).values())


def test_ema_holds_when_the_generator_step_is_skipped():
  # Regression: the GAN's EMA used to move on a skipped step (the diffusion model's did not).
  task = GANTask(small_config())
  state = jax.jit(task.init_state)(jax.random.key(0))
  first = next(iter(state.params))  # one generator leaf made NaN: G's loss is NaN
  poisoned = jax.tree.map(lambda x: x, state.params)
  leaf_path = jax.tree_util.tree_flatten_with_path(poisoned[first])[0][0][0]
  bad = jax.tree_util.tree_map_with_path(
      lambda p, x: x.at[(0,) * x.ndim].set(jnp.nan) if p == leaf_path else x, poisoned[first])
  state = state.replace(params=dict(poisoned, **{first: bad}))
  before = jax.device_get(state)
  after, metrics = jax.jit(task.train_step)(state, random_batch(), {})
  after = jax.device_get(after)
  assert metrics['skipped'] == 1 and not np.isfinite(metrics['g_loss'])
  jax.tree.map(np.testing.assert_array_equal, before.extras['ema'], after.extras['ema'])
  jax.tree.map(np.testing.assert_array_equal, before.params, after.params)


def test_eval_summary_scores_ema_samples_and_grid():
  config = small_config(**{'eval.num_samples': 30})
  task = GANTask(config)
  state = jax.jit(task.init_state)(jax.random.key(0))

  class Recorder:
    def score(self, images, labels):
      self.images, self.labels = images, labels
      return {'eval/fd': 1.0}

  task.evaluator = Recorder()
  out = task.eval_summary({'d_loss_sum': 6.0, 'd_real_correct': 3.0, 'd_fake_correct': 1.0,
                           'examples': 4.0}, state)
  assert out == {'eval/loss': 1.5, 'eval/d_real_acc': 0.75, 'eval/d_fake_acc': 0.25,
                 'eval/fd': 1.0}
  assert task.evaluator.images.shape == (30, 8, 8, 1)
  np.testing.assert_array_equal(task.evaluator.labels, np.arange(30) % 10)
  assert np.abs(task.evaluator.images).max() <= 1.0 and task.evaluator.images.std() > 0
  # Samples come from the EMA weights: all-zero EMA weights give tanh(0) = 0 everywhere.
  state.extras['ema'] = jax.tree.map(jnp.zeros_like, state.extras['ema'])
  task.eval_summary({}, state)
  np.testing.assert_array_equal(task.evaluator.images, 0.0)
  grid = task.samples(state, config.seed)['samples/grid']
  assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[-1] == 1


# --- config errors ------------------------------------------------------------------------


@pytest.mark.parametrize('overrides, key', [
    ({'gan.loss': 'wasserstein'}, 'gan.loss'),
    ({'gan.d_steps': 3}, 'gan.d_steps'),
    ({'gan.r1_gamma': -1.0}, 'gan.r1_gamma'),
    ({'d_optimizer.lr': 0.0}, 'd_optimizer.lr'),
    ({'ema.decay': 1.0}, 'ema.decay'),
    ({'model.g_channels': (16, 8, 8, 8, 8)}, 'model.g_channels'),
    ({'model.g_norm': 'batch'}, 'model.g_norm'),
    ({'grad_accum': 2}, 'grad_accum'),
    ({'eval.num_samples': 0}, 'eval.num_samples'),
])
def test_bad_config_names_the_key(overrides, key):
  with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
    GANTask(small_config(**overrides))


# --- whole runs: resume, meshes ---------------------------------------------------------


def run_in_process(workdir, **overrides):
  return trainer.train_and_evaluate(small_config(**overrides), str(workdir))


# The one evaluation of the suite's image runs: at the last step, of few samples, with a
# feature classifier trained briefly (its scores need only be sane here; test_image_eval.py
# checks a well-trained one).
EVAL = {'eval_every': STEPS, 'eval.num_samples': 40, 'eval.classifier_steps': 50}


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """STEPS steps on a 2x2x2 mesh of the 8 fake devices, evaluated at the last."""
  workdir = tmp_path_factory.mktemp('straight')
  mesh = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
  return workdir, run_in_process(workdir, **mesh, **EVAL).losses, mesh


def test_evaluation_reaches_tensorboard(straight):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  workdir = straight[0]
  acc = EventAccumulator(str(workdir), size_guidance={'scalars': 0, 'images': 0})
  acc.Reload()
  evals = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
           for tag in acc.Tags()['scalars'] if tag.startswith('eval/')}
  for tag in ('eval/fd', 'eval/kid', 'eval/fd_floor', 'eval/kid_floor', 'eval/cond_acc',
              'eval/loss', 'eval/precision', 'eval/recall', 'eval/precision_floor',
              'eval/recall_floor', 'eval/memorisation_ratio', 'eval/memorisation_share'):
    assert [step for step, _ in evals.get(tag, [])] == [STEPS], (tag, sorted(evals))
  value = {tag: v[0][1] for tag, v in evals.items()}
  assert all(np.isfinite(v) for v in value.values()), value
  assert value['eval/fd'] >= 0 and value['eval/fd_floor'] >= 0
  # Six steps from the init: far from the data, farther than held-out images are.
  assert value['eval/fd'] > value['eval/fd_floor'], value
  assert 0 <= value['eval/cond_acc'] <= 1
  assert value['eval/recall'] < value['eval/recall_floor'], value

  [grid] = acc.Images('samples/grid')
  assert grid.step == STEPS
  pixels = np.asarray(Image.open(io.BytesIO(grid.encoded_image_string)))
  rows = small_config().sample.grid_rows
  assert pixels.shape == (grid.height, grid.width) == (rows * 9 + 1,) * 2  # 8x8, 1-pixel lattice
  assert pixels.std() > 0

  # train.sample --out draws the same grid from the last checkpoint, as a PNG scaled 2x.
  out = workdir / 'grid.png'
  proc = subprocess.run(
      [sys.executable, '-m', 'train.sample', f'--workdir={workdir}', f'--out={out}',
       '--scale=2'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_array_equal(np.asarray(Image.open(out)),
                                pixels.repeat(2, axis=0).repeat(2, axis=1))


def test_resume_is_exact(straight, tmp_path):
  straight_dir, straight_losses, mesh = straight
  first = run_in_process(tmp_path, **mesh, steps=3).losses
  second = run_in_process(tmp_path, **mesh).losses
  assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]
  resumed = {**first, **second}
  for step in range(1, STEPS + 1):
    assert resumed[step] == straight_losses[step], step  # bitwise
  assert_trees_equal(restore(straight_dir, STEPS), restore(tmp_path, STEPS))


def test_meshes_match_one_device(straight, tmp_path):
  results = {(2, 2, 2): straight[1]}
  # FSDP over all 8 devices is tests/test_train.py's; here tensor parallelism over all 8.
  for shape in [(1, 1, 8)]:
    mesh = {'mesh.data': shape[0], 'mesh.fsdp': shape[1], 'mesh.tensor': shape[2]}
    results[shape] = run_in_process(tmp_path / str(shape), **mesh).losses

  # One device, in this process: the trainer's math (jitted init from the seed, then the
  # step on each batch of the same data stream) without a mesh.
  config = small_config()
  task = GANTask(config)
  data = task.setup_data(str(tmp_path), 0, 1)
  state = jax.jit(task.init_state)(jax.random.key(config.seed))
  step_fn = jax.jit(lambda s, b: task.train_step(s, b, {}))
  single, norms = {}, {'grad_norm': {}, 'd_grad_norm': {}}
  for step in range(1, STEPS + 1):
    state, metrics = step_fn(state, next(data))
    single[step] = float(metrics['loss'])
    for name, by_step in norms.items():
      by_step[step] = float(metrics[name])

  assert single[STEPS] != single[1]
  for shape, run_losses in results.items():
    assert sorted(run_losses) == sorted(single), shape
    for step in single:
      np.testing.assert_allclose(run_losses[step], single[step], rtol=1e-4,
                                 err_msg=f'{shape} {step}')

  # Adam barely reacts to a gradient scaled by an axis size, so the losses alone would let
  # a sum instead of a mean over fsdp or tensor through; G's and D's gradient norms would
  # not (they would be 2 to 8 times off). Largest differences measured against one device
  # (2026-12-01, meshes (2,2,2), (1,8,1), (1,1,8)): 4.4e-7 relative in the norms, 1.2e-7
  # absolute in the final G, D and EMA weights; the tolerances are about 4x those.
  dirs = {(2, 2, 2): straight[0], **{shape: tmp_path / str(shape) for shape in results
                                     if shape != (2, 2, 2)}}
  single_params = flat({'g_params': state.params, 'd_params': state.extras['d_params'],
                        'ema': state.extras['ema']})
  for shape, workdir in dirs.items():
    for name, by_step in norms.items():
      logged = scalars(workdir, f'train/{name}')
      assert sorted(logged) == sorted(by_step), (shape, name)
      for step in by_step:
        np.testing.assert_allclose(logged[step], by_step[step], rtol=2e-6,
                                   err_msg=f'{shape} {name} {step}')
    saved = restore(workdir, STEPS)
    got = flat({'g_params': saved['params'], 'd_params': saved['extras']['d_params'],
                'ema': saved['extras']['ema']})
    assert sorted(got) == sorted(single_params), shape
    for key, want in single_params.items():
      np.testing.assert_allclose(got[key], want, rtol=0, atol=5e-7, err_msg=f'{shape} {key}')

