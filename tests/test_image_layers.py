"""The image models' flax layers against float64 numpy references of the same parameters.

Oracles: a numpy ResBlock, self-attention block and generator, written from the
definitions (SAME convolution, two-pass GroupNorm, softmax attention, sub-pixel
convolution, pixel norm), fed the parameters of the flax modules; the logical
axis names the models' docstrings promise, leaf by leaf; and the initialisers'
laws (U(+-1/sqrt(fan_in)), exact zeros, the ADM output layers).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import gan, unet

# --- numpy references ---------------------------------------------------------------------


def np_conv(x_BxHxWxI, k_HxWxIxO, stride=1):
  """'SAME' convolution as XLA pads it: out = ceil(in / stride), the odd pixel after."""
  kh, kw = k_HxWxIxO.shape[:2]
  h, w = x_BxHxWxI.shape[1:3]
  out_h, out_w = -(-h // stride), -(-w // stride)
  pad_h, pad_w = max((out_h - 1) * stride + kh - h, 0), max((out_w - 1) * stride + kw - w, 0)
  x = np.pad(x_BxHxWxI, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                         (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
  windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
  windows = windows[:, ::stride, ::stride][:, :out_h, :out_w]  # [B, H', W', I, kh, kw]
  return np.einsum('bhwiyx,yxio->bhwo', windows, k_HxWxIxO)


def np_group_norm(x_BxHxWxF, scale, bias, groups, eps=1e-5):
  b, h, w, f = x_BxHxWxF.shape
  x = x_BxHxWxF.reshape(b, h, w, groups, f // groups)
  mean = x.mean(axis=(1, 2, 4), keepdims=True)
  var = ((x - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((x - mean) / np.sqrt(var + eps)).reshape(b, h, w, f) * scale + bias


def silu(x):
  return x / (1.0 + np.exp(-x))


def params64(module) -> dict:
  return jax.tree.map(lambda v: np.asarray(v, np.float64),
                      nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def perturbed(module, scale=0.1):
  """The module with every parameter moved off its init (zero layers included)."""
  graphdef, state = nnx.split(module)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def unet_cfg(**kw) -> unet.UNetConfig:
  base = dict(image_size=8, channels=3, num_classes=4, base_channels=8, channel_mult=(1, 2),
              num_res_blocks=1, attention_resolutions=(4,), head_dim=4, norm_groups=4)
  return unet.UNetConfig(**{**base, **kw})


def np_res_block(p, x, emb, groups, dropout_keep=None, rate=0.0):
  h = np_conv(silu(np_group_norm(x, p['norm1']['scale'], p['norm1']['bias'], groups)),
              p['conv1']['kernel']) + p['conv1']['bias']
  h = h + (silu(emb) @ p['emb']['kernel'] + p['emb']['bias'])[:, None, None, :]
  h = silu(np_group_norm(h, p['norm2']['scale'], p['norm2']['bias'], groups))
  if dropout_keep is not None:
    h = np.where(dropout_keep, h / (1.0 - rate), 0.0)
  h = np_conv(h, p['conv2']['kernel']) + p['conv2']['bias']
  skip = x if 'skip' not in p else np_conv(x, p['skip']['kernel']) + p['skip']['bias']
  return skip + h


# --- U-Net layers -------------------------------------------------------------------------


@pytest.mark.parametrize('f_in', [8, 12])  # 12 -> 8: a 1x1 convolution on the skip path
def test_res_block_matches_numpy(f_in):
  cfg = unet_cfg(dropout=0.3)
  with nnx.use_eager_sharding(False):
    block = perturbed(unet.ResBlock(f_in, 8, cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  x, emb = rng.normal(size=(2, 5, 6, f_in)), rng.normal(size=(2, cfg.embed_dim))
  p = params64(block)
  got = block(jnp.asarray(x, jnp.float32), jnp.asarray(emb, jnp.float32), None)
  np.testing.assert_allclose(got, np_res_block(p, x, emb, 4), rtol=1e-4, atol=1e-4)

  # Training: the mask is a Bernoulli(1 - rate) draw of the block's key, as before the
  # layers were flax's, so a run's dropout depends on its step key alone.
  key = jax.random.key(3)
  keep = np.asarray(jax.random.bernoulli(key, 1.0 - 0.3, (2, 5, 6, 8)))
  got = block(jnp.asarray(x, jnp.float32), jnp.asarray(emb, jnp.float32), key)
  want = np_res_block(p, x, emb, 4, dropout_keep=keep, rate=0.3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_self_attention_matches_numpy():
  cfg = unet_cfg()
  with nnx.use_eager_sharding(False):
    attn = perturbed(unet.SelfAttention(8, cfg, rngs=nnx.Rngs(0)))
  x = np.random.default_rng(1).normal(size=(2, 3, 4, 8))
  p = params64(attn)
  h = np_group_norm(x, p['norm']['scale'], p['norm']['bias'], 4).reshape(2, 12, 8)
  q, k, v = np.einsum('blf,tfnd->tblnd', h, p['qkv']['kernel'])
  scores = np.einsum('blnd,bsnd->bnls', q, k) / np.sqrt(4)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum('bnls,bsnd->blnd', probs, v)
  want = x + (np.einsum('blnd,ndf->blf', out, p['out']['kernel'])
              + p['out']['bias']).reshape(x.shape)
  np.testing.assert_allclose(attn(jnp.asarray(x, jnp.float32)), want, rtol=1e-4, atol=1e-4)


def test_unet_parameters_carry_the_documented_axis_names():
  cfg = unet_cfg()
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: unet.UNet(cfg, rngs=nnx.Rngs(0)))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  flat = {jax.tree_util.keystr(path): tuple(spec) for path, spec in
          jax.tree_util.tree_leaves_with_path(
              specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
  conv = ('kernel', 'kernel', 'conv_in', 'channels')
  expected = {
      "['stem']['kernel']": ('kernel', 'kernel', 'image', 'channels'),
      "['stem']['bias']": ('channels',),
      "['out_conv']['kernel']": ('kernel', 'kernel', 'conv_in', 'image'),
      "['out_conv']['bias']": ('image',),
      "['out_norm']['scale']": ('norm',),
      "['time_mlp1']['kernel']": ('channels', 'embed'),
      "['time_mlp1']['bias']": ('embed',),
      "['time_mlp2']['kernel']": ('embed', 'embed'),
      "['class_embed']['embedding']": ('classes', 'embed'),
      "['downsample'][0]['kernel']": conv,
      "['mid1']['conv1']['kernel']": conv,
      "['mid1']['conv2']['bias']": ('channels',),
      "['mid1']['emb']['kernel']": ('embed', 'channels'),
      "['mid1']['norm2']['bias']": ('norm',),
      "['up'][0]['blocks'][0]['skip']['kernel']": conv,
      "['mid_attn']['qkv']['kernel']": (None, 'conv_in', 'heads', 'head_dim'),
      "['mid_attn']['out']['kernel']": ('heads', 'head_dim', 'channels'),
      "['mid_attn']['out']['bias']": ('channels',),
  }
  for path, names in expected.items():
    assert flat[path] == names, path
  # And every leaf has a name for each axis, from the rules table.
  shapes = {jax.tree_util.keystr(p): x.shape for p, x in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
  assert shapes.keys() == flat.keys()
  rules = dict(unet.LOGICAL_AXIS_RULES)
  for path, names in flat.items():
    assert len(names) == len(shapes[path]) and all(n is None or n in rules for n in names), path


def test_unet_initialisers():
  cfg = unet_cfg(base_channels=32, norm_groups=8, head_dim=8)
  with nnx.use_eager_sharding(False):
    model = unet.UNet(cfg, rngs=nnx.Rngs(0))
  p = params64(model)
  block = p['down'][1]['blocks'][0]  # 32 -> 64 channels
  for leaf, fan_in in ((block['conv1']['kernel'], 9 * 32), (block['conv1']['bias'], 9 * 32),
                       (block['skip']['kernel'], 32), (block['emb']['bias'], 128),
                       (p['time_mlp1']['kernel'], 32)):
    bound = 1 / np.sqrt(fan_in)  # U(-bound, bound): max near the bound, std bound / sqrt(3)
    assert bound * 0.9 < np.abs(leaf).max() <= bound
    if leaf.size > 1000:
      np.testing.assert_allclose(leaf.std(), bound / np.sqrt(3), rtol=0.05)
  np.testing.assert_allclose(p['class_embed']['embedding'].std(), 1.0, rtol=0.2)
  # Zero: each block's second conv and attention output (every block starts as the
  # identity) and the output conv; GroupNorm starts at scale 1, bias 0.
  for leaf in (block['conv2']['kernel'], block['conv2']['bias'], p['out_conv']['kernel'],
               p['mid_attn']['out']['kernel'], p['mid_attn']['out']['bias'],
               block['norm1']['bias']):
    np.testing.assert_array_equal(leaf, 0.0)
  np.testing.assert_array_equal(block['norm1']['scale'], 1.0)
  # The random layers take the model's key stream in the order they are built; norms and
  # zero layers draw nothing from it (so adding one moves no other layer's initial values).
  rngs = nnx.Rngs(0)
  draw = lambda shape, fan_in: np.asarray(jax.random.uniform(  # noqa: E731
      rngs.params(), shape, jnp.float32, -1 / np.sqrt(fan_in), 1 / np.sqrt(fan_in)))
  np.testing.assert_array_equal(p['time_mlp1']['kernel'], draw((32, 128), 32))
  np.testing.assert_array_equal(p['time_mlp1']['bias'], draw((128,), 32))
  draw((128, 128), 128), draw((128,), 128)  # time_mlp2
  np.testing.assert_array_equal(p['class_embed']['embedding'],
                                jax.random.normal(rngs.params(), (5, 128)))
  draw((3, 3, 3, 32), 27), draw((32,), 27)  # stem
  first = p['down'][0]['blocks'][0]  # norm1, conv1, emb, norm2, conv2 (zero): two draws
  np.testing.assert_array_equal(first['conv1']['kernel'], draw((3, 3, 32, 32), 288))
  draw((32,), 288), draw((128, 32), 128), draw((32,), 128)
  np.testing.assert_array_equal(p['downsample'][0]['kernel'], draw((3, 3, 32, 32), 288))


# --- GAN generator ------------------------------------------------------------------------


def np_generator(g: gan.Generator, z, labels):
  p = params64(g)
  cfg = g.cfg
  pixel_norm = lambda x: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-8)  # noqa: E731
  h = np.concatenate([z, p['embed']['embedding'][labels]], axis=-1)
  x = np.einsum('bz,zhwc->bhwc', h, p['dense']['kernel']) + p['dense_bias']
  x = np.maximum(pixel_norm(x), 0)
  for i in range(len(cfg.g_channels) - 1):
    y = np_conv(x, p[f'up{i}']['kernel'])
    b, hh, ww, c4 = y.shape
    # Channel 4o + 2p + q is pixel (2h + p, 2w + q), channel o.
    up = np.zeros((b, 2 * hh, 2 * ww, c4 // 4))
    for o in range(c4 // 4):
      for dy in range(2):
        for dx in range(2):
          up[:, dy::2, dx::2, o] = y[..., 4 * o + 2 * dy + dx]
    x = np.maximum(pixel_norm(up + p[f'up{i}_bias']), 0)
  return np.tanh(np_conv(x, p['out']['kernel']) + p['out']['bias'])


def test_generator_matches_numpy():
  cfg = gan.GANConfig(image_size=8, channels=3, num_classes=5, latent_dim=6,
                      g_channels=(8, 4, 4), d_channels=(4,))
  with nnx.use_eager_sharding(False):
    g = perturbed(gan.Generator(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(2)
  z, labels = rng.normal(size=(3, 6)), np.array([0, 4, 2])
  got = g(jnp.asarray(z, jnp.float32), jnp.asarray(labels))
  np.testing.assert_allclose(got, np_generator(g, z, labels), rtol=1e-4, atol=1e-5)


def test_gan_parameters_carry_the_documented_axis_names():
  cfg = gan.GANConfig(image_size=8, channels=3, num_classes=5, latent_dim=6,
                      g_channels=(8, 4), d_channels=(4, 8))
  with nnx.use_eager_sharding(False):
    g = nnx.eval_shape(lambda: gan.Generator(cfg, rngs=nnx.Rngs(0)))
    d = nnx.eval_shape(lambda: gan.Discriminator(cfg, rngs=nnx.Rngs(0)))

  def flat(state):
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    return {jax.tree_util.keystr(p): tuple(s) for p, s in jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}

  conv = ('height', 'width', 'conv_in', 'conv_out')
  assert flat(nnx.state(g, nnx.Param)) == {
      "['embed']['embedding']": ('classes', 'latent'),
      "['dense']['kernel']": ('latent', 'height', 'width', 'conv_out'),
      "['dense_bias']": ('conv_out',),
      "['up0']['kernel']": conv,
      "['up0_bias']": ('conv_out',),
      "['out']['kernel']": ('height', 'width', 'conv_in', 'image_channels'),
      "['out']['bias']": ('image_channels',),
  }
  read = ('height', 'width', 'conv_in', 'classes')
  assert flat(nnx.state(d, nnx.Param)) == {
      "['conv0']['layer']['kernel']": ('height', 'width', 'image_channels', 'conv_out'),
      "['conv0']['layer']['bias']": ('conv_out',),
      "['conv1']['layer']['kernel']": conv,
      "['conv1']['layer']['bias']": ('conv_out',),
      "['read']['layer']['kernel']": read,
      "['read']['layer']['bias']": ('classes',),
      "['project']['layer']['kernel']": read,
  }
  assert flat(nnx.state(d, gan.SpectralState)) == {
      "['conv0']['u']": ('conv_out',), "['conv1']['u']": ('conv_out',),
      "['read']['u']": ('classes',), "['project']['u']": ('classes',)}


def test_spectral_norm_leaves_the_trained_kernel_in_place():
  """Each call normalises a copy: the Param keeps the trained kernel, only `u` moves."""
  with nnx.use_eager_sharding(False):
    rngs = nnx.Rngs(0)
    layer = gan.SpectralNorm(nnx.Conv(2, 3, (3, 3), rngs=rngs), enabled=True,
                             power_iterations=1, rngs=rngs)
  kernel, u = np.asarray(layer.layer.kernel[...]), np.asarray(layer.u[...])
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 4, 4, 2)), jnp.float32)
  first = layer(x, update=False)
  np.testing.assert_array_equal(layer(x, update=False), first)
  np.testing.assert_array_equal(layer.u[...], u)
  layer(x, update=True)
  layer(x, update=True)
  np.testing.assert_array_equal(layer.layer.kernel[...], kernel)
  assert not np.array_equal(layer.u[...], u)
  # The output is the plain convolution with kernel / sigma, sigma from the stored vector.
  sigma, _, _ = gan.power_iteration(jnp.asarray(kernel).reshape(-1, 3), jnp.asarray(u), 1)
  want = np_conv(np.asarray(x, np.float64), kernel / float(sigma)) + np.asarray(
      layer.layer.bias[...])
  np.testing.assert_allclose(first, want, rtol=1e-5, atol=1e-5)
