"""Convolutional VAE with a KL-regularised latent: the autoencoder of latent diffusion.

Shape letters: B batch, H/W image height/width, C image channels, F feature channels,
h/w latent height/width (H / factor), Z latent channels.

The shape of latent diffusion's KL autoencoder (Rombach et al. 2022), which Stable
Diffusion's f=8 VAE also has:

  encoder: conv 3x3 C -> F0 -> per level: num_res_blocks ResBlocks, then a stride-2 conv
    (not after the last level) -> middle ResBlock, [self-attention], ResBlock ->
    GroupNorm, SiLU, conv 3x3 to 2 Z -> 1x1 conv (LDM's quant_conv) = [mean | logvar]
  decoder: 1x1 conv Z -> Z (post_quant_conv) -> conv 3x3 to F_last -> middle ResBlock,
    [self-attention], ResBlock -> per level from the last: num_res_blocks + 1 ResBlocks,
    then nearest-neighbour 2x upsampling + conv 3x3 (not after the first level) ->
    GroupNorm, SiLU, conv 3x3 to C.

The downsampling factor is 2 ** (len(channel_mult) - 1). ResBlocks are the U-Net's without
the time embedding (norm, SiLU, conv, norm, SiLU, conv, plus a 1x1 conv on the skip when the
width changes); the convolutions, norms and self-attention are model/unet.py's, so the
parameters carry the same logical axis names and `LOGICAL_AXIS_RULES` is the U-Net's.

Every block's input and output is pinned to the batch sharding (model/gan.py's
`constrain_batch`): left to choose, XLA's SPMD partitioner gave convolution gradients that
differed from one device's by the size of an Adam step on a 2x2x2 (data, fsdp, tensor) mesh,
as it did for the GAN's stride-2 convolutions (tests/test_vae.py's mesh test found it).
That includes the blocks inside `Middle`: with only the middle's ends pinned, the parameter
gradients from the second ResBlock's first GroupNorm back to the encoder's first layer were
wrong (max errors the size of the gradients themselves) on 2x2x2 only; data=8, fsdp=8,
(1, 4, 2), (4, 1, 2) and (2, 2, 1) meshes matched one device to 3e-6 (jax 0.10.2, CPU).

The encoder's log-variance is clipped to [-30, 20] as LDM's DiagonalGaussianDistribution
clips it: exp(logvar) stays finite in float32 and the KL's gradient bounded. Outside that
range the clip passes no gradient.

Unlike ADM's U-Net, the convolutions do not start at zero (LDM initialises them with
PyTorch's default, as `unet.conv` does): a decoder whose output layer starts at zero would
pass no gradient to the encoder at the first step. Only the middle self-attention's output
projection starts at zero (unet.SelfAttention), so that block starts as the identity.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from model import unet
from model.gan import constrain_batch

LOGICAL_AXIS_RULES = unet.LOGICAL_AXIS_RULES
LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clip of the encoder's log-variance
RECON_LOSSES = ('l1', 'l2')


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  image_size: int
  channels: int  # image channels C
  base_channels: int = 64
  channel_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  latent_channels: int = 4
  norm_groups: int = 32
  mid_attention: bool = True
  head_dim: int = 64
  dtype: jnp.dtype = jnp.dtype('float32')
  param_dtype: jnp.dtype = jnp.dtype('float32')
  attention: str = 'xla'

  @classmethod
  def from_config(cls, model_cfg: ml_collections.ConfigDict, *, image_size: int,
                  channels: int) -> 'VAEConfig':
    """From `config.model` (configs/vae.py) and the data's shape.

    Raises:
      ValueError: naming the `model.*` key that is wrong and what it may be.
    """
    m = model_cfg
    for key in ('base_channels', 'num_res_blocks', 'latent_channels', 'head_dim',
                'norm_groups'):
      if int(m[key]) <= 0:
        raise ValueError(f'model.{key}={m[key]!r} must be a positive integer.')
    mult = tuple(int(x) for x in m.channel_mult)
    if not mult or min(mult) <= 0:
      raise ValueError(f'model.channel_mult={m.channel_mult!r} must be a non-empty tuple of '
                       'positive integers, e.g. (1, 2, 4, 4).')
    factor = 2 ** (len(mult) - 1)
    if image_size % factor:
      raise ValueError(
          f'model.channel_mult={mult!r} has {len(mult)} levels, a downsampling factor of '
          f'{factor}; data.image_size={image_size} must divide by it.')
    widths = sorted({int(m.base_channels) * k for k in mult})
    for width in widths:
      if width % min(int(m.norm_groups), width):
        raise ValueError(f'model.norm_groups={m.norm_groups} must divide every level width '
                         f'(model.base_channels * model.channel_mult = {widths}).')
    mid = int(m.base_channels) * mult[-1]
    if m.mid_attention and mid % int(m.head_dim):
      raise ValueError(f'model.head_dim={m.head_dim} must divide the middle width {mid} '
                       '(model.base_channels * model.channel_mult[-1]) when '
                       'model.mid_attention is set.')
    unet.check_compute_keys(m)
    return cls(image_size=image_size, channels=channels, base_channels=int(m.base_channels),
               channel_mult=mult, num_res_blocks=int(m.num_res_blocks),
               latent_channels=int(m.latent_channels), norm_groups=int(m.norm_groups),
               mid_attention=bool(m.mid_attention), head_dim=int(m.head_dim),
               dtype=unet.DTYPES[m.dtype], param_dtype=unet.DTYPES[m.param_dtype],
               attention=m.attention)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.channel_mult) - 1)

  @property
  def latent_size(self) -> int:
    return self.image_size // self.downsample_factor

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """(h, w, Z) of one image's latent."""
    return (self.latent_size, self.latent_size, self.latent_channels)


# --- layers --------------------------------------------------------------------------------


class ResBlock(nnx.Module):
  """The U-Net's ResBlock without the time embedding and dropout: x + conv(SiLU(norm(
  conv(SiLU(norm(x)))))), with a 1x1 conv on the skip path when the width changes."""

  def __init__(self, f_in: int, f_out: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.norm1 = unet.group_norm(f_in, cfg)
    self.conv1 = unet.conv(f_in, f_out, cfg, rngs=rngs)
    self.norm2 = unet.group_norm(f_out, cfg)
    self.conv2 = unet.conv(f_out, f_out, cfg, rngs=rngs)
    self.skip = unet.conv(f_in, f_out, cfg, rngs=rngs, k=1) if f_in != f_out else None

  def __call__(self, x_BxHxWxF: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x_BxHxWxF)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = x_BxHxWxF if self.skip is None else self.skip(x_BxHxWxF)
    return skip + h


class Middle(nnx.Module):
  """ResBlock, optional self-attention, ResBlock at the lowest resolution."""

  def __init__(self, f: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.block1 = ResBlock(f, f, cfg, rngs=rngs)
    self.attn = unet.SelfAttention(f, cfg, rngs=rngs) if cfg.mid_attention else None
    self.block2 = ResBlock(f, f, cfg, rngs=rngs)

  def __call__(self, x_BxHxWxF: jax.Array) -> jax.Array:
    h = constrain_batch(self.block1(x_BxHxWxF))
    if self.attn is not None:
      h = constrain_batch(self.attn(h))
    return self.block2(h)


class Encoder(nnx.Module):
  """x_BxHxWxC -> moments_Bxhxwx2Z (mean | logvar, before the clip)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    ch, z = cfg.base_channels, cfg.latent_channels
    self.stem = unet.conv(cfg.channels, ch, cfg, rngs=rngs, names=('image', 'channels'))
    levels, downsample, f = [], [], ch
    for i, mult in enumerate(cfg.channel_mult):
      blocks = []
      for _ in range(cfg.num_res_blocks):
        blocks.append(ResBlock(f, ch * mult, cfg, rngs=rngs))
        f = ch * mult
      levels.append(nnx.List(blocks))
      if i < len(cfg.channel_mult) - 1:
        downsample.append(unet.conv(f, f, cfg, rngs=rngs, stride=2))
    self.levels, self.downsample = nnx.List(levels), nnx.List(downsample)
    self.mid = Middle(f, cfg, rngs=rngs)
    self.out_norm = unet.group_norm(f, cfg)
    self.out_conv = unet.conv(f, 2 * z, cfg, rngs=rngs, names=('conv_in', 'image'))
    # LDM's quant_conv: the moments' own 1x1 mixing. Its output half [Z:] is the log-variance.
    self.moments = unet.conv(2 * z, 2 * z, cfg, rngs=rngs, k=1, names=('image', 'image'))

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    h = constrain_batch(self.stem(constrain_batch(x_BxHxWxC.astype(self.stem.dtype))))
    for i, blocks in enumerate(self.levels):
      for block in blocks:
        h = constrain_batch(block(h))
      if i < len(self.downsample):
        h = constrain_batch(self.downsample[i](h))
    h = self.out_conv(jax.nn.silu(self.out_norm(constrain_batch(self.mid(h)))))
    return constrain_batch(self.moments(constrain_batch(h)))


class Decoder(nnx.Module):
  """z_BxhxwxZ -> x_BxHxWxC (not clipped)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    ch, z = cfg.base_channels, cfg.latent_channels
    f = ch * cfg.channel_mult[-1]
    self.latent_in = unet.conv(z, z, cfg, rngs=rngs, k=1, names=('image', 'image'))
    self.stem = unet.conv(z, f, cfg, rngs=rngs, names=('image', 'channels'))
    self.mid = Middle(f, cfg, rngs=rngs)
    levels, upsample = [], []
    for i, mult in reversed(list(enumerate(cfg.channel_mult))):
      blocks = []
      for _ in range(cfg.num_res_blocks + 1):
        blocks.append(ResBlock(f, ch * mult, cfg, rngs=rngs))
        f = ch * mult
      levels.append(nnx.List(blocks))
      if i > 0:
        upsample.append(unet.conv(f, f, cfg, rngs=rngs))
    self.levels, self.upsample = nnx.List(levels), nnx.List(upsample)
    self.out_norm = unet.group_norm(f, cfg)
    self.out_conv = unet.conv(f, cfg.channels, cfg, rngs=rngs, names=('conv_in', 'image'))

  def __call__(self, z_BxhxwxZ: jax.Array) -> jax.Array:
    h = constrain_batch(self.latent_in(constrain_batch(z_BxhxwxZ.astype(self.stem.dtype))))
    h = constrain_batch(self.mid(constrain_batch(self.stem(h))))
    for i, blocks in enumerate(self.levels):
      for block in blocks:
        h = constrain_batch(block(h))
      if i < len(self.upsample):
        h = constrain_batch(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
        h = constrain_batch(self.upsample[i](h))
    return constrain_batch(self.out_conv(jax.nn.silu(self.out_norm(h))).astype(jnp.float32))


class VAE(nnx.Module):
  """encode: images in [-1, 1] -> (mean, logvar) of q(z | x); decode: z -> images."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)

  def encode(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean_Bxhxwxz, logvar_Bxhxwxz), float32; logvar clipped to LOGVAR_RANGE."""
    moments = self.encoder(x_BxHxWxC).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z_BxhxwxZ: jax.Array) -> jax.Array:
    """Images float32 [B, H, W, C], not clipped to [-1, 1]."""
    return self.decoder(z_BxhxwxZ)

  def __call__(self, x_BxHxWxC: jax.Array, *, key: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(recon, mean, logvar). With `key`, z = mean + exp(logvar / 2) * eps (the
    reparameterised sample of q(z | x)); without it, z = mean."""
    mean, logvar = self.encode(x_BxHxWxC)
    z = mean
    if key is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
    return self.decode(z), mean, logvar


# --- losses --------------------------------------------------------------------------------


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over the latent: float32 [B].

  Closed form per dimension: (mean^2 + exp(logvar) - 1 - logvar) / 2.
  """
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  per_dim = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(per_dim.reshape(per_dim.shape[0], -1), axis=-1)


def reconstruction_loss(kind: str, recon_BxHxWxC: jax.Array, x_BxHxWxC: jax.Array) -> jax.Array:
  """Per example, the mean over pixels and channels of |recon - x| ('l1') or
  (recon - x)^2 ('l2'): float32 [B]."""
  diff = recon_BxHxWxC.astype(jnp.float32) - x_BxHxWxC.astype(jnp.float32)
  if kind == 'l1':
    per = jnp.abs(diff)
  elif kind == 'l2':
    per = jnp.square(diff)
  else:
    raise ValueError(f'Unknown reconstruction loss {kind!r}; choose one of '
                     f'{", ".join(RECON_LOSSES)}.')
  return jnp.mean(per.reshape(per.shape[0], -1), axis=-1)


def perceptual_distance(activations_fn, x_BxHxWxC: jax.Array, y_BxHxWxC: jax.Array,
                        eps: float = 1e-10) -> jax.Array:
  """LPIPS's distance (Zhang et al. 2018) with a feature network of our own: float32 [B].

  `activations_fn(images) -> [per-layer activations [B, ..., F_l]]` (e.g. the eval feature
  classifier's `Classifier.activations`). Each layer's activations are unit-normalised over
  their channels at every position, squared differences are summed over channels and
  averaged over positions, and the layers are summed: LPIPS's "baseline" form, without its
  learned per-channel weights (those are fit to human judgements of VGG/AlexNet features,
  which we cannot download). On images it was not trained for, a feature network says little;
  the classifier is trained on the same data as the VAE (train/image_eval.py).
  """
  total = jnp.zeros((x_BxHxWxC.shape[0],), jnp.float32)
  both = activations_fn(jnp.concatenate([x_BxHxWxC, y_BxHxWxC]))  # one call for the pair
  for act in both:
    act = act.astype(jnp.float32)
    act = act * jax.lax.rsqrt(jnp.sum(jnp.square(act), axis=-1, keepdims=True) + eps)
    a, b = jnp.split(act, 2)
    d = jnp.sum(jnp.square(a - b), axis=-1)
    total = total + jnp.mean(d.reshape(d.shape[0], -1), axis=-1)
  return total


def forward_flops(cfg: VAEConfig, batch: int) -> float:
  """FLOPs of encode + decode of `batch` images, from XLA's cost analysis of the graph."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: VAE(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  s = cfg.image_size

  def fwd(params, x):
    return nnx.merge(graphdef, params)(x)[0]

  args = (params, jax.ShapeDtypeStruct((batch, s, s, cfg.channels), cfg.dtype))
  cost = jax.jit(fwd).lower(*args).cost_analysis()
  return float(cost.get('flops', 0.0)) if cost else 0.0
