"""Supervised fine-tuning (SFT) of a decoder-only LM: loss on completions or assistant turns.

The demo (embedded, no downloads): complete a standard-library function's body from its
signature and docstring (data/stdlib_functions.py), starting from the tiny stdlib LM:

  python -m train --config=configs/lm.py --workdir=/tmp/kiln_tiny
  python -m train --config=configs/sft.py --workdir=/tmp/kiln_sft --config.init_from=/tmp/kiln_tiny

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
  if preset != 'tiny':
    raise ValueError(f'Unknown preset {preset!r} for configs/sft.py; choose tiny.')
  c = lm.get_config('tiny')
  c.task = 'sft'
  c.data = ml_collections.ConfigDict(dict(
      source='stdlib',  # stdlib (the embedded demo) | jsonl (data.path)
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
  return c
