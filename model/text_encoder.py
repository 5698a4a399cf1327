"""A small bidirectional transformer encoder: the jointly trained text encoder of text-to-image
diffusion (model/unet.py's cross-attention reads its output).

Shape letters: B batch, S tokens, E width, N heads, D head dim, M MLP width, V vocabulary.

  tokens -> embedding + learned positions -> depth x [pre-LayerNorm self-attention (every
  token sees every real token: a key padding mask, no causality) + pre-LayerNorm GELU MLP]
  -> final LayerNorm -> context_BxSxE.

Why not model/transformer.py's blocks: its attention is causal throughout (RoPE, segment ids,
the KV cache, the scanned and pipelined layer stack all assume it), and a caption encoder needs
none of that machinery: a non-causal flag there would touch every one of those paths for a
2-layer, 16-token model. This one is written from model/attention.py's masked einsum path
(`masked_attention`), the same attention every Kiln model dispatches through.

Padding: positions where mask_BxS is False are never attended to, so what they hold does not
reach any real position's output (their own outputs are whatever; cross-attention masks them).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from model import attention as attention_lib

# Names of the encoder's parameter axes (merged with the U-Net's by the diffusion task).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('text_embed', 'fsdp'),
    ('heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('vocab', None),
    ('positions', None),
    ('norm', None),
)

DTYPES = {name: jnp.dtype(name) for name in ('bfloat16', 'float32', 'float16')}


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  vocab_size: int
  max_len: int  # S: captions are padded or cut to this many tokens
  width: int = 64  # E
  depth: int = 2
  num_heads: int = 4
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.dtype('float32')
  param_dtype: jnp.dtype = jnp.dtype('float32')

  @classmethod
  def from_config(cls, text_cfg: ml_collections.ConfigDict, *, vocab_size: int,
                  dtype: str = 'float32', param_dtype: str = 'float32') -> 'TextEncoderConfig':
    """From `config.text` (configs/diffusion.py). Raises ValueError naming the `text.*` key."""
    t = text_cfg
    for key in ('width', 'depth', 'num_heads', 'max_len'):
      if int(t[key]) <= 0:
        raise ValueError(f'text.{key}={t[key]!r} must be a positive integer.')
    if int(t.width) % int(t.num_heads):
      raise ValueError(f'text.num_heads={t.num_heads} must divide text.width={t.width}.')
    if float(t.mlp_ratio) <= 0:
      raise ValueError(f'text.mlp_ratio={t.mlp_ratio!r} must be positive.')
    return cls(vocab_size=int(vocab_size), max_len=int(t.max_len), width=int(t.width),
               depth=int(t.depth), num_heads=int(t.num_heads), mlp_ratio=float(t.mlp_ratio),
               dtype=DTYPES[dtype], param_dtype=DTYPES[param_dtype])

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return int(round(self.width * self.mlp_ratio))


def _normal(std: float) -> nnx.Initializer:
  return nnx.initializers.normal(std)


def _layer_norm(cfg: TextEncoderConfig) -> nnx.LayerNorm:
  return nnx.LayerNorm(cfg.width, epsilon=1e-5, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                       scale_metadata={'out_sharding': ('norm',)},
                       bias_metadata={'out_sharding': ('norm',)}, rngs=nnx.Rngs(0))


class EncoderBlock(nnx.Module):
  def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
    e, n, d, m = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    # GPT-2's init: N(0, 0.02), the residual outputs scaled down by sqrt(2 * depth).
    out_std = 0.02 / math.sqrt(2 * cfg.depth)
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.norm1 = _layer_norm(cfg)
    self.qkv = nnx.Einsum('bse,tend->tbsnd', (3, e, n, d), (3, 1, 1, n, d),
                          kernel_init=_normal(0.02), bias_init=nnx.initializers.zeros,
                          kernel_metadata={'out_sharding': (None, 'text_embed', 'heads',
                                                            'head_dim')},
                          bias_metadata={'out_sharding': (None, None, None, 'heads',
                                                          'head_dim')}, rngs=rngs, **kw)
    self.attn_out = nnx.Einsum('bsnd,nde->bse', (n, d, e), (e,), kernel_init=_normal(out_std),
                               bias_init=nnx.initializers.zeros,
                               kernel_metadata={'out_sharding': ('heads', 'head_dim',
                                                                 'text_embed')},
                               bias_metadata={'out_sharding': ('text_embed',)}, rngs=rngs, **kw)
    self.norm2 = _layer_norm(cfg)
    self.up = nnx.Linear(e, m, kernel_init=_normal(0.02), bias_init=nnx.initializers.zeros,
                         kernel_metadata={'out_sharding': ('text_embed', 'mlp')},
                         bias_metadata={'out_sharding': ('mlp',)}, rngs=rngs, **kw)
    self.down = nnx.Linear(m, e, kernel_init=_normal(out_std), bias_init=nnx.initializers.zeros,
                           kernel_metadata={'out_sharding': ('mlp', 'text_embed')},
                           bias_metadata={'out_sharding': ('text_embed',)}, rngs=rngs, **kw)

  def __call__(self, x_BxSxE: jax.Array, mask_BxSxS: jax.Array) -> jax.Array:
    q, k, v = self.qkv(self.norm1(x_BxSxE).astype(x_BxSxE.dtype))
    x_BxSxE = x_BxSxE + self.attn_out(attention_lib.masked_attention(q, k, v, mask_BxSxS))
    h_BxSxM = jax.nn.gelu(self.up(self.norm2(x_BxSxE).astype(x_BxSxE.dtype)))
    return x_BxSxE + self.down(h_BxSxM)


class TextEncoder(nnx.Module):
  """tokens_BxS (int), mask_BxS (bool, True at real tokens) -> context_BxSxE float32."""

  def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.width, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, embedding_init=_normal(0.02),
                           embedding_metadata={'out_sharding': ('vocab', 'text_embed')},
                           rngs=rngs)
    self.positions = nnx.Param(_normal(0.02)(rngs.params(), (cfg.max_len, cfg.width),
                                             cfg.param_dtype),
                               out_sharding=('positions', 'text_embed'))
    self.blocks = nnx.List([EncoderBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.final_norm = _layer_norm(cfg)

  def __call__(self, tokens_BxS: jax.Array, mask_BxS: jax.Array) -> jax.Array:
    b, s = tokens_BxS.shape
    if s > self.cfg.max_len:
      raise ValueError(f'{s} tokens is more than text.max_len={self.cfg.max_len}.')
    x_BxSxE = (self.embed(tokens_BxS)
               + self.positions[...][:s].astype(self.cfg.dtype)[None])
    mask_BxSxS = jnp.broadcast_to(mask_BxS.astype(bool)[:, None, :], (b, s, s))
    for block in self.blocks:
      x_BxSxE = block(x_BxSxE, mask_BxSxS)
    return self.final_norm(x_BxSxE).astype(jnp.float32)
