"""The VAE family: the model's KL and reparameterisation, the task on the trainer.

Oracles: the KL of two Gaussians written in numpy from their standard deviations, and a
Monte-Carlo estimate E_q[log q(z) - log p(z)] from scipy's normal log-densities; an
autoencoder x -> decode(mean) that the VAE with zero encoder variance and KL weight 0 must
equal in loss and gradients; shapes from the downsampling factor.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from configs import vae as vae_config
from data import images
from data.errors import ConfigError
from model import vae
from tests.test_run import assert_trees_equal, flat, restore, scalars
from train import image_eval, trainer
from train.state import TrainState
from train.tasks.vae import VAETask


def model_config(**overrides) -> ml_collections.ConfigDict:
  """configs/vae.py's model keys at test size: widths 8 and 16, one block per level."""
  m = vae_config.base().model
  m.update(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4,
           norm_groups=4, mid_attention=True, head_dim=8)
  m.update(overrides)
  return m


def build(cfg: vae.VAEConfig, seed: int = 0) -> vae.VAE:
  with nnx.use_eager_sharding(False):
    return vae.VAE(cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))


# --- the KL term -------------------------------------------------------------------------------


def test_kl_matches_closed_form_and_monte_carlo():
  rng = np.random.default_rng(0)
  mean = rng.normal(0.0, 1.0, (3, 2, 2, 2))
  logvar = rng.uniform(-2.0, 1.0, (3, 2, 2, 2))
  got = np.asarray(vae.kl_divergence(jnp.asarray(mean, jnp.float32),
                                     jnp.asarray(logvar, jnp.float32)))
  assert got.shape == (3,) and got.dtype == np.float32

  # KL(N(m, s^2) || N(0, 1)) = log(1 / s) + (s^2 + m^2) / 2 - 1/2 per dimension, summed.
  s = np.exp(0.5 * logvar)
  closed = np.sum(np.log(1.0 / s) + (s**2 + mean**2) / 2 - 0.5, axis=(1, 2, 3))
  np.testing.assert_allclose(got, closed, rtol=1e-5)

  # Monte Carlo: log q(z) - log p(z) at z ~ q, averaged over many draws; within 5 standard
  # errors of the estimate (and the estimate is tight: a KL off by 1% would fail).
  n = 200_000
  z = mean[None] + s[None] * rng.standard_normal((n, *mean.shape))
  log_ratio = np.sum(stats.norm.logpdf(z, mean[None], s[None]) - stats.norm.logpdf(z),
                     axis=(2, 3, 4))
  estimate = log_ratio.mean(axis=0)
  stderr = log_ratio.std(axis=0) / np.sqrt(n)
  assert np.all(stderr < 0.01 * got), (stderr, got)
  assert np.all(np.abs(estimate - got) < 5 * stderr), (estimate, got, stderr)
  # Zero for the prior itself.
  np.testing.assert_array_equal(vae.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 3))), 0.0)


# --- zero encoder variance and KL weight 0: an autoencoder -----------------------------------


def test_zero_variance_vae_is_an_autoencoder():
  """The task's loss with KL weight 0 and a forced zero encoder variance is a plain
  autoencoder's, x -> decode(mean), in value and in every gradient."""
  # No middle attention: it starts as the identity, and compiling gradients through it
  # would double this test's time.
  overrides = {'model.mid_attention': False, 'vae.recon_loss': 'l2', 'vae.kl_weight': 0.0,
               'vae.perceptual_weight': 0.0, 'vae.adversarial_weight': 0.0}
  task = VAETask(small_config(**overrides))
  weighted_task = VAETask(small_config(**{**overrides, 'vae.kl_weight': 1.0}))
  model = build(task.model_cfg)
  z = task.model_cfg.latent_channels
  # The log-variance half of the encoder's last (1x1) convolution: kernel 0, bias far below
  # the clip, so logvar = -30 for every input (std 3e-7; the clip passes no gradient).
  kernel, bias = model.encoder.moments.kernel, model.encoder.moments.bias
  kernel[...] = kernel[...].at[..., z:].set(0.0)
  bias[...] = bias[...].at[z:].set(-1e4)
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), jnp.float32, -1.0, 1.0)
  key = jax.random.key(2)

  def vae_loss(params, task=task):
    return task._loss(params, {'images': x}, key=key, frozen={}, d_state={},
                      adversarial_on=0.0)[0]

  def ae_loss(params):
    m = nnx.merge(graphdef, params)
    return jnp.mean(jnp.square(m.decode(m.encode(x)[0]) - x))

  @jax.jit
  def both(params):  # one compile: the two losses and their gradients
    return jax.value_and_grad(vae_loss)(params), jax.value_and_grad(ae_loss)(params)

  (loss, grads), (ae, ae_grads) = both(params)
  np.testing.assert_allclose(loss, ae, rtol=1e-5)
  flat_ae = flat(ae_grads)
  for name, g in flat(grads).items():
    np.testing.assert_allclose(g, flat_ae[name], rtol=1e-3, atol=1e-6, err_msg=name)
  moments = grads['encoder']['moments']
  np.testing.assert_array_equal(moments['kernel'][..., z:], 0.0)
  np.testing.assert_array_equal(moments['bias'][z:], 0.0)

  # The oracle can fail: with the KL weighted, or with the encoder's own variance, the
  # VAE's loss is not the autoencoder's.
  fresh = nnx.to_pure_dict(nnx.split(build(task.model_cfg), nnx.Param)[1])
  weighted, fresh_vae, fresh_ae = jax.jit(
      lambda p, q: (vae_loss(p, weighted_task), vae_loss(q), ae_loss(q)))(params, fresh)
  assert not np.isclose(weighted, ae, rtol=1e-3)
  assert not np.isclose(fresh_vae, fresh_ae, rtol=1e-3)


# --- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize('mult, factor', [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4),
                                          ((1, 1, 2, 2), 8)])
def test_shapes_for_each_factor(mult, factor):
  cfg = vae.VAEConfig.from_config(model_config(channel_mult=mult, latent_channels=3),
                                  image_size=16, channels=3)
  assert cfg.downsample_factor == factor and cfg.latent_size == 16 // factor
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: vae.VAE(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  recon, mean, logvar = jax.eval_shape(
      lambda p, x: nnx.merge(graphdef, p)(x, key=jax.random.key(0)), params, x)
  latent = (2, 16 // factor, 16 // factor, 3)
  assert mean.shape == logvar.shape == latent and mean.dtype == logvar.dtype == jnp.float32
  assert recon.shape == x.shape and recon.dtype == jnp.float32
  decoded = jax.eval_shape(lambda p, z: nnx.merge(graphdef, p).decode(z), params,
                           jax.ShapeDtypeStruct(latent, jnp.float32))
  assert decoded.shape == x.shape


def test_forward_is_per_example_and_sampled_only_with_a_key():
  cfg = vae.VAEConfig.from_config(model_config(), image_size=8, channels=1)
  graphdef, params = nnx.split(build(cfg))
  fwd = jax.jit(lambda p, x, key: nnx.merge(graphdef, p)(x, key=key))
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), jnp.float32, -1.0, 1.0)
  recon, mean, logvar = fwd(params, x, None)
  m = nnx.merge(graphdef, params)
  np.testing.assert_allclose(recon, m.decode(mean), rtol=1e-5, atol=1e-6)  # z = mean
  # GroupNorm and attention never mix the batch: reversed inputs, reversed outputs.
  np.testing.assert_allclose(fwd(params, x[::-1], None)[0], recon[::-1], rtol=1e-4, atol=1e-5)
  # With a key, z = mean + exp(logvar / 2) * eps with eps ~ N(0, I) from that key.
  key = jax.random.key(3)
  eps = jax.random.normal(key, mean.shape)
  sampled = fwd(params, x, key)[0]
  np.testing.assert_allclose(sampled, m.decode(mean + jnp.exp(logvar / 2) * eps), rtol=1e-5,
                             atol=1e-5)
  assert not np.allclose(sampled, recon, atol=1e-4)


def test_every_parameter_has_logical_axes():
  cfg = vae.VAEConfig.from_config(model_config(), image_size=8, channels=1)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: vae.VAE(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  specs = jax.tree_util.tree_leaves_with_path(
      nnx.to_pure_dict(nnx.get_partition_spec(params)),
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = jax.tree.leaves(nnx.to_pure_dict(params))
  rules = dict(vae.LOGICAL_AXIS_RULES)
  assert len(specs) == len(shapes) > 30
  for (path, spec), x in zip(specs, shapes, strict=True):
    assert len(spec) == x.ndim and any(name is not None for name in spec), path
    assert all(name is None or name in rules for name in spec), (path, spec)


@pytest.mark.parametrize('overrides, image_size, message', [
    ({'channel_mult': (1, 2, 2)}, 6, r'model.channel_mult=\(1, 2, 2\) .* factor of 4; '
                                     r'data.image_size=6 must divide'),
    ({'norm_groups': 3}, 8, r'model.norm_groups=3 must divide'),
    ({'head_dim': 5}, 8, r'model.head_dim=5 must divide the middle width 16'),
    ({'latent_channels': 0}, 8, r'model.latent_channels=0 must be a positive'),
    ({'dtype': 'float64'}, 8, r"model.dtype='float64' is not allowed"),
])
def test_bad_model_config_names_the_key(overrides, image_size, message):
  with pytest.raises(ValueError, match=message):
    vae.VAEConfig.from_config(model_config(**overrides), image_size=image_size, channels=1)


# --- VAETask on the trainer ------------------------------------------------------------------


STEPS = 4
ADVERSARIAL_START = 2  # steps 1-2 without the discriminator, 3-4 with it
MESH = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}  # splits along all three axes


def small_config(**overrides) -> ml_collections.ConfigDict:
  """digits_gan at test size: every term of the loss on (perceptual, and the discriminator
  from step 3), no evaluation; every sharded width divides 2."""
  c = vae_config.get_config('digits_gan')
  c.update(steps=STEPS, batch_size=16, log_every=1, eval_every=0, eval_steps=2)
  c.checkpoint.update(every=2, async_save=False)
  c.model = model_config()
  c.vae.update(adversarial_start=ADVERSARIAL_START, d_channels=(8, 16), d_loss='non_saturating')
  # A feature classifier trained briefly: the perceptual term needs only some features here.
  c.eval.update(num_samples=40, classifier_steps=50)
  # One schedule for every run length, so that the resumed runs' steps compile to the
  # straight run's programs (the session's compilation cache serves them).
  c.optimizer.update(warmup_steps=1, decay_steps=20)
  c.d_optimizer.update(decay_steps=20)
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """STEPS steps on a 2x2x2 mesh, checkpoints at 2 and 4, evaluated at the last step."""
  workdir = tmp_path_factory.mktemp('straight')
  config = small_config(**MESH, eval_every=STEPS)
  return workdir, trainer.train_and_evaluate(config, str(workdir)).losses


def test_resume_is_exact(straight, tmp_path):
  straight_dir, straight_losses = straight
  first = trainer.train_and_evaluate(small_config(**MESH, steps=2), str(tmp_path))
  second = trainer.train_and_evaluate(small_config(**MESH), str(tmp_path))
  assert sorted(first.losses) == [1, 2] and sorted(second.losses) == [3, 4]
  assert {**first.losses, **second.losses} == straight_losses  # bitwise
  assert_trees_equal(restore(straight_dir, STEPS), restore(tmp_path, STEPS))


def single_device_run(config):
  """The trainer's math on one device without a mesh: jitted init from the seed, then the
  step on each batch of the same data stream, with the same frozen classifier."""
  task = VAETask(config)
  data = task.setup_data('', 0, 1)
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  frozen = task.load_frozen(one)
  state = jax.jit(task.init_state)(jax.random.key(config.seed))
  init = jax.device_get(state)
  step_fn = jax.jit(lambda s, b: task.train_step(s, b, frozen))
  metrics = []
  for _ in range(config.steps):
    state, m = step_fn(state, next(data))
    metrics.append(jax.device_get(m))
  return task, init, jax.device_get(state), metrics


def test_meshes_match_one_device_and_the_discriminator_waits(straight):
  straight_dir, straight_losses = straight
  task, init, state, metrics = single_device_run(small_config())
  for step, m in enumerate(metrics, 1):
    np.testing.assert_allclose(straight_losses[step], m['loss'], rtol=1e-4, err_msg=str(step))
    assert m['skipped'] == 0 and m['perceptual'] > 0 and m['kl'] > 0
    # The discriminator is idle before vae.adversarial_start and runs from it on.
    assert (m['d_loss'] > 0) == (step > ADVERSARIAL_START), (step, m['d_loss'])
  # Adam barely reacts to a gradient scaled by an axis size, so the losses alone would let a
  # sum instead of a mean over fsdp or tensor through; the gradient norms would not.
  for name in ('grad_norm', 'd_grad_norm', 'd_loss', 'perceptual', 'g_loss'):
    logged = scalars(straight_dir, f'train/{name}')
    assert sorted(logged) == list(range(1, STEPS + 1)), name
    for step, m in enumerate(metrics, 1):
      np.testing.assert_allclose(logged[step], m[name], rtol=2e-5, atol=1e-7,
                                 err_msg=f'{name} {step}')
  saved = restore(straight_dir, STEPS)
  for key, got, want in (('params', saved['params'], state.params),
                         ('d_params', saved['extras']['d_params'], state.extras['d_params'])):
    got, want = flat(got), flat(want)
    assert sorted(got) == sorted(want), key
    for name, x in want.items():
      np.testing.assert_allclose(got[name], x, rtol=0, atol=1e-4, err_msg=f'{key} {name}')
  # At step 2 the discriminator (weights and power-iteration vectors) is still its init;
  # the VAE is not; and the VAE's parameters hold no discriminator.
  at_2 = restore(straight_dir, 2)
  assert_trees_equal(at_2['extras']['d_params'], init.extras['d_params'])
  # The power-iteration vectors are unit-normalised at init by a sum over their 'channels'
  # axis, which this mesh splits over tensor: float32 summed in another order, up to 8.9e-8
  # (3 ulp) from one device's (measured 2026-12-01). The one power iteration of step 4 moved
  # the convolutions' by 0.23 and 0.43 (the read-out's has one entry, +-1), so a
  # tolerance of 1e-6 still tells an idle discriminator from a running one.
  init_sn, sn_2, sn_4 = (flat(t) for t in (init.extras['sn'], at_2['extras']['sn'],
                                           saved['extras']['sn']))
  assert sorted(sn_2) == sorted(init_sn) == sorted(sn_4)
  for name, u in init_sn.items():
    np.testing.assert_allclose(sn_2[name], u, rtol=0, atol=1e-6, err_msg=name)
    assert u.size == 1 or np.max(np.abs(sn_4[name] - u)) > 1e-2, name
  assert sorted(saved['params']) == ['decoder', 'encoder']
  assert not np.array_equal(flat(at_2['params'])['decoder/out_conv/kernel'],
                            flat(init.params)['decoder/out_conv/kernel'])


def test_eval_metrics_match_a_recomputation(straight):
  """eval/kl, eval/recon_mse, eval/psnr and eval/loss recomputed from the checkpoint's
  parameters on the same held-out batches, with model/vae.py's functions and numpy."""
  straight_dir, _ = straight
  config = small_config()
  task = VAETask(config)
  task.setup_data('', 0, 1)
  data = task.data
  params = restore(straight_dir, STEPS)['params']
  model = nnx.merge(task.graphdef, params)
  x = np.concatenate([b['images'] for b in data.eval_batches()])
  assert len(x) == config.eval_steps * config.batch_size
  mean, logvar = jax.jit(model.encode)(x)
  recon = np.asarray(jax.jit(model.decode)(mean), np.float64)
  kl = np.asarray(vae.kl_divergence(mean, logvar))
  mse = np.mean((np.clip(recon, -1, 1) - x) ** 2, axis=(1, 2, 3))
  l1 = np.mean(np.abs(recon - x), axis=(1, 2, 3))
  want = {'eval/kl': kl.mean(), 'eval/recon_mse': mse.mean(),
          'eval/psnr': np.mean(10 * np.log10(4.0 / mse)),
          'eval/loss': np.mean(l1 + config.vae.kl_weight * kl / x[0].size)}
  for tag, value in want.items():
    np.testing.assert_allclose(scalars(straight_dir, tag)[STEPS], value, rtol=2e-5,
                               err_msg=tag)
  # The sample-based scores: all logged, finite, four steps from the init farther from the
  # data than held-out images are.
  got = {tag: scalars(straight_dir, tag)[STEPS] for tag in (
      'eval/recon_fd', 'eval/recon_kid', 'eval/fd', 'eval/kid', 'eval/fd_floor',
      'eval/kid_floor')}
  assert all(np.isfinite(v) for v in got.values()), got
  assert got['eval/fd'] > got['eval/fd_floor'] and got['eval/recon_fd'] > got['eval/fd_floor']


def test_samples_show_heldout_images_beside_reconstructions(straight):
  straight_dir, _ = straight
  config = small_config(**{'sample.grid_rows': 4})
  task = VAETask(config)
  saved = restore(straight_dir, STEPS)
  state = TrainState(step=saved['step'], params=saved['params'], opt_state=None, rng=None,
                     extras={})
  grids = task.samples(state, seed=0)
  # 4 rows of 2 pairs of 8x8 images on a 1-pixel lattice; the prior grid is 4 x 4.
  recon_grid, prior_grid = grids['samples/reconstructions'], grids['samples/prior']
  assert recon_grid.dtype == prior_grid.dtype == np.uint8
  assert recon_grid.shape == prior_grid.shape == (4 * 9 + 1, 4 * 9 + 1, 1)
  cells = recon_grid[1:, 1:].reshape(4, 9, 4, 9, 1)[:, :8, :, :8].transpose(0, 2, 1, 3, 4)
  cells = cells.reshape(16, 8, 8, 1)
  test_x, _ = images.load_split(config.data, 'test')
  np.testing.assert_array_equal(cells[0::2], test_x[:8])  # the held-out images, in order
  model = nnx.merge(task.graphdef, saved['params'])
  x = images.to_float(test_x[:8])
  recon = model.decode(model.encode(x)[0])
  np.testing.assert_array_equal(cells[1::2], image_eval.to_uint8(recon))
  z = jax.random.normal(jax.random.key(0 + 2), (16, 4, 4, 4))
  prior = prior_grid[1:, 1:].reshape(4, 9, 4, 9, 1)[:, :8, :, :8].transpose(0, 2, 1, 3, 4)
  np.testing.assert_allclose(prior.reshape(16, 8, 8, 1).astype(int),
                             image_eval.to_uint8(model.decode(z)).astype(int), atol=1)


@pytest.mark.parametrize('overrides, message', [
    ({'model.channel_mult': (1, 2, 2, 2, 2)},
     r'model.channel_mult=.* factor of 16; data.image_size=8 must divide'),
    ({'vae.recon_loss': 'l3'}, r"vae.recon_loss='l3' is not allowed"),
    ({'vae.kl_weight': -1.0}, r'vae.kl_weight'),
    ({'vae.d_loss': 'wasserstein'}, r"vae.d_loss='wasserstein' is not allowed"),
    ({'vae.d_channels': ()}, r'vae.d_channels=\(\) must be'),
    ({'d_optimizer.lr': 0.0}, r'd_optimizer.lr'),
    ({'eval.num_samples': 0}, r'eval.num_samples'),
])
def test_bad_config_names_the_key(overrides, message):
  with pytest.raises(ConfigError, match=message):
    VAETask(small_config(**overrides))
