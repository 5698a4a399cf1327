"""Supervised fine-tuning (SFT) of a decoder-only LM: loss on completions or assistant turns.

The demo (embedded, no downloads): complete a standard-library function's body from its
signature and docstring (data/stdlib_functions.py), starting from the tiny stdlib LM:

  python -m train --config=configs/lm.py --workdir=/tmp/kiln_tiny
  python -m train --config=configs/sft.py --workdir=/tmp/kiln_sft --config.init_from=/tmp/kiln_tiny

The start of the GRPO demo (configs/grpo.py), sums of two numbers below 100, from scratch:

  python -m train --config=configs/sft.py:addition --workdir=/tmp/kiln_add_sft

Your own data: chat jsonl ({"messages": [{"role": ..., "content": ...}, ...]}) or
prompt/completion jsonl, local or gs://, from a Kiln run or an HF import (whose chat template
and tokenizer it uses):

  python -m train --config=configs/sft.py --workdir=W --config.init_from=IMPORT \\
    --config.data.source=jsonl --config.data.path='chats/*.jsonl' --config.data.seq_len=2048

`model` is configs/lm.py's model section (its architecture keys come from `init_from`), so
every model key of an LM run, LoRA's included, works here too. Without `init_from` the model
starts fresh and trains its tokenizer (`data.tokenizer`) on the training examples.
"""

import ml_collections

from configs import lm


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  preset = preset or 'tiny'
  if preset not in ('tiny', 'addition'):
    raise ValueError(f'Unknown preset {preset!r} for configs/sft.py; choose tiny, addition.')
  c = lm.get_config('tiny')
  c.task = 'sft'
  c.data = ml_collections.ConfigDict(dict(
      source='stdlib',  # stdlib (the embedded demo) | addition (data/verifiable.py) | jsonl
      path='',  # jsonl file or glob, local or gs://
      val_path='',  # held-out jsonl; '' = the rows that a hash puts in val_fraction
      val_fraction=0.1,  # held-out share of modules (stdlib) or of rows (jsonl)
      max_examples=0,  # read at most this many examples per split; 0 = all
      messages_field='messages',  # a chat row's list of {"role", "content"} messages
      prompt_field='prompt',  # a prompt/completion row's fields: strings or message lists
      completion_field='completion',
      seq_len=256,  # positions per row; a longer example is truncated (and counted)
      pack=True,  # several examples per row (segment ids, positions restart), else one
      loss_on='completion',  # completion: completion / assistant tokens only | all
      tokenizer=lm.base().data.tokenizer,  # used only when there is no init_from
  ))
  c.steps = 300
  c.batch_size = 16
  c.log_every = 25
  c.eval_every = 100
  c.eval_steps = 10
  c.checkpoint.every = 300
  c.optimizer.update(lr=3e-4, warmup_steps=20, end_lr=3e-5)
  c.sample.update(prompt='', max_new_tokens=96, temperature=0.0)  # '': a held-out prompt
  if preset == 'addition':
    # The start of the GRPO demo (configs/grpo.py): a byte-level model from scratch on the
    # embedded sums, to a held-out accuracy well above 0 and well below 1.
    c.model.update(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4)
    c.data.update(source='addition', seq_len=64)
    c.data.tokenizer.update(kind='byte')
    c.steps = 400
    c.batch_size = 32
    c.eval_every = 200
    c.checkpoint.every = 400
    c.optimizer.update(lr=3e-3, warmup_steps=20, end_lr=3e-4, weight_decay=0.0)
    c.sample.update(max_new_tokens=4)
  return c
