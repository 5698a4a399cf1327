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
from model import vae


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
  # No middle attention: it starts as the identity, and compiling gradients through it
  # would double this test's time.
  cfg = vae.VAEConfig.from_config(model_config(mid_attention=False), image_size=8, channels=1)
  model = build(cfg)
  z = cfg.latent_channels
  # The log-variance half of the encoder's last (1x1) convolution: kernel 0, bias far below
  # the clip, so logvar = -30 for every input (std 3e-7; the clip passes no gradient).
  kernel, bias = model.encoder.moments.kernel, model.encoder.moments.bias
  kernel[...] = kernel[...].at[..., z:].set(0.0)
  bias[...] = bias[...].at[z:].set(-1e4)
  graphdef, params = nnx.split(model, nnx.Param)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), jnp.float32, -1.0, 1.0)
  key = jax.random.key(2)

  def vae_loss(params, kl_weight=0.0):
    recon, mean, logvar = nnx.merge(graphdef, params)(x, key=key)
    rec = jnp.mean(vae.reconstruction_loss('l2', recon, x))
    return rec + kl_weight * jnp.mean(vae.kl_divergence(mean, logvar)) / x[0].size

  def ae_loss(params):
    m = nnx.merge(graphdef, params)
    return jnp.mean(jnp.mean(jnp.square(m.decode(m.encode(x)[0]) - x), axis=(1, 2, 3)))

  @jax.jit
  def both(params):  # one compile: the two losses and their gradients
    return jax.value_and_grad(vae_loss)(params), jax.value_and_grad(ae_loss)(params)

  (loss, grads), (ae, ae_grads) = both(params)
  np.testing.assert_allclose(loss, ae, rtol=1e-5)
  flat, ae_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(ae_grads))
  for path, g in flat:
    np.testing.assert_allclose(g[...], ae_flat[path][...], rtol=1e-3, atol=1e-6,
                               err_msg=str(path))
  moments = nnx.to_pure_dict(grads)['encoder']['moments']
  np.testing.assert_array_equal(moments['kernel'][..., z:], 0.0)
  np.testing.assert_array_equal(moments['bias'][z:], 0.0)

  # The oracle can fail: with the KL weighted, or with the encoder's own variance, the
  # VAE's loss is not the autoencoder's.
  _, fresh = nnx.split(build(cfg), nnx.Param)
  weighted, fresh_vae, fresh_ae = jax.jit(
      lambda p, q: (vae_loss(p, 1.0), vae_loss(q), ae_loss(q)))(params, fresh)
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
