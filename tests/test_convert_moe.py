"""Mixtral and Qwen2-MoE checkpoints through train/convert.py, against transformers: small
random HF models built offline.

Oracles: HF's forward pass and greedy generation (import parity, for both routers and with
and without the shared expert, from per-expert and fused files), HF's reload of the export
(no missing or unexpected keys, the original logits), and the imported parameters
themselves (export -> import round trip).
"""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from test_convert import (
    VOCAB,
    _assert_logits_close,
    _hf_logits,
    _kiln_logits,
    _tokens,
    assert_greedy_matches_generate,
    randomized,
)

from configs import lm
from data.errors import ConfigError
from model import transformer
from train import convert

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
              num_experts_per_tok=2)


def _hf_model(kind: str):
  torch.manual_seed(0)
  if kind == 'mixtral':
    config = transformers.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4)
  else:  # qwen2_moe: unrenormalised top-k (softmax_topk), q/k/v biases, a gated shared expert
    config = transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=40, moe_intermediate_size=24, num_experts=4,
        shared_expert_intermediate_size=16, norm_topk_prob=False, qkv_bias=True)
  return randomized(transformers.AutoModelForCausalLM.from_config(config))


KINDS = ('mixtral', 'qwen2_moe')


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """kind -> (HF model, Kiln workdir, (task, state) loaded from it). Mixtral is saved as
  transformers saves it (one matrix per expert) and loaded into an expert x tensor mesh
  (each device reads its experts' slices); Qwen2-MoE is saved from the state dict, so its
  file holds transformers 5's fused [E, 2F, D] gate_up_proj."""
  out = {}
  for kind in KINDS:
    root = tmp_path_factory.mktemp(kind)
    model = _hf_model(kind)
    if kind == 'qwen2_moe':
      model.config.save_pretrained(root / 'hf')
      save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                str(root / 'hf' / 'model.safetensors'), metadata={'format': 'pt'})
    else:
      model.save_pretrained(root / 'hf')
    sharded = kind == 'mixtral'
    convert.import_hf(str(root / 'hf'), str(root / 'kiln'), dtype='float32',
                      expert=2 if sharded else 1, tensor=2 if sharded else 1)
    out[kind] = (model, root / 'kiln', *convert.load_run(str(root / 'kiln'))[:2])
  return out


@pytest.mark.parametrize('kind', KINDS)
def test_import_logits_match_hf(imported, kind):
  model, _, task, state = imported[kind]
  cfg = task.model_cfg
  assert (cfg.n_experts, cfg.top_k, cfg.capacity_factor) == (4, 2, 0.0)
  assert cfg.router == ('softmax_topk' if kind == 'qwen2_moe' else 'topk_softmax')
  if kind == 'mixtral':  # [N, E, D, F]: the experts over 'expert', F over 'tensor'
    w_gate = state.params['blocks']['mlp']['w_gate']
    assert w_gate.addressable_shards[0].data.shape == (2, 2, 32, 24)
  tokens = _tokens((2, 24), seed=1)
  _assert_logits_close(_kiln_logits(task, state.params, tokens), _hf_logits(model, tokens))


def test_greedy_decoding_matches_hf_generate(imported):
  """The KV-cache decode path (dropless MoE) against transformers' generate."""
  model, _, task, state = imported['qwen2_moe']
  assert_greedy_matches_generate(model, task, state.params)


@pytest.mark.parametrize('kind', KINDS)
def test_export_reloads_in_transformers(imported, kind, tmp_path):
  """The export loads in transformers with HF's original logits; for the fused checkpoint
  (read in one layout, written in transformers' per-expert one) it imports back to the
  same parameters bit for bit."""
  model, workdir, _, state = imported[kind]
  out = tmp_path / 'hf'
  convert.export_hf(str(workdir), str(out))
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, output_loading_info=True)
  assert type(reloaded) is type(model)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  saved = json.loads((out / 'config.json').read_text())
  assert saved['model_type'] == model.config.model_type
  tokens = _tokens((2, 24), seed=3)
  np.testing.assert_allclose(_hf_logits(reloaded.eval(), tokens), _hf_logits(model, tokens),
                             rtol=0, atol=1e-5)
  if kind != 'qwen2_moe':
    return
  with safe_open(str(out / 'model.safetensors'), framework='np') as f:
    names = set(f.keys())
  assert 'model.layers.1.mlp.experts.3.down_proj.weight' in names
  assert not any('gate_up_proj' in n for n in names)
  again = tmp_path / 'kiln_again'
  convert.import_hf(str(out), str(again), dtype='float32')
  _, second, _ = convert.load_run(str(again))
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(second.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('edit, message', [
    (dict(decoder_sparse_step=2), r'decoder_sparse_step=2'),
    (dict(mlp_only_layers=[1]), r'mlp_only_layers=\[1\]'),
    (dict(shared_expert_intermediate_size=0), r'shared_expert_intermediate_size=0'),
])
def test_qwen2_moe_layouts_kiln_lacks_are_refused(edit, message):
  hf = {**COMMON, 'model_type': 'qwen2_moe', 'intermediate_size': 40,
        'moe_intermediate_size': 24, 'num_experts': 4, 'shared_expert_intermediate_size': 16,
        **edit}
  with pytest.raises(ConfigError, match=message):
    convert.model_keys_from_hf(hf)


def test_qwen2_moe_norm_topk_prob_is_the_mixtral_router():
  """Renormalising the top-k softmax probabilities is a softmax over the top-k logits."""
  hf = {**COMMON, 'model_type': 'qwen2_moe', 'intermediate_size': 40,
        'moe_intermediate_size': 24, 'num_experts': 4, 'shared_expert_intermediate_size': 16}
  assert convert.model_keys_from_hf({**hf, 'norm_topk_prob': True})['moe']['router'] == (
      'topk_softmax')
  assert convert.model_keys_from_hf(hf)['moe']['router'] == 'softmax_topk'  # HF's default


@pytest.mark.parametrize('moe, message', [
    (dict(router='softmax_topk'), 'No Hugging Face MoE architecture'),  # Mixtral renormalises
    (dict(shared_mlp_dim=16), 'No Hugging Face MoE architecture'),  # Qwen2-MoE gates it
])
def test_export_refuses_moe_models_hf_cannot_express(moe, message):
  config = lm.get_config('tiny')
  config.model.moe.update(n_experts=4, **moe)
  cfg = transformer.TransformerConfig.from_config(config.model, 256)
  with pytest.raises(ConfigError, match=message):
    convert.hf_family(cfg)
