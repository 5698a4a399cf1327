"""Long-context model keys against transformers: RoPE scaling (linear, llama3, yarn) and
sliding-window attention (Mistral, Qwen2), imported from small random HF models.

Oracles: HF's forward pass at lengths beyond the window and beyond the original context
(import parity), HF's reload of the export (its config must say the same thing), HF's
RoPE frequency functions, and Kiln's own full forward for chunked decoding over the KV
cache.
"""

import json

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from test_convert import (
    VOCAB,
    _assert_logits_close,
    _hf_logits,
    _kiln_logits,
    _tokens,
    randomized,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from configs import lm
from data.errors import ConfigError
from model import decode, rope
from train import convert
from train.tasks import lm as lm_task

LENGTH = 34  # beyond the windows (8) and yarn's original context (16)
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              tie_word_embeddings=False)


def _hf_model(kind: str):
  torch.manual_seed(0)
  if kind == 'mistral_llama3_window':
    # head_dim 8: wavelengths 6, 63, 628, 6283 fall in all three llama3 bands.
    config = transformers.MistralConfig(**COMMON, sliding_window=8, rope_parameters=dict(
        rope_type='llama3', rope_theta=10_000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64))
  else:  # qwen2_yarn_window: head_dim 16 (yarn's ramp spans dimensions 0..3), every layer
    # sliding (max_window_layers=0)
    config = transformers.Qwen2Config(
        **dict(COMMON, num_attention_heads=2, num_key_value_heads=1), head_dim=16,
        use_sliding_window=True, sliding_window=8, max_window_layers=0,
        rope_parameters=dict(rope_type='yarn', rope_theta=10_000.0, factor=4.0,
                             original_max_position_embeddings=16))
  return randomized(
      transformers.AutoModelForCausalLM.from_config(config, attn_implementation='eager'))


KINDS = ('mistral_llama3_window', 'qwen2_yarn_window')


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """kind -> (HF model, Kiln workdir, (task, state) loaded from it)."""
  out = {}
  for kind in KINDS:
    root = tmp_path_factory.mktemp(kind)
    model = _hf_model(kind)
    model.save_pretrained(root / 'hf')
    convert.import_hf(str(root / 'hf'), str(root / 'kiln'), dtype='float32')
    task, state, _ = convert.load_run(str(root / 'kiln'))
    out[kind] = (model, root / 'kiln', task, state)
  return out


@pytest.mark.parametrize('kind', KINDS)
def test_logits_match_transformers_beyond_window_and_original_length(imported, kind, tmp_path):
  model, workdir, task, state = imported[kind]
  cfg = task.model_cfg
  rope_type = kind.split('_')[1]
  assert (cfg.rope_scaling.type, cfg.sliding_window) == (rope_type, 8)
  tokens = _tokens((2, LENGTH), seed=1)
  want = _hf_logits(model, tokens)
  _assert_logits_close(_kiln_logits(task, state.params, tokens), want)

  # The export says the same to transformers: its reload gives the original logits.
  convert.export_hf(str(workdir), str(tmp_path / 'hf'))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'hf', attn_implementation='eager').eval()
  assert type(reloaded) is type(model)
  written = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert written['sliding_window'] == 8
  assert written['rope_parameters']['rope_type'] == rope_type
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), want, rtol=0, atol=1e-5)


def test_chunked_decode_matches_full_forward(imported):
  """A prompt, single steps and chunks over the KV cache give the full forward's logits:
  the window holds in decoding too (page size 4, so the window spans several pages)."""
  _, _, task, state = imported['mistral_llama3_window']
  tokens = _tokens((2, LENGTH), seed=1)  # the parity test's: its compiled forward is reused
  full = _kiln_logits(task, state.params, tokens)
  cache = decode.contiguous_cache(task.model_cfg, 2, LENGTH, page_size=4)
  step = jax.jit(decode.forward, static_argnums=0)
  pieces, start = [], 0
  for end in (16, 17, 33, LENGTH):  # two shapes: 16 tokens and 1
    positions = np.broadcast_to(np.arange(start, end, dtype=np.int32), (2, end - start))
    logits, cache = step(task.graphdef, state.params, tokens[:, start:end], positions, cache)
    pieces.append(np.asarray(logits))
    start = end
  _assert_logits_close(np.concatenate(pieces, axis=1), full)


@pytest.mark.parametrize('params', [
    dict(rope_type='linear', factor=2.0),
    dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=512),
    dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=256),
    dict(rope_type='yarn', factor=16.0, original_max_position_embeddings=128, beta_fast=16,
         beta_slow=2, mscale=0.707, mscale_all_dim=1.0, truncate=False),
    dict(rope_type='yarn', factor=8.0, original_max_position_embeddings=64,
         attention_factor=1.5),
])
def test_rope_frequencies_match_transformers(params):
  """model/rope.py's frequencies and cos/sin factor against transformers' own functions,
  through the import's key mapping, for head_dim 64 (32 frequencies across every band)."""
  hf = dict(COMMON, model_type='llama', hidden_size=256, max_position_embeddings=2048,
            rope_parameters=dict(params, rope_theta=500_000.0))
  keys = convert.model_keys_from_hf(hf)
  scaling = rope.RopeScaling.from_config(ml_collections.ConfigDict(keys['rope_scaling']))
  ours, our_factor = rope.frequencies(64, keys['rope_theta'], scaling)
  config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != 'model_type'})
  theirs, their_factor = ROPE_INIT_FUNCTIONS[params['rope_type']](config)
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
  np.testing.assert_allclose(our_factor, their_factor, rtol=1e-6)
  assert not np.allclose(ours, rope.frequencies(64, keys['rope_theta'])[0])  # it scales


@pytest.mark.parametrize('edit, message', [
    (dict(rope_parameters=dict(rope_type='dynamic', factor=2.0)), "rope type 'dynamic'"),
    (dict(rope_parameters=dict(rope_type='default', partial_rotary_factor=0.5)),
     'partial_rotary_factor=0.5'),
    (dict(model_type='qwen2', use_sliding_window=True, sliding_window=8, max_window_layers=1),
     r'sliding-window attention on 1 of 2 layers'),
    (dict(rope_parameters=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0)), None),
])
def test_hf_config_keys(edit, message):
  hf = {**COMMON, 'model_type': 'llama', **edit}
  if message:
    with pytest.raises(ConfigError, match=message):
      convert.model_keys_from_hf(hf)
  else:  # HF's default original length: max_position_embeddings
    assert convert.model_keys_from_hf(hf)['rope_scaling'] == dict(
        type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_positions=64)


def test_init_from_adopts_long_context_keys_unless_set(tmp_path):
  """A fine-tune of an imported long-context model keeps its RoPE scaling and window; one
  that sets its own scaling (to extend the context further) keeps that."""
  run = lm.get_config('tiny')
  run.model.rope_scaling.update(type='yarn', factor=4.0, original_max_positions=128)
  run.model.sliding_window = 8
  (tmp_path / 'config.json').write_text(json.dumps(run.to_dict()))
  plain, extended = lm.get_config('tiny'), lm.get_config('tiny')
  extended.model.rope_scaling.update(type='linear', factor=2.0)
  for config in (plain, extended):
    config.init_from = str(tmp_path)
    lm_task.adopt_init_run(config)
    assert config.model.sliding_window == 8
  assert plain.model.rope_scaling.to_dict() == run.model.rope_scaling.to_dict()
  assert (extended.model.rope_scaling.type, extended.model.rope_scaling.factor) == ('linear', 2.0)
