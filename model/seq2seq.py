"""Encoder-decoder transformer in the T5 shape (T5 v1.0, v1.1, flan-t5), with RoPE by config.

Shape letters: B batch, S encoder (input) length, T decoder (target) length, D d_model,
H heads, Dh head dim, F mlp dim, V vocab, N layers, R relative-position buckets, M new
tokens of a generation.

The numerics are HF's `T5ForConditionalGeneration`, so an imported checkpoint gives its
logits (train/convert_t5.py):
  - pre-norm residual blocks; RMSNorm without mean or bias, statistics in float32;
  - no 1/sqrt(Dh) scaling of q.k (T5 folds it into the init of wq);
  - position='relative': a learned [R, H] bias on the attention logits per relative
    position bucket (bidirectional buckets in the encoder, causal ones in the decoder), one
    table per stack, shared by all its layers (HF stores it in layer 0); cross-attention has
    none. position='rope': rotary q and k in the self-attentions (model/rope.py), none on
    cross-attention;
  - mlp: 'gated-gelu' down(gelu_tanh(gate(x)) * up(x)) (v1.1, HF's gelu_new), 'relu'
    down(relu(up(x))) (v1.0), 'gated-silu';
  - tie_embeddings: the head is the embedding and the decoder output is scaled by
    D ** -0.5 first (v1.0); untied: a separate [D, V] head, unscaled (v1.1).
Dropout (rate `dropout`) falls where T5's does: on the embeddings, each sublayer's output,
the MLP hidden layer and the stacks' final outputs; not on the attention probabilities.

Parameters carry logical axis names (`LOGICAL_AXIS_RULES` maps them to the mesh) and live in
`param_dtype`; compute runs in `dtype`, softmax and norms in float32, logits in float32.
The layers of each stack are stacked on a leading 'layers' axis (`nnx.vmap`) and run with
`nnx.scan`, as model/transformer.py's.

Init (T5's / mesh-tensorflow's, which the unscaled q.k needs): embedding ~ N(0, 1); wq ~
N(0, (D * Dh) ** -0.5); wk, wv, MLP inputs, relative bias and the untied head ~ N(0, D **
-0.5); wo ~ N(0, (H * Dh) ** -0.5); MLP output ~ N(0, F ** -0.5); norm scales 1.

Generation (`generate`) encodes once, computes every decoder layer's cross-attention keys
and values once, and then decodes token after token over a self-attention KV cache inside
one `lax.while_loop` with static shapes.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from model import attention as attention_lib
from model import rope as rope_lib
from model import sampling

# The transformer's parameter init and dropout, shared rather than copied.
from model.transformer import DTYPES, REMAT_POLICIES, _dropout, _param, constrain_activation

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp', 'expert')),
    ('length', None),  # no context parallelism in this family
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('head_dim', None),
    ('norm', None),
    ('layers', None),  # no pipeline stages in this family
    ('rel_buckets', None),
)

MLPS = ('gated-gelu', 'relu', 'gated-silu')
POSITIONS = ('relative', 'rope')
_ACTIVATION = ('batch', None, None)
_LAYERS_METADATA = {nnx.PARTITION_NAME: 'layers'}


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
  """Resolved encoder-decoder hyperparameters (`config.model` of the seq2seq family)."""
  vocab_size: int  # the tokenizer's, rounded up to a multiple of 128
  d_model: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  encoder_layers: int
  decoder_layers: int
  mlp: str = 'gated-gelu'
  position: str = 'relative'
  relative_buckets: int = 32
  relative_max_distance: int = 128
  rope_theta: float = 10_000.0
  tie_embeddings: bool = False
  dropout: float = 0.0
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.dtype('float32')
  param_dtype: jnp.dtype = jnp.dtype('float32')
  attention: str = 'xla'
  remat: str = 'none'
  decoder_start_id: int = 0

  @classmethod
  def from_config(cls, model_cfg: ml_collections.ConfigDict, *,
                  vocab_size: int) -> 'Seq2SeqConfig':
    """Validated from `config.model` (configs/seq2seq.py) and the tokenizer's vocabulary size.

    The model's vocabulary is `vocab_size` rounded up to a multiple of 128, as T5's (32100
    pieces, 32128 rows): the vocabulary splits over tensor-parallel meshes and an HF T5
    import keeps its shape. The extra rows are never targets.

    Raises:
      ValueError: naming the offending `model.<key>` and what is allowed.
    """
    m = model_cfg
    for key in ('d_model', 'num_heads', 'head_dim', 'mlp_dim', 'encoder_layers',
                'decoder_layers'):
      if int(m[key]) <= 0:
        raise ValueError(f'model.{key}={m[key]} must be a positive integer.')
    if int(vocab_size) <= 0:
      raise ValueError(f'The tokenizer has {vocab_size} tokens; the model needs at least one.')
    mlp = _choice('model.mlp', m.mlp, MLPS)
    position = _choice('model.position', m.position, POSITIONS)
    if position == 'rope' and int(m.head_dim) % 2:
      raise ValueError(f"model.head_dim={m.head_dim} must be even with model.position='rope' "
                       '(RoPE rotates pairs of features).')
    buckets, max_distance = int(m.relative_buckets), int(m.relative_max_distance)
    if position == 'relative' and (buckets < 4 or buckets % 2):
      raise ValueError(f'model.relative_buckets={buckets} must be an even number >= 4 (half '
                       'per direction in the encoder, half of those exact).')
    if position == 'relative' and max_distance <= buckets // 2:
      raise ValueError(f'model.relative_max_distance={max_distance} must exceed '
                       f'model.relative_buckets / 2 = {buckets // 2}.')
    dropout = float(m.dropout)
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f'model.dropout={dropout} must be in [0, 1).')
    attention = _choice('model.attention', m.attention, attention_lib.IMPLEMENTATIONS)
    try:
      attention_lib.check_available(attention)
    except ValueError as e:
      raise ValueError(f'model.attention={attention!r}: {e}') from None
    if position == 'relative' and attention == 'pallas':
      raise ValueError("model.attention='pallas' has no relative position bias; use 'xla', "
                       "'cudnn' or 'auto' with model.position='relative', or position='rope'.")
    if int(m.decoder_start_id) < 0:
      raise ValueError(f'model.decoder_start_id={m.decoder_start_id} must be a token id >= 0.')
    return cls(
        vocab_size=-(-int(vocab_size) // 128) * 128,
        d_model=int(m.d_model), num_heads=int(m.num_heads), head_dim=int(m.head_dim),
        mlp_dim=int(m.mlp_dim), encoder_layers=int(m.encoder_layers),
        decoder_layers=int(m.decoder_layers), mlp=mlp, position=position,
        relative_buckets=buckets, relative_max_distance=max_distance,
        rope_theta=float(m.rope_theta), tie_embeddings=bool(m.tie_embeddings),
        dropout=dropout, norm_eps=float(m.norm_eps),
        dtype=DTYPES[_choice('model.dtype', m.dtype, DTYPES)],
        param_dtype=DTYPES[_choice('model.param_dtype', m.param_dtype, DTYPES)],
        attention=attention, remat=_choice('model.remat', m.remat, ('none', 'full')),
        decoder_start_id=int(m.decoder_start_id))


def _choice(name: str, value, allowed) -> str:
  if value not in allowed:
    raise ValueError(f'{name}={value!r} is not allowed; choose one of {", ".join(allowed)}.')
  return value


# ---------------------------------------------------------------------------
# Parameter counting and FLOPs.
# ---------------------------------------------------------------------------


def _mlp_params(cfg: Seq2SeqConfig) -> int:
  return (2 if cfg.mlp == 'relu' else 3) * cfg.d_model * cfg.mlp_dim


def count_params(cfg: Seq2SeqConfig) -> int:
  """Number of parameters the model creates (a tied head counted once)."""
  d, attn = cfg.d_model, 4 * cfg.d_model * cfg.num_heads * cfg.head_dim
  encoder = cfg.encoder_layers * (attn + _mlp_params(cfg) + 2 * d) + d
  decoder = cfg.decoder_layers * (2 * attn + _mlp_params(cfg) + 3 * d) + d
  rel = 2 * cfg.relative_buckets * cfg.num_heads if cfg.position == 'relative' else 0
  head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
  return cfg.vocab_size * d + encoder + decoder + rel + head


def train_flops_per_token(cfg: Seq2SeqConfig, input_len: int, target_len: int) -> float:
  """Training FLOPs of one (input, target) example divided by its input_len + target_len
  positions: multiply by the positions a step processes (batch * (S + T)) for its FLOPs.

  PaLM's count (appendix B) per stack: 6 FLOPs per matmul weight per position it is applied
  at (the encoder's projections at S positions; the decoder's self-attention, cross-attention
  q and o, MLP and the d_model x vocab head at T; the cross-attention k and v at S per
  decoder layer), and 12 * H * Dh per query per key for attention (encoder S x S, decoder
  self T x T, not halved for the causal mask, cross T x S). Embedding gathers, norms and the
  relative bias are left out.
  """
  s, t = input_len, target_len
  d, hd = cfg.d_model, cfg.num_heads * cfg.head_dim
  enc_matmul = cfg.encoder_layers * (4 * d * hd + _mlp_params(cfg)) * s
  dec_matmul = (cfg.decoder_layers * (6 * d * hd + _mlp_params(cfg)) + d * cfg.vocab_size) * t
  cross_kv = cfg.decoder_layers * 2 * d * hd * s
  attn = 12 * hd * (cfg.encoder_layers * s * s + cfg.decoder_layers * (t * t + t * s))
  return float(6 * (enc_matmul + dec_matmul + cross_kv) + attn) / (s + t)


# ---------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------


def _split(key: jax.Array | None, n: int) -> list:
  return [None] * n if key is None else list(jax.random.split(key, n))


class RMSNorm(nnx.Module):
  """T5's layer norm: x / rms(x) * scale, no mean and no bias, in float32. Written out (not
  nnx.RMSNorm) to keep HF's order of operations, so imported logits match to rounding."""

  def __init__(self, cfg: Seq2SeqConfig):
    self.eps, self.dtype = cfg.norm_eps, cfg.dtype
    self.scale = nnx.Param(jnp.ones((cfg.d_model,), cfg.param_dtype), out_sharding=('norm',))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * x).astype(self.dtype)


def relative_buckets(rel_LxS: jax.Array, *, bidirectional: bool, num_buckets: int,
                     max_distance: int) -> jax.Array:
  """T5's bucket of each relative position rel = key position - query position (int32).

  Half the buckets are exact distances, the other half logarithmic up to max_distance (all
  farther ones share the last); bidirectional (the encoder) gives each sign half the
  buckets, causal (the decoder) only looks back. The float32 arithmetic is HF's, so bucket
  edges fall where they do in transformers.
  """
  rel = rel_LxS.astype(jnp.int32)
  out = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    out = out + (rel > 0).astype(jnp.int32) * num_buckets
    rel = jnp.abs(rel)
  else:
    rel = -jnp.minimum(rel, 0)
  max_exact = num_buckets // 2
  log_ratio = jnp.log(rel.astype(jnp.float32) / jnp.float32(max_exact))
  large = max_exact + (log_ratio / jnp.float32(math.log(max_distance / max_exact))
                       * jnp.float32(num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return out + jnp.where(rel < max_exact, rel, large)


class RelativeBias(nnx.Module):
  """The [R, H] table of one stack and the [H, L, S] bias it gives a query/key layout."""

  def __init__(self, cfg: Seq2SeqConfig, *, bidirectional: bool, rngs: nnx.Rngs):
    self.cfg, self.bidirectional = cfg, bidirectional
    self.embedding = _param(rngs, (cfg.relative_buckets, cfg.num_heads),
                            ('rel_buckets', 'heads'), cfg.d_model ** -0.5, cfg.param_dtype)

  def __call__(self, query_pos_L: jax.Array, key_pos_S: jax.Array) -> jax.Array:
    """float32 bias_HxLxS for queries at `query_pos_L` and keys at `key_pos_S`."""
    buckets_LxS = relative_buckets(
        key_pos_S[None, :] - query_pos_L[:, None], bidirectional=self.bidirectional,
        num_buckets=self.cfg.relative_buckets, max_distance=self.cfg.relative_max_distance)
    bias_LxSxH = jnp.take(self.embedding[...].astype(jnp.float32), buckets_LxS, axis=0)
    return jnp.transpose(bias_LxSxH, (2, 0, 1))


def attend(q_BxLxHxDh: jax.Array, k_BxSxHxDh: jax.Array, v_BxSxHxDh: jax.Array, *,
           mask_BxLxS: jax.Array | None = None, bias_HxLxS: jax.Array | None = None,
           implementation: str = 'xla') -> jax.Array:
  """softmax(q.k + bias) v, unscaled as T5's, over the keys `mask` lets each query see.

  model/attention.py's `attention` takes neither an additive bias nor a key mask across two
  sequences, so T5's relative bias and cross-attention are written here in the same
  einsum-and-float32-softmax form as its xla path; 'cudnn' runs jax.nn.dot_product_attention
  with the bias and mask (and scale 1) in bfloat16 or float16 compute (float32 takes the
  einsums); under 'pallas' cross-attention and biased attention take the einsums, which the
  flash kernel lacks (Attention.self_attention gives it the rest). A query that sees no key
  gets zeros.
  """
  half = q_BxLxHxDh.dtype in (jnp.bfloat16, jnp.float16)  # cuDNN's fused kernel needs it
  if half and attention_lib.resolve(implementation, q_BxLxHxDh.shape[1]) == 'cudnn':
    return jax.nn.dot_product_attention(
        q_BxLxHxDh, k_BxSxHxDh, v_BxSxHxDh,
        bias=None if bias_HxLxS is None else bias_HxLxS[None].astype(q_BxLxHxDh.dtype),
        mask=None if mask_BxLxS is None else mask_BxLxS[:, None], scale=1.0,
        implementation='cudnn')
  scores_BxHxLxS = jnp.einsum('blhd,bshd->bhls', q_BxLxHxDh, k_BxSxHxDh,
                              preferred_element_type=jnp.float32)
  if bias_HxLxS is not None:
    scores_BxHxLxS = scores_BxHxLxS + bias_HxLxS[None]
  if mask_BxLxS is not None:
    scores_BxHxLxS = jnp.where(mask_BxLxS[:, None], scores_BxHxLxS, jnp.finfo(jnp.float32).min)
  probs_BxHxLxS = jax.nn.softmax(scores_BxHxLxS, axis=-1)
  out_BxLxHxDh = jnp.einsum('bhls,bshd->blhd', probs_BxHxLxS.astype(v_BxSxHxDh.dtype),
                            v_BxSxHxDh)
  if mask_BxLxS is not None:
    out_BxLxHxDh = jnp.where(jnp.any(mask_BxLxS, -1)[:, :, None, None], out_BxLxHxDh, 0)
  return out_BxLxHxDh.astype(q_BxLxHxDh.dtype)


class Attention(nnx.Module):
  """Multi-head attention projections: wq, wk, wv [D, H, Dh] and wo [H, Dh, D]."""

  def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, dh, pd = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.param_dtype
    names = ('embed', 'heads', 'head_dim')
    self.wq = _param(rngs, (d, h, dh), names, (d * dh) ** -0.5, pd)
    self.wk = _param(rngs, (d, h, dh), names, d ** -0.5, pd)
    self.wv = _param(rngs, (d, h, dh), names, d ** -0.5, pd)
    self.wo = _param(rngs, (h, dh, d), ('heads', 'head_dim', 'embed'), (h * dh) ** -0.5, pd)

  def project(self, name: str, x_BxLxD: jax.Array) -> jax.Array:
    """q, k or v (`name` 'wq' | 'wk' | 'wv') of x: [B, L, H, Dh] in the compute dtype."""
    w = getattr(self, name)[...].astype(self.cfg.dtype)
    out = jnp.einsum('bld,dhk->blhk', x_BxLxD, w)
    return constrain_activation(out, ('batch', None, 'heads', None))

  def out(self, o_BxLxHxDh: jax.Array) -> jax.Array:
    return jnp.einsum('blhk,hkd->bld', o_BxLxHxDh, self.wo[...].astype(self.cfg.dtype))

  def self_attention(self, x_BxLxD: jax.Array, positions_L: jax.Array, *,
                     mask_BxLxS: jax.Array | None, bias_HxLxS: jax.Array | None,
                     segment_ids_BxL: jax.Array | None = None, causal: bool = False,
                     cache=None):
    """Self-attention of x (positions `positions_L`, for RoPE) under `mask_BxLxS`, which is
    `segment_ids_BxL` (the encoder's padding: ids 1 real, 0 padding) or `causal` (the
    decoder) in the form model/attention.py's flash kernel takes, used by 'pallas' without a
    bias. With `cache` = (k_NxBxPxHxDh, v_NxBxPxHxDh, layer, index): this step's keys and
    values are written at `index` of layer `layer` of the whole cache and the queries attend
    to all P cached positions under `mask_BxLxS`; returns (out, (k, v))."""
    cfg = self.cfg
    q_BxLxHxDh = self.project('wq', x_BxLxD)
    k_BxLxHxDh = self.project('wk', x_BxLxD)
    v_BxLxHxDh = self.project('wv', x_BxLxD)
    if cfg.position == 'rope':
      positions_BxL = jnp.broadcast_to(positions_L, x_BxLxD.shape[:2])
      q_BxLxHxDh = rope_lib.apply_rope(q_BxLxHxDh, positions_BxL, cfg.rope_theta)
      k_BxLxHxDh = rope_lib.apply_rope(k_BxLxHxDh, positions_BxL, cfg.rope_theta)
    if cache is not None:
      k_all, v_all, layer, index = cache
      k_all = jax.lax.dynamic_update_slice(
          k_all, k_BxLxHxDh[None].astype(k_all.dtype), (layer, 0, index, 0, 0))
      v_all = jax.lax.dynamic_update_slice(
          v_all, v_BxLxHxDh[None].astype(v_all.dtype), (layer, 0, index, 0, 0))
      k_BxLxHxDh = k_all[layer].astype(cfg.dtype)
      v_BxLxHxDh = v_all[layer].astype(cfg.dtype)
    if cache is None and bias_HxLxS is None and attention_lib.resolve(
        cfg.attention, x_BxLxD.shape[1]) == 'pallas':
      # The kernel scales q.k by Dh ** -0.5, which T5 does not: undone on q.
      q_BxLxHxDh = q_BxLxHxDh * jnp.asarray(cfg.head_dim ** 0.5, q_BxLxHxDh.dtype)
      out_BxLxHxDh = attention_lib.attention(
          q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, segment_ids_BxL=segment_ids_BxL, causal=causal,
          implementation='pallas')
    else:
      out_BxLxHxDh = attend(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, mask_BxLxS=mask_BxLxS,
                            bias_HxLxS=bias_HxLxS, implementation=cfg.attention)
    out_BxLxD = self.out(out_BxLxHxDh)
    return out_BxLxD if cache is None else (out_BxLxD, (k_all, v_all))

  def cross_attention(self, x_BxTxD: jax.Array, k_BxSxHxDh: jax.Array, v_BxSxHxDh: jax.Array,
                      enc_mask_BxS: jax.Array) -> jax.Array:
    """Attention of the decoder's x over the encoder's keys and values (from `project`)."""
    mask_BxTxS = jnp.broadcast_to(enc_mask_BxS[:, None, :],
                                  (x_BxTxD.shape[0], x_BxTxD.shape[1], enc_mask_BxS.shape[1]))
    out_BxTxHxDh = attend(self.project('wq', x_BxTxD), k_BxSxHxDh, v_BxSxHxDh,
                          mask_BxLxS=mask_BxTxS, implementation=self.cfg.attention)
    return self.out(out_BxTxHxDh)


class Mlp(nnx.Module):
  """T5's feed-forward: down(act(gate(x)) * up(x)) when gated, else down(relu(up(x)))."""

  def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f, pd = cfg.d_model, cfg.mlp_dim, cfg.param_dtype
    if cfg.mlp != 'relu':
      self.w_gate = _param(rngs, (d, f), ('embed', 'mlp'), d ** -0.5, pd)
    self.w_up = _param(rngs, (d, f), ('embed', 'mlp'), d ** -0.5, pd)
    self.w_down = _param(rngs, (f, d), ('mlp', 'embed'), f ** -0.5, pd)

  def __call__(self, x_BxLxD: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
    cfg = self.cfg
    up_BxLxF = jnp.einsum('bld,df->blf', x_BxLxD, self.w_up[...].astype(cfg.dtype))
    if cfg.mlp == 'relu':
      hidden_BxLxF = jax.nn.relu(up_BxLxF)
    else:
      gate_BxLxF = jnp.einsum('bld,df->blf', x_BxLxD, self.w_gate[...].astype(cfg.dtype))
      act = (functools.partial(jax.nn.gelu, approximate=True) if cfg.mlp == 'gated-gelu'
             else jax.nn.silu)
      hidden_BxLxF = act(gate_BxLxF) * up_BxLxF
    hidden_BxLxF = _dropout(hidden_BxLxF, cfg.dropout, dropout_key)
    return jnp.einsum('blf,fd->bld', hidden_BxLxF, self.w_down[...].astype(cfg.dtype))


class EncoderBlock(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)); bidirectional self-attention."""

  def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
    self.dropout = cfg.dropout
    self.attn_norm = RMSNorm(cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_BxSxD, positions_S, mask_BxS, bias_HxSxS, key):
    k_attn, k_hidden, k_mlp = _split(key, 3)
    x_BxSxD = constrain_activation(x_BxSxD, _ACTIVATION)
    b, s = mask_BxS.shape
    h_BxSxD = self.attn.self_attention(
        self.attn_norm(x_BxSxD), positions_S,
        mask_BxLxS=jnp.broadcast_to(mask_BxS[:, None, :], (b, s, s)), bias_HxLxS=bias_HxSxS,
        segment_ids_BxL=mask_BxS.astype(jnp.int32))
    x_BxSxD = x_BxSxD + _dropout(h_BxSxD, self.dropout, k_attn)
    h_BxSxD = self.mlp(self.mlp_norm(x_BxSxD), k_hidden)
    return x_BxSxD + _dropout(h_BxSxD, self.dropout, k_mlp)


class DecoderBlock(nnx.Module):
  """Causal self-attention, cross-attention over the encoder output, MLP; each pre-norm."""

  def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
    self.dropout = cfg.dropout
    self.self_norm = RMSNorm(cfg)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.cross_norm = RMSNorm(cfg)
    self.cross_attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg)
    self.mlp = Mlp(cfg, rngs=rngs)

  def cross_kv(self, enc_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """This layer's cross-attention keys and values of the encoder output, [B, S, H, Dh]."""
    return self.cross_attn.project('wk', enc_BxSxD), self.cross_attn.project('wv', enc_BxSxD)

  def __call__(self, x_BxTxD, positions_T, mask_BxTxT, bias_HxTxT, cross_k, cross_v,
               enc_mask_BxS, key, cache=None):
    """x after the block; with a self-attention `cache` (see Attention.self_attention),
    (x, (k, v))."""
    k_self, k_cross, k_hidden, k_mlp = _split(key, 4)
    x_BxTxD = constrain_activation(x_BxTxD, _ACTIVATION)
    h = self.self_attn.self_attention(self.self_norm(x_BxTxD), positions_T,
                                      mask_BxLxS=mask_BxTxT, bias_HxLxS=bias_HxTxT, causal=True,
                                      cache=cache)
    if cache is not None:
      h, cache = h
    x_BxTxD = x_BxTxD + _dropout(h, self.dropout, k_self)
    h = self.cross_attn.cross_attention(self.cross_norm(x_BxTxD), cross_k, cross_v, enc_mask_BxS)
    x_BxTxD = x_BxTxD + _dropout(h, self.dropout, k_cross)
    h = self.mlp(self.mlp_norm(x_BxTxD), k_hidden)
    x_BxTxD = x_BxTxD + _dropout(h, self.dropout, k_mlp)
    return x_BxTxD if cache is None else (x_BxTxD, cache)


def _stack(block_cls, cfg: Seq2SeqConfig, n: int, rngs: nnx.Rngs):
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_METADATA)
  def make(rngs: nnx.Rngs):
    return block_cls(cfg, rngs=rngs)
  return make(rngs)


class Encoder(nnx.Module):
  """Embedded tokens -> N bidirectional blocks -> final norm."""

  def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    if cfg.position == 'relative':
      self.rel_bias = RelativeBias(cfg, bidirectional=True, rngs=rngs)
    self.blocks = _stack(EncoderBlock, cfg, cfg.encoder_layers, rngs)
    self.final_norm = RMSNorm(cfg)

  def __call__(self, x_BxSxD: jax.Array, mask_BxS: jax.Array,
               dropout_key: jax.Array | None) -> jax.Array:
    cfg = self.cfg
    s = x_BxSxD.shape[1]
    k_embed, k_final, k_layers = _split(dropout_key, 3)
    keys_N = None if k_layers is None else jax.random.split(k_layers, cfg.encoder_layers)
    positions_S = jnp.arange(s, dtype=jnp.int32)
    bias_HxSxS = self.rel_bias(positions_S, positions_S) if cfg.position == 'relative' else None

    def layer(block, x, key):
      return block(x, positions_S, mask_BxS, bias_HxSxS, key)

    if cfg.remat == 'full':
      layer = nnx.remat(layer, policy=REMAT_POLICIES['full'], prevent_cse=False)

    @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry,
              transform_metadata=_LAYERS_METADATA)
    def scan_fn(block, x, key):
      return layer(block, x, key)

    x_BxSxD = scan_fn(self.blocks, _dropout(x_BxSxD, cfg.dropout, k_embed), keys_N)
    return _dropout(self.final_norm(x_BxSxD), cfg.dropout, k_final)


class Decoder(nnx.Module):
  """Embedded tokens -> N causal blocks with cross-attention -> final norm."""

  def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    if cfg.position == 'relative':
      self.rel_bias = RelativeBias(cfg, bidirectional=False, rngs=rngs)
    self.blocks = _stack(DecoderBlock, cfg, cfg.decoder_layers, rngs)
    self.final_norm = RMSNorm(cfg)

  def cross_kv(self, enc_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Every layer's cross-attention keys and values, [N, B, S, H, Dh] each."""
    @nnx.vmap(in_axes=(0, None), out_axes=0, transform_metadata=_LAYERS_METADATA)
    def kv(block, enc):
      return block.cross_kv(enc)
    return kv(self.blocks, enc_BxSxD)

  def __call__(self, x_BxTxD: jax.Array, cross_k_N, cross_v_N, enc_mask_BxS: jax.Array,
               dropout_key: jax.Array | None, *, start: jax.Array | int = 0,
               cache=None):
    """Teacher forcing (cache None): x_BxTxD at positions 0..T-1, causal. Cached: x_BxTxD
    are the tokens at positions start..start+T-1 and cache = (k_NxBxPxHxDh, v_NxBxPxHxDh)
    holds positions < start; returns (hidden, new cache)."""
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    k_embed, k_final, k_layers = _split(dropout_key, 3)
    keys_N = None if k_layers is None else jax.random.split(k_layers, cfg.decoder_layers)
    positions_T = start + jnp.arange(t, dtype=jnp.int32)
    key_positions = positions_T if cache is None else jnp.arange(cache[0].shape[2],
                                                                 dtype=jnp.int32)
    bias = (self.rel_bias(positions_T, key_positions) if cfg.position == 'relative' else None)
    mask_TxP = key_positions[None, :] <= positions_T[:, None]
    mask_BxTxP = jnp.broadcast_to(mask_TxP[None], (b, *mask_TxP.shape))
    x_BxTxD = _dropout(x_BxTxD, cfg.dropout, k_embed)

    if cache is None:
      def layer(block, x, ck, cv, key):
        return block(x, positions_T, mask_BxTxP, bias, ck, cv, enc_mask_BxS, key)

      if cfg.remat == 'full':
        layer = nnx.remat(layer, policy=REMAT_POLICIES['full'], prevent_cse=False)

      @nnx.scan(in_axes=(0, nnx.Carry, 0, 0, 0), out_axes=nnx.Carry,
                transform_metadata=_LAYERS_METADATA)
      def scan_fn(block, x, ck, cv, key):
        return layer(block, x, ck, cv, key)

      x_BxTxD = scan_fn(self.blocks, x_BxTxD, cross_k_N, cross_v_N, keys_N)
      return _dropout(self.final_norm(x_BxTxD), cfg.dropout, k_final)

    # The whole cache is carried and each layer writes its own slice in place (as
    # model/transformer.py's decode): scanning per-layer slices out would copy it all.
    @nnx.scan(in_axes=(0, nnx.Carry, 0, 0), out_axes=nnx.Carry,
              transform_metadata=_LAYERS_METADATA)
    def decode_fn(block, carry, ck, cv):
      x, k_all, v_all, layer_index = carry
      x, (k_all, v_all) = block(x, positions_T, mask_BxTxP, bias, ck, cv, enc_mask_BxS, None,
                                cache=(k_all, v_all, layer_index, start))
      return x, k_all, v_all, layer_index + 1

    x_BxTxD, k_all, v_all, _ = decode_fn(
        self.blocks, (x_BxTxD, cache[0], cache[1], jnp.int32(0)), cross_k_N, cross_v_N)
    return self.final_norm(x_BxTxD), (k_all, v_all)


class Seq2Seq(nnx.Module):
  """Encoder-decoder transformer returning float32 logits.

  Parameter tree: `embedding` [V, D] (shared by encoder, decoder and, when tied, the head);
  `encoder.rel_bias.embedding` and `decoder.rel_bias.embedding` [R, H] (position='relative');
  `encoder.blocks` (every leaf with a leading [N] 'layers' axis): `attn_norm.scale`,
  `attn.{wq,wk,wv}` [D, H, Dh], `attn.wo` [H, Dh, D], `mlp_norm.scale`,
  `mlp.{w_gate,w_up}` [D, F] (w_gate only when gated), `mlp.w_down` [F, D];
  `decoder.blocks`: `self_norm`, `self_attn`, `cross_norm`, `cross_attn`, `mlp_norm`, `mlp`
  likewise; `encoder.final_norm.scale`, `decoder.final_norm.scale`; `lm_head` [D, V] only
  when untied.
  """

  def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = _param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), 1.0,
                            cfg.param_dtype)
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'),
                            cfg.d_model ** -0.5, cfg.param_dtype)

  def _embed(self, tokens_BxL: jax.Array) -> jax.Array:
    x_BxLxD = jnp.take(self.embedding[...], tokens_BxL, axis=0).astype(self.cfg.dtype)
    return constrain_activation(x_BxLxD, _ACTIVATION)

  def encode(self, tokens_BxS: jax.Array, mask_BxS: jax.Array, *,
             dropout_key: jax.Array | None = None) -> jax.Array:
    """enc_BxSxD (compute dtype): bidirectional; padded keys (mask False / 0) are never
    attended, and the outputs at padded positions mean nothing."""
    return self.encoder(self._embed(tokens_BxS), mask_BxS.astype(bool), dropout_key)

  def decode(self, tokens_BxT: jax.Array, enc_BxSxD: jax.Array, enc_mask_BxS: jax.Array, *,
             dropout_key: jax.Array | None = None) -> jax.Array:
    """Teacher-forced float32 logits_BxTxV: causal self-attention over `tokens_BxT` (the
    targets shifted right behind `cfg.decoder_start_id`) and cross-attention over the
    encoder output."""
    enc_mask_BxS = enc_mask_BxS.astype(bool)
    cross_k, cross_v = self.decoder.cross_kv(enc_BxSxD)
    x_BxTxD = self.decoder(self._embed(tokens_BxT), cross_k, cross_v, enc_mask_BxS,
                           dropout_key)
    return self._head(x_BxTxD)

  def __call__(self, inputs_BxS: jax.Array, input_mask_BxS: jax.Array,
               decoder_inputs_BxT: jax.Array, *,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """decode(encode(inputs), ...): float32 logits_BxTxV."""
    k_enc, k_dec = _split(dropout_key, 2)
    enc_BxSxD = self.encode(inputs_BxS, input_mask_BxS, dropout_key=k_enc)
    return self.decode(decoder_inputs_BxT, enc_BxSxD, input_mask_BxS, dropout_key=k_dec)

  def decode_step(self, tokens_BxT: jax.Array, start: jax.Array, cache, cross_kv,
                  enc_mask_BxS: jax.Array):
    """T tokens at positions start..start+T-1 against the caches: (float32 logits_BxTxV,
    new self-attention cache). `cross_kv` is `decoder.cross_kv(encode(...))`, computed once
    per input; `cache` = (k, v), each [N, B, P, H, Dh], with positions < start filled."""
    x_BxTxD, cache = self.decoder(self._embed(tokens_BxT), *cross_kv, enc_mask_BxS.astype(bool),
                                  None, start=start, cache=cache)
    return self._head(x_BxTxD), cache

  def _head(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    if cfg.tie_embeddings:
      x_BxTxD = x_BxTxD * jnp.asarray(cfg.d_model ** -0.5, x_BxTxD.dtype)
      head_DxV = self.embedding[...].astype(cfg.dtype).T
    else:
      head_DxV = self.lm_head[...].astype(cfg.dtype)
    logits_BxTxV = jnp.einsum('btd,dv->btv', x_BxTxD, head_DxV,
                              preferred_element_type=jnp.float32)
    return constrain_activation(logits_BxTxV, ('batch', None, 'vocab'))


def graphdef(cfg: Seq2SeqConfig) -> nnx.GraphDef:
  """The model's graph without its parameters: nnx.merge(graphdef(cfg), params)."""
  with nnx.use_eager_sharding(False):
    return nnx.graphdef(nnx.eval_shape(lambda: Seq2Seq(cfg, rngs=nnx.Rngs(0))))


# ---------------------------------------------------------------------------
# Generation.
# ---------------------------------------------------------------------------


def generate(model, inputs_BxS: jax.Array, input_mask_BxS: jax.Array, *, max_new_tokens: int,
             eos_id: int, key: jax.Array | None = None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, pad_id: int = 0,
             vocab_limit: int | None = None) -> jax.Array:
  """Generated tokens_BxM int32 (M = max_new_tokens): each row's tokens up to and including
  its first `eos_id`, then `pad_id`. Jittable (static shapes); runs jitted when called
  eagerly.

  Args:
    model: a Seq2Seq, or its (graphdef, params).
    inputs_BxS, input_mask_BxS: the encoder input and its mask (False/0 = padding).
    max_new_tokens: M, static (the other settings are traced: one program serves them all).
    eos_id: the token that ends a row.
    key: a PRNG key; needed when temperature > 0.
    temperature: 0 is greedy; else sampled after top_k (0: off) and top_p (1: off)
      filtering (model/sampling.py).
    pad_id: what fills a row after its eos (T5's pad, 0).
    vocab_limit: the tokenizer's vocabulary size; larger ids (the padded rows) are never
      chosen.
  """
  if isinstance(model, nnx.Module):
    gdef, params = nnx.split(model)
  else:
    gdef, params = model
  # Plain arrays: Variables closed over by the loop body would belong to the outer trace.
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  if key is None and not (isinstance(temperature, (int, float)) and temperature <= 0):
    raise ValueError('generate with temperature > 0 needs a PRNG key.')
  key = jax.random.key(0) if key is None else key
  vocab = params['embedding'].shape[0]
  limit = vocab if vocab_limit is None else min(int(vocab_limit), vocab)
  scalars = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.int32(eos_id),
             jnp.int32(pad_id), jnp.int32(limit))
  return _generate(gdef, params, inputs_BxS, input_mask_BxS, key, *scalars,
                   max_new_tokens=int(max_new_tokens))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=('max_new_tokens',))
def _generate(gdef, params, inputs_BxS, input_mask_BxS, key, temperature, top_k, top_p, eos_id,
              pad_id, vocab_limit, *, max_new_tokens: int):
  """`generate` with every setting but M traced, so one program serves them all."""
  model: Seq2Seq = nnx.merge(gdef, params)
  cfg = model.cfg
  b, m = inputs_BxS.shape[0], max_new_tokens
  mask_BxS = input_mask_BxS.astype(bool)
  cross_kv = model.decoder.cross_kv(model.encode(inputs_BxS, mask_BxS))
  shape = (cfg.decoder_layers, b, m, cfg.num_heads, cfg.head_dim)
  cache = (jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
  params_s = sampling.SamplingParams(
      temperature=jnp.broadcast_to(temperature, (b,)), top_k=jnp.broadcast_to(top_k, (b,)),
      top_p=jnp.broadcast_to(top_p, (b,)), min_p=jnp.zeros((b,), jnp.float32),
      repetition_penalty=jnp.ones((b,), jnp.float32))

  def cond(carry):
    i, _, _, _, done_B = carry
    return (i < m) & ~jnp.all(done_B)

  def body(carry):
    i, token_B, cache, out_BxM, done_B = carry
    # Merged inside the loop body: an nnx module cannot cross into a lax trace.
    step_model: Seq2Seq = nnx.merge(gdef, params)
    logits_Bx1xV, cache = step_model.decode_step(token_B[:, None], i, cache, cross_kv, mask_BxS)
    logits_BxV = logits_Bx1xV[:, 0]
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab_limit, logits_BxV, -jnp.inf)
    keys_B = jax.random.split(jax.random.fold_in(key, i), b)
    next_B = sampling.sample(logits_BxV, params_s, keys_B)
    next_B = jnp.where(done_B, pad_id, next_B)
    out_BxM = out_BxM.at[:, i].set(next_B)
    return i + 1, next_B, cache, out_BxM, done_B | (next_B == eos_id)

  start_B = jnp.full((b,), cfg.decoder_start_id, jnp.int32)
  out_BxM = jnp.full((b, m), pad_id, jnp.int32)
  carry = (jnp.int32(0), start_B, cache, out_BxM, jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, carry)[3]


def shift_right(targets_BxT: jax.Array, start_id: int) -> jax.Array:
  """Decoder inputs for teacher forcing: `start_id`, then the targets without their last."""
  targets_BxT = jnp.asarray(targets_BxT)
  start_Bx1 = jnp.full_like(targets_BxT[:, :1], start_id)
  return jnp.concatenate([start_Bx1, targets_BxT[:, :-1]], axis=1)
