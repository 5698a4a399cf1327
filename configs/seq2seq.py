"""Encoder-decoder transformers (T5): span corruption pre-training and seq2seq on pairs.

The embedded demo (2 CPU cores, nothing downloaded; docs/benchmarks.md has its numbers):
pre-train on the stdlib with T5's span corruption, then learn to write a function's
docstring summary from its code (held-out BLEU and ROUGE), warm-started from it:

  python -m train --config=configs/seq2seq.py:span --workdir=/tmp/kiln_span
  python -m train --config=configs/seq2seq.py:docstring --workdir=/tmp/kiln_doc \\
    --config.init_from=/tmp/kiln_span
  python -m train.sample --workdir=/tmp/kiln_doc \\
    --prompt=$'def add(a, b):\\n    return a + b\\n'

Without `init_from` the docstring run starts from scratch (the same tokenizer: both train it
on the stdlib's training modules). Your own pairs: a jsonl file of {"input": ..., "target":
...} objects (local or gs://; held out by a hash, or `data.val_path`):

  python -m train --config=configs/seq2seq.py:docstring --workdir=W \\
    --config.data.source=jsonl --config.data.path=pairs.jsonl

Fine-tuning an imported T5 (`python -m train.convert import`): `--config.init_from=IMPORT`
takes its architecture and its tokenizer (with the 100 `<extra_id_N>` sentinels). Presets:
`span`, `docstring` (CPU), `t5_small`, `flan_t5_base` (T5 v1.1 / Flan-T5 shapes).
"""

import ml_collections

from configs import common

PRESETS = ('span', 'docstring', 't5_small', 'flan_t5_base')


def base() -> ml_collections.ConfigDict:
  """The seq2seq schema: every key a seq2seq run can have, with its default."""
  c = common.trainer_defaults()
  c.task = 'seq2seq'
  # A seq2seq run directory (python -m train, or an HF T5 import) whose newest checkpoint's
  # parameters start this run, with a fresh optimizer at step 0. The architecture keys of
  # `model` and the tokenizer come from that run; the rest from this config.
  c.init_from = ''

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

  # span_corruption (T5's pre-training, data/span_corruption.py) | pairs (input -> target).
  c.objective = 'span_corruption'
  c.data = ml_collections.ConfigDict(dict(
      # span_corruption: stdlib | text | jsonl (documents in data.text_field), as the LM.
      # pairs: stdlib (the docstring demo, data/stdlib_functions.py) | jsonl (pairs).
      source='stdlib',
      path='',  # text or jsonl file or glob, local or gs://
      val_path='',  # pairs: a held-out jsonl; '' = the rows a hash puts in val_fraction
      val_fraction=0.1,  # held-out share of stdlib modules, text characters or jsonl rows
      text_field='text',  # span_corruption from jsonl: the field with the document
      input_field='input',  # pairs from jsonl: the fields of the input and target texts
      target_field='target',
      name='', data_dir='',  # (unused: the LM's token cache keys on them)
      max_examples=0,  # pairs: at most this many per split; 0 = all
      input_len=512,  # encoder positions (EOS included)
      target_len=114,  # decoder positions (EOS included): T5's 114 for 512 at 15% noise
      noise_density=0.15,  # span corruption: the share of tokens masked
      mean_noise_span_length=3.0,
      # T5's id layout (data/tokenizers.py): pad 0, EOS 1, and `extra_ids` sentinels above
      # the `vocab_size` pieces (T5: 32000 + 100).
      tokenizer=ml_collections.ConfigDict(dict(
          kind='sentencepiece',  # sentencepiece | byte (ByT5's ids)
          vocab_size=32000,
          model_type='unigram',  # bpe | unigram (T5's)
          train_chars=20_000_000,
          extra_ids=100,
      )),
  ))

  c.loss = ml_collections.ConfigDict(dict(z_loss=0.0))  # T5X's z-loss is 1e-4

  # Held-out generation (pairs): greedy outputs of the first num_generate held-out inputs,
  # scored against their targets (eval/bleu: sacrebleu; eval/rouge1, rouge2, rougeL:
  # rouge-score F-measures, averaged), generate_batch at a time (samples too: one program).
  c.eval = ml_collections.ConfigDict(dict(num_generate=128, generate_batch=64))

  # A held-out input ('' = the first held-out example) and its generated target.
  c.sample = ml_collections.ConfigDict(dict(
      prompt='', max_new_tokens=-1, temperature=0.0, top_k=0, top_p=1.0))  # -1: target_len
  return c


def get_config(preset: str = 'span') -> ml_collections.ConfigDict:
  preset = preset or 'span'
  if preset not in PRESETS:
    raise ValueError(f'Unknown preset {preset!r} for configs/seq2seq.py; choose one of '
                     f'{", ".join(PRESETS)}.')
  c = base()
  if preset in ('span', 'docstring'):
    # A ~1.5M parameter T5 v1.1 on 2 CPU cores: 2 + 2 layers of width 128, 2048 ids (2016
    # pieces and 32 sentinels, enough for the 7 spans of a 141-token chunk). Inputs of 128
    # tokens: about half the stdlib's functions fit whole, the rest lose their ends.
    c.model.update(d_model=128, num_heads=4, head_dim=32, mlp_dim=384, encoder_layers=2,
                   decoder_layers=2)
    c.data.update(input_len=128, target_len=32)  # span corruption: 141 raw tokens, 29 targets
    c.data.tokenizer.update(vocab_size=2016, extra_ids=32, model_type='bpe',
                            train_chars=5_000_000)
    c.batch_size = 32
    c.steps = 300
    c.log_every = 25
    c.eval_every = 300
    c.eval_steps = 10
    c.checkpoint.every = 300
    c.optimizer.update(lr=3e-3, warmup_steps=30, end_lr=3e-4)
  if preset == 'docstring':
    c.objective = 'pairs'
    # 120 steps: about 20 minutes on the shared 2-core machine of docs/benchmarks.md.
    c.update(steps=120, eval_every=120)
    c.checkpoint.every = 120
    c.eval.update(num_generate=256, generate_batch=64)
  elif preset == 't5_small':
    # google/t5-v1_1-small's shape: gated-GELU, untied head, 8 + 8 layers, 6 heads of 64.
    c.model.update(d_model=512, num_heads=6, head_dim=64, mlp_dim=1024, encoder_layers=8,
                   decoder_layers=8, mlp='gated-gelu', tie_embeddings=False)
    c.steps = 100_000
    c.batch_size = 128
    c.eval_every = 5000
    c.checkpoint.every = 5000
    c.optimizer.update(lr=1e-2, warmup_steps=10_000, end_lr=1e-4, weight_decay=0.0)
  elif preset == 'flan_t5_base':
    # google/flan-t5-base's shape: gated-GELU, untied head, 12 + 12 layers, 12 heads of 64.
    c.model.update(d_model=768, num_heads=12, head_dim=64, mlp_dim=2048, encoder_layers=12,
                   decoder_layers=12, mlp='gated-gelu', tie_embeddings=False)
    c.objective = 'pairs'
    c.steps = 10_000
    c.batch_size = 64
    c.eval_every = 1000
    c.checkpoint.every = 1000
    c.data.update(source='jsonl', input_len=512, target_len=128)
    c.optimizer.update(lr=3e-4, warmup_steps=500, end_lr=3e-5, weight_decay=0.0)
  return c
