"""Direct preference optimisation (train/tasks/dpo.py), with TRL's losses and metrics.

Run (default preset `rules`: a tiny byte-level model from scratch on the embedded
rule-based preference set, where chosen lists are sorted; about a minute on 2 CPU cores):

  python -m train --config=configs/dpo.py --workdir=/tmp/kiln_dpo

From a trained model, on your own pairs (a jsonl with prompt, chosen and rejected, each a
string or a list of messages):

  python -m train --config=configs/dpo.py --workdir=/tmp/dpo --config.init_from=/tmp/kiln_tiny \
    --config.data.source=jsonl --config.data.path='/data/prefs/*.jsonl'

`init_from` gives the model and the tokenizer; the reference is that same model, frozen
(`dpo.reference=model`), or its log-probs computed once (`precomputed`), or with LoRA the
policy with its adapters off (`lora_base`). `data.shuffle_labels=True` swaps chosen and
rejected in a random half of the training pairs: a control that must stay at chance.
"""

import ml_collections

from configs import lm


def get_config(preset: str = 'rules') -> ml_collections.ConfigDict:
  c = lm.base()
  c.task = 'dpo'
  c.data = ml_collections.ConfigDict(dict(
      source='stdlib',  # stdlib (the embedded rule set) | jsonl
      path='',  # jsonl: a file, glob or URL
      val_fraction=0.1,  # held-out share (by module for stdlib, by line hash for jsonl)
      seq_len=128,  # tokens per row: prompt + completion
      max_prompt_len=-1,  # longer prompts are bad rows, skipped and counted; -1: seq_len // 2
      shuffle_labels=False,  # swap chosen/rejected in a random half of the training pairs
      tokenizer=ml_collections.ConfigDict(dict(
          kind='sentencepiece',  # sentencepiece | byte | char; init_from's when given
          vocab_size=4096,
          model_type='bpe',
          train_chars=20_000_000,
      )),
  ))
  c.dpo = ml_collections.ConfigDict(dict(
      beta=0.1,  # strength of the pull toward the reference
      loss_type='sigmoid',  # sigmoid | hinge | ipo
      label_smoothing=0.0,  # sigmoid only: assumed share of flipped labels (cDPO)
      reference='model',  # model | lora_base | precomputed
      ref_from='',  # the reference run ('' = init_from, else the seed's initialisation)
  ))
  c.eval_steps = 4
  preset = preset or 'rules'
  if preset == 'rules':
    c.steps = 150
    c.batch_size = 32
    c.log_every = 10
    c.eval_every = 25
    c.checkpoint.update(every=150)
    c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, dtype='float32',
                   scan_unroll=-1)
    c.data.update(seq_len=80, max_prompt_len=48)
    c.data.tokenizer.update(kind='byte')
    c.optimizer.update(lr=3e-3, warmup_steps=10, end_lr=3e-4, weight_decay=0.0)
    c.sample.update(prompt='sort: pear fig apple\n', max_new_tokens=16, temperature=0.0)
  elif preset == 'tiny':
    # DPO of configs/lm.py:tiny's run (--config.init_from=its workdir) on the rule set.
    c.steps = 300
    c.batch_size = 32
    c.log_every = 10
    c.eval_every = 50
    c.checkpoint.update(every=300)
    c.data.update(seq_len=64, max_prompt_len=40)
    c.optimizer.update(lr=5e-4, warmup_steps=20, end_lr=5e-5, weight_decay=0.0)
    c.sample.update(prompt='sort: pear fig apple\n', max_new_tokens=16, temperature=0.0)
  else:
    raise ValueError(f'Unknown preset {preset!r} for configs/dpo.py; choose one of rules, tiny.')
  return c
