"""Hugging Face checkpoints in and out of Kiln: Llama, Mistral, Qwen2, GPT-2, and the
mixtures of experts Mixtral and Qwen2-MoE; T5 (model_type t5, and seq2seq runs) goes to
train/convert_t5.py. The file plumbing both share is train/hf_files.py.

  python -m train.convert import --hf_dir=DIR --workdir=OUT   # HF -> a Kiln run directory
  python -m train.convert export --workdir=DIR --hf_dir=OUT   # a Kiln run -> HF

Import writes what `python -m train` leaves in a workdir: `config.json`, an orbax
checkpoint at step 0 with the LM task's state (parameters, a fresh optimizer
state) and the tokenizer: Kiln's SentencePiece one when the HF directory has a
`tokenizer.model`, else its `tokenizer.json` (GPT-2's, Llama 3's byte-level BPE), which
`data.tokenizers.HFTokenizer` reads. `python -m train.sample --workdir=OUT` samples from it, and
`python -m train --config.init_from=OUT` starts a new run from its parameters.
Each parameter is read lazily (safetensors' `safe_open`) one layer at a time,
straight into the slices that each device holds of its NamedSharding, so no
device or host holds an extra full copy of the model.

Export writes `config.json`, `generation_config.json`, `model.safetensors`
(split, with an index, above `--max_shard_gb`) and the tokenizer: the HF
tokenizer files kept at import, or Kiln's SentencePiece model as
`tokenizer.model` plus a `tokenizer.json` built from it (needs the `tokenizers`
package, a dependency of transformers) that encodes the same ids.

Both directions write into a temporary directory beside the target and rename it
at the end, so an interrupted conversion never leaves a directory that looks
complete.
"""

import os
import shutil
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from configs import lm
from data import cli, hf_tokenizer, tokenizers
from data.errors import ConfigError, DataError, exit_on_user_error
from model import transformer
from train import checkpoint, hf_files, trainer
from train import mesh as mesh_lib
from train.hf_files import FLOAT_DTYPES, HF_TOKENIZER_DIR, SafetensorsReader, Tensor
from train.hf_files import same as _same
from train.hf_files import transpose as _t
from train.runs import load_run_config, restore_latest
from train.state import TrainState, setup_state
from train.tasks.lm import LMTask

SUPPORTED = ('llama', 'mistral', 'qwen2', 'gpt2', 'mixtral', 'qwen2_moe')
# Tensors that some HF checkpoints carry but that are buffers, not parameters.
IGNORED_SUFFIXES = ('rotary_emb.inv_freq', '.attn.bias', '.attn.masked_bias')


# ---------------------------------------------------------------------------
# Architectures: HF config.json <-> config.model, and the tensor maps.
# ---------------------------------------------------------------------------


def model_keys_from_hf(hf: dict) -> dict:
  """`config.model` keys for an HF config.json.

  Raises:
    ConfigError: the architecture or one of its features is not supported, naming it.
  """
  model_type = hf.get('model_type')
  if model_type not in SUPPORTED:
    raise ConfigError(f'config.json has model_type={model_type!r}; train.convert supports '
                      f'{", ".join(SUPPORTED)} and t5.')
  if model_type == 'gpt2':
    return _gpt2_keys(hf)
  return _llama_keys(hf, model_type)


def _llama_keys(hf: dict, model_type: str) -> dict:
  act = hf.get('hidden_act', 'silu')
  _require(act == 'silu', f'hidden_act={act!r}: only silu (SwiGLU) is supported.')
  theta, rope_scaling = _rope_keys(hf)
  heads = int(hf['num_attention_heads'])
  d_model = int(hf['hidden_size'])
  if model_type == 'qwen2':  # Qwen2 always has q, k, v biases and no output bias
    qkv_bias, out_bias = True, False
  elif model_type == 'qwen2_moe':  # transformers 5 made them optional
    qkv_bias, out_bias = bool(hf.get('qkv_bias', True)), False
  else:
    qkv_bias = out_bias = bool(hf.get('attention_bias', False))
  return dict(
      vocab_size=int(hf['vocab_size']), d_model=d_model, n_layers=int(hf['num_hidden_layers']),
      n_heads=heads, n_kv_heads=int(hf.get('num_key_value_heads') or heads),
      head_dim=int(hf.get('head_dim') or d_model // heads),
      mlp_dim=int(hf['intermediate_size']), rope_theta=theta, rope_scaling=rope_scaling,
      sliding_window=_window_key(hf, model_type),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)), norm='rmsnorm', mlp='swiglu',
      position='rope', max_positions=-1, qkv_bias=qkv_bias, attn_out_bias=out_bias,
      mlp_bias=bool(hf.get('mlp_bias', False)), moe=_moe_keys(hf, model_type))


def _moe_keys(hf: dict, model_type: str) -> dict:
  """model.moe for Mixtral (top-k then softmax over the k, no shared expert) and Qwen2-MoE
  (softmax, top-k, renormalised only with norm_topk_prob; a sigmoid-gated shared expert).
  Imports are dropless, as HF is; HF's MoE has no router z-loss."""
  if model_type == 'mixtral':
    return dict(n_experts=int(hf['num_local_experts']), top_k=int(hf['num_experts_per_tok']),
                expert_mlp_dim=int(hf['intermediate_size']), shared_mlp_dim=0,
                shared_gate=False, router='topk_softmax', capacity_factor=0.0,
                balance_weight=float(hf.get('router_aux_loss_coef', 0.001)), z_weight=0.0)
  if model_type != 'qwen2_moe':
    return dict(n_experts=0)
  step, dense = int(hf.get('decoder_sparse_step', 1)), hf.get('mlp_only_layers') or []
  _require(step == 1 and not dense,
           f'decoder_sparse_step={step}, mlp_only_layers={dense}: Kiln\'s MoE models have '
           'experts in every layer (decoder_sparse_step=1, mlp_only_layers=[]).')
  shared = int(hf.get('shared_expert_intermediate_size') or 0)
  _require(shared > 0, 'shared_expert_intermediate_size=0: Qwen2-MoE\'s shared expert is '
           'expected.')
  return dict(n_experts=int(hf['num_experts']), top_k=int(hf['num_experts_per_tok']),
              expert_mlp_dim=int(hf['moe_intermediate_size']), shared_mlp_dim=shared,
              shared_gate=True,
              router='topk_softmax' if hf.get('norm_topk_prob', False) else 'softmax_topk',
              capacity_factor=0.0, balance_weight=float(hf.get('router_aux_loss_coef', 0.001)),
              z_weight=0.0)


# HF rope_parameters keys -> model.rope_scaling keys, per RoPE type (model/rope.py).
ROPE_KEYS = {
    'default': (),
    'linear': ('factor',),
    'llama3': ('factor', 'low_freq_factor', 'high_freq_factor'),
    'yarn': ('factor', 'attention_factor', 'mscale', 'mscale_all_dim', 'beta_fast',
             'beta_slow', 'truncate'),
}


def _rope_keys(hf: dict) -> tuple[float, dict]:
  """(rope_theta, model.rope_scaling) from HF's rope_parameters (transformers 5) or
  rope_scaling (before), with HF's defaults where a key is absent."""
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  _require(not any(isinstance(v, dict) for v in rope.values()),
           'rope_parameters differ per layer type; Kiln has one RoPE for all layers.')
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  _require(rope_type in ROPE_KEYS, f'rope type {rope_type!r} (rope_scaling / rope_parameters): '
           f'supported are {", ".join(ROPE_KEYS)}.')
  partial = rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  _require(partial in (None, 1.0), f'partial_rotary_factor={partial}: Kiln rotates every '
           'feature of a head.')
  theta = float(rope.get('rope_theta', hf.get('rope_theta', 10_000.0)))
  if rope_type == 'default':
    return theta, {'type': 'none'}
  # HF's defaults (modeling_rope_utils.py): the original length falls back to
  # max_position_embeddings (a top-level original_max_position_embeddings, as Phi-3 writes
  # it, comes first); yarn's factor to their ratio; unset yarn options to the paper's.
  original = int(hf.get('original_max_position_embeddings')
                 or rope.get('original_max_position_embeddings')
                 or hf.get('max_position_embeddings') or 0)
  out = {'type': rope_type}
  for key in ROPE_KEYS[rope_type]:
    if rope.get(key) is not None:
      out[key] = rope[key]
  if rope_type == 'yarn' and 'factor' not in out and original:
    out['factor'] = float(hf['max_position_embeddings']) / original
  _require('factor' in out, f'rope type {rope_type!r} without a factor.')
  if rope_type in ('llama3', 'yarn'):
    _require(original > 0, f'rope type {rope_type!r} needs original_max_position_embeddings.')
    out['original_max_positions'] = original
  return theta, out


def _window_key(hf: dict, model_type: str) -> int:
  """model.sliding_window: Mistral's and Mixtral's window covers every layer; Qwen2's and
  Qwen2-MoE's (use_sliding_window) the layers `layer_types` names (or, without it, those
  their configs derive from max_window_layers), which Kiln takes only when that is all of
  them or none."""
  if model_type in ('mistral', 'mixtral'):
    return int(hf.get('sliding_window') or 0)
  # qwen2 and qwen2_moe; Llama has no window whatever its layer_types say.
  window = hf.get('sliding_window') if hf.get('use_sliding_window', False) else None
  n_layers, first = int(hf['num_hidden_layers']), int(hf.get('max_window_layers', 0))
  if model_type == 'qwen2':  # the defaults of transformers' configs when layer_types is unset
    default = [i >= first for i in range(n_layers)]
  else:
    default = [i % 2 == 0 and i < first for i in range(n_layers)]
  types = hf.get('layer_types') or [
      'sliding_attention' if window and s else 'full_attention' for s in default]
  unknown = sorted(set(types) - {'full_attention', 'sliding_attention'})
  _require(not unknown, f'layer_types {unknown}: only full_attention and sliding_attention '
           'layers are supported.')
  sliding = [t == 'sliding_attention' for t in types] if window else [False] * n_layers
  _require(all(sliding) or not any(sliding),
           f'sliding-window attention on {sum(sliding)} of {n_layers} layers '
           f'(max_window_layers={hf.get("max_window_layers")!r} / layer_types): Kiln has one '
           'window for all layers or none.')
  return int(window) if all(sliding) else 0


def _gpt2_keys(hf: dict) -> dict:
  act = hf.get('activation_function', 'gelu_new')
  _require(act in ('gelu_new', 'gelu_pytorch_tanh'),
           f'activation_function={act!r}: only the tanh GELU (gelu_new) is supported.')
  _require(hf.get('scale_attn_weights', True) and not hf.get('scale_attn_by_inverse_layer_idx'),
           'scale_attn_weights must be true and scale_attn_by_inverse_layer_idx false.')
  _require(not hf.get('add_cross_attention'), 'add_cross_attention is not supported.')
  d_model, heads = int(hf['n_embd']), int(hf['n_head'])
  return dict(
      vocab_size=int(hf['vocab_size']), d_model=d_model, n_layers=int(hf['n_layer']),
      n_heads=heads, n_kv_heads=heads, head_dim=d_model // heads,
      mlp_dim=int(hf.get('n_inner') or 4 * d_model), rope_theta=10_000.0,
      tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
      norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)), norm='layernorm', mlp='gelu_tanh',
      position='learned', max_positions=int(hf['n_positions']), qkv_bias=True,
      attn_out_bias=True, mlp_bias=True)


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(f'Unsupported HF model: {message}')


def hf_family(cfg: transformer.TransformerConfig) -> str:
  """The HF model_type that expresses `cfg` exactly.

  Raises:
    ConfigError: no supported HF architecture has this combination of switches.
  """
  llama = (cfg.norm, cfg.mlp, cfg.position) == ('rmsnorm', 'swiglu', 'rope')
  gpt2 = (cfg.norm, cfg.mlp, cfg.position) == ('layernorm', 'gelu_tanh', 'learned')
  biases = (cfg.qkv_bias, cfg.attn_out_bias, cfg.mlp_bias)
  if cfg.n_experts:
    return _moe_family(cfg, llama and not cfg.attn_out_bias and not cfg.mlp_bias)
  if llama and not cfg.sliding_window and cfg.qkv_bias == cfg.attn_out_bias:
    return 'llama'  # attention_bias covers q, k, v and o together
  if llama and cfg.sliding_window and not any(biases):
    return 'mistral'
  if llama and biases == (True, False, False):
    return 'qwen2'
  if gpt2 and all(biases) and not cfg.sliding_window and (
      cfg.n_kv_heads == cfg.n_heads and cfg.head_dim * cfg.n_heads == cfg.d_model):
    return 'gpt2'
  raise ConfigError(
      f'No Hugging Face architecture matches this model (norm={cfg.norm}, mlp={cfg.mlp}, '
      f'position={cfg.position}, qkv_bias={cfg.qkv_bias}, attn_out_bias={cfg.attn_out_bias}, '
      f'mlp_bias={cfg.mlp_bias}, sliding_window={cfg.sliding_window}); export supports Llama '
      '(rmsnorm, swiglu, rope, q/k/v/o biases both on or both off, no window), Mistral (the '
      'same with a window and no biases), Qwen2 (q/k/v biases only, with or without a window) '
      'and GPT-2 (layernorm, gelu_tanh, learned, all biases, no GQA).')


def _moe_family(cfg: transformer.TransformerConfig, llama_block: bool) -> str:
  shared = (cfg.shared_mlp_dim > 0, cfg.shared_gate)
  if llama_block and shared == (False, False) and not cfg.qkv_bias and (
      cfg.router == 'topk_softmax'):
    return 'mixtral'
  if llama_block and shared == (True, True):
    return 'qwen2_moe'
  raise ConfigError(
      f'No Hugging Face MoE architecture matches this model (router={cfg.router}, '
      f'shared_mlp_dim={cfg.shared_mlp_dim}, shared_gate={cfg.shared_gate}, qkv_bias='
      f'{cfg.qkv_bias}, attn_out_bias={cfg.attn_out_bias}, mlp_bias={cfg.mlp_bias}); export '
      'supports Mixtral (router topk_softmax, no shared expert, no biases) and Qwen2-MoE (a '
      'shared expert with shared_gate, either router, optional q/k/v biases), both with the '
      'Llama block (rmsnorm, swiglu, rope).')


def hf_rope_parameters(cfg: transformer.TransformerConfig) -> dict:
  """HF's rope_parameters dict for `cfg` (the inverse of `_rope_keys`)."""
  s = cfg.rope_scaling
  out = {'rope_type': 'default' if s.type == 'none' else s.type, 'rope_theta': cfg.rope_theta}
  for key in ROPE_KEYS[out['rope_type']]:
    value = getattr(s, key)
    if key in ('attention_factor', 'mscale', 'mscale_all_dim') and not value:
      continue  # 0: unset, HF derives it
    out[key] = value
  if s.type in ('llama3', 'yarn'):
    out['original_max_position_embeddings'] = s.original_max_positions
  return out


def hf_config(cfg: transformer.TransformerConfig, seq_len: int, bos_id: int,
              eos_id: int, dtype: str) -> dict:
  """The HF config.json of a Kiln model."""
  family = hf_family(cfg)
  special = {k: v for k, v in (('bos_token_id', bos_id), ('eos_token_id', eos_id)) if v >= 0}
  common = dict(model_type=family, vocab_size=cfg.vocab_size,
                tie_word_embeddings=cfg.tie_embeddings, dtype=dtype, **special)
  if family == 'gpt2':
    return dict(common, architectures=['GPT2LMHeadModel'], n_embd=cfg.d_model,
                n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.mlp_dim,
                n_positions=cfg.max_positions, activation_function='gelu_new',
                layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0)
  arch = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
          'qwen2': 'Qwen2ForCausalLM', 'mixtral': 'MixtralForCausalLM',
          'qwen2_moe': 'Qwen2MoeForCausalLM'}[family]
  rope = hf_rope_parameters(cfg)
  out = dict(common, architectures=[arch], hidden_size=cfg.d_model,
             intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.n_layers,
             num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
             head_dim=cfg.head_dim, hidden_act='silu', rms_norm_eps=cfg.norm_eps,
             max_position_embeddings=seq_len, rope_theta=cfg.rope_theta,
             rope_parameters=rope, attention_dropout=0.0)
  if rope['rope_type'] != 'default':
    out['rope_scaling'] = rope  # the key transformers 4 reads
  window = cfg.sliding_window or None
  if family == 'llama':
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  elif family in ('mistral', 'mixtral'):
    out.update(sliding_window=window)
  else:
    layer = 'sliding_attention' if window else 'full_attention'
    out.update(use_sliding_window=bool(window), sliding_window=window,
               max_window_layers=0 if family == 'qwen2' and window else cfg.n_layers,
               layer_types=[layer] * cfg.n_layers)
  if family == 'mixtral':
    out.update(intermediate_size=cfg.expert_mlp_dim, num_local_experts=cfg.n_experts,
               num_experts_per_tok=cfg.top_k, router_aux_loss_coef=cfg.balance_weight,
               output_router_logits=False, router_jitter_noise=0.0)
  elif family == 'qwen2_moe':
    out.update(moe_intermediate_size=cfg.expert_mlp_dim, num_experts=cfg.n_experts,
               num_experts_per_tok=cfg.top_k, norm_topk_prob=cfg.router == 'topk_softmax',
               shared_expert_intermediate_size=cfg.shared_mlp_dim, decoder_sparse_step=1,
               mlp_only_layers=[], qkv_bias=cfg.qkv_bias, router_aux_loss_coef=cfg.balance_weight,
               output_router_logits=False)
  return out








def tensor_map(cfg: transformer.TransformerConfig, family: str,
               fused_experts: bool = False) -> list[Tensor]:
  """Every Kiln parameter of `cfg` and the HF tensor it comes from. An MoE model's experts
  are HF's per-expert matrices (what transformers saves), or with `fused_experts` the
  [E, ...] tensors of transformers 5's modules (read at import only)."""
  if family == 'gpt2':
    return _gpt2_map(cfg)
  d, h, k, dh, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim

  def proj_in(heads):  # HF Linear [heads * Dh, D] <-> Kiln [D, heads, Dh]
    return (lambda w: w.T.reshape(d, heads, dh), lambda x: x.reshape(d, heads * dh).T)

  def head_bias(heads):
    return (lambda b: b.reshape(heads, dh), lambda x: x.reshape(heads * dh))

  out = [Tensor(('embedding',), 'model.embed_tokens.weight', (cfg.vocab_size, d), _same, _same),
         Tensor(('final_norm', 'scale'), 'model.norm.weight', (d,), _same, _same)]
  if not cfg.tie_embeddings:
    out.append(Tensor(('lm_head',), 'lm_head.weight', (cfg.vocab_size, d), _t, _t))
  blocks = [
      (('attn_norm', 'scale'), 'input_layernorm.weight', (d,), _same, _same),
      (('mlp_norm', 'scale'), 'post_attention_layernorm.weight', (d,), _same, _same),
      (('attn', 'wq'), 'self_attn.q_proj.weight', (h * dh, d), *proj_in(h)),
      (('attn', 'wk'), 'self_attn.k_proj.weight', (k * dh, d), *proj_in(k)),
      (('attn', 'wv'), 'self_attn.v_proj.weight', (k * dh, d), *proj_in(k)),
      (('attn', 'wo'), 'self_attn.o_proj.weight', (d, h * dh),
       lambda w: w.T.reshape(h, dh, d), lambda x: x.reshape(h * dh, d).T),
  ]
  if cfg.n_experts:
    blocks += _moe_map(cfg, family, fused_experts)
  else:
    blocks += [(('mlp', 'w_gate'), 'mlp.gate_proj.weight', (f, d), _t, _t),
               (('mlp', 'w_up'), 'mlp.up_proj.weight', (f, d), _t, _t),
               (('mlp', 'w_down'), 'mlp.down_proj.weight', (d, f), _t, _t)]
  if cfg.qkv_bias:
    blocks += [(('attn', 'q_bias'), 'self_attn.q_proj.bias', (h * dh,), *head_bias(h)),
               (('attn', 'k_bias'), 'self_attn.k_proj.bias', (k * dh,), *head_bias(k)),
               (('attn', 'v_bias'), 'self_attn.v_proj.bias', (k * dh,), *head_bias(k))]
  if cfg.attn_out_bias:
    blocks.append((('attn', 'o_bias'), 'self_attn.o_proj.bias', (d,), _same, _same))
  if cfg.mlp_bias and not cfg.n_experts:  # the experts have no biases
    blocks += [(('mlp', f'{n}_bias'), f'mlp.{n}_proj.bias', (d if n == 'down' else f,), _same,
                _same) for n in ('gate', 'up', 'down')]
  return out + [Tensor(('blocks',) + path, 'model.layers.{i}.' + name, shape, *fns)
                for path, name, shape, *fns in blocks]


# Per-expert HF names (with {e}) of Kiln's w_gate, w_up, w_down, and the router's module.
EXPERT_NAMES = {
    'mixtral': ('block_sparse_moe', 'experts.{e}.w1', 'experts.{e}.w3', 'experts.{e}.w2'),
    'qwen2_moe': ('mlp', 'experts.{e}.gate_proj', 'experts.{e}.up_proj',
                  'experts.{e}.down_proj'),
}


def _moe_map(cfg: transformer.TransformerConfig, family: str, fused: bool) -> list[tuple]:
  """The block entries of an MoE MLP (model/moe.py's layout): the router [D, E] is HF's
  gate [E, D] transposed; each expert's Linear [F, D] / [D, F] is Kiln's [E, D, F] /
  [E, F, D] slice e transposed. transformers 5 holds the experts fused in memory,
  `experts.gate_up_proj` [E, 2F, D] (gate rows first) and `experts.down_proj` [E, D, F],
  and saves them per expert; checkpoints written from its state dict keep the fused form."""
  d, e, f, fs = cfg.d_model, cfg.n_experts, cfg.expert_mlp_dim, cfg.shared_mlp_dim
  module, gate, up, down = EXPERT_NAMES[family]
  if fused:
    module = 'mlp'  # transformers 5's module name for both families

    def swap(x):
      return x.transpose(0, 2, 1)

    gate_up = 'mlp.experts.gate_up_proj'
    out = [(('mlp', 'w_gate'), gate_up, (e, 2 * f, d), lambda w: swap(w[:, :f]), swap, 1),
           (('mlp', 'w_up'), gate_up, (e, 2 * f, d), lambda w: swap(w[:, f:]), swap, 1),
           (('mlp', 'w_down'), 'mlp.experts.down_proj', (e, d, f), swap, swap)]
  else:
    out = [(('mlp', 'w_gate'), f'{module}.{gate}.weight', (f, d), _t, _t),
           (('mlp', 'w_up'), f'{module}.{up}.weight', (f, d), _t, _t),
           (('mlp', 'w_down'), f'{module}.{down}.weight', (d, f), _t, _t)]
  out.append((('mlp', 'router'), f'{module}.gate.weight', (e, d), _t, _t))
  if fs:
    out += [(('mlp', 'shared', 'w_gate'), 'mlp.shared_expert.gate_proj.weight', (fs, d), _t, _t),
            (('mlp', 'shared', 'w_up'), 'mlp.shared_expert.up_proj.weight', (fs, d), _t, _t),
            (('mlp', 'shared', 'w_down'), 'mlp.shared_expert.down_proj.weight', (d, fs), _t,
             _t)]
  if cfg.shared_gate:
    out.append((('mlp', 'shared_gate'), 'mlp.shared_expert_gate.weight', (1, d), _t, _t))
  return out


def _gpt2_map(cfg: transformer.TransformerConfig) -> list[Tensor]:
  d, h, dh, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.mlp_dim
  out = [Tensor(('embedding',), 'transformer.wte.weight', (cfg.vocab_size, d), _same, _same),
         Tensor(('position_embedding',), 'transformer.wpe.weight', (cfg.max_positions, d),
                _same, _same),
         Tensor(('final_norm', 'scale'), 'transformer.ln_f.weight', (d,), _same, _same),
         Tensor(('final_norm', 'bias'), 'transformer.ln_f.bias', (d,), _same, _same)]
  if not cfg.tie_embeddings:
    out.append(Tensor(('lm_head',), 'lm_head.weight', (cfg.vocab_size, d), _t, _t))
  # GPT-2's Conv1D weights are [in, out], Kiln's layout already.
  blocks = [
      (('attn_norm', 'scale'), 'ln_1.weight', (d,), _same, _same),
      (('attn_norm', 'bias'), 'ln_1.bias', (d,), _same, _same),
      (('mlp_norm', 'scale'), 'ln_2.weight', (d,), _same, _same),
      (('mlp_norm', 'bias'), 'ln_2.bias', (d,), _same, _same),
      (('attn', 'wo'), 'attn.c_proj.weight', (d, d),
       lambda w: w.reshape(h, dh, d), lambda x: x.reshape(d, d)),
      (('attn', 'o_bias'), 'attn.c_proj.bias', (d,), _same, _same),
      (('mlp', 'w_up'), 'mlp.c_fc.weight', (d, f), _same, _same),
      (('mlp', 'up_bias'), 'mlp.c_fc.bias', (f,), _same, _same),
      (('mlp', 'w_down'), 'mlp.c_proj.weight', (f, d), _same, _same),
      (('mlp', 'down_bias'), 'mlp.c_proj.bias', (d,), _same, _same),
  ]
  for part, name in enumerate(('q', 'k', 'v')):  # c_attn: [D, 3D], columns q | k | v
    cols = slice(part * d, (part + 1) * d)
    blocks += [
        (('attn', f'w{name}'), 'attn.c_attn.weight', (d, 3 * d),
         lambda w, cols=cols: w[:, cols].reshape(d, h, dh), lambda x: x.reshape(d, d), 1),
        (('attn', f'{name}_bias'), 'attn.c_attn.bias', (3 * d,),
         lambda b, cols=cols: b[cols].reshape(h, dh), lambda x: x.reshape(d), 0)]
  return out + [Tensor(('blocks',) + path, 'transformer.h.{i}.' + name, shape, *fns)
                for path, name, shape, *fns in blocks]


def _expand(t: Tensor, cfg: transformer.TransformerConfig) -> list[tuple[str, tuple]]:
  """(HF name, index into the Kiln parameter) of each HF tensor behind `t`: one, one per
  layer (`{i}`: index (i,)), or one per layer and expert (`{i}` and `{e}`: (i, e))."""
  if '{e}' in t.hf:
    return [(t.hf.format(i=i, e=e), (i, e)) for i in range(cfg.n_layers)
            for e in range(cfg.n_experts)]
  if '{i}' in t.hf:
    return [(t.hf.format(i=i), (i,)) for i in range(cfg.n_layers)]
  return [(t.hf, ())]


def hf_tensors_from_kiln(params: dict, cfg: transformer.TransformerConfig,
                         family: str) -> dict[str, Callable[[], np.ndarray]]:
  """HF name -> a function that builds that tensor from Kiln's (host) params.

  The inverse of `tensor_map`: GPT-2's c_attn is concatenated from q, k and v.
  """
  groups: dict[str, list[tuple[Tensor, tuple]]] = {}
  for t in tensor_map(cfg, family):
    for name, index in _expand(t, cfg):
      groups.setdefault(name, []).append((t, index))

  def build(parts) -> Callable[[], np.ndarray]:
    def tensor():
      pieces = [t.to_hf(np.asarray(_get(params, t.kiln))[index]) for t, index in parts]
      return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, parts[0][0].concat_axis)
    return tensor

  return {name: build(parts) for name, parts in groups.items()}


# ---------------------------------------------------------------------------
# Import.
# ---------------------------------------------------------------------------




def _resolve_names(reader: SafetensorsReader, tensors: list[Tensor],
                   cfg: transformer.TransformerConfig, family: str) -> dict[str, str]:
  """Maps the expected HF names to the names in the files; checks names, shapes, dtypes.

  GPT-2 checkpoints on the Hub often drop the `transformer.` prefix.

  Raises:
    DataError: naming every missing or unexpected tensor, or the first wrong shape or dtype.
  """
  expected = {name: t.hf_shape for t in tensors for name, _ in _expand(t, cfg)}
  names = reader.names()
  rename = {}
  for name in expected:
    if name not in names and family == 'gpt2' and name.removeprefix('transformer.') in names:
      rename[name] = name.removeprefix('transformer.')
    else:
      rename[name] = name
  missing = sorted(n for n, file_name in rename.items() if file_name not in names)
  if missing:
    raise DataError(f'The HF checkpoint lacks {len(missing)} tensor(s) the config needs: '
                    f'{", ".join(missing[:8])}{" ..." if len(missing) > 8 else ""}.')
  # Some tied checkpoints store the copy.
  ignorable = {'lm_head.weight'} if cfg.tie_embeddings else set()
  unexpected = sorted(n for n in names - set(rename.values())
                      if n not in ignorable and not n.endswith(IGNORED_SUFFIXES))
  if unexpected:
    raise DataError(f'The HF checkpoint has {len(unexpected)} tensor(s) the config does not '
                    f'explain: {", ".join(unexpected[:8])}{" ..." if len(unexpected) > 8 else ""}.'
                    ' Is config.json the one of these weights?')
  for name, shape in expected.items():
    got, dtype = reader.shapes[rename[name]], reader.dtypes[rename[name]]
    if got != shape:
      raise DataError(f'HF tensor {rename[name]} has shape {got}; config.json implies {shape}.')
    if dtype not in FLOAT_DTYPES:
      raise DataError(f'HF tensor {rename[name]} has dtype {dtype}; expected one of '
                      f'{", ".join(FLOAT_DTYPES)}.')
  return rename


def load_params(reader: SafetensorsReader, cfg: transformer.TransformerConfig, family: str,
                abstract_params: dict, shardings: dict) -> dict:
  """Kiln's params, each array built shard by shard in its NamedSharding.

  Each device's shard is read on its own, a layer at a time for stacked
  parameters: only the device's slice where Kiln's layout is HF's or its
  transpose (embeddings, lm_head, norms, MLP), else the layer's whole HF tensor
  (attention projections, which Kiln splits into heads) sliced in memory.
  """
  fused = cfg.n_experts > 0 and 'model.layers.0.mlp.experts.gate_up_proj' in reader.names()
  tensors = tensor_map(cfg, family, fused_experts=fused)
  rename = _resolve_names(reader, tensors, cfg, family)
  by_path = {t.kiln: t for t in tensors}
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  paths = {tuple(k.key for k in p) for p, _ in flat}
  if paths != set(by_path):  # a bug in tensor_map, not a user error
    raise AssertionError(f'tensor_map does not cover the model: {paths ^ set(by_path)}')

  def build(path, abstract):
    t = by_path[path]
    sharding = _get(shardings, path)

    def piece(name: str, index: tuple) -> np.ndarray:
      """Kiln's `index` of the (one-layer) parameter read from HF tensor `name`: only that
      slice is read when the layouts agree up to a transpose."""
      if t.to_kiln is _same:
        x = reader.read(name, index)
      elif t.to_kiln is _t:
        x = reader.read(name, index[::-1]).T
      else:
        x = t.to_kiln(reader.read(name))[index]
      return hf_files.cast(x, abstract.dtype, name)

    def callback(index):
      if path[0] != 'blocks':
        return piece(rename[t.hf], tuple(index))
      layers = range(cfg.n_layers)[index[0]]
      if '{e}' not in t.hf:
        return np.stack([piece(rename[t.hf.format(i=i)], tuple(index[1:])) for i in layers])
      experts = range(cfg.n_experts)[index[1]]
      return np.stack([np.stack([piece(rename[t.hf.format(i=i, e=e)], tuple(index[2:]))
                                 for e in experts]) for i in layers])

    return jax.make_array_from_callback(abstract.shape, sharding, callback)

  return jax.tree_util.tree_map_with_path(
      lambda p, a: build(tuple(k.key for k in p), a), abstract_params)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree




def import_hf(hf_dir: str, workdir: str, *, param_dtype: str = 'float32',
              dtype: str = 'bfloat16', seq_len: int = 0, fsdp: int = 1, tensor: int = 1,
              expert: int = 1, overwrite: bool = False) -> None:
  """Converts the HF checkpoint in `hf_dir` into a Kiln run directory `workdir`; an
  existing non-empty `workdir` is replaced (once the import is whole) only with `overwrite`."""
  hf_files.check_target(workdir, '--workdir', overwrite)
  hf = hf_files.read_json(os.path.join(hf_dir, 'config.json'))
  if hf.get('model_type') == 't5':  # the encoder-decoder family, train/convert_t5.py
    from train import convert_t5
    convert_t5.import_t5(hf_dir, workdir, param_dtype=param_dtype, dtype=dtype, fsdp=fsdp,
                         tensor=tensor, overwrite=overwrite)
    return
  keys = model_keys_from_hf(hf)
  config = lm.get_config('tiny')
  config.model.update(keys, dtype=dtype, param_dtype=param_dtype, scan_unroll=1)
  max_len = keys['max_positions'] if keys['position'] == 'learned' else int(
      hf.get('max_position_embeddings', 2048))
  config.data.seq_len = seq_len or min(max_len, 2048)
  config.mesh.update(data=1 if -1 in (fsdp, tensor, expert) else -1, fsdp=fsdp, tensor=tensor,
                     expert=expert)
  config.checkpoint.async_save = False
  spm_proto = hf_files.read_spm(hf_dir)
  if spm_proto is not None:
    config.data.tokenizer.update(kind='sentencepiece', vocab_size=hf_files.piece_count(spm_proto),
                                 model_type=hf_files.spm_model_type(spm_proto))
  task = LMTask(config)
  family = hf['model_type']
  reader = SafetensorsReader(hf_dir)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, abstract, shardings, _ = setup_state(task, config, mesh)
  params = load_params(reader, task.model_cfg, family, abstract.params, shardings.params)
  opt_state = jax.jit(task.opt.init, out_shardings=shardings.opt_state)(params)
  rng = jax.random.key_data(jax.random.split(jax.random.key(config.seed))[1])
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                     params=params, opt_state=opt_state,
                     rng=jax.device_put(rng, shardings.rng), extras={})

  with hf_files.Staging(workdir, overwrite) as tmp:
    trainer.write_config(config, tmp)
    hf_files.copy_tokenizer(hf_dir, tmp, spm_proto, config)
    ckpt = checkpoint.Checkpointer(tmp, config.checkpoint)
    ckpt.save(0, state, None)
    ckpt.wait()
    ckpt.close()
  logging.info('Imported %s (%s, %d parameters) into %s.', hf_dir, family,
               transformer.count_params(task.model_cfg), workdir)


















# ---------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------


def export_hf(workdir: str, hf_dir: str, *, dtype: str = '', max_shard_gb: float = 5.0,
              overwrite: bool = False) -> None:
  """Writes the newest checkpoint of the Kiln run in `workdir` as an HF model in `hf_dir`;
  an existing non-empty `hf_dir` is replaced (once the export is whole) only with `overwrite`."""
  from safetensors.numpy import save_file

  if load_run_config(workdir).get('task') == 'seq2seq':  # T5, train/convert_t5.py
    from train import convert_t5
    convert_t5.export_t5(workdir, hf_dir, dtype=dtype, max_shard_gb=max_shard_gb,
                         overwrite=overwrite)
    return
  hf_files.check_target(hf_dir, '--hf_dir', overwrite)
  task, state, step = load_run(workdir)
  cfg = task.model_cfg
  family = hf_family(cfg)
  kept = os.path.join(workdir, 'tokenizer', HF_TOKENIZER_DIR, 'tokenizer.json')
  if isinstance(task.tokenizer, tokenizers.SentencePieceTokenizer) and not os.path.exists(kept):
    try:
      import tokenizers as hf_tokenizers_lib  # noqa: F401
    except ImportError:
      raise ConfigError('Exporting a SentencePiece tokenizer needs the `tokenizers` package: '
                        'pip install -e ".[hf]".') from None
  out_dtype = np.dtype(transformer.DTYPES[dtype] if dtype else cfg.param_dtype)
  if out_dtype not in (np.float32, np.float16, jnp.bfloat16):
    raise ConfigError(f'--dtype={dtype!r}: choose float32, bfloat16 or float16.')
  tokenizer = task.tokenizer  # None for an import whose HF tokenizer is not SentencePiece
  bos = getattr(tokenizer, 'bos_id', -1)
  eos = tokenizer._sp.eos_id() if isinstance(tokenizer, tokenizers.SentencePieceTokenizer) else -1
  builders = hf_tensors_from_kiln(jax.device_get(task.inference_params(state)), cfg, family)
  del state
  shapes = {n: t.hf_shape for t in tensor_map(cfg, family) for n, _ in _expand(t, cfg)}
  nbytes = {n: int(np.prod(shapes[n])) * out_dtype.itemsize for n in builders}
  shards = hf_files.plan_shards(list(builders), nbytes, int(max_shard_gb * 2**30))

  with hf_files.Staging(hf_dir, overwrite) as tmp:
    weight_map = {}
    for k, names in enumerate(shards):
      file = ('model.safetensors' if len(shards) == 1 else
              f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors')
      save_file({n: np.ascontiguousarray(builders[n](), out_dtype) for n in names},
                os.path.join(tmp, file),
                metadata={'format': 'pt'})
      weight_map.update({n: file for n in names})
    if len(shards) > 1:
      index = {'metadata': {'total_size': sum(nbytes.values())}, 'weight_map': weight_map}
      hf_files.write_json(os.path.join(tmp, 'model.safetensors.index.json'), index)
    dtype_name = {np.dtype(np.float32): 'float32', np.dtype(np.float16): 'float16',
                  np.dtype(jnp.bfloat16): 'bfloat16'}[out_dtype]
    hf_files.write_json(os.path.join(tmp, 'config.json'), _with_original(
        hf_config(cfg, task.config.data.seq_len, bos, eos, dtype_name), workdir))
    _export_tokenizer(workdir, tmp, tokenizer, task.config, bos, eos)
  logging.info('Exported step %d of %s as %s into %s.', step, workdir, family, hf_dir)


def _with_original(config: dict, workdir: str) -> dict:
  """`config` with the maximum length and special token ids of the imported config.json."""
  path = os.path.join(workdir, 'tokenizer', HF_TOKENIZER_DIR, 'config.json')
  if not os.path.exists(path):
    return config
  original = hf_files.read_json(path)
  if original.get('model_type') != config['model_type']:
    return config
  for key in ('max_position_embeddings', 'bos_token_id', 'eos_token_id', 'pad_token_id'):
    if key in original and (key not in config or key == 'max_position_embeddings'):
      config[key] = original[key]
  return config


def load_run(workdir: str):
  """(LMTask, state, step) of the newest checkpoint in `workdir`, as train.runs.load_latest,
  but a run without a Kiln tokenizer (imported with another kind) loads too."""
  config = load_run_config(workdir)
  if config.get('task') not in ('lm', 'sft'):  # an SFT run's model is the LM's
    raise ConfigError(f'{workdir} is a {config.get("task")!r} run; only LM and SFT runs export '
                      'to HF.')
  task = LMTask(config)
  if os.path.exists(os.path.join(workdir, 'tokenizer', tokenizers.META_FILE)):
    task.setup_inference(workdir)
  return (task, *restore_latest(task, config, workdir))






def _export_tokenizer(workdir: str, hf_dir: str, tokenizer, config, bos: int, eos: int) -> None:
  """The HF files kept at import, as they were; for a SentencePiece tokenizer without a
  tokenizer.json among them, `tokenizer.model` and a tokenizer.json built from it."""
  kept = os.path.join(workdir, 'tokenizer', HF_TOKENIZER_DIR)
  if os.path.isdir(kept):
    for name in set(os.listdir(kept)) - {'config.json'}:
      shutil.copy(os.path.join(kept, name), os.path.join(hf_dir, name))
  if isinstance(tokenizer, tokenizers.SentencePieceTokenizer) and not os.path.exists(
      os.path.join(hf_dir, 'tokenizer.json')):
    with open(os.path.join(workdir, 'tokenizer', tokenizers.SPM_FILE), 'rb') as f:
      proto = f.read()
    with open(os.path.join(hf_dir, 'tokenizer.model'), 'wb') as f:
      f.write(proto)
    try:
      hf_tokenizer.write(proto, config.data.tokenizer.model_type, tokenizer.encode, bos, eos,
                         hf_dir, max_length=config.data.seq_len,
                         tokenizer_config=not os.path.exists(
                             os.path.join(hf_dir, 'tokenizer_config.json')))
    except DataError as e:
      if not os.path.isdir(kept):
        raise
      # An imported SentencePiece model with other settings (e.g. Llama 2's dummy prefix):
      # its own files, copied above, are what transformers loads.
      logging.warning('No tokenizer.json written: %s', e)
  elif not isinstance(tokenizer, tokenizers.SentencePieceTokenizer) and not os.path.isdir(kept):
    logging.warning('The run\'s %s tokenizer has no HF form; export writes no tokenizer.',
                    type(tokenizer).__name__)
  if not os.path.exists(os.path.join(hf_dir, 'generation_config.json')):
    gen = {k: v for k, v in (('bos_token_id', bos), ('eos_token_id', eos)) if v >= 0}
    hf_files.write_json(os.path.join(hf_dir, 'generation_config.json'), gen)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def _define_flags() -> None:
  flags.DEFINE_string('hf_dir', None, 'The Hugging Face model directory (read or written).')
  flags.DEFINE_string('workdir', None, 'The Kiln run directory (written or read).')
  flags.DEFINE_string('param_dtype', 'float32', 'import: Kiln parameter dtype.')
  flags.DEFINE_string('dtype', '', 'import: compute dtype (default bfloat16); export: the '
                      'dtype of the safetensors (default: the parameter dtype).')
  flags.DEFINE_integer('seq_len', 0, 'import: data.seq_len of the run (default: the model\'s '
                       'maximum length, at most 2048).')
  flags.DEFINE_integer('fsdp', 1, 'import: mesh.fsdp to load into (-1: all devices).')
  flags.DEFINE_integer('tensor', 1, 'import: mesh.tensor to load into.')
  flags.DEFINE_integer('expert', 1, 'import: mesh.expert to load an MoE model\'s experts into.')
  flags.DEFINE_float('max_shard_gb', 5.0, 'export: split model.safetensors above this size.')
  flags.DEFINE_bool('overwrite', False, 'Replace a non-empty output directory (--workdir for '
                    'import, --hf_dir for export) once the conversion is whole.')


def check_args(argv: Sequence[str], f) -> None:
  """The command and its flags `f` (absl's FLAGS), before any work: the input exists,
  the numbers are valid, the output is new, empty or --overwrite."""
  if len(argv) != 2 or argv[1] not in ('import', 'export'):
    raise ConfigError('Give one command, import or export: python -m train.convert '
                      'import|export --hf_dir=DIR --workdir=DIR.')
  if not f.hf_dir or not f.workdir:
    raise ConfigError('Both --hf_dir and --workdir are required.')
  if argv[1] == 'import':
    cli.check_input(f.hf_dir, '--hf_dir', directory=True)
    for flag, value in (('--dtype', f.dtype or 'bfloat16'), ('--param_dtype', f.param_dtype)):
      if value not in transformer.DTYPES:
        raise ConfigError(f'{flag}={value!r}: choose one of {", ".join(transformer.DTYPES)}.')
    if f.seq_len < 0:
      raise ConfigError(f'--seq_len={f.seq_len} must be >= 0 (0: the model\'s maximum length).')
    for flag, value in (('--fsdp', f.fsdp), ('--tensor', f.tensor), ('--expert', f.expert)):
      if value != -1 and value < 1:
        raise ConfigError(f'{flag}={value} must be -1 (all devices) or >= 1.')
    hf_files.check_target(f.workdir, '--workdir', f.overwrite)
  else:
    cli.check_input(f.workdir, '--workdir', directory=True)
    if f.dtype and f.dtype not in transformer.DTYPES:
      raise ConfigError(f'--dtype={f.dtype!r}: choose one of {", ".join(transformer.DTYPES)}.')
    if f.max_shard_gb <= 0:
      raise ConfigError(f'--max_shard_gb={f.max_shard_gb} must be > 0.')
    hf_files.check_target(f.hf_dir, '--hf_dir', f.overwrite)


def main(argv):
  f = flags.FLAGS

  def run():
    check_args(argv, f)
    if argv[1] == 'import':
      import_hf(f.hf_dir, f.workdir, param_dtype=f.param_dtype, dtype=f.dtype or 'bfloat16',
                seq_len=f.seq_len, fsdp=f.fsdp, tensor=f.tensor, expert=f.expert,
                overwrite=f.overwrite)
    else:
      export_hf(f.workdir, f.hf_dir, dtype=f.dtype, max_shard_gb=f.max_shard_gb,
                overwrite=f.overwrite)

  exit_on_user_error(run)


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
