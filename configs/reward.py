"""Reward models (train/tasks/reward.py): Bradley-Terry on preference pairs, as TRL's RewardTrainer.

Run (default preset `rules`: a tiny byte-level model from scratch on the embedded rule-based
preference set, where chosen lists are sorted; about a minute on 2 CPU cores):

  python -m train --config=configs/reward.py --workdir=/tmp/kiln_rm

From configs/lm.py:tiny's run (the trunk warm-starts from it; the tokenizer is its own):

  python -m train --config=configs/reward.py:tiny --workdir=/tmp/kiln_rm_tiny \
    --config.init_from=/tmp/kiln_tiny

On your own pairs (a jsonl with prompt, chosen, rejected and an optional number `margin`;
e.g. the output of `python -m train.ai_feedback`): `--config.data.source=jsonl
--config.data.path=prefs.jsonl`. `python -m train.sample --workdir=/tmp/kiln_rm` prints the
rewards of `sample.completions`; PPO reads the run with `load_reward_model`.
"""

import ml_collections

from configs import dpo


def get_config(preset: str = 'rules') -> ml_collections.ConfigDict:
  preset = preset or 'rules'
  if preset not in ('rules', 'tiny'):
    raise ValueError(f'Unknown preset {preset!r} for configs/reward.py; choose one of rules, '
                     'tiny.')
  c = dpo.get_config(preset)  # the same model, data and optimizer presets as DPO's
  c.task = 'reward'
  del c.dpo
  c.reward = ml_collections.ConfigDict(dict(
      # TRL's center_rewards_coefficient: + c * mean((r_chosen + r_rejected)^2), which keeps the
      # rewards centred on 0 (Eisenstein et al. 2023 use 0.01); 0 = off.
      center_coefficient=0.0,
  ))
  # A reward model scores rather than generates: train.sample prints each completion's reward.
  c.sample = ml_collections.ConfigDict(dict(
      prompt='sort: pear fig apple\n',
      completions=('apple fig pear\n', 'fig apple pear\n', 'pear fig apple\n'),
  ))
  if preset == 'rules':
    c.steps = 120
    c.eval_every = 20
    c.checkpoint.update(every=120)
  else:
    c.steps = 200
    c.eval_every = 50
    c.checkpoint.update(every=200)
  return c
