"""DCGAN-style generator and discriminator, spectral normalisation, GAN losses and R1.

Shape letters: B batch, H/W height/width, C channels, Z latent, K classes.

Generator: [z, class embedding] -> dense to a r0 x r0 x C0 map -> upsampling
convolutions, each doubling the resolution, with pixel norm (ProGAN) and ReLU
-> 3x3 convolution to the image channels -> tanh. An upsampling convolution is
a sub-pixel convolution (Shi et al. 2016): a 3x3 convolution to 4 x C_out
channels, rearranged depth-to-space. It can express DCGAN's 4x4 stride-2
transposed convolution (each output pixel of that sees 2x2 input pixels, all
inside the 3x3 window), and its gradient is an ordinary convolution: XLA's CPU
gradient of a transposed convolution measured 15-40x slower. Pixel norm
instead of DCGAN's batch norm: a sample does not depend on the rest of its
batch, so the EMA generator needs no running statistics and samples are the
same whatever the batch they are drawn in.

Discriminator: 4x4 stride-2 convolutions with LeakyReLU(0.2), no batch norm,
then a linear read-out of the flattened features; for class-conditional
models the projection term <embed(y), features> of Miyato & Koyama (2018) is
added to the logit. Every weight matrix can be spectrally normalised
(Miyato et al. 2018).

Spectral normalisation keeps its power-iteration vector `u` in a Variable of
its own kind (`SpectralState`), not a Param: the optimizer never sees it, the
task keeps it as a separate pure dict in the train state (so it is in the
checkpoint) and the discriminator step writes back the updated vector. The
layers are flax's (nnx.Conv, nnx.Einsum); our `SpectralNorm` wraps one and runs
it on a copy that holds the normalised kernel. We do not use
`nnx.SpectralNorm`: it writes the normalised weight into the wrapped
layer's Param on every call (a module called twice in one step normalises
twice, and the state read back after a call holds normalised weights instead
of the trained ones), and its statistics are BatchStats keyed by tuples,
without logical axis names.

Parameters carry logical axis names; `LOGICAL_AXIS_RULES` maps them to the
mesh: the input channels of a convolution to `fsdp`, its output channels to
`tensor` (as `embed` and `mlp` in the transformer); kernel positions, the
latent, classes and image channels are never split.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp', 'expert')),
    ('conv_in', 'fsdp'),
    ('conv_out', 'tensor'),
    ('height', None),
    ('width', None),
    ('latent', None),
    ('classes', None),
    ('image_channels', None),
)

DTYPES = {name: jnp.dtype(name) for name in ('bfloat16', 'float32', 'float16')}
LOSSES = ('non_saturating', 'hinge')
G_NORMS = ('pixel', 'none')
LEAKY_SLOPE = 0.2


class SpectralState(nnx.Variable):
  """Power-iteration state of spectral normalisation: not trained, but checkpointed."""


@dataclasses.dataclass(frozen=True)
class GANConfig:
  """Resolved hyperparameters of both networks."""
  image_size: int
  channels: int  # image channels
  num_classes: int  # 0: unconditional
  latent_dim: int
  g_channels: tuple[int, ...]  # feature channels from the base resolution up
  d_channels: tuple[int, ...]  # feature channels of the stride-2 convolutions, from the image
  g_norm: str = 'pixel'
  spectral_norm: bool = True  # on every discriminator weight
  power_iterations: int = 1  # per discriminator step
  dtype: jnp.dtype = jnp.dtype('float32')
  param_dtype: jnp.dtype = jnp.dtype('float32')

  @property
  def base_size(self) -> int:
    return self.image_size // 2 ** (len(self.g_channels) - 1)

  @property
  def d_final_size(self) -> int:
    size = self.image_size
    for _ in self.d_channels:
      size = -(-size // 2)  # 'SAME' padding, stride 2
    return size

  @classmethod
  def from_config(cls, model_cfg: ml_collections.ConfigDict,
                  data_cfg: ml_collections.ConfigDict) -> 'GANConfig':
    """Builds the config from `config.model` and the image shape in `config.data`.

    Raises:
      ValueError: naming the offending key and the allowed values.
    """
    m = model_cfg
    image_size, channels = int(data_cfg.image_size), int(data_cfg.channels)
    num_classes = int(data_cfg.num_classes) if m.conditional else 0
    if image_size <= 0 or channels <= 0:
      raise ValueError(f'data.image_size={image_size} and data.channels={channels} must be > 0.')
    if m.conditional and num_classes < 2:
      raise ValueError(f'model.conditional=True needs data.num_classes >= 2; got {num_classes}.')
    g_channels, d_channels = tuple(int(c) for c in m.g_channels), tuple(
        int(c) for c in m.d_channels)
    for key, chans in (('model.g_channels', g_channels), ('model.d_channels', d_channels)):
      if not chans or any(c <= 0 for c in chans):
        raise ValueError(f'{key}={chans} must be a non-empty list of positive channel counts.')
    ups = len(g_channels) - 1
    if image_size % 2 ** ups:
      raise ValueError(
          f'model.g_channels has {len(g_channels)} entries, so the generator doubles its '
          f'resolution {ups} times, but data.image_size={image_size} is not divisible by '
          f'{2 ** ups}; use fewer entries.')
    if int(m.latent_dim) <= 0:
      raise ValueError(f'model.latent_dim={m.latent_dim} must be > 0.')
    if m.g_norm not in G_NORMS:
      raise ValueError(f'model.g_norm={m.g_norm!r} is not allowed; choose one of '
                       f'{", ".join(G_NORMS)}.')
    if int(m.power_iterations) < 1:
      raise ValueError(f'model.power_iterations={m.power_iterations} must be >= 1.')
    for key in ('dtype', 'param_dtype'):
      if m[key] not in DTYPES:
        raise ValueError(f'model.{key}={m[key]!r} is not allowed; choose one of '
                         f'{", ".join(DTYPES)}.')
    return cls(
        image_size=image_size, channels=channels, num_classes=num_classes,
        latent_dim=int(m.latent_dim), g_channels=g_channels, d_channels=d_channels,
        g_norm=m.g_norm, spectral_norm=bool(m.spectral_norm),
        power_iterations=int(m.power_iterations), dtype=DTYPES[m.dtype],
        param_dtype=DTYPES[m.param_dtype])


# ---------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x), eps))


def power_iteration(w_MxN: jax.Array, u_N: jax.Array,
                    steps: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`steps` rounds of power iteration on w; returns (sigma, u, v), u and v without gradient.

  sigma = v^T w u estimates the largest singular value; its gradient flows
  into w only (Miyato et al. 2018, algorithm 1).
  """
  w = w_MxN.astype(jnp.float32)
  u = jax.lax.stop_gradient(u_N.astype(jnp.float32))
  v = None
  for _ in range(steps):
    v = _l2_normalize(w @ u)
    u = _l2_normalize(w.T @ v)
  u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
  return v @ w @ u, u, v


class SpectralNorm(nnx.Module):
  """A layer (nnx.Conv, nnx.Einsum) whose kernel is optionally divided by its spectral norm.

  The kernel's last axis is its output: it is viewed as a matrix [prod(other axes), out].
  The layer's Param keeps the trained kernel; each call runs the layer on a copy that
  holds the normalised one. With `update=True` the power-iteration vector advances and is
  written back (the discriminator step); otherwise the stored vector is used as it is. The
  vector `u` [out] takes the logical name of the kernel's output axis.
  """

  def __init__(self, layer: nnx.Module, *, enabled: bool, power_iterations: int,
               rngs: nnx.Rngs):
    self.layer = layer
    self.enabled = enabled
    self.power_iterations = power_iterations
    if enabled:
      kernel = layer.kernel
      u = _l2_normalize(jax.random.normal(rngs.params(), (kernel.shape[-1],), jnp.float32))
      names = kernel.get_metadata('out_sharding', None)
      self.u = SpectralState(u, out_sharding=None if names is None else names[-1:])

  def kernel(self, update: bool) -> jax.Array:
    w = self.layer.kernel[...]
    if not self.enabled:
      return w
    sigma, u, _ = power_iteration(w.reshape(-1, w.shape[-1]), self.u[...],
                                  self.power_iterations)
    if update:
      self.u[...] = u
    return (w.astype(jnp.float32) / sigma).astype(w.dtype)

  def __call__(self, x: jax.Array, *, update: bool) -> jax.Array:
    if not self.enabled:
      return self.layer(x)
    graphdef, params = nnx.split(self.layer)
    params = nnx.to_pure_dict(params)
    params['kernel'] = self.kernel(update)
    return nnx.merge(graphdef, params)(x)


def constrain_batch(x_Bx: jax.Array) -> jax.Array:
  """Pins x's leading axis to the rules' 'batch' sharding, when a mesh is set and it divides.

  Every activation of both networks goes through this. Left to choose, XLA's
  SPMD partitioner computed wrong gradients with respect to the input of the
  discriminator's stride-2 convolutions on a 2x2x2 (data, fsdp, tensor) mesh
  (max error 0.3 against one device, jax 0.10.2 on CPU; tests/test_gan.py's
  mesh test found it). With the activations pinned it matches to 1e-7, and
  noise drawn inside the step is split like the real images.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x_Bx
  axes = tuple(a for a in dict(LOGICAL_AXIS_RULES)['batch'] if a in mesh.shape)
  if x_Bx.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x_Bx
  return jax.lax.with_sharding_constraint(x_Bx, jax.sharding.PartitionSpec(axes))


def _conv(layer: nnx.Module, x_BxHxWxC: jax.Array, **kw) -> jax.Array:
  """A convolution layer called with its input and output pinned by `constrain_batch`."""
  return constrain_batch(layer(constrain_batch(x_BxHxWxC), **kw))


def _depth_to_space(y_BxHxWx4O: jax.Array) -> jax.Array:
  """Sub-pixel rearrangement: [B, H, W, 4 O] -> [B, 2H, 2W, O].

  Channel 4o + 2p + q becomes pixel (2h + p, 2w + q), channel o.
  """
  b, h, w, c4 = y_BxHxWx4O.shape
  y = y_BxHxWx4O.reshape(b, h, w, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return constrain_batch(y.reshape(b, 2 * h, 2 * w, c4 // 4))


def pixel_norm(x_BxHxWxC: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Each pixel's feature vector scaled to unit mean square (ProGAN)."""
  x = x_BxHxWxC.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return x.astype(x_BxHxWxC.dtype)


def _he_std(fan_in: int, gain: float = math.sqrt(2.0)) -> float:
  return gain / math.sqrt(fan_in)


# ---------------------------------------------------------------------------
# Networks.
# ---------------------------------------------------------------------------


class Generator(nnx.Module):
  """z_BxZ (and labels_B when conditional) -> images_BxHxWxC in [-1, 1].

  Layers: `embed` (conditional only: the class embedding [K, Z], concatenated to z),
  `dense` (kernel [Z or 2Z, r0, r0, C0]) with `dense_bias` [C0], `up{i}` (kernel
  [3, 3, C_i, 4 C_{i+1}]) with `up{i}_bias` [C_{i+1}], `out` (kernel [3, 3, C_last, C] and
  bias). The dense map's and the upsampling convolutions' biases are per channel, shared
  by all positions and sub-pixels, so they are Params beside their layers.
  """

  def __init__(self, cfg: GANConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd, z, r0, chans = cfg.param_dtype, cfg.latent_dim, cfg.base_size, cfg.g_channels
    layer = dict(dtype=cfg.dtype, param_dtype=pd, rngs=rngs)
    in_dim = z
    if cfg.num_classes:
      self.embed = nnx.Embed(cfg.num_classes, z, embedding_init=nnx.initializers.normal(1.0),
                             embedding_metadata={'out_sharding': ('classes', 'latent')}, **layer)
      in_dim = 2 * z
    self.dense = nnx.Einsum(
        'bz,zhwc->bhwc', (in_dim, r0, r0, chans[0]),
        kernel_init=nnx.initializers.normal(_he_std(in_dim)),
        kernel_metadata={'out_sharding': ('latent', 'height', 'width', 'conv_out')}, **layer)
    self.dense_bias = nnx.Param(jnp.zeros((chans[0],), pd), out_sharding=('conv_out',))
    # Numbered attributes rather than an nnx.List: string keys all the way down the
    # checkpointed pure dicts.
    for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
      # Output channels ordered (c_out, 2, 2), so a tensor-parallel shard holds whole pixels'
      # sub-pixels of its channels.
      setattr(self, f'up{i}', nnx.Conv(
          c_in, 4 * c_out, (3, 3), use_bias=False,
          kernel_init=nnx.initializers.normal(_he_std(9 * c_in)),
          kernel_metadata={'out_sharding': ('height', 'width', 'conv_in', 'conv_out')}, **layer))
      setattr(self, f'up{i}_bias',
              nnx.Param(jnp.zeros((c_out,), pd), out_sharding=('conv_out',)))
    self.out = nnx.Conv(
        chans[-1], cfg.channels, (3, 3),
        kernel_init=nnx.initializers.normal(_he_std(9 * chans[-1], 1.0)),
        kernel_metadata={'out_sharding': ('height', 'width', 'conv_in', 'image_channels')},
        bias_metadata={'out_sharding': ('image_channels',)}, **layer)

  def _norm(self, x: jax.Array) -> jax.Array:
    return pixel_norm(x) if self.cfg.g_norm == 'pixel' else x

  def __call__(self, z_BxZ: jax.Array, labels_B: jax.Array | None = None) -> jax.Array:
    cfg, dt = self.cfg, self.cfg.dtype
    h_BxZ = z_BxZ.astype(dt)
    if cfg.num_classes:
      h_BxZ = jnp.concatenate([h_BxZ, self.embed(labels_B)], axis=-1)
    x_BxHxWxC = constrain_batch(self.dense(h_BxZ))
    x_BxHxWxC = jax.nn.relu(self._norm(x_BxHxWxC + self.dense_bias[...].astype(dt)))
    for i in range(len(cfg.g_channels) - 1):
      up, bias = getattr(self, f'up{i}'), getattr(self, f'up{i}_bias')
      x_BxHxWxC = _depth_to_space(_conv(up, x_BxHxWxC)) + bias[...].astype(dt)
      x_BxHxWxC = jax.nn.relu(self._norm(x_BxHxWxC))
    x_BxHxWxC = _conv(self.out, x_BxHxWxC)
    return jnp.tanh(x_BxHxWxC.astype(jnp.float32))


class Discriminator(nnx.Module):
  """images_BxHxWxC (and labels_B when conditional) -> float32 logits_B.

  Layers, each a SpectralNorm around an nnx layer: `conv{i}` (kernel [4, 4, C_i, C_{i+1}]
  and bias), `read` (the linear read-out of the flattened features: kernel
  [r, r, C_last, 1] and bias [1]) and `project` (conditional only: kernel [r, r, C_last, K],
  row y the class embedding). With spectral normalisation each has a `u` SpectralState.
  """

  def __init__(self, cfg: GANConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    layer = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    sn = dict(enabled=cfg.spectral_norm, power_iterations=cfg.power_iterations, rngs=rngs)
    c_in, in_name = cfg.channels, 'image_channels'
    for i, c_out in enumerate(cfg.d_channels):
      setattr(self, f'conv{i}', SpectralNorm(nnx.Conv(
          c_in, c_out, (4, 4), 2, kernel_init=nnx.initializers.normal(_he_std(16 * c_in)),
          kernel_metadata={'out_sharding': ('height', 'width', in_name, 'conv_out')},
          bias_metadata={'out_sharding': ('conv_out',)}, **layer), **sn))
      c_in, in_name = c_out, 'conv_in'
    r = cfg.d_final_size
    # The read-out and the projection are linear maps of the features, normalised as one
    # matrix each (as BigGAN's discriminator embedding). Their output axes are named
    # 'classes' so they are never split (the read-out's has size 1).
    names = ('height', 'width', 'conv_in', 'classes')
    self.read = SpectralNorm(nnx.Einsum(
        'bhwc,hwck->bk', (r, r, c_in, 1), (1,), preferred_element_type=jnp.float32,
        kernel_init=nnx.initializers.normal(_he_std(r * r * c_in, 1.0)),
        kernel_metadata={'out_sharding': names}, bias_metadata={'out_sharding': ('classes',)},
        **layer), **sn)
    if cfg.num_classes:
      self.project = SpectralNorm(nnx.Einsum(
          'bhwc,hwck->bk', (r, r, c_in, cfg.num_classes), preferred_element_type=jnp.float32,
          kernel_init=nnx.initializers.normal(_he_std(r * r * c_in, 1.0)),
          kernel_metadata={'out_sharding': names}, **layer), **sn)

  def __call__(self, images_BxHxWxC: jax.Array, labels_B: jax.Array | None = None, *,
               update: bool = False) -> jax.Array:
    """`update`: advance the spectral-norm power iteration (discriminator steps only)."""
    cfg = self.cfg
    x = images_BxHxWxC.astype(cfg.dtype)
    for i in range(len(cfg.d_channels)):
      x = jax.nn.leaky_relu(_conv(getattr(self, f'conv{i}'), x, update=update), LEAKY_SLOPE)
    logits_B = self.read(x, update=update)[:, 0].astype(jnp.float32)
    if cfg.num_classes:
      scores_BxK = self.project(x, update=update).astype(jnp.float32)
      logits_B = logits_B + jnp.take_along_axis(scores_BxK, labels_B[:, None], axis=1)[:, 0]
    return logits_B


# ---------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------


def d_loss(kind: str, real_logits_B: jax.Array, fake_logits_B: jax.Array) -> jax.Array:
  """The discriminator's loss, a mean over the batch (real and fake terms summed).

  non_saturating: softplus(-D(x)) + softplus(D(G(z))) (the GAN cross-entropy);
  hinge: relu(1 - D(x)) + relu(1 + D(G(z))) (Lim & Ye 2017; Miyato et al. 2018).
  """
  if kind == 'non_saturating':
    return jnp.mean(jax.nn.softplus(-real_logits_B)) + jnp.mean(jax.nn.softplus(fake_logits_B))
  if kind == 'hinge':
    return jnp.mean(jax.nn.relu(1.0 - real_logits_B)) + jnp.mean(jax.nn.relu(1.0 + fake_logits_B))
  raise ValueError(f'Unknown GAN loss {kind!r}; choose one of {", ".join(LOSSES)}.')


def g_loss(kind: str, fake_logits_B: jax.Array) -> jax.Array:
  """The generator's loss: softplus(-D(G(z))) (non-saturating) or -D(G(z)) (hinge)."""
  if kind == 'non_saturating':
    return jnp.mean(jax.nn.softplus(-fake_logits_B))
  if kind == 'hinge':
    return -jnp.mean(fake_logits_B)
  raise ValueError(f'Unknown GAN loss {kind!r}; choose one of {", ".join(LOSSES)}.')


def r1_penalty(logits_fn, images_BxHxWxC: jax.Array) -> jax.Array:
  """E_x ||grad_x D(x)||^2 at real images x (Mescheder et al. 2018), without the gamma/2.

  `logits_fn(images) -> logits_B` must treat examples independently (no batch
  statistics), so the gradient of the summed logits is each example's own.
  """
  grads = jax.grad(lambda x: jnp.sum(logits_fn(x)))(images_BxHxWxC.astype(jnp.float32))
  return jnp.mean(jnp.sum(jnp.square(grads), axis=(1, 2, 3)))


# ---------------------------------------------------------------------------
# FLOPs.
# ---------------------------------------------------------------------------


def forward_flops(cfg: GANConfig) -> tuple[float, float]:
  """Matmul/convolution FLOPs (2 per multiply-add) of one example through G and through D."""
  g = 2 * (2 * cfg.latent_dim if cfg.num_classes else cfg.latent_dim) * (
      cfg.base_size ** 2 * cfg.g_channels[0])
  size = cfg.base_size
  for c_in, c_out in zip(cfg.g_channels[:-1], cfg.g_channels[1:], strict=True):
    g += 2 * size * size * 9 * c_in * 4 * c_out  # a 3x3 conv to 4 c_out on the input grid
    size *= 2
  g += 2 * size * size * 9 * cfg.g_channels[-1] * cfg.channels
  d, size, c_in = 0, cfg.image_size, cfg.channels
  for c_out in cfg.d_channels:
    size = -(-size // 2)
    d += 2 * size * size * 16 * c_in * c_out
    c_in = c_out
  d += 2 * size * size * c_in * (1 + (1 if cfg.num_classes else 0))
  return float(g), float(d)
