"""GRPO on verifiable rewards (train/tasks/grpo.py), with TRL's losses and metrics.

The demo (embedded, no downloads; a few minutes each on 2 CPU cores): a byte-level model
learns sums of two numbers below 100 by SFT, then GRPO on the exact-match reward raises its
held-out greedy accuracy (`eval/accuracy`); the control, with random rewards, does not.

  python -m train --config=configs/sft.py:addition --workdir=/tmp/kiln_add_sft
  python -m train --config=configs/grpo.py --workdir=/tmp/kiln_add_grpo \\
    --config.init_from=/tmp/kiln_add_sft
  python -m train --config=configs/grpo.py --workdir=/tmp/kiln_add_random \\
    --config.init_from=/tmp/kiln_add_sft --config.grpo.reward=random

Your own problems: a jsonl with a `prompt` and the fields the reward reads (`answer` for
exact_match, `tests` for unit_tests), from any LM-family run or HF import:

  python -m train --config=configs/grpo.py --workdir=W --config.init_from=SFT_RUN \\
    --config.data.source=jsonl --config.data.path=problems.jsonl --config.grpo.reward=unit_tests

Variants: DAPO (`grpo.loss_aggregation=token_mean`, `grpo.clip_high=0.28`, `grpo.beta=0`),
Dr. GRPO (`grpo.loss_aggregation=dr_grpo`, `grpo.scale_rewards=False`). LoRA:
`--config.model.lora.rank=16` (the reference is then the policy with its adapters off).
"""

import ml_collections

from configs import lm


def get_config(preset: str = 'addition') -> ml_collections.ConfigDict:
  preset = preset or 'addition'
  if preset != 'addition':
    raise ValueError(f'Unknown preset {preset!r} for configs/grpo.py; choose addition.')
  c = lm.base()
  c.task = 'grpo'
  c.data = ml_collections.ConfigDict(dict(
      source='addition',  # addition (embedded, data/verifiable.py) | jsonl (data.path)
      path='',  # jsonl: a file, glob or URL of problems
      val_fraction=0.1,  # held-out share, by a hash of the prompt (addition) or line (jsonl)
      seq_len=32,  # unused by GRPO (prompts and completions have their own lengths below)
      tokenizer=ml_collections.ConfigDict(dict(  # init_from's when given
          kind='byte', vocab_size=4096, model_type='bpe', train_chars=20_000_000)),
  ))
  c.grpo = ml_collections.ConfigDict(dict(
      num_generations=8,  # G: completions per prompt
      max_new_tokens=8,  # completion length limit (and Dr. GRPO's constant)
      max_prompt_len=16,  # prompt tokens (BOS included); longer prompts are a config error
      temperature=1.0,  # sampling temperature, also applied to the logits of the loss
      top_k=0,  # 0: off
      top_p=1.0,
      reward='exact_match',  # exact_match | format:<regex> | unit_tests | random (control)
      eval_reward='exact_match',  # what eval/accuracy averages over held-out greedy samples
      scale_rewards=True,  # divide advantages by the group's std (False: Dr. GRPO)
      loss_aggregation='sequence_mean',  # sequence_mean (GRPO) | token_mean (DAPO) | dr_grpo
      clip_low=0.2,  # ratio clipped to [1 - clip_low, 1 + clip_high]
      clip_high=0.2,  # DAPO's clip-higher: 0.28
      beta=0.04,  # weight of the k3 KL to the reference; 0: no reference is held
      num_iterations=1,  # optimizer updates per rollout batch (TRL's num_iterations, mu)
      eval_prompts=512,  # held-out prompts per evaluation (greedy)
  ))
  c.steps = 100
  c.batch_size = 16  # prompts per step; batch_size * num_generations completions
  c.log_every = 5
  c.eval_every = 25
  c.eval_steps = 0
  c.checkpoint.update(every=50)
  # The model of configs/sft.py:addition (init_from overrides the architecture keys).
  c.model.update(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, dtype='float32',
                 scan_unroll=-1)
  c.optimizer.update(lr=1e-4, warmup_steps=5, end_lr=1e-4, weight_decay=0.0, b2=0.99)
  return c
