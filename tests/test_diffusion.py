"""Diffusion: processes, samplers, the U-Net and DiffusionTask on the trainer.

Oracles: closed forms of the schedules and of the eps/v/x0 conversions; for Gaussian data
N(mu, s^2) the ideal denoiser E[x0 | x_t] is known in closed form, so each sampler driven by it
must reproduce mu and s^2 (and, with guidance between two Gaussians of equal variance, the
guided mean mu_u + g (mu_c - mu_u), whose diffused score is exactly the guided one); DDPM
against DDIM with eta = 1 (the same chain written two ways); a run cut and resumed against one
straight through; every mesh against one device (losses, gradient norms, weights); the EMA
against its recurrence; samples of a random non-zero U-Net that change with its weights, the
labels and the guidance scale.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_run import assert_trees_equal, flat, restore, scalars

from configs import diffusion as diffusion_config
from data import images
from data.errors import ConfigError
from model import diffusion, unet
from train import trainer
from train.tasks.diffusion import DiffusionTask

# --- schedules and parameterisations: closed forms ------------------------------------------


def test_linear_schedule_closed_form():
  for timesteps in (1000, 250):
    p = diffusion.Process(schedule='linear', timesteps=timesteps)
    scale = 1000 / timesteps
    alpha_bar, prod = [], 1.0
    for i in range(timesteps):  # the DDPM chain, one factor at a time
      beta = scale * (1e-4 + (0.02 - 1e-4) * i / (timesteps - 1))
      prod *= 1.0 - beta
      alpha_bar.append(prod)
    t = jnp.arange(timesteps)
    alpha, sigma = p.coefficients(t)
    np.testing.assert_allclose(alpha ** 2, alpha_bar, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma ** 2, 1 - np.array(alpha_bar), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(p.snr(t), np.array(alpha_bar) / (1 - np.array(alpha_bar)),
                               rtol=1e-4)
    # t = -1 is the clean image.
    assert p.coefficients(jnp.int32(-1)) == (1.0, 0.0)
  # The same total noise for any T (iDDPM's scaling): the end points nearly agree.
  ends = [diffusion.Process(schedule='linear', timesteps=n).alpha_bar[-2] for n in (250, 1000)]
  assert abs(math.log(ends[0]) - math.log(ends[1])) < 0.05 * abs(math.log(ends[1]))


def test_cosine_schedule_closed_form():
  timesteps, s = 1000, 0.008
  p = diffusion.Process(schedule='cosine', timesteps=timesteps)
  t = np.arange(timesteps)
  f = lambda u: np.cos((u / timesteps + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
  want = f(t + 1) / f(0)
  # Betas are clipped at 0.999 only at the very end, where f reaches 0.
  unclipped = t < timesteps - 5
  alpha, sigma = p.coefficients(jnp.asarray(t))
  np.testing.assert_allclose((alpha ** 2)[unclipped], want[unclipped], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose((alpha ** 2 + sigma ** 2), 1.0, rtol=1e-6)
  snr = np.asarray(p.snr(jnp.asarray(t)))
  np.testing.assert_allclose(snr[unclipped], (want / (1 - want))[unclipped], rtol=2e-4)
  assert np.all(np.diff(snr) < 0)  # noise only grows


@pytest.mark.parametrize('parameterization', diffusion.PARAMETERIZATIONS)
def test_parameterizations_convert_exactly(parameterization):
  p = diffusion.Process(schedule='cosine', parameterization=parameterization)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k1, (6, 4, 4, 1))
  eps = jax.random.normal(k2, (6, 4, 4, 1))
  t = jnp.array([0, 10, 250, 500, 900, 999])
  # The closed forms in float64.
  a_bar = p.alpha_bar[:-1][np.asarray(t)][:, None, None, None]
  a, s = np.sqrt(a_bar), np.sqrt(1 - a_bar)
  x_t = p.add_noise(x0, eps, t)
  x0, eps = np.asarray(x0, np.float64), np.asarray(eps, np.float64)
  np.testing.assert_allclose(x_t, a * x0 + s * eps, rtol=1e-5, atol=1e-6)
  closed = {'eps': eps, 'x0': x0, 'v': a * eps - s * x0}[parameterization]
  np.testing.assert_allclose(p.target(x0, eps, t), closed, rtol=1e-5, atol=1e-6)
  # The target is what converts back to the true (x0, eps); from_x0 inverts the conversion.
  x0_hat, eps_hat = p.to_x0_eps(p.target(x0, eps, t), x_t, t)
  # eps -> x0 divides by alpha (tiny at t = T-1), x0 -> eps by sigma (tiny at t = 0): float32
  # rounding of x_t grows by those factors; v needs neither division.
  round_off = 1e-6 * (np.abs(x0) + np.abs(eps) + 1)
  np.testing.assert_array_less(np.abs(x0_hat - x0), round_off / a)
  np.testing.assert_array_less(np.abs(eps_hat - eps), round_off / s)
  np.testing.assert_array_less(np.abs(p.from_x0(x0, x_t, t) - closed),
                               round_off * (1 + (1 / s if parameterization != 'x0' else 0)))


@pytest.mark.parametrize('parameterization', diffusion.PARAMETERIZATIONS)
def test_min_snr_weighting_is_min_snr_times_x0_error(parameterization):
  gamma = 5.0
  p = diffusion.Process(schedule='linear', parameterization=parameterization,
                        loss_weighting='min_snr', min_snr_gamma=gamma)
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  x0, eps = jax.random.normal(k1, (5, 3, 3, 1)), jax.random.normal(k2, (5, 3, 3, 1))
  t = jnp.array([5, 50, 200, 600, 990])
  x_t = p.add_noise(x0, eps, t)
  out = p.target(x0, eps, t) + 0.1 * jax.random.normal(k3, x0.shape)  # an imperfect network
  x0_hat, _ = p.to_x0_eps(out, x_t, t)
  snr = p.snr(t)
  want = jnp.minimum(snr, gamma) * jnp.mean(jnp.square(x0_hat - x0), axis=(1, 2, 3))
  np.testing.assert_allclose(p.loss(out, x0, eps, t), want, rtol=2e-3)
  uniform = diffusion.Process(schedule='linear', parameterization=parameterization)
  np.testing.assert_allclose(uniform.loss(out, x0, eps, t),
                             jnp.mean(jnp.square(out - p.target(x0, eps, t)), axis=(1, 2, 3)),
                             rtol=1e-5)


# --- samplers on a Gaussian target ------------------------------------------------------------

MU_C, MU_U, S = 0.5, -0.25, 0.5  # class 0 ~ N(MU_C, S^2); the "no label" model ~ N(MU_U, S^2)
N_SAMPLES = (4000, 4)


def ideal_model(process: diffusion.Process):
  """The exact network for Gaussian data, in the process's parameterisation:
  E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + sigma^2) (x_t - a mu)."""
  def model_fn(x_t, t_B, labels_B):
    a, sigma = (c[:, None] for c in process.coefficients(t_B))
    mu = MU_C if labels_B is None else jnp.where(labels_B == 0, MU_C, MU_U)[:, None]
    x0 = mu + a * S ** 2 / (a ** 2 * S ** 2 + sigma ** 2) * (x_t - a * mu)
    return process.from_x0(x0, x_t, t_B)
  return model_fn


# (sampler, eta, steps): enough steps that the discretisation bias of each is a few % of s^2
# at most (it shrinks like 1/steps for the first-order samplers, faster for dpm2m).
SAMPLER_CASES = [('ddpm', 0.0, 500), ('ddim', 0.0, 250), ('ddim', 1.0, 500), ('dpm2m', 0.0, 100)]


@pytest.mark.parametrize('sampler, eta, steps', SAMPLER_CASES)
@pytest.mark.parametrize('guidance', [1.0, 3.0])
def test_samplers_reproduce_a_gaussian(sampler, eta, steps, guidance):
  process = diffusion.Process(schedule='cosine', parameterization='v')
  labels = jnp.zeros((N_SAMPLES[0],), jnp.int32)
  run = jax.jit(lambda key: diffusion.sample(
      ideal_model(process), process, N_SAMPLES, key, sampler=sampler, steps=steps, eta=eta,
      labels_B=labels, null_label=1, guidance_scale=guidance))
  x = np.asarray(run(jax.random.key(0)), np.float64)
  n = x.size
  want_mean = MU_U + guidance * (MU_C - MU_U)
  mean_se, var_se = S / math.sqrt(n), S ** 2 * math.sqrt(2 / n)
  assert abs(x.mean() - want_mean) < 5 * mean_se + 0.002, (x.mean(), want_mean)
  assert abs(x.var() - S ** 2) < 5 * var_se + 0.02 * S ** 2, (x.var(), S ** 2)


def test_sampler_error_shrinks_with_steps():
  """Few steps are visibly off and more steps converge: the check above is not vacuous."""
  process = diffusion.Process(schedule='linear', parameterization='eps')
  errors = {}
  for sampler, steps in (('ddim', 10), ('ddim', 250), ('dpm2m', 10), ('dpm2m', 100)):
    x = diffusion.sample(ideal_model(process), process, N_SAMPLES, jax.random.key(1),
                         sampler=sampler, steps=steps)
    errors[sampler, steps] = abs(float(jnp.var(x)) - S ** 2)
  assert errors['ddim', 10] > 0.3 * S ** 2 and errors['ddim', 250] < 0.06 * S ** 2
  assert errors['dpm2m', 10] > 0.3 * S ** 2 and errors['dpm2m', 100] < 0.06 * S ** 2


def test_ddpm_is_ddim_with_eta_one():
  process = diffusion.Process(schedule='linear', parameterization='eps')
  draw = {s: diffusion.sample(ideal_model(process), process, (64, 3), jax.random.key(2),
                              sampler=s, steps=20, eta=1.0) for s in ('ddpm', 'ddim')}
  np.testing.assert_allclose(draw['ddpm'], draw['ddim'], rtol=1e-4, atol=1e-4)


# --- the U-Net ----------------------------------------------------------------------------


def small_model_config(**overrides) -> ml_collections.ConfigDict:
  """Widths that split 8 ways (tensor = 8 shards channels and heads)."""
  m = diffusion_config.base().model
  m.update(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
           head_dim=4, dropout=0.0, norm_groups=8)
  m.update(overrides)
  return m


def perturbed_unet(cfg: unet.UNetConfig) -> unet.UNet:
  """A U-Net whose zero-initialised output layers are made non-zero, so every input counts."""
  with nnx.use_eager_sharding(False):
    model = unet.UNet(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def test_unet_shapes_and_conditioning():
  cfg = unet.UNetConfig.from_config(small_model_config(attention_resolutions=(8, 4)),
                                    image_size=8, channels=3, num_classes=10)
  graphdef, params = nnx.split(perturbed_unet(cfg))
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  t, labels = jnp.array([0, 10, 500, 999]), jnp.array([0, 1, 2, 3])
  # Every variant in one batch, one compile: the batch split back into its variants.
  variants = [(x, t, labels), (x, t, labels + 1), (x, t + 1, labels),
              (x[::-1], t[::-1], labels[::-1]), (x, t, jnp.full((4,), 10))]
  xs, ts, ls = (jnp.concatenate(parts) for parts in zip(*variants, strict=True))
  fwd = jax.jit(lambda params, x, t, labels: nnx.merge(graphdef, params)(x, t, labels))
  out, other_label, other_time, swapped, null = jnp.split(fwd(params, xs, ts, ls), 5)
  assert out.shape == x.shape and out.dtype == jnp.float32
  # The label and the time step each change the output ...
  assert not np.allclose(other_label, out, atol=1e-4)
  assert not np.allclose(other_time, out, atol=1e-4)
  # ... per example: GroupNorm and attention never mix the batch.
  np.testing.assert_allclose(swapped[::-1], out, rtol=1e-4, atol=1e-5)
  # No label (None) is the extra "null" row, the one label dropout trains.
  np.testing.assert_allclose(fwd(params, x, t, None), null, rtol=1e-4, atol=1e-5)


def test_unet_dropout_and_zero_init():
  cfg = unet.UNetConfig.from_config(
      small_model_config(dropout=0.5, channel_mult=(1,), attention_resolutions=()),
      image_size=8, channels=1, num_classes=0)
  with nnx.use_eager_sharding(False):
    fresh = unet.UNet(cfg, rngs=nnx.Rngs(0))
  x, t = jnp.ones((2, 8, 8, 1)), jnp.array([3, 7])
  graphdef, params = nnx.split(perturbed_unet(cfg))
  fwd = jax.jit(lambda params, key: nnx.merge(graphdef, params)(x, t, dropout_key=key))
  # ADM zero-initialises the last conv: a fresh network predicts exactly zero.
  np.testing.assert_array_equal(fwd(nnx.state(fresh), None), 0.0)
  base = fwd(params, None)
  np.testing.assert_array_equal(fwd(params, None), base)  # deterministic without a key
  assert not np.allclose(fwd(params, jax.random.key(0)), base, atol=1e-4)


def test_every_parameter_has_logical_axes():
  cfg = unet.UNetConfig.from_config(small_model_config(), image_size=8, channels=1,
                                    num_classes=10)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: unet.UNet(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
  shapes = nnx.to_pure_dict(params)
  rules = dict(unet.LOGICAL_AXIS_RULES)
  flat_specs = jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(flat_specs) == len(jax.tree.leaves(shapes)) > 50
  for (path, spec), x in zip(flat_specs, jax.tree.leaves(shapes), strict=True):
    assert len(spec) == x.ndim, jax.tree_util.keystr(path)
    assert all(name is None or name in rules for name in spec), (jax.tree_util.keystr(path), spec)
    assert any(name is not None for name in spec), jax.tree_util.keystr(path)


# --- DiffusionTask on the trainer ---------------------------------------------------------------


def small_config(**overrides) -> ml_collections.ConfigDict:
  """Digits on a one-level U-Net (every kind of parameter, little to compile); fp32 so meshes
  agree tightly; no sample-based evaluation."""
  c = diffusion_config.get_config('digits')
  c.unlock()
  c.update(steps=3, batch_size=8, log_every=1, eval_every=0, eval_steps=0)
  c.checkpoint.update(every=1000, async_save=False)
  c.model = small_model_config(dropout=0.1, channel_mult=(1,), attention_resolutions=(8,),
                               head_dim=2)
  # Adam's eps well above the rounding noise of gradients that nearly cancel (class
  # embedding rows of rare labels): at 1e-8, Adam turns that noise into steps of about
  # +-lr, and the same run on two meshes then ends 1e-3 apart in those weights.
  c.optimizer.update(warmup_steps=1, decay_steps=20, eps=1e-4)
  c.update_from_flattened_dict(overrides)
  c.lock()
  return c


MESH = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}  # splits along all three axes


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """4 steps on a 2x2x2 mesh, checkpoints at 2 and 4: the run the resume and mesh tests
  compare against. (The GAN test splits convolutions 8 ways over fsdp and tensor; the LM
  test covers 8-way data and FSDP meshes of the same trainer.)"""
  workdir = tmp_path_factory.mktemp('straight')
  config = small_config(steps=4, **MESH, **{'checkpoint.every': 2})
  return workdir, trainer.train_and_evaluate(config, str(workdir)).losses


def test_resume_is_exact(straight, tmp_path):
  straight_dir, straight_losses = straight
  overrides = {**MESH, 'checkpoint.every': 2}
  first = trainer.train_and_evaluate(small_config(steps=2, **overrides), str(tmp_path))
  second = trainer.train_and_evaluate(small_config(steps=4, **overrides), str(tmp_path))
  assert sorted(first.losses) == [1, 2] and sorted(second.losses) == [3, 4]
  assert {**first.losses, **second.losses} == straight_losses  # bitwise
  final = restore(tmp_path, 4)
  assert int(final['step']) == 4
  assert_trees_equal(restore(straight_dir, 4), final)
  # The EMA is saved, and it is not the parameters.
  assert not np.array_equal(final['extras']['ema']['stem']['kernel'],
                            final['params']['stem']['kernel'])


def test_meshes_match_one_device_and_ema_recurrence(straight):
  straight_dir, straight_losses = straight
  steps = 4
  config = small_config(steps=steps)
  # One device, without the trainer: the same seed's init and the same batches.
  task = DiffusionTask(config)
  data = images.build_image_data(config.data, seed=config.seed, global_batch_size=8,
                                 eval_steps=0, process_index=0, process_count=1)
  state = jax.jit(task.init_state)(jax.random.key(config.seed))
  step_fn = jax.jit(lambda s, b: task.train_step(s, b, {}))
  single, grad_norms, ema = {}, {}, state.extras['ema']
  for step in range(1, steps + 1):
    state, metrics = step_fn(state, next(data.train))
    single[step], grad_norms[step] = float(metrics['loss']), float(metrics['grad_norm'])
    decay = min(config.ema.decay, step / (9.0 + step))  # (1 + s) / (10 + s) at s = step - 1
    ema = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * p, ema, state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               state.extras['ema'], ema)

  assert sorted(straight_losses) == sorted(single)
  for step in single:
    np.testing.assert_allclose(straight_losses[step], single[step], rtol=1e-4, err_msg=str(step))
  # Adam barely reacts to a gradient scaled by an axis size, so the losses alone would let a
  # sum instead of a mean over fsdp or tensor through; the gradient norms would not (2 to 8
  # times off). Largest differences measured against one device (2026-12-01): 3.3e-7
  # relative in grad_norm (tolerance 6x that); 2.3e-5 absolute in the weights after 4 steps
  # at lr 1e-3, where Adam divides a gradient that nearly cancels, and so is summed in
  # another order on each mesh, by its own size (tolerance 4x that, a tenth of one step).
  logged = scalars(straight_dir, 'train/grad_norm')
  assert sorted(logged) == sorted(grad_norms)
  for step, want in grad_norms.items():
    np.testing.assert_allclose(logged[step], want, rtol=2e-6, err_msg=str(step))
  saved = restore(straight_dir, steps)
  for key, got, want in (('params', saved['params'], state.params),
                         ('ema', saved['extras']['ema'], state.extras['ema'])):
    got, want = flat(got), flat(want)
    assert sorted(got) == sorted(want), key
    for name, x in want.items():
      np.testing.assert_allclose(got[name], x, rtol=0, atol=1e-4, err_msg=f'{key} {name}')



def test_generate_and_grid():
  config = small_config(**{'sample.steps': 3, 'sample.batch_size': 6, 'sample.grid_rows': 4})
  task = DiffusionTask(config)
  state = jax.jit(task.init_state)(jax.random.key(0))
  # A fresh U-Net's output layer is zero (ADM's init), so its samples would not depend on
  # the network at all: random non-zero weights make every input of it count.
  fresh = state.extras['ema']
  leaves, treedef = jax.tree.flatten(fresh)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                              for x, k in zip(leaves, keys, strict=True)])
  state = state.replace(extras={'ema': params})
  grid = task.samples(state, config.seed)['samples/grid']
  # 4 x 4 images of 8 x 8 on a 1-pixel lattice, in batches of 6 (the last one padded).
  assert grid.dtype == np.uint8 and grid.shape == (4 * 9 + 1, 4 * 9 + 1, 1)
  assert grid.std() > 0
  labels = np.arange(10, dtype=np.int32) % 10
  x = task.generate(params, labels, seed=3)
  assert x.shape == (10, 8, 8, 1) and np.all(np.abs(x) <= 1.0)
  # The same call gives the same images: they depend only on the seed, labels and network.
  np.testing.assert_array_equal(task.generate(params, labels, seed=3), x)

  def differ(a, b):  # image by image
    return [not np.allclose(p, q, atol=1e-3) for p, q in zip(a, b, strict=True)]

  # Each of them depends on the network, on its own label, and on the guidance scale (the
  # same noise: the seed and the batching are the same).
  assert all(differ(task.generate(fresh, labels, seed=3), x))
  assert all(differ(task.generate(params, (labels + 1) % 10, seed=3), x))
  assert config.sample.guidance_scale != 1.0
  unguided = DiffusionTask(small_config(**{'sample.steps': 3, 'sample.batch_size': 6,
                                           'sample.guidance_scale': 1.0}))
  assert all(differ(unguided.generate(params, labels, seed=3), x))


@pytest.mark.parametrize('overrides, message', [
    ({'diffusion.schedule': 'quadratic'}, r"diffusion.schedule='quadratic' is not allowed"),
    ({'diffusion.parameterization': 'score'}, r"diffusion.parameterization='score' is not"),
    ({'sample.sampler': 'euler'}, r"sample.sampler='euler' is not allowed; choose one of ddpm"),
    ({'sample.steps': 2000}, r'sample.steps=2000 must be at most diffusion.timesteps=1000'),
    ({'diffusion.label_dropout': 0.0},
     r'sample.guidance_scale=1.5 needs .*diffusion.label_dropout > 0'),
    ({'ema.decay': 1.0}, r'ema.decay=1.0 must be in \[0, 1\)'),
    ({'model.attention_resolutions': (3,)}, r'model.attention_resolutions=\(3,\) must be among'),
    ({'model.channel_mult': (1, 2, 2, 2, 2)}, r'model.channel_mult=.* image size 8 must divide'),
    ({'model.norm_groups': 6}, r'model.norm_groups=6 must divide every level width'),
    ({'data.channels': 2}, r'data.channels=2 is not allowed'),
])
def test_bad_configs_raise_config_errors(tmp_path, overrides, message):
  config = small_config(**overrides)
  with pytest.raises(ConfigError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_clipped_predictions_stay_in_the_data_range():
  process = diffusion.Process(schedule='cosine', parameterization='eps')
  far = lambda x, t, labels: process.from_x0(jnp.full_like(x, 3.0), x, t)  # noqa: E731
  for sampler in diffusion.SAMPLERS:
    x = diffusion.sample(far, process, (16, 3), jax.random.key(0), sampler=sampler, steps=5)
    np.testing.assert_allclose(x, 3.0, rtol=1e-3)
    x = diffusion.sample(far, process, (16, 3), jax.random.key(0), sampler=sampler, steps=5,
                         clip_x0=(-1.0, 1.0))
    np.testing.assert_allclose(x, 1.0, rtol=1e-3)
