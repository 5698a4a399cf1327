"""Decoder-only transformer: Llama-style by default (RoPE, RMSNorm, GQA, SwiGLU, no
biases), GPT-2 and Qwen2 blocks by a few switches.

Shape letters: B batch, L length, D d_model, H query heads, K key/value heads,
Dh head dim, F mlp dim, V vocab, N layers, P max positions.

Switches (config keys; defaults give the Llama block):
  norm      rmsnorm | layernorm (with a bias, GPT-2)
  mlp       swiglu  | gelu_tanh (up, GELU with the tanh approximation, down; GPT-2)
  position  rope (half-split layout, as HF's `rotate_half`) | learned (a [P, D] table, GPT-2)
  qkv_bias, attn_out_bias, mlp_bias: biases on the q/k/v projections (Qwen2), on the
  attention output projection and on the MLP projections (GPT-2 has all three).
  rope_scaling  linear | llama3 | yarn frequencies for long context (model/rope.py)
  sliding_window  w > 0: each token attends to itself and the w - 1 tokens before it
                (Mistral), in training and over the KV cache
  moe.n_experts > 0: every block's MLP is a mixture of SwiGLU experts (model/moe.py;
  Mixtral, Qwen2-MoE), expert-parallel over the 'expert' mesh axis.
GPT-2's fused c_attn is kept as separate q, k and v matrices (a reshape apart;
train/convert.py splits and re-fuses it).

Parameters live in `param_dtype` and carry logical axis names (flax
`out_sharding` metadata); `LOGICAL_AXIS_RULES` maps them to the mesh axes.
Compute runs in `dtype`: each parameter is cast where it is used. Softmax,
norms and RoPE angles run in float32 and the logits come back in float32.

The blocks are stacked along a leading 'layers' axis (`nnx.vmap` at init) and
run with `nnx.scan`, so compile time does not grow with depth.

Every weight matrix is applied by `project`, the one place that knows how it is stored:
float, or quantized (`quant`: int8, int4 or NF4, model/quant.py; dequantized one layer at
a time inside the scan), and with LoRA adapters where `lora_rank` > 0 (model/lora.py).

Init: embedding and every input projection (q, k, v, gate, up, untied head)
~ N(0, 0.02); the residual output projections (attention out, MLP down)
~ N(0, 0.02 / sqrt(2 * n_layers)), as in GPT-2, so the residual stream variance
does not grow with depth; norm scales = 1.
"""

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from model import attention as attention_lib
from model import context_parallel, kv_cache
from model import lora as lora_lib
from model import moe as moe_lib
from model import pipeline as pipeline_lib
from model import quant as quant_lib
from model import rope as rope_lib

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp', 'expert')),
    ('length', 'context'),  # activations only (model/context_parallel.py)
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('head_dim', None),
    ('norm', None),
    ('layers', 'stage'),  # pipeline stages (model/pipeline.py); a no-op at mesh.stage=1
    ('positions', None),
    ('expert', 'expert'),
    ('expert_mlp', 'tensor'),
)

DTYPES = {name: jnp.dtype(name) for name in ('bfloat16', 'float32', 'float16')}
# Activations a block names (jax.ad_checkpoint.checkpoint_name) for the names-based remat
# policies: the q, k and v projections, and the attention and MLP outputs (after their output
# projections), each a [B, L, *] tensor per layer.
QKV_NAME, ATTN_OUT_NAME, MLP_OUT_NAME = 'qkv_proj', 'attn_out', 'mlp_out'
_BLOCK_OUTPUTS = (QKV_NAME, ATTN_OUT_NAME, MLP_OUT_NAME)
# What the backward pass of a block keeps from its forward pass; the rest is recomputed.
#   none          everything (no remat)
#   full          nothing but the block's input (the scan carry)
#   dots          the outputs of matmuls without batch dimensions (the projections), on device
#   offload_dots  the same, moved to host memory ('pinned_host') in the forward pass and back
#                 for the backward one: device memory of `full`, most of the recompute of `dots`
#   outputs       the named q/k/v projections and attention and MLP outputs, on device
#   offload_outputs  the same named activations, in host memory
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'offload_dots': jax.checkpoint_policies.offload_dot_with_no_batch_dims('device', 'pinned_host'),
    'outputs': jax.checkpoint_policies.save_only_these_names(*_BLOCK_OUTPUTS),
    'offload_outputs': jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=_BLOCK_OUTPUTS,
        offload_src='device', offload_dst='pinned_host'),
}
INIT_STD = 0.02
NORMS = ('rmsnorm', 'layernorm')
MLPS = ('swiglu', 'gelu_tanh')
POSITIONS = ('rope', 'learned')


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Resolved model hyperparameters (no -1 placeholders)."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  rope_scaling: rope_lib.RopeScaling = rope_lib.RopeScaling()  # model/rope.py
  # Sliding-window attention (Mistral): a token attends to itself and the sliding_window - 1
  # tokens before it; 0: to every earlier token.
  sliding_window: int = 0
  tie_embeddings: bool = True
  norm_eps: float = 1e-5
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.dtype('bfloat16')  # compute
  param_dtype: jnp.dtype = jnp.dtype('float32')
  remat: str = 'none'
  attention: str = 'xla'
  scan_unroll: int = 1
  norm: str = 'rmsnorm'
  mlp: str = 'swiglu'
  position: str = 'rope'
  max_positions: int = 0  # the learned table's size P; unused with rope
  qkv_bias: bool = False
  attn_out_bias: bool = False
  mlp_bias: bool = False
  # How the projections are stored (model/quant.py): none | int8 | int4 | nf4, the int4 group
  # or NF4 block along the contraction axis (0: 128 and 64), NF4's int8 block scales.
  quant: str = 'none'
  quant_group: int = 0
  quant_double: bool = True
  # Low-rank adapters (model/lora.py); rank 0 = none.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: str = '.*'
  # Mixture of experts (model/moe.py); n_experts 0 = a dense MLP in every block.
  n_experts: int = 0
  top_k: int = 2
  expert_mlp_dim: int = 0
  shared_mlp_dim: int = 0
  shared_gate: bool = False
  router: str = 'topk_softmax'
  capacity_factor: float = 0.0  # 0: dropless
  balance_weight: float = 0.01
  z_weight: float = 0.001
  # Under a mesh with a 'context' axis: zig-zag the row so every device does the same causal
  # work (model/context_parallel.py). No effect on the parameters.
  context_load_balance: bool = True
  # Pipeline parallelism over the 'stage' mesh axis (model/pipeline.py); used only when the
  # mesh in context has stage > 1. microbatches -1: 2 * stages.
  pipeline_microbatches: int = -1
  pipeline_schedule: str = 'gpipe'
  pipeline_repeats: int = 1

  @property
  def quant_scheme(self) -> quant_lib.Scheme:
    return quant_lib.Scheme(self.quant, self.quant_group, self.quant_double)

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

  def base(self) -> 'TransformerConfig':
    """The same model without adapters and with float weights (what a merge gives)."""
    return dataclasses.replace(self, quant='none', quant_group=0, lora_rank=0)

  @classmethod
  def from_config(
      cls, model_cfg: ml_collections.ConfigDict, vocab_size: int
  ) -> 'TransformerConfig':
    """Builds the config from `config.model`, resolving -1 defaults and validating.

    Args:
      model_cfg: the `config.model` ConfigDict (schema in configs/lm.py).
      vocab_size: the tokenizer's vocabulary size (model.vocab_size=-1 rounds it up to a
        multiple of 128).

    Raises:
      ValueError: naming the offending `model.*` key and the allowed values.
    """
    m = model_cfg
    for key in ('d_model', 'n_layers', 'n_heads', 'n_kv_heads'):
      if int(m[key]) <= 0:
        raise ValueError(f'model.{key}={m[key]} must be a positive integer.')
    d_model, n_heads, n_kv_heads = int(m.d_model), int(m.n_heads), int(m.n_kv_heads)
    if n_heads % n_kv_heads:
      raise ValueError(
          f'model.n_kv_heads={n_kv_heads} must divide model.n_heads={n_heads}.')

    head_dim = int(m.head_dim)
    if head_dim == -1:
      if d_model % n_heads:
        raise ValueError(
            f'model.d_model={d_model} must be divisible by model.n_heads={n_heads} '
            'when model.head_dim=-1; set model.head_dim explicitly otherwise.')
      head_dim = d_model // n_heads
    if head_dim <= 0 or (head_dim % 2 and m.get('position', 'rope') == 'rope'):
      raise ValueError(
          f'model.head_dim={head_dim} must be a positive even number (RoPE rotates '
          'pairs of features).')

    # Keys added after the first runs: a run's saved config.json may lack them.
    norm = _parse_key('model.norm', m.get('norm', 'rmsnorm'), NORMS)
    mlp = _parse_key('model.mlp', m.get('mlp', 'swiglu'), MLPS)
    position = _parse_key('model.position', m.get('position', 'rope'), POSITIONS)
    max_positions = int(m.get('max_positions', -1))
    if position == 'learned' and max_positions <= 0:
      raise ValueError(
          f"model.position='learned' needs model.max_positions > 0 (the size of the position "
          f'table), got {max_positions}.')

    mlp_dim = int(m.mlp_dim)
    if mlp_dim == -1:
      # SwiGLU's 8/3 * d_model gives it the parameters of a 4 * d_model GELU MLP.
      mlp_dim = 4 * d_model if mlp == 'gelu_tanh' else 64 * math.ceil(8 * d_model / (3 * 64))
    if mlp_dim <= 0:
      raise ValueError(f'model.mlp_dim={mlp_dim} must be positive or -1.')

    model_vocab = int(m.vocab_size)
    if model_vocab == -1:
      # Rounded up so the vocab dimension splits over any tensor-parallel size
      # up to 128 (and matmuls tile well); the extra rows are never targets.
      model_vocab = -(-vocab_size // 128) * 128
    elif model_vocab < vocab_size:
      raise ValueError(
          f'model.vocab_size={model_vocab} is smaller than the tokenizer vocabulary '
          f'({vocab_size}); use -1 or a value >= {vocab_size}.')

    dropout = float(m.dropout)
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f'model.dropout={dropout} must be in [0, 1).')

    sliding_window = int(m.get('sliding_window', 0))
    if sliding_window < 0:
      raise ValueError(f'model.sliding_window={sliding_window} must be >= 0 (0: no window).')
    rope_scaling = rope_lib.RopeScaling.from_config(m.get('rope_scaling'))
    if rope_scaling.type != 'none' and position != 'rope':
      raise ValueError(f'model.rope_scaling.type={rope_scaling.type!r} needs '
                       "model.position='rope'.")

    scan_unroll = int(m.get('scan_unroll', 1))
    if scan_unroll == 0 or scan_unroll < -1:
      raise ValueError(
          f'model.scan_unroll={scan_unroll} must be -1 (all layers unrolled) or a positive '
          'number of layers per scan iteration.')

    return cls(
        vocab_size=model_vocab,
        d_model=d_model,
        n_layers=int(m.n_layers),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        mlp_dim=mlp_dim,
        rope_theta=float(m.rope_theta),
        rope_scaling=rope_scaling,
        sliding_window=sliding_window,
        tie_embeddings=bool(m.tie_embeddings),
        norm_eps=float(m.norm_eps),
        dropout=dropout,
        dtype=_parse_choice('model.dtype', m.dtype, DTYPES),
        param_dtype=_parse_choice('model.param_dtype', m.param_dtype, DTYPES),
        remat=_parse_key('model.remat', m.remat, REMAT_POLICIES),
        attention=_parse_attention(m.attention),
        scan_unroll=scan_unroll,
        norm=norm,
        mlp=mlp,
        position=position,
        max_positions=max_positions if position == 'learned' else 0,
        qkv_bias=bool(m.get('qkv_bias', False)),
        attn_out_bias=bool(m.get('attn_out_bias', False)),
        mlp_bias=bool(m.get('mlp_bias', False)),
        context_load_balance=bool(m.get('context_load_balance', True)),
        **_parse_lora(m.get('lora'), mlp),
        **_parse_moe(m.get('moe'), mlp, mlp_dim, m.get('lora'), bool(m.get('mlp_bias', False))),
        **_parse_pipeline(m.get('pipeline')),
    )


def _parse_moe(moe: ml_collections.ConfigDict | None, mlp: str, mlp_dim: int,
               lora: ml_collections.ConfigDict | None, mlp_bias: bool) -> dict[str, Any]:
  """TransformerConfig's mixture-of-experts fields from `model.moe` (absent in runs saved
  before it existed: a dense model)."""
  if moe is None or int(moe.get('n_experts', 0)) == 0:
    return {}
  n, top_k = int(moe.n_experts), int(moe.top_k)
  if n < 0:
    raise ValueError(f'model.moe.n_experts={n} must be >= 0 (0 turns MoE off).')
  if not 1 <= top_k <= n:
    raise ValueError(f'model.moe.top_k={top_k} must be in [1, model.moe.n_experts={n}].')
  if mlp != 'swiglu':
    raise ValueError(f"model.moe.n_experts={n} needs model.mlp='swiglu' (the experts are "
                     f'SwiGLU MLPs), got {mlp!r}.')
  if mlp_bias:
    raise ValueError(f'model.mlp_bias=True is not supported with model.moe.n_experts={n} (the '
                     'experts have no biases); set model.mlp_bias=False.')
  if lora is not None and (int(lora.rank) or lora.base_quant != 'none'):
    raise ValueError('model.lora is not supported with model.moe.n_experts > 0 (the experts '
                     'have no adapters or quantized storage); set model.lora.rank=0.')
  expert_mlp_dim = int(moe.expert_mlp_dim)
  expert_mlp_dim = mlp_dim if expert_mlp_dim == -1 else expert_mlp_dim
  if expert_mlp_dim <= 0:
    raise ValueError(f'model.moe.expert_mlp_dim={moe.expert_mlp_dim} must be positive or -1 '
                     '(model.mlp_dim).')
  shared = int(moe.shared_mlp_dim)
  if shared < 0:
    raise ValueError(f'model.moe.shared_mlp_dim={shared} must be >= 0 (0: no shared expert).')
  if bool(moe.shared_gate) and not shared:
    raise ValueError('model.moe.shared_gate=True needs model.moe.shared_mlp_dim > 0 (it gates '
                     'the shared expert).')
  cf = float(moe.capacity_factor)
  if cf < 0:
    raise ValueError(f'model.moe.capacity_factor={cf} must be >= 0 (0: dropless).')
  for key in ('balance_weight', 'z_weight'):
    if float(moe[key]) < 0:
      raise ValueError(f'model.moe.{key}={moe[key]} must be >= 0.')
  return dict(
      n_experts=n, top_k=top_k, expert_mlp_dim=expert_mlp_dim, shared_mlp_dim=shared,
      shared_gate=bool(moe.shared_gate),
      router=_parse_key('model.moe.router', moe.router, moe_lib.ROUTERS), capacity_factor=cf,
      balance_weight=float(moe.balance_weight), z_weight=float(moe.z_weight))


def _parse_pipeline(pipeline: ml_collections.ConfigDict | None) -> dict[str, Any]:
  """TransformerConfig's pipeline fields from `model.pipeline` (absent in older runs). The
  checks that need the mesh (layers per stage, microbatch sizes) are the task's."""
  if pipeline is None:
    return {}
  fields = dict(pipeline_microbatches=int(pipeline.microbatches),
                pipeline_schedule=str(pipeline.schedule), pipeline_repeats=int(pipeline.repeats))
  problem = pipeline_lib.check(1, 1, pipeline_lib.resolve_microbatches(
      fields['pipeline_microbatches'], 1), fields['pipeline_schedule'],
      fields['pipeline_repeats'], 1, 1)
  if problem:
    raise ValueError(problem)
  return fields


def _parse_lora(lora: ml_collections.ConfigDict | None, mlp: str) -> dict[str, Any]:
  """TransformerConfig's adapter and base-quantization fields from `model.lora`."""
  if lora is None:  # a run saved before LoRA existed
    return {}
  rank = int(lora.rank)
  if rank < 0:
    raise ValueError(f'model.lora.rank={rank} must be >= 0 (0 turns LoRA off).')
  alpha, dropout = float(lora.alpha), float(lora.dropout)
  if alpha <= 0:
    raise ValueError(f'model.lora.alpha={alpha} must be > 0 (adapters are scaled by alpha/rank).')
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'model.lora.dropout={dropout} must be in [0, 1).')
  try:
    pattern = re.compile(lora.targets)
  except re.error as e:
    raise ValueError(f'model.lora.targets={lora.targets!r} is not a valid regular expression: '
                     f'{e}.') from None
  names = [n for n in lora_lib.TARGETS if mlp == 'swiglu' or n != 'w_gate']
  if rank and not any(pattern.fullmatch(n) for n in names):
    raise ValueError(f'model.lora.targets={lora.targets!r} matches no projection; the names are '
                     f'{", ".join(names)} (e.g. \'wq|wv\' or \'.*\').')
  base_quant = _parse_key('model.lora.base_quant', lora.base_quant, ('none', 'nf4'))
  if base_quant != 'none' and not rank:
    raise ValueError(f'model.lora.base_quant={base_quant!r} needs model.lora.rank > 0: a '
                     'quantized base trains only through adapters.')
  return dict(lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout,
              lora_targets=str(lora.targets), quant=base_quant,
              quant_double=bool(lora.double_quant))


def _parse_key(name: str, value: str, allowed) -> str:
  if value not in allowed:
    raise ValueError(f'{name}={value!r} is not allowed; choose one of {", ".join(allowed)}.')
  return value


def _parse_attention(value: str) -> str:
  value = _parse_key('model.attention', value, attention_lib.IMPLEMENTATIONS)
  try:
    attention_lib.check_available(value)
  except ValueError as e:
    raise ValueError(f'model.attention={value!r}: {e}') from None
  return value


def _parse_choice(name: str, value: str, table: dict[str, Any]) -> Any:
  return table[_parse_key(name, value, table)]


# ---------------------------------------------------------------------------
# Parameter counting and FLOPs.
# ---------------------------------------------------------------------------


def _block_matmul_params(cfg: TransformerConfig, active: bool = False) -> int:
  """Matmul weights of one block; with MoE, `active` counts only the top_k experts a token
  takes (plus the router and the shared expert, which every token takes)."""
  d, dh = cfg.d_model, cfg.head_dim
  attn = d * cfg.n_heads * dh * 2 + d * cfg.n_kv_heads * dh * 2  # q, o and k, v
  if cfg.n_experts:
    experts = cfg.top_k if active else cfg.n_experts
    mlp = (experts * 3 * d * cfg.expert_mlp_dim + d * cfg.n_experts
           + 3 * d * cfg.shared_mlp_dim + (d if cfg.shared_gate else 0))
  else:
    mlp = (3 if cfg.mlp == 'swiglu' else 2) * d * cfg.mlp_dim
  return attn + mlp


def _block_vector_params(cfg: TransformerConfig) -> int:
  """Norm scales (and LayerNorm biases) and projection biases of one block."""
  d, f = cfg.d_model, cfg.mlp_dim
  norms = 2 * _norm_params(cfg)
  qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim if cfg.qkv_bias else 0
  out = d if cfg.attn_out_bias else 0
  mlp = ((2 if cfg.mlp == 'swiglu' else 1) * f + d) if cfg.mlp_bias else 0
  return norms + qkv + out + mlp


def _norm_params(cfg: TransformerConfig) -> int:
  return cfg.d_model * (2 if cfg.norm == 'layernorm' else 1)


def count_params(cfg: TransformerConfig, active: bool = False) -> int:
  """Number of parameters the model creates (the tied matrix is counted once); with
  `active`, those one token uses (an MoE model's top_k experts of each block, not all)."""
  embed = cfg.vocab_size * cfg.d_model
  head = 0 if cfg.tie_embeddings else cfg.d_model * cfg.vocab_size
  positions = cfg.max_positions * cfg.d_model if cfg.position == 'learned' else 0
  per_block = _block_matmul_params(cfg, active) + _block_vector_params(cfg)
  return embed + head + positions + cfg.n_layers * per_block + _norm_params(cfg)


def train_flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs per token, PaLM (appendix B): 6 * N + 12 * n_layers * H * Dh * T.

  N counts the weights that take part in a matmul: every block projection plus
  the d_model x vocab output head (counted whether or not it is tied). It
  leaves out the input and position embeddings (gathers, not matmuls), the norms
  and the biases. For MoE, N is the ACTIVE count: each token's top_k experts, the router
  and the shared expert (not the E - top_k experts it skips), so MFU measures useful work.
  The attention term is PaLM's, without halving for the causal mask.

  Args:
    cfg: the model.
    seq_len: the training context length T (with a sliding window w, the attention term
      counts min(T, w) keys per query).
  """
  n = cfg.n_layers * _block_matmul_params(cfg, active=True) + cfg.d_model * cfg.vocab_size
  attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
  if cfg.sliding_window:  # each query scores min(T, w) keys, not T
    attn = attn * min(seq_len, cfg.sliding_window) / seq_len
  return float(6 * n + attn)


# ---------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------


def _param(
    rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], std: float, dtype
) -> nnx.Param:
  init = jax.nn.initializers.normal(stddev=std)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _zeros(shape: tuple[int, ...], names: tuple[str, ...], dtype) -> nnx.Param:
  return nnx.Param(jnp.zeros(shape, dtype), out_sharding=names)


def _add_bias(x: jax.Array, module: nnx.Module, name: str) -> jax.Array:
  """x + module.<name> (broadcast over the leading axes) when the module has that bias."""
  bias = getattr(module, name, None)
  return x if bias is None else x + bias[...].astype(x.dtype)


def _weight(module: nnx.Module, name: str, cfg: TransformerConfig, rngs: nnx.Rngs,
            shape: tuple[int, ...], names: tuple[str, ...], std: float) -> None:
  """Sets projection `name` on `module`: a float Param ~ N(0, std), or its quantized stored
  form (model/quant.py), plus LoRA adapters when `cfg` targets it. The adapters draw from a
  key folded off the weight's, so the base weights are those of the model without LoRA."""
  key = rngs.params()
  w = jax.random.normal(key, shape, cfg.param_dtype) * jnp.asarray(std, cfg.param_dtype)
  scheme = cfg.quant_scheme
  stored = quant_lib.quantize(w, name, scheme) if scheme.mode != 'none' else {'': w}
  stored_names = quant_lib.stored_names(names, name, scheme)
  for suffix, value in stored.items():
    setattr(module, name + suffix, nnx.Param(value, out_sharding=stored_names[suffix]))
  if lora_lib.is_target(name, cfg.lora_targets, cfg.lora_rank):
    adapters = lora_lib.init_adapters(jax.random.fold_in(key, 1), shape, names, name,
                                      cfg.lora_rank, cfg.param_dtype)
    for suffix, (value, value_names) in adapters.items():
      setattr(module, name + suffix, nnx.Param(value, out_sharding=value_names))


def project(module: nnx.Module, name: str, spec: str, x: jax.Array, *,
            lora_key: jax.Array | None = None, preferred_element_type=None) -> jax.Array:
  """einsum(spec, x, module.<name>) in x's dtype: the one place a weight matrix is applied.

  A model with adapters or quantized weights trains only its adapters, so its base weights
  are constants: `_frozen_matmul` applies them, dequantizing a quantized weight (`cfg.quant`)
  on the fly. A weight with adapters adds scale * ((dropout(x) @ A) @ B), with dropout keyed
  by `lora_key`.
  """
  cfg = module.cfg
  scheme = cfg.quant_scheme
  stored = {s: getattr(module, name + s)[...] for s in scheme.suffixes()}
  if scheme.mode == 'none' and not cfg.lora_rank:
    out = jnp.einsum(spec, x, stored[''].astype(x.dtype),
                     preferred_element_type=preferred_element_type)
  else:
    out = _frozen_matmul(spec, name, scheme, x.dtype, preferred_element_type)(x, stored)
  if hasattr(module, name + lora_lib.A):
    delta = lora_lib.apply(module, name, spec, x, cfg.lora_scale, cfg.lora_dropout, lora_key)
    out = out + delta.astype(out.dtype)
  return out


def _frozen_matmul(spec: str, name: str, scheme: quant_lib.Scheme, dtype, preferred):
  """f(x, stored) = einsum(spec, x, W) for a constant W held as `stored`, whose backward
  pass keeps only `stored` and recomputes W (dequantizing it).

  Autodiff would otherwise keep W in compute dtype (the dequantized or cast weight, a value
  of the constants alone) as a residual of every scanned layer: a float copy of the whole
  base model, more than full fine-tuning keeps. W gets a zero cotangent.
  """
  inputs, out = spec.split('->')
  x_letters, w_letters = inputs.split(',')
  dx_spec = f'{out},{w_letters}->{x_letters}'

  def weight(stored):
    w = stored[''] if scheme.mode == 'none' else quant_lib.dequantize(stored, name, scheme)
    return w.astype(dtype)

  @jax.custom_vjp
  def f(x, stored):
    return jnp.einsum(spec, x, weight(stored), preferred_element_type=preferred)

  def fwd(x, stored):
    return f(x, stored), stored

  def bwd(stored, g):
    dx = jnp.einsum(dx_spec, g.astype(dtype), weight(stored)).astype(dtype)
    zeros = jax.tree.map(
        lambda s: np.zeros(s.shape, jax.dtypes.float0) if not jnp.issubdtype(
            s.dtype, jnp.floating) else jnp.zeros_like(s), stored)
    return dx, zeros

  f.defvjp(fwd, bwd)
  return f


def constrain_activation(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """`x` pinned to the sharding its logical axis `names` get from LOGICAL_AXIS_RULES under
  the mesh in context: the batch over the data-parallel axes, the row over 'context',
  heads and vocabulary over 'tensor'. An axis the mesh lacks, one that is manual here (a
  pipeline stage's shard_map), one already used or one that does not divide its dimension
  is left out; without a mesh `x` is returned as it is.

  Left to itself, XLA's partitioner may lay activations out like the FSDP-sharded weights
  they meet and keep the batch whole: compiled for a TPU slice, a 7B step under FSDP then
  needed temporaries that grow with the global batch (hundreds of GiB per device with XLA
  attention). Pinning them, as MaxText does with its logical constraints, keeps each
  device's share of the batch its own.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  rules, manual, used, spec = dict(LOGICAL_AXIS_RULES), set(mesh.manual_axes), set(), []
  for dim, name in zip(x.shape, names, strict=True):
    axes = rules.get(name) if name else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.axis_names and a not in manual and a not in used)
    if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
      spec.append(axes)
      used.update(axes)
    else:
      spec.append(None)
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def _keys(key: jax.Array | None, n: int) -> list:
  return [None] * n if key is None else list(jax.random.split(key, n))


class Norm(nnx.Module):
  """RMSNorm (a scale) or LayerNorm (a scale and a bias); statistics in float32."""

  def __init__(self, cfg: TransformerConfig):
    self.eps = cfg.norm_eps
    self.dtype = cfg.dtype
    self.layernorm = cfg.norm == 'layernorm'
    self.scale = nnx.Param(jnp.ones((cfg.d_model,), cfg.param_dtype), out_sharding=('norm',))
    if self.layernorm:
      self.bias = _zeros((cfg.d_model,), ('norm',), cfg.param_dtype)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)
    if self.layernorm:
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    x = x * self.scale[...].astype(jnp.float32)
    if self.layernorm:
      x = x + self.bias[...].astype(jnp.float32)
    return x.astype(self.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention, with RoPE unless the model has learned positions."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, k, dh, pd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
    out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
    _weight(self, 'wq', cfg, rngs, (d, h, dh), ('embed', 'heads', 'head_dim'), INIT_STD)
    _weight(self, 'wk', cfg, rngs, (d, k, dh), ('embed', 'kv_heads', 'head_dim'), INIT_STD)
    _weight(self, 'wv', cfg, rngs, (d, k, dh), ('embed', 'kv_heads', 'head_dim'), INIT_STD)
    _weight(self, 'wo', cfg, rngs, (h, dh, d), ('heads', 'head_dim', 'embed'), out_std)
    if cfg.qkv_bias:
      self.q_bias = _zeros((h, dh), ('heads', 'head_dim'), pd)
      self.k_bias = _zeros((k, dh), ('kv_heads', 'head_dim'), pd)
      self.v_bias = _zeros((k, dh), ('kv_heads', 'head_dim'), pd)
    if cfg.attn_out_bias:
      self.o_bias = _zeros((d,), ('embed',), pd)

  def __call__(
      self, x_BxLxD: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array | None,
      kv: tuple[jax.Array, jax.Array, jax.Array | None, jax.Array] | None = None,
      lora_key: jax.Array | None = None,
      context: context_parallel.Layout | None = None,
  ):
    """Self-attention over the row; with `kv` = (k_pages, v_pages, page_table, layer), the
    new keys and values go into layer `layer` of the whole cache and the queries attend to
    it (model/kv_cache.py), and the result is (out, (k_pages, v_pages)). `lora_key` keys
    adapter dropout. `context`: the row is split over the mesh's 'context' axis in that
    layout (model/context_parallel.py)."""
    theta = self.cfg.rope_theta
    key_q, key_k, key_v, key_o = _keys(lora_key, 4)
    q_BxLxHxDh = project(self, 'wq', 'bld,dhk->blhk', x_BxLxD, lora_key=key_q)
    k_BxLxKxDh = project(self, 'wk', 'bld,dhk->blhk', x_BxLxD, lora_key=key_k)
    v_BxLxKxDh = project(self, 'wv', 'bld,dhk->blhk', x_BxLxD, lora_key=key_v)
    q_BxLxHxDh = constrain_activation(_add_bias(q_BxLxHxDh, self, 'q_bias'),
                                      ('batch', 'length', 'heads', None))
    k_BxLxKxDh = constrain_activation(_add_bias(k_BxLxKxDh, self, 'k_bias'),
                                      ('batch', 'length', 'kv_heads', None))
    v_BxLxKxDh = constrain_activation(_add_bias(v_BxLxKxDh, self, 'v_bias'),
                                      ('batch', 'length', 'kv_heads', None))
    q_BxLxHxDh = checkpoint_name(q_BxLxHxDh, QKV_NAME)
    k_BxLxKxDh = checkpoint_name(k_BxLxKxDh, QKV_NAME)
    v_BxLxKxDh = checkpoint_name(v_BxLxKxDh, QKV_NAME)
    if self.cfg.position == 'rope':
      q_BxLxHxDh = rope_lib.apply_rope(q_BxLxHxDh, positions_BxL, theta, self.cfg.rope_scaling)
      k_BxLxKxDh = rope_lib.apply_rope(k_BxLxKxDh, positions_BxL, theta, self.cfg.rope_scaling)
    if context is not None:
      out_BxLxHxDh = context_parallel.attention(
          q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, context, segment_ids_BxL=segment_ids_BxL,
          causal=True, sliding_window=attention_window(self.cfg),
          implementation=self.cfg.attention)
    elif kv is None:
      out_BxLxHxDh = attention_lib.attention(
          q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL=segment_ids_BxL,
          causal=True, sliding_window=attention_window(self.cfg),
          implementation=self.cfg.attention)
    else:
      out_BxLxHxDh, *pages = kv_cache.attend(
          q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, positions_BxL, *kv,
          implementation=self.cfg.attention, sliding_window=self.cfg.sliding_window)
    out_BxLxD = project(self, 'wo', 'blhk,hkd->bld', out_BxLxHxDh, lora_key=key_o)
    out_BxLxD = checkpoint_name(_add_bias(out_BxLxD, self, 'o_bias'), ATTN_OUT_NAME)
    return out_BxLxD if kv is None else (out_BxLxD, tuple(pages))


def attention_window(cfg: TransformerConfig) -> tuple[int, int] | None:
  """`cfg.sliding_window` in model/attention.py's terms, (left, right): a token sees the keys
  at [pos - (w - 1), pos]; None without a window."""
  return (cfg.sliding_window - 1, 0) if cfg.sliding_window else None


class Mlp(nnx.Module):
  """SwiGLU, down(silu(gate(x)) * up(x)), or GPT-2's down(gelu_tanh(up(x)))."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.gated = cfg.mlp == 'swiglu'
    d, f, pd = cfg.d_model, cfg.mlp_dim, cfg.param_dtype
    out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
    if self.gated:
      _weight(self, 'w_gate', cfg, rngs, (d, f), ('embed', 'mlp'), INIT_STD)
    _weight(self, 'w_up', cfg, rngs, (d, f), ('embed', 'mlp'), INIT_STD)
    _weight(self, 'w_down', cfg, rngs, (f, d), ('mlp', 'embed'), out_std)
    if cfg.mlp_bias:
      if self.gated:
        self.gate_bias = _zeros((f,), ('mlp',), pd)
      self.up_bias = _zeros((f,), ('mlp',), pd)
      self.down_bias = _zeros((d,), ('embed',), pd)

  def __call__(self, x_BxLxD: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
    k_up, k_gate, k_down = _keys(lora_key, 3)
    up_BxLxF = project(self, 'w_up', 'bld,df->blf', x_BxLxD, lora_key=k_up)
    up_BxLxF = _add_bias(up_BxLxF, self, 'up_bias')
    if self.gated:
      gate_BxLxF = project(self, 'w_gate', 'bld,df->blf', x_BxLxD, lora_key=k_gate)
      hidden_BxLxF = jax.nn.silu(_add_bias(gate_BxLxF, self, 'gate_bias')) * up_BxLxF
    else:
      hidden_BxLxF = jax.nn.gelu(up_BxLxF, approximate=True)
    out_BxLxD = project(self, 'w_down', 'blf,fd->bld', hidden_BxLxF, lora_key=k_down)
    return checkpoint_name(_add_bias(out_BxLxD, self, 'down_bias'), MLP_OUT_NAME)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.dropout = cfg.dropout
    self.lora_dropout = cfg.lora_dropout
    self.attn_norm = Norm(cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg)
    self.moe = bool(cfg.n_experts)
    self.mlp = moe_lib.MoeMlp(cfg, rngs=rngs) if self.moe else Mlp(cfg, rngs=rngs)

  def __call__(
      self,
      x_BxLxD: jax.Array,
      positions_BxL: jax.Array,
      segment_ids_BxL: jax.Array | None,
      dropout_key: jax.Array | None,
      kv: tuple[jax.Array, jax.Array, jax.Array | None, jax.Array] | None = None,
      context: context_parallel.Layout | None = None,
  ):
    """(x after the block, aux_3: the MoE layer's float32 [balance, z, dropped], zeros for a
    dense MLP); with a cache `kv` (see Attention), (x, (k_pages, v_pages)) and the MoE layer
    dropless."""
    attn_key = mlp_key = attn_lora_key = mlp_lora_key = None
    if dropout_key is not None and self.lora_dropout > 0:
      attn_key, mlp_key, attn_lora_key, mlp_lora_key = jax.random.split(dropout_key, 4)
    elif dropout_key is not None:
      attn_key, mlp_key = jax.random.split(dropout_key)
    x_BxLxD = constrain_activation(x_BxLxD, _ACTIVATION)
    h_BxLxD = self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL, kv,
                        attn_lora_key, context)
    if kv is not None:
      h_BxLxD, pages = h_BxLxD
    x_BxLxD = x_BxLxD + _dropout(h_BxLxD, self.dropout, attn_key)
    if self.moe:
      h_BxLxD, aux_3 = self.mlp(self.mlp_norm(x_BxLxD), dropless=kv is not None)
    else:
      h_BxLxD = self.mlp(self.mlp_norm(x_BxLxD), mlp_lora_key)
      aux_3 = jnp.zeros((len(moe_lib.AUX_NAMES),), jnp.float32)
    x_BxLxD = x_BxLxD + _dropout(h_BxLxD, self.dropout, mlp_key)
    return (x_BxLxD, aux_3) if kv is None else (x_BxLxD, pages)


_LAYERS_METADATA = {nnx.PARTITION_NAME: 'layers'}
# The residual stream's logical axes: the batch and the row split, the features whole.
_ACTIVATION = ('batch', 'length', None)


class Transformer(nnx.Module):
  """Decoder-only language model returning float32 next-token logits.

  Parameter tree: `embedding` [V, D]; `position_embedding` [P, D] with learned
  positions; `blocks` (every leaf with a leading [N] 'layers' axis):
  `attn_norm.{scale,bias}`, `attn.{wq,wk,wv,wo}` [D, H|K, Dh] / [H, Dh, D],
  `attn.{q,k,v}_bias` [H|K, Dh], `attn.o_bias` [D], `mlp_norm.{scale,bias}`,
  `mlp.{w_gate,w_up,w_down}`, `mlp.{gate,up,down}_bias` (an MoE model's `mlp` is
  model/moe.py's MoeMlp: `mlp.router`, `mlp.{w_gate,w_up,w_down}` [E, ...], `mlp.shared.*`,
  `mlp.shared_gate`); `final_norm.{scale,bias}`;
  `lm_head` [D, V] only when the embeddings are untied. Norm biases exist only
  for LayerNorm, projection biases only when switched on, `w_gate` only for SwiGLU.
  A quantized model stores each projection `w` as `w` (int8 or packed uint8 codes) and
  `w_scale` (plus `w_scale_scale`, `w_scale_mean` for double-quantized NF4); LoRA adds
  `w_lora_a`, `w_lora_b` beside each targeted projection.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = _param(
        rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), INIT_STD, cfg.param_dtype)
    if cfg.position == 'learned':
      self.position_embedding = _param(
          rngs, (cfg.max_positions, cfg.d_model), ('positions', 'embed'), INIT_STD,
          cfg.param_dtype)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_METADATA)
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = Norm(cfg)
    if not cfg.tie_embeddings:
      _weight(self, 'lm_head', cfg, rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'),
              INIT_STD)

  def __call__(
      self,
      tokens_BxL: jax.Array,
      *,
      positions_BxL: jax.Array | None = None,
      segment_ids_BxL: jax.Array | None = None,
      deterministic: bool = True,
      rngs: nnx.Rngs | None = None,
      features: bool = False,
      return_aux: bool = False,
  ):
    """Returns float32 logits_BxLxV, or with `features=True` the final-normed hidden states
    x_BxLxD in the compute dtype (what a scalar head, a reward model or a value head, reads).
    With `return_aux`, (that, aux): aux maps each of model/moe.py's AUX_NAMES
    (moe_balance_loss, moe_z_loss, moe_dropped_fraction) to its float32 mean over the layers
    (zeros for a dense model).

    Args:
      tokens_BxL: integer token ids.
      positions_BxL: RoPE (or learned table) positions; default arange(L) in every
        row. For packed rows pass positions that restart at 0 in each document.
        Learned positions must be < max_positions (a gather clamps larger ones).
      segment_ids_BxL: integer document ids; tokens attend only within their
        document (always causally).
      deterministic: if False and cfg.dropout > 0, applies dropout.
      rngs: needed for dropout; one key is drawn from its 'dropout' stream
        (falling back to 'default').
    """
    cfg = self.cfg
    b, length = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    dropout_keys_N = None
    if not deterministic and (cfg.dropout > 0.0 or cfg.lora_dropout > 0.0):
      if rngs is None:
        raise ValueError('Transformer with dropout > 0 and deterministic=False needs rngs.')
      dropout_keys_N = jax.random.split(rngs.dropout(), cfg.n_layers)

    # Under a mesh with a 'context' axis the row is split over it: moved into the split
    # layout once here and back before the head (model/context_parallel.py).
    context = context_parallel.plan(length, cfg.context_load_balance)
    if context is not None:
      tokens_BxL, positions_BxL = context.split(tokens_BxL), context.split(positions_BxL)
      if segment_ids_BxL is not None:
        segment_ids_BxL = context.split(segment_ids_BxL)
    x_BxLxD, aux_3 = _run_blocks(
        self.blocks, self._embed(tokens_BxL, positions_BxL), positions_BxL, segment_ids_BxL,
        dropout_keys_N, cfg.remat, self._unroll(), context=context, pipeline=cfg)
    x_BxLxD = self.final_norm(x_BxLxD)
    if context is not None:
      x_BxLxD = context.join(x_BxLxD)
    out = x_BxLxD if features else self._head(x_BxLxD)
    if not return_aux:
      return out
    return out, dict(zip(moe_lib.AUX_NAMES, aux_3 / cfg.n_layers, strict=True))

  def decode(
      self,
      tokens_BxT: jax.Array,
      positions_BxT: jax.Array,
      cache: kv_cache.KVCache,
      page_table_BxP: jax.Array | None = None,
  ) -> tuple[jax.Array, kv_cache.KVCache]:
    """Runs T new tokens per row against a KV cache: (float32 logits_BxTxV, new cache).

    Each token's keys and values are written at its position, and it attends to every
    cached position <= its own in its row, the last `sliding_window` of them with a window
    (model/kv_cache.py has the layout; a position < 0 marks padding). A prompt, a chunk
    of one, a single decode step and a speculative block are all this call.
    """
    x_BxTxD = self._embed(tokens_BxT, jnp.maximum(positions_BxT, 0))
    x_BxTxD, (k, v) = _run_blocks(
        self.blocks, x_BxTxD, positions_BxT, None, None, 'none', self._unroll(),
        kv=(cache.k, cache.v, page_table_BxP))
    return self._head(self.final_norm(x_BxTxD)), kv_cache.KVCache(k=k, v=v)

  def _unroll(self) -> int:
    cfg = self.cfg
    return cfg.n_layers if cfg.scan_unroll == -1 else min(cfg.scan_unroll, cfg.n_layers)

  def _embed(self, tokens_BxL: jax.Array, positions_BxL: jax.Array) -> jax.Array:
    x_BxLxD = jnp.take(self.embedding[...], tokens_BxL, axis=0)
    if self.cfg.position == 'learned':
      x_BxLxD = x_BxLxD + jnp.take(self.position_embedding[...], positions_BxL, axis=0)
    return x_BxLxD.astype(self.cfg.dtype)

  def _head(self, x_BxLxD: jax.Array) -> jax.Array:
    """float32 logits from final-normed hidden states."""
    cfg = self.cfg
    if not cfg.tie_embeddings:
      logits_BxLxV = project(self, 'lm_head', 'bld,dv->blv', x_BxLxD,
                             preferred_element_type=jnp.float32)
    else:
      head_DxV = self.embedding[...].astype(cfg.dtype).T
      logits_BxLxV = jnp.einsum('bld,dv->blv', x_BxLxD, head_DxV,
                                preferred_element_type=jnp.float32)
    return constrain_activation(logits_BxLxV, ('batch', 'length', 'vocab'))


def graphdef(cfg: TransformerConfig) -> nnx.GraphDef:
  """The model's graph, built without its parameters: `nnx.merge(graphdef(cfg), params)`
  applies parameters of that config (e.g. the stored form of a quantized `cfg`)."""
  with nnx.use_eager_sharding(False):
    return nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def _run_blocks(
    blocks: Block,
    x_BxLxD: jax.Array,
    positions_BxL: jax.Array,
    segment_ids_BxL: jax.Array | None,
    dropout_keys_N: jax.Array | None,
    remat: str,
    unroll: int,
    kv: tuple[jax.Array, jax.Array, jax.Array | None] | None = None,
    context: context_parallel.Layout | None = None,
    pipeline: TransformerConfig | None = None,
):
  """Scans the stacked blocks over their leading 'layers' axis: (x, the blocks' aux_3
  summed over layers). With a cache kv = (k_NxKxGxSxD, v_NxKxGxSxD, page_table), returns
  (x, (k, v)). `context`: the row is split over the mesh's 'context' axis in that layout.

  With `pipeline` (the model's config) under a mesh whose 'stage' axis is > 1, the layers
  run as a pipeline of stages (model/pipeline.py) when the batch splits into its
  microbatches; otherwise (decoding, an evaluation batch that does not split) they run as
  one scan, the compiler gathering each stage's layers where they are needed. A pipelined
  model is dense (LMTask.check_mesh refuses MoE with stages), so its aux_3 is zeros.
  """
  if kv is not None:
    k_pages, v_pages, page_table = kv

    # The whole cache is carried and each layer writes its own slice in place; scanning
    # per-layer slices in and out would copy all of it on every call.
    @nnx.scan(in_axes=(0, nnx.Carry, None, None), out_axes=nnx.Carry,
              transform_metadata=_LAYERS_METADATA, unroll=unroll)
    def decode_fn(block, carry, positions, table):
      x, k, v, layer = carry
      x, (k, v) = block(x, positions, None, None, (k, v, table, layer))
      return x, k, v, layer + 1

    x_BxLxD, k_pages, v_pages, _ = decode_fn(
        blocks, (x_BxLxD, k_pages, v_pages, jnp.int32(0)), positions_BxL, page_table)
    return x_BxLxD, (k_pages, v_pages)

  def layer(block, x, positions, segment_ids, key):
    return block(x, positions, segment_ids, key, context=context)

  # The MoE losses are summed in the carry: a scan output per layer would do as well, but
  # the carry keeps them out of the stacked residuals.

  if remat != 'none':
    # prevent_cse=False: inside a scan the CSE barrier only costs performance.
    layer = nnx.remat(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)

  @nnx.scan(
      in_axes=(0, nnx.Carry, None, None, 0), out_axes=nnx.Carry,
      transform_metadata=_LAYERS_METADATA, unroll=unroll)
  def scan_fn(block, carry, positions, segment_ids, key):
    x, aux_sum = carry
    x, aux = layer(block, x, positions, segment_ids, key)
    return x, aux_sum + aux

  aux_3 = jnp.zeros((len(moe_lib.AUX_NAMES),), jnp.float32)
  stages = pipeline_lib.num_stages() if pipeline is not None else 1
  if stages > 1:
    m = pipeline_lib.resolve_microbatches(pipeline.pipeline_microbatches, stages)
    if x_BxLxD.shape[0] % m == 0:
      graphdef, weights = nnx.split(blocks)

      def chunk_fn(chunk, x, rows, keys):
        x, _ = scan_fn(nnx.merge(graphdef, chunk), (x, aux_3), rows['positions'],
                       rows.get('segment_ids'), keys)
        return x

      rows = {'positions': positions_BxL}
      if segment_ids_BxL is not None:
        rows['segment_ids'] = segment_ids_BxL
      x_BxLxD = pipeline_lib.run(
          chunk_fn, weights, x_BxLxD, rows, dropout_keys_N, stages=stages, microbatches=m,
          repeats=pipeline.pipeline_repeats)
      return x_BxLxD, aux_3

  return scan_fn(blocks, (x_BxLxD, aux_3), positions_BxL, segment_ids_BxL, dropout_keys_N)
