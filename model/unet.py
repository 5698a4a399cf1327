"""DDPM/ADM-style U-Net (Ho et al. 2020; Dhariwal & Nichol 2021) in Flax NNX.

Shape letters: B batch, H height, W width, C image channels, F feature channels, E time/class
embedding width (4 * base channels), N heads, D head dim, L = H * W positions.

  stem conv 3x3 -> per level: num_res_blocks x [ResBlock (+ self-attention at the resolutions
  in `attention_resolutions`)], then a stride-2 conv (not after the last level) -> middle
  ResBlock, attention, ResBlock -> per level in reverse: num_res_blocks + 1 x [concat skip,
  ResBlock (+ attention)], then nearest-neighbour upsample + conv (not after the first level)
  -> GroupNorm, SiLU, conv 3x3 to C channels.

ResBlock: GroupNorm, SiLU, conv 3x3, + Dense(SiLU(emb)), GroupNorm, SiLU, dropout, conv 3x3
(zero-initialised, so each block starts as the identity), plus a 1x1 conv on the skip path when
the width changes. The time step enters as a sinusoidal embedding through a two-layer MLP;
a class label adds a learned embedding, with one extra row (index num_classes) for "no label",
which label dropout trains for classifier-free guidance.

Text conditioning (`context_dim > 0`, Stable Diffusion's shape): after every self-attention
(the attention resolutions and the middle block) a CrossAttention layer lets the image
positions attend to a context [B, S, E_ctx] (a text encoder's output) under a key padding
mask [B, S]; its output projection starts at zero, so a fresh layer is the identity.

Parameters carry logical axis names (`LOGICAL_AXIS_RULES` maps them to the mesh): conv kernels
[kh, kw, F_in, F_out] are ('kernel', 'kernel', 'conv_in', 'channels'); the image-side convs use
'image' for their C side, which is never split. Norms and statistics run in float32.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from model import attention as attention_lib

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp', 'expert')),
    ('conv_in', 'fsdp'),  # FSDP: weights gathered where they are used
    ('channels', 'tensor'),
    ('embed', 'tensor'),
    ('heads', 'tensor'),
    ('head_dim', None),
    ('kernel', None),
    ('image', None),
    ('norm', None),
    ('classes', None),
    ('context_embed', None),  # the text context's features (cross-attention's k/v input)
)

DTYPES = {name: jnp.dtype(name) for name in ('bfloat16', 'float32', 'float16')}


def check_compute_keys(m: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming `model.dtype`, `model.param_dtype` or `model.attention` when
  one is not allowed, or the attention is not available here; the image models share it."""
  for key in ('dtype', 'param_dtype'):
    if m[key] not in DTYPES:
      raise ValueError(f'model.{key}={m[key]!r} is not allowed; choose one of '
                       f'{", ".join(DTYPES)}.')
  if m.attention not in attention_lib.IMPLEMENTATIONS:
    raise ValueError(f'model.attention={m.attention!r} is not allowed; choose one of '
                     f'{", ".join(attention_lib.IMPLEMENTATIONS)}.')
  try:
    attention_lib.check_available(m.attention)
  except ValueError as e:
    raise ValueError(f'model.attention={m.attention!r}: {e}') from None


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  image_size: int
  channels: int  # image channels C
  num_classes: int  # 0: unconditional
  base_channels: int = 64
  channel_mult: tuple[int, ...] = (1, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: tuple[int, ...] = (16,)
  head_dim: int = 32
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: jnp.dtype = jnp.dtype('float32')
  param_dtype: jnp.dtype = jnp.dtype('float32')
  attention: str = 'xla'
  context_dim: int = 0  # > 0: cross-attention to a [B, S, context_dim] context (text)

  @classmethod
  def from_config(cls, model_cfg: ml_collections.ConfigDict, *, image_size: int, channels: int,
                  num_classes: int, context_dim: int = 0) -> 'UNetConfig':
    """From `config.model` (configs/diffusion.py) and the data's shape; `context_dim` is the
    text encoder's width (0: no cross-attention).

    Raises:
      ValueError: naming the `model.*` key that is wrong and what it may be.
    """
    m = model_cfg
    for key in ('base_channels', 'num_res_blocks', 'head_dim', 'norm_groups'):
      if int(m[key]) <= 0:
        raise ValueError(f'model.{key}={m[key]!r} must be a positive integer.')
    mult = tuple(int(x) for x in m.channel_mult)
    if not mult or min(mult) <= 0:
      raise ValueError(f'model.channel_mult={m.channel_mult!r} must be a non-empty tuple of '
                       'positive integers, e.g. (1, 2, 2).')
    levels = len(mult)
    if image_size % 2 ** (levels - 1):
      raise ValueError(
          f'model.channel_mult={mult!r} has {levels} levels, which halve the image '
          f'{levels - 1} times; image size {image_size} must divide by {2 ** (levels - 1)}.')
    resolutions = {image_size // 2 ** i for i in range(levels)}
    attn = tuple(int(r) for r in m.attention_resolutions)
    if not set(attn) <= resolutions:
      raise ValueError(
          f'model.attention_resolutions={attn!r} must be among the U-Net\'s resolutions '
          f'{sorted(resolutions)} (image size {image_size}, {levels} levels).')
    widths = {int(m.base_channels) * k for k in mult}
    for width in sorted(widths):
      if width % int(m.norm_groups):
        raise ValueError(f'model.norm_groups={m.norm_groups} must divide every level width '
                         f'(model.base_channels * model.channel_mult = {sorted(widths)}).')
      if attn and width % int(m.head_dim):
        raise ValueError(f'model.head_dim={m.head_dim} must divide every level width '
                         f'{sorted(widths)} when attention is used.')
    if not 0.0 <= float(m.dropout) < 1.0:
      raise ValueError(f'model.dropout={m.dropout!r} must be in [0, 1).')
    check_compute_keys(m)
    if context_dim and not attn:
      raise ValueError('Text conditioning enters through cross-attention at the attention '
                       'resolutions: model.attention_resolutions must not be empty.')
    return cls(image_size=image_size, channels=channels, num_classes=num_classes,
               base_channels=int(m.base_channels), channel_mult=mult,
               num_res_blocks=int(m.num_res_blocks), attention_resolutions=attn,
               head_dim=int(m.head_dim), dropout=float(m.dropout),
               norm_groups=int(m.norm_groups), dtype=DTYPES[m.dtype],
               param_dtype=DTYPES[m.param_dtype], attention=m.attention,
               context_dim=int(context_dim))

  @property
  def embed_dim(self) -> int:
    return 4 * self.base_channels


# --- layers --------------------------------------------------------------------------------


def _uniform_init(fan_in: int) -> nnx.Initializer:
  # PyTorch's default init for conv and linear layers (ADM keeps it): U(+-1/sqrt(fan_in)),
  # for the bias too (so not variance_scaling, which sees only the bias's own shape).
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def _no_draws() -> nnx.Rngs:
  """Rngs for a layer whose initialisers ignore their key (zeros, ones).

  flax layers draw a key per parameter whatever the initialiser; drawing those from a
  throwaway stream leaves the model's stream to the random layers, so adding a norm or a
  zero-initialised layer does not move every later layer's initial values.
  """
  return nnx.Rngs(0)


def conv(f_in: int, f_out: int, cfg: UNetConfig, *, rngs: nnx.Rngs, k: int = 3, stride: int = 1,
         zero_init: bool = False, names: tuple[str, str] = ('conv_in', 'channels')) -> nnx.Conv:
  """k x k convolution, NHWC, 'SAME' padding; kernel [k, k, F_in, F_out] named ('kernel',
  'kernel', *names). `zero_init`: kernel and bias start at zero (ADM's output layers)."""
  init = nnx.initializers.zeros if zero_init else _uniform_init(k * k * f_in)
  return nnx.Conv(f_in, f_out, (k, k), stride, padding='SAME', dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, kernel_init=init, bias_init=init,
                  kernel_metadata={'out_sharding': ('kernel', 'kernel') + names},
                  bias_metadata={'out_sharding': names[1:]},
                  rngs=_no_draws() if zero_init else rngs)


def linear(f_in: int, f_out: int, cfg: UNetConfig, names: tuple[str, str], *,
           rngs: nnx.Rngs) -> nnx.Linear:
  init = _uniform_init(f_in)
  return nnx.Linear(f_in, f_out, dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=init,
                    bias_init=init, kernel_metadata={'out_sharding': names},
                    bias_metadata={'out_sharding': names[1:]}, rngs=rngs)


def _float32_params(arrays, dtype=None, inexact=True):
  """A promote_dtype that leaves the arrays alone: the norm upcasts its input for the
  statistics, and unrounded scale and bias keep all its arithmetic in float32."""
  del dtype, inexact
  return arrays


def group_norm(f: int, cfg: UNetConfig) -> nnx.GroupNorm:
  """GroupNorm over (H, W, F / groups) in float32 (two-pass variance), output in cfg.dtype."""
  return nnx.GroupNorm(f, min(cfg.norm_groups, f), epsilon=1e-5, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, use_fast_variance=False,
                       promote_dtype=_float32_params,
                       scale_metadata={'out_sharding': ('norm',)},
                       bias_metadata={'out_sharding': ('norm',)}, rngs=_no_draws())


def timestep_embedding(t_B: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps: [cos | sin], float32 [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles_BxHalf = t_B.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(angles_BxHalf), jnp.sin(angles_BxHalf)], axis=-1)


class ResBlock(nnx.Module):
  def __init__(self, f_in: int, f_out: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.norm1 = group_norm(f_in, cfg)
    self.conv1 = conv(f_in, f_out, cfg, rngs=rngs)
    self.emb = linear(cfg.embed_dim, f_out, cfg, ('embed', 'channels'), rngs=rngs)
    self.norm2 = group_norm(f_out, cfg)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.conv2 = conv(f_out, f_out, cfg, rngs=rngs, zero_init=True)
    self.skip = conv(f_in, f_out, cfg, rngs=rngs, k=1) if f_in != f_out else None

  def __call__(self, x_BxHxWxF, emb_BxE, dropout_key: jax.Array | None):
    h = self.conv1(jax.nn.silu(self.norm1(x_BxHxWxF)))
    h = h + self.emb(jax.nn.silu(emb_BxE))[:, None, None, :]
    h = self.dropout(jax.nn.silu(self.norm2(h)), deterministic=dropout_key is None,
                     rngs=dropout_key)
    h = self.conv2(h)
    skip = x_BxHxWxF if self.skip is None else self.skip(x_BxHxWxF)
    return skip + h


class SelfAttention(nnx.Module):
  """Multi-head self-attention over the H * W positions, through model/attention.py."""

  def __init__(self, f: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.norm = group_norm(f, cfg)
    heads, d = f // cfg.head_dim, cfg.head_dim
    # q, k and v stacked on a leading axis of 3: one kernel, one draw.
    self.qkv = nnx.Einsum('blf,tfnd->tblnd', (3, f, heads, d), dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, kernel_init=_uniform_init(f),
                          kernel_metadata={'out_sharding': (None, 'conv_in', 'heads',
                                                            'head_dim')}, rngs=rngs)
    self.out = nnx.Einsum('blnd,ndf->blf', (heads, d, f), (f,), dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, kernel_init=nnx.initializers.zeros,
                          kernel_metadata={'out_sharding': ('heads', 'head_dim', 'channels')},
                          bias_metadata={'out_sharding': ('channels',)}, rngs=_no_draws())
    self.attention = cfg.attention

  def __call__(self, x_BxHxWxF: jax.Array) -> jax.Array:
    b, h, w, f = x_BxHxWxF.shape
    x_BxLxF = self.norm(x_BxHxWxF).reshape(b, h * w, f)
    q, k, v = self.qkv(x_BxLxF)
    out_BxLxNxD = attention_lib.attention(q, k, v, causal=False, implementation=self.attention)
    return x_BxHxWxF + self.out(out_BxLxNxD).reshape(b, h, w, f)


class CrossAttention(nnx.Module):
  """Image positions (queries, GroupNorm'd) attend to a context's positions (keys, values).

  The context is short (a caption: tens of tokens), so the [L, S] scores are small and this
  always runs model/attention.py's masked einsum path, whatever `model.attention` says: the
  fused kernels take segment ids, which need L == S, not a key padding mask. Masked positions
  get exactly zero weight, so what they hold never reaches the output; a row with no visible
  key gets zeros (then only the output bias).
  """

  def __init__(self, f: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.norm = group_norm(f, cfg)
    heads, d, e = f // cfg.head_dim, cfg.head_dim, cfg.context_dim
    self.q = nnx.Einsum('blf,fnd->blnd', (f, heads, d), dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, kernel_init=_uniform_init(f),
                        kernel_metadata={'out_sharding': ('conv_in', 'heads', 'head_dim')},
                        rngs=rngs)
    # k and v stacked on a leading axis of 2, as SelfAttention stacks q, k, v.
    self.kv = nnx.Einsum('bse,tend->tbsnd', (2, e, heads, d), dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, kernel_init=_uniform_init(e),
                         kernel_metadata={'out_sharding': (None, 'context_embed', 'heads',
                                                           'head_dim')}, rngs=rngs)
    self.out = nnx.Einsum('blnd,ndf->blf', (heads, d, f), (f,), dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, kernel_init=nnx.initializers.zeros,
                          kernel_metadata={'out_sharding': ('heads', 'head_dim', 'channels')},
                          bias_metadata={'out_sharding': ('channels',)}, rngs=_no_draws())

  def __call__(self, x_BxHxWxF: jax.Array, context_BxSxE: jax.Array,
               context_mask_BxS: jax.Array) -> jax.Array:
    b, h, w, f = x_BxHxWxF.shape
    q_BxLxNxD = self.q(self.norm(x_BxHxWxF).reshape(b, h * w, f))
    k_BxSxNxD, v_BxSxNxD = self.kv(context_BxSxE.astype(q_BxLxNxD.dtype))
    mask_BxLxS = jnp.broadcast_to(context_mask_BxS[:, None, :].astype(bool),
                                  (b, h * w, context_mask_BxS.shape[1]))
    out_BxLxNxD = attention_lib.masked_attention(q_BxLxNxD, k_BxSxNxD, v_BxSxNxD, mask_BxLxS)
    return x_BxHxWxF + self.out(out_BxLxNxD).reshape(b, h, w, f)


class Level(nnx.Module):
  """One resolution of the encoder or decoder: ResBlocks, each followed by optional attention
  (self-attention, then cross-attention to the context when the U-Net has one)."""

  def __init__(self, widths_in: list[int], f_out: int, attend: bool, cfg: UNetConfig, *,
               rngs: nnx.Rngs):
    self.blocks = nnx.List([ResBlock(f, f_out, cfg, rngs=rngs) for f in widths_in])
    self.attns = nnx.List([SelfAttention(f_out, cfg, rngs=rngs) for _ in widths_in]
                          if attend else [])
    self.cross = nnx.List([CrossAttention(f_out, cfg, rngs=rngs) for _ in widths_in]
                          if attend and cfg.context_dim else [])


class UNet(nnx.Module):
  """eps / v / x0 predictor: (x_t [B, H, W, C], t [B], labels [B] | None, context [B, S, E_ctx]
  | None, its mask [B, S]) -> [B, H, W, C]."""

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    ch, e = cfg.base_channels, cfg.embed_dim
    self.time_mlp1 = linear(ch, e, cfg, ('channels', 'embed'), rngs=rngs)
    self.time_mlp2 = linear(e, e, cfg, ('embed', 'embed'), rngs=rngs)
    if cfg.num_classes:
      self.class_embed = nnx.Embed(
          cfg.num_classes + 1, e, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
          embedding_init=nnx.initializers.normal(1.0),
          embedding_metadata={'out_sharding': ('classes', 'embed')}, rngs=rngs)
    self.stem = conv(cfg.channels, ch, cfg, rngs=rngs, names=('image', 'channels'))

    # Encoder: record the width of every activation kept for a skip connection.
    skips, f, res = [ch], ch, cfg.image_size
    down, downsample = [], []
    for i, mult in enumerate(cfg.channel_mult):
      widths_in = [f] + [ch * mult] * (cfg.num_res_blocks - 1)
      down.append(Level(widths_in, ch * mult, res in cfg.attention_resolutions, cfg, rngs=rngs))
      f = ch * mult
      skips += [f] * cfg.num_res_blocks
      if i < len(cfg.channel_mult) - 1:
        downsample.append(conv(f, f, cfg, rngs=rngs, stride=2))
        skips.append(f)
        res //= 2
    self.down, self.downsample = nnx.List(down), nnx.List(downsample)

    self.mid1 = ResBlock(f, f, cfg, rngs=rngs)
    self.mid_attn = SelfAttention(f, cfg, rngs=rngs) if cfg.attention_resolutions else None
    self.mid_cross = (CrossAttention(f, cfg, rngs=rngs)
                      if cfg.attention_resolutions and cfg.context_dim else None)
    self.mid2 = ResBlock(f, f, cfg, rngs=rngs)

    up, upsample = [], []
    for i, mult in reversed(list(enumerate(cfg.channel_mult))):
      f_out = ch * mult
      widths_in = []
      for _ in range(cfg.num_res_blocks + 1):
        widths_in.append(f + skips.pop())
        f = f_out
      up.append(Level(widths_in, f_out, res in cfg.attention_resolutions, cfg, rngs=rngs))
      if i > 0:
        upsample.append(conv(f, f, cfg, rngs=rngs))
        res *= 2
    self.up, self.upsample = nnx.List(up), nnx.List(upsample)
    self.out_norm = group_norm(f, cfg)
    self.out_conv = conv(f, cfg.channels, cfg, rngs=rngs, zero_init=True,
                         names=('conv_in', 'image'))

  def __call__(self, x_BxHxWxC: jax.Array, t_B: jax.Array, labels_B: jax.Array | None = None,
               *, context: jax.Array | None = None, context_mask: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """Labels in [0, num_classes], num_classes meaning "no label"; None for "no label" too.

    context: [B, S, context_dim] (needed when cfg.context_dim > 0), context_mask: [B, S]
    bool, True at real positions (None: all real).
    dropout_key: None runs deterministically (sampling, evaluation).
    """
    cfg = self.cfg
    b = x_BxHxWxC.shape[0]
    ctx = None
    if cfg.context_dim:
      if context is None or context.ndim != 3 or context.shape[-1] != cfg.context_dim:
        raise ValueError(f'This U-Net cross-attends to a context [B, S, {cfg.context_dim}]; '
                         f'got {None if context is None else context.shape}.')
      if context_mask is None:
        context_mask = jnp.ones(context.shape[:2], bool)
      ctx = (context, context_mask)
    emb_BxE = self.time_mlp2(jax.nn.silu(self.time_mlp1(
        timestep_embedding(t_B, cfg.base_channels))))
    if cfg.num_classes:
      if labels_B is None:
        labels_B = jnp.full((b,), cfg.num_classes, jnp.int32)
      emb_BxE = emb_BxE + self.class_embed(labels_B)
    n_blocks = 2 * len(cfg.channel_mult) * cfg.num_res_blocks + len(cfg.channel_mult) + 2
    keys = (iter(jax.random.split(dropout_key, n_blocks)) if dropout_key is not None
            else iter([None] * n_blocks))

    h = self.stem(x_BxHxWxC)
    hs = [h]
    for i, level in enumerate(self.down):
      h = self._level(level, h, emb_BxE, keys, ctx, hs)
      if i < len(self.downsample):
        h = self.downsample[i](h)
        hs.append(h)
    h = self.mid1(h, emb_BxE, next(keys))
    if self.mid_attn is not None:
      h = self.mid_attn(h)
    if self.mid_cross is not None:
      h = self.mid_cross(h, *ctx)
    h = self.mid2(h, emb_BxE, next(keys))
    for i, level in enumerate(self.up):
      h = self._level(level, h, emb_BxE, keys, ctx, skips=hs)
      if i < len(self.upsample):
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = self.upsample[i](h)
    return self.out_conv(jax.nn.silu(self.out_norm(h)))

  @staticmethod
  def _level(level: Level, h, emb_BxE, keys, ctx, hs=None, skips=None):
    """Encoder levels append each output to `hs`; decoder levels pop a skip from `skips`;
    `ctx`: (context, mask) for the cross-attention layers, or None."""
    for j, block in enumerate(level.blocks):
      if skips is not None:
        h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = block(h, emb_BxE, next(keys))
      if len(level.attns):
        h = level.attns[j](h)
      if len(level.cross):
        h = level.cross[j](h, *ctx)
      if hs is not None:
        hs.append(h)
    return h


def forward_flops(cfg: UNetConfig, batch: int, context_len: int = 1) -> float:
  """FLOPs of one forward pass over `batch` images (with a context of `context_len`
  positions when the U-Net cross-attends), from XLA's cost analysis of the graph."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  s = cfg.image_size

  def fwd(params, x, t, labels, context):
    return nnx.merge(graphdef, params)(x, t, labels if cfg.num_classes else None,
                                       context=context if cfg.context_dim else None)

  args = (params, jax.ShapeDtypeStruct((batch, s, s, cfg.channels), cfg.dtype),
          jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32),
          jax.ShapeDtypeStruct((batch, context_len, max(cfg.context_dim, 1)), jnp.float32))
  cost = jax.jit(fwd).lower(*args).cost_analysis()
  return float(cost.get('flops', 0.0)) if cost else 0.0
