"""Encoder-decoder (T5-style) model family (model/seq2seq.py).

Presets of the model shapes (for imports, fine-tuning and memory plans):
`configs/seq2seq.py:t5_small` (T5 v1.1 small, 77M parameters with its 32128-row
vocabulary) and `configs/seq2seq.py:flan_t5_base` (flan-t5-base, 248M). Any key can be
overridden with `--config.a.b=value`.
"""

import ml_collections

from configs import common


def base() -> ml_collections.ConfigDict:
  """The seq2seq schema: every key a seq2seq run can have, with its default."""
  c = common.trainer_defaults()
  c.task = 'seq2seq'
  # The model's vocabulary is the tokenizer's rounded up to a multiple of 128 (T5's 32100
  # pieces give 32128 rows), so it is not a key here.
  c.model = ml_collections.ConfigDict(dict(
      d_model=256,
      num_heads=4,
      head_dim=64,  # T5's d_kv: need not be d_model / num_heads
      mlp_dim=1024,
      encoder_layers=4,
      decoder_layers=4,
      mlp='gated-gelu',  # gated-gelu (T5 v1.1, flan-t5) | relu (T5 v1.0) | gated-silu
      # relative: T5's learned bias per relative-position bucket, one table per stack shared
      # by its layers (bidirectional buckets in the encoder, causal in the decoder) | rope.
      position='relative',
      relative_buckets=32,
      relative_max_distance=128,
      rope_theta=10_000.0,  # position='rope' only
      # True: the head is the embedding and the decoder output is scaled by d_model ** -0.5
      # (T5 v1.0); False: a separate head, unscaled (v1.1, flan-t5).
      tie_embeddings=False,
      dropout=0.0,
      norm_eps=1e-6,
      dtype='float32',  # compute dtype
      param_dtype='float32',
      attention='xla',  # xla | cudnn | pallas (position='rope' only) | auto (model/attention.py)
      remat='none',  # none | full (each layer recomputed in the backward pass)
      decoder_start_id=0,  # the decoder's first input (T5: its pad id)
  ))
  return c


def get_config(preset: str = 't5_small') -> ml_collections.ConfigDict:
  c = base()
  preset = preset or 't5_small'
  if preset == 't5_small':
    # google/t5-v1_1-small's shape: gated-GELU, untied head, 8 + 8 layers, 6 heads of 64.
    c.model.update(d_model=512, num_heads=6, head_dim=64, mlp_dim=1024, encoder_layers=8,
                   decoder_layers=8, mlp='gated-gelu', tie_embeddings=False)
  elif preset == 'flan_t5_base':
    # google/flan-t5-base's shape: gated-GELU, untied head, 12 + 12 layers, 12 heads of 64.
    c.model.update(d_model=768, num_heads=12, head_dim=64, mlp_dim=2048, encoder_layers=12,
                   decoder_layers=12, mlp='gated-gelu', tie_embeddings=False)
  else:
    raise ValueError(f'Unknown preset {preset!r} for configs/seq2seq.py; choose one of '
                     't5_small, flan_t5_base.')
  return c
