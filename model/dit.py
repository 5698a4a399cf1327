"""Diffusion transformer (DiT, Peebles & Xie 2023) in Flax NNX: the U-Net's alternative denoiser.

Shape letters: B batch, H height, W width, C image channels, p patch size, L = (H/p) * (W/p)
tokens, P = p * p * C pixels per patch, D width, N heads, K = D / N head dim, M MLP width,
S context length, E context width, F timestep frequencies.

  patchify (non-overlapping p x p patches, a linear map to D) + fixed 2-D sin-cos positions
  -> depth x DiTBlock -> final layer (adaLN, linear to P) -> unpatchify -> [B, H, W, C]

Conditioning: c = MLP(sinusoid(t)) + class embedding (num_classes + 1 rows, the last one
"no label", as the U-Net, for classifier-free guidance). Each block regresses from SiLU(c) a
shift, scale and gate for its two branches (adaLN-Zero):

  x += gate1 * SelfAttention(LN(x) * (1 + scale1) + shift1)
  x += CrossAttention(LN'(x), context)             (only when context_dim > 0)
  x += gate2 * MLP(LN(x) * (1 + scale2) + shift2)  (gelu with the tanh approximation)

The cross-attention sits where PixArt-alpha puts it, after self-attention and before the MLP,
ungated (the text is not a per-block modulation); its queries are layer-normed (with a learned
scale and bias, as Stable Diffusion's transformer blocks) and its keys are the context tokens
that `context_mask` marks. The modulation regressors, the cross-attention's output projection
and the final layer start at zero, so every block starts as the identity and a fresh network
predicts exactly zero, like the U-Net's zero-initialised output convs. Other weights are
xavier-uniform per projection, the timestep MLP and class embedding N(0, 0.02), as DiT.

Parameters carry logical axis names; `LOGICAL_AXIS_RULES` maps them to the mesh the way the
LM's transformer does (Megatron-style): the width D ('embed') is split by FSDP and gathered
where used, heads and the MLP hidden over the tensor axis; every activation is pinned to the
batch sharding (`constrain_batch`). LayerNorms and LN(x) * (1 + scale) + shift run in float32,
the rest in `dtype`. `model.dropout` applies to the MLP hidden (DiT itself has none).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from model import attention as attention_lib
from model.unet import DTYPES, check_compute_keys, timestep_embedding

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp', 'expert')),
    ('embed', 'fsdp'),  # the token width D: FSDP, gathered where used
    ('heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),  # the MLP hidden M and the timestep MLP's hidden
    ('channels', 'tensor'),  # the width of each modulation output (shift, scale, gate)
    ('context_embed', 'fsdp'),  # the context width E
    ('frequency', None),  # the timestep's sinusoid features
    ('image', None),  # the pixels of a patch, P
    ('classes', None),
    ('norm', None),
)

# DiT's timestep sinusoid width, whatever the model width.
TIME_FREQUENCIES = 256
DIT_KEYS = ('patch_size', 'width', 'depth', 'num_heads', 'mlp_ratio')


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  image_size: int
  channels: int  # image channels C
  num_classes: int  # 0: no class embedding
  context_dim: int = 0  # E; 0: no cross-attention
  patch_size: int = 2
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.dtype('float32')
  param_dtype: jnp.dtype = jnp.dtype('float32')
  attention: str = 'xla'

  @classmethod
  def from_config(cls, model_cfg: ml_collections.ConfigDict, *, image_size: int, channels: int,
                  num_classes: int, context_dim: int) -> 'DiTConfig':
    """From `config.model` (its `dit` block and the diffusion family's shared keys) and the
    data's shape.

    Raises:
      ValueError: naming the `model.*` key that is wrong and what it may be.
    """
    m = model_cfg
    if 'dit' not in m:
      raise ValueError('model.dit is missing: the DiT backbone reads model.dit.{'
                       f'{", ".join(DIT_KEYS)}}}.')
    d = m.dit
    for key in DIT_KEYS:
      if key not in d:
        raise ValueError(f'model.dit.{key} is missing (model.dit needs {", ".join(DIT_KEYS)}).')
    for key in DIT_KEYS[:-1]:
      if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] <= 0:
        raise ValueError(f'model.dit.{key}={d[key]!r} must be a positive integer.')
    if image_size % d.patch_size:
      raise ValueError(f'model.dit.patch_size={d.patch_size} must divide the image size '
                       f'{image_size}.')
    if d.width % d.num_heads:
      raise ValueError(f'model.dit.num_heads={d.num_heads} must divide '
                       f'model.dit.width={d.width}.')
    if d.width % 4:
      raise ValueError(f'model.dit.width={d.width} must be a multiple of 4 (the 2-D sin-cos '
                       'position embedding gives a quarter of it to each of sin, cos per axis).')
    if not float(d.mlp_ratio) * d.width >= 1:
      raise ValueError(f'model.dit.mlp_ratio={d.mlp_ratio!r} must be positive (the MLP width '
                       'is mlp_ratio * width).')
    if not 0.0 <= float(m.dropout) < 1.0:
      raise ValueError(f'model.dropout={m.dropout!r} must be in [0, 1).')
    check_compute_keys(m)
    return cls(image_size=image_size, channels=channels, num_classes=num_classes,
               context_dim=context_dim, patch_size=d.patch_size, width=d.width, depth=d.depth,
               num_heads=d.num_heads, mlp_ratio=float(d.mlp_ratio), dropout=float(m.dropout),
               dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], attention=m.attention)

  @property
  def grid(self) -> int:
    """Patches per side."""
    return self.image_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)

  @property
  def patch_pixels(self) -> int:
    return self.patch_size ** 2 * self.channels


# --- patches and positions -------------------------------------------------------------------


def patchify(x_BxHxWxC: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, L, P]: p x p patches in row-major order, each flattened (row, col, C)."""
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x_BxLxP: jax.Array, p: int, h: int, w: int) -> jax.Array:
  """The inverse of `patchify` for an [h, w] image."""
  b, _, pp_c = x_BxLxP.shape
  c = pp_c // (p * p)
  x = x_BxLxP.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def sincos_2d(grid: int, dim: int, max_period: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D position embedding of a grid x grid token map, float32 [grid * grid, dim].

  Token (i, j) (row-major) gets [sin(i w), cos(i w), sin(j w), cos(j w)] with the
  dim / 4 frequencies w_k = max_period ** (-k / (dim / 4)): the first half encodes the row,
  the second the column (as MAE's and DiT's tables, up to which half holds which axis).
  Computed in numpy from static shapes, so it is a constant of the compiled graph, not a
  parameter.
  """
  quarter = dim // 4
  freqs_Q = max_period ** (-np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')

  def axis(pos_L):
    angles_LxQ = pos_L.reshape(-1)[:, None] * freqs_Q[None]
    return np.concatenate([np.sin(angles_LxQ), np.cos(angles_LxQ)], axis=1)

  return np.concatenate([axis(rows), axis(cols)], axis=1).astype(np.float32)


# --- layers --------------------------------------------------------------------------------


def _no_draws() -> nnx.Rngs:
  """Rngs for layers whose initialisers ignore their key (zeros, no parameters): the model's
  stream stays with the random layers (model/unet.py's `_no_draws`)."""
  return nnx.Rngs(0)


def constrain_batch(x_Bx: jax.Array) -> jax.Array:
  """Pins x's leading axis to the rules' 'batch' sharding, when a mesh is set and it divides.

  Every activation with a batch axis goes through this. Left to choose, XLA's SPMD partitioner
  laid some out like the FSDP-sharded weights they meet (batch over 'data' alone, width over
  'fsdp') and swapped two examples' outputs on a 2x2x2 (data, fsdp, tensor) mesh (error 0.3
  against one device, jax 0.10.2 on CPU, with Shardy and with GSPMD; pinning only the token
  stream and the conditioning was not enough). tests/test_dit.py's mesh test found it, as
  tests/test_gan.py's found the same kind for the GAN (model/gan.py `constrain_batch`). Pinned,
  the mesh matches one device to 1e-6.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x_Bx
  axes = tuple(a for a in dict(LOGICAL_AXIS_RULES)['batch'] if a in mesh.shape)
  if x_Bx.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x_Bx
  return jax.lax.with_sharding_constraint(x_Bx, jax.sharding.PartitionSpec(axes))


def _xavier(in_axis=-2, out_axis=-1, batch_axis=()) -> nnx.Initializer:
  return nnx.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=in_axis,
                                           out_axis=out_axis, batch_axis=batch_axis)


def _einsum(spec: str, kernel_shape: tuple[int, ...], kernel_names: tuple, cfg: DiTConfig, *,
            rngs: nnx.Rngs, bias_names: tuple | None = None, init: nnx.Initializer | None = None,
            bias_shape: tuple[int, ...] | None = None) -> nnx.Einsum:
  """An nnx.Einsum with named axes and a zero bias; `init` None means zero-initialised."""
  zero = init is None
  return nnx.Einsum(
      spec, kernel_shape, bias_shape, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      kernel_init=nnx.initializers.zeros if zero else init, bias_init=nnx.initializers.zeros,
      kernel_metadata={'out_sharding': kernel_names},
      bias_metadata={'out_sharding': bias_names}, rngs=_no_draws() if zero else rngs)


def _plain_norm(width: int) -> nnx.LayerNorm:
  """LayerNorm without scale or bias (adaLN supplies them), float32 in and out."""
  return nnx.LayerNorm(width, epsilon=1e-6, use_bias=False, use_scale=False, dtype=jnp.float32,
                       use_fast_variance=False, rngs=_no_draws())


def _modulate(norm: nnx.LayerNorm, x_BxLxD, shift_BxD, scale_BxD, dtype) -> jax.Array:
  """norm(x) * (1 + scale) + shift in float32, returned in the compute dtype."""
  h = norm(x_BxLxD.astype(jnp.float32))
  h = h * (1.0 + scale_BxD.astype(jnp.float32)[:, None]) + shift_BxD.astype(jnp.float32)[:, None]
  return constrain_batch(h.astype(dtype))


class Modulation(nnx.Module):
  """SiLU(c) -> `n` vectors of width D (shifts, scales, gates), zero-initialised."""

  def __init__(self, n: int, cfg: DiTConfig):
    d = cfg.width
    self.proj = _einsum('be,etf->btf', (d, n, d), ('embed', None, 'channels'), cfg,
                        rngs=_no_draws(), bias_shape=(n, d), bias_names=(None, 'channels'))

  def __call__(self, c_BxD: jax.Array) -> list[jax.Array]:
    mod_BxNxD = constrain_batch(self.proj(jax.nn.silu(c_BxD)))
    return [mod_BxNxD[:, i] for i in range(mod_BxNxD.shape[1])]


class SelfAttention(nnx.Module):
  """Multi-head self-attention over the L tokens through model/attention.py."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d, n, k = cfg.width, cfg.num_heads, cfg.head_dim
    self.qkv = _einsum('bld,tdnk->tblnk', (3, d, n, k), (None, 'embed', 'heads', 'head_dim'),
                       cfg, rngs=rngs, init=_xavier(1, (2, 3), (0,)), bias_shape=(3, n, k),
                       bias_names=(None, 'heads', 'head_dim'))
    self.out = _einsum('blnk,nkd->bld', (n, k, d), ('heads', 'head_dim', 'embed'), cfg,
                       rngs=rngs, init=_xavier((0, 1), 2), bias_shape=(d,),
                       bias_names=('embed',))
    self.implementation = cfg.attention

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    q, k, v = (constrain_batch(a) for a in self.qkv(x_BxLxD))
    out_BxLxNxK = attention_lib.attention(q, k, v, causal=False,
                                          implementation=self.implementation)
    return constrain_batch(self.out(constrain_batch(out_BxLxNxK)))


class CrossAttention(nnx.Module):
  """Queries from the layer-normed tokens, keys and values from the context; the output
  projection starts at zero, so the text enters a fresh network gradually."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d, e, n, k = cfg.width, cfg.context_dim, cfg.num_heads, cfg.head_dim
    self.norm = nnx.LayerNorm(d, epsilon=1e-6, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                              use_fast_variance=False,
                              scale_metadata={'out_sharding': ('norm',)},
                              bias_metadata={'out_sharding': ('norm',)}, rngs=_no_draws())
    self.q = _einsum('bld,dnk->blnk', (d, n, k), ('embed', 'heads', 'head_dim'), cfg, rngs=rngs,
                     init=_xavier(0, (1, 2)), bias_shape=(n, k), bias_names=('heads', 'head_dim'))
    self.kv = _einsum('bse,tenk->tbsnk', (2, e, n, k),
                      (None, 'context_embed', 'heads', 'head_dim'), cfg, rngs=rngs,
                      init=_xavier(1, (2, 3), (0,)), bias_shape=(2, n, k),
                      bias_names=(None, 'heads', 'head_dim'))
    self.out = _einsum('blnk,nkd->bld', (n, k, d), ('heads', 'head_dim', 'embed'), cfg,
                       rngs=rngs, bias_shape=(d,), bias_names=('embed',))
    self.implementation = cfg.attention
    self.dtype = cfg.dtype

  def __call__(self, x_BxLxD, context_BxSxE, mask_BxS):
    q = constrain_batch(self.q(self.norm(x_BxLxD).astype(self.dtype)))
    k, v = (constrain_batch(a) for a in self.kv(context_BxSxE))
    if mask_BxS is None:
      out_BxLxNxK = attention_lib.attention(q, k, v, causal=False,
                                            implementation=self.implementation)
    else:
      # A key-padding mask is not a layout the kernels take (their segment ids need L == S);
      # the [L, S] scores of a short caption are small, so the einsum path is the right one.
      mask_BxLxS = jnp.broadcast_to(mask_BxS[:, None, :], (q.shape[0], q.shape[1], k.shape[1]))
      out_BxLxNxK = attention_lib.masked_attention(q, k, v, mask_BxLxS)
    return constrain_batch(self.out(constrain_batch(out_BxLxNxK)))


class Mlp(nnx.Module):
  """up, gelu (tanh approximation), dropout, down."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d, m = cfg.width, cfg.mlp_dim
    self.up = _einsum('bld,dm->blm', (d, m), ('embed', 'mlp'), cfg, rngs=rngs, init=_xavier(),
                      bias_shape=(m,), bias_names=('mlp',))
    self.down = _einsum('blm,md->bld', (m, d), ('mlp', 'embed'), cfg, rngs=rngs,
                        init=_xavier(), bias_shape=(d,), bias_names=('embed',))
    self.dropout = nnx.Dropout(cfg.dropout)

  def __call__(self, x_BxLxD, dropout_key):
    h_BxLxM = jax.nn.gelu(constrain_batch(self.up(x_BxLxD)), approximate=True)
    h_BxLxM = self.dropout(h_BxLxM, deterministic=dropout_key is None, rngs=dropout_key)
    return constrain_batch(self.down(h_BxLxM))


class DiTBlock(nnx.Module):
  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.modulation = Modulation(6, cfg)
    self.norm = _plain_norm(cfg.width)
    self.attn = SelfAttention(cfg, rngs=rngs)
    self.cross = CrossAttention(cfg, rngs=rngs) if cfg.context_dim else None
    self.mlp = Mlp(cfg, rngs=rngs)
    self.dtype = cfg.dtype

  def __call__(self, x_BxLxD, c_BxD, context_BxSxE, mask_BxS, dropout_key):
    shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c_BxD)
    h = _modulate(self.norm, x_BxLxD, shift1, scale1, self.dtype)
    x_BxLxD = constrain_batch(x_BxLxD + gate1[:, None] * self.attn(h))
    if self.cross is not None:
      x_BxLxD = constrain_batch(x_BxLxD + self.cross(x_BxLxD, context_BxSxE, mask_BxS))
    h = _modulate(self.norm, x_BxLxD, shift2, scale2, self.dtype)
    return constrain_batch(x_BxLxD + gate2[:, None] * self.mlp(h, dropout_key))


class DiT(nnx.Module):
  """eps / v / x0 predictor with the U-Net's call: (x_t [B, H, W, C], t [B], labels [B] | None,
  context [B, S, E], context_mask [B, S]) -> [B, H, W, C]."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.width
    self.patch_embed = _einsum('blp,pd->bld', (cfg.patch_pixels, d), ('image', 'embed'), cfg,
                               rngs=rngs, init=_xavier(), bias_shape=(d,),
                               bias_names=('embed',))
    normal = nnx.initializers.normal(0.02)
    self.time_mlp1 = _einsum('bf,fd->bd', (TIME_FREQUENCIES, d), ('frequency', 'mlp'), cfg,
                             rngs=rngs, init=normal, bias_shape=(d,), bias_names=('mlp',))
    self.time_mlp2 = _einsum('bm,md->bd', (d, d), ('mlp', 'embed'), cfg, rngs=rngs, init=normal,
                             bias_shape=(d,), bias_names=('embed',))
    if cfg.num_classes:
      self.class_embed = nnx.Embed(
          cfg.num_classes + 1, d, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
          embedding_init=normal, embedding_metadata={'out_sharding': ('classes', 'embed')},
          rngs=rngs)
    self.blocks = nnx.List([DiTBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.final_modulation = Modulation(2, cfg)
    self.final_norm = _plain_norm(d)
    self.final = _einsum('bld,dp->blp', (d, cfg.patch_pixels), ('embed', 'image'), cfg,
                         rngs=rngs, bias_shape=(cfg.patch_pixels,), bias_names=('image',))

  def __call__(self, x_BxHxWxC: jax.Array, t_B: jax.Array, labels_B: jax.Array | None = None,
               *, context: jax.Array | None = None, context_mask: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """Labels in [0, num_classes], num_classes meaning "no label"; None for "no label" too.

    context: [B, S, context_dim] embeddings, needed exactly when context_dim > 0;
    context_mask: [B, S] bool, True for the tokens to attend to (None: all of them).
    dropout_key: None runs deterministically (sampling, evaluation).
    """
    cfg = self.cfg
    b, h, w, _ = x_BxHxWxC.shape
    if (context is None) != (not cfg.context_dim):
      raise ValueError(f'This DiT has context_dim={cfg.context_dim}: pass a context exactly '
                       'when context_dim > 0.')
    c_BxD = self.time_mlp2(jax.nn.silu(self.time_mlp1(
        timestep_embedding(t_B, TIME_FREQUENCIES).astype(cfg.dtype))))
    if cfg.num_classes:
      if labels_B is None:
        labels_B = jnp.full((b,), cfg.num_classes, jnp.int32)
      c_BxD = c_BxD + self.class_embed(labels_B)
    c_BxD = constrain_batch(c_BxD)
    pos_LxD = jnp.asarray(sincos_2d(cfg.grid, cfg.width), cfg.dtype)
    x_BxLxD = constrain_batch(
        self.patch_embed(patchify(x_BxHxWxC.astype(cfg.dtype), cfg.patch_size)) + pos_LxD)
    keys = (jax.random.split(dropout_key, cfg.depth) if dropout_key is not None
            else [None] * cfg.depth)
    for block, key in zip(self.blocks, keys, strict=True):
      x_BxLxD = block(x_BxLxD, c_BxD, context, context_mask, key)
    shift, scale = self.final_modulation(c_BxD)
    out_BxLxP = constrain_batch(
        self.final(_modulate(self.final_norm, x_BxLxD, shift, scale, cfg.dtype)))
    return unpatchify(out_BxLxP, cfg.patch_size, h, w)


def forward_flops(cfg: DiTConfig, batch: int, context_len: int = 16) -> float:
  """FLOPs of one forward pass over `batch` images, from XLA's cost analysis of the graph;
  with cross-attention, over contexts of `context_len` tokens."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  s = cfg.image_size

  def fwd(params, x, t, labels, context):
    return nnx.merge(graphdef, params)(x, t, labels if cfg.num_classes else None,
                                       context=context)

  context = (jax.ShapeDtypeStruct((batch, context_len, cfg.context_dim), cfg.dtype)
             if cfg.context_dim else None)
  args = (params, jax.ShapeDtypeStruct((batch, s, s, cfg.channels), cfg.dtype),
          jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32),
          context)
  cost = jax.jit(fwd).lower(*args).cost_analysis()
  return float(cost.get('flops', 0.0)) if cost else 0.0
