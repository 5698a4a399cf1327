"""PPO of a language model against a reward model or a reward function (train/tasks/ppo.py),
with TRL's PPOConfig names and defaults where it has them.

The demo (preset `rules`, embedded data, no downloads; docs/benchmarks.md has the numbers):
a byte-level policy that writes the prompt's words back as a list, half of its training
lists sorted and half reversed (SFT on a jsonl made from the rule set); a reward model
trained on the rule-based preference pairs (sorted lists preferred); then PPO of the
policy against it, whose `train/objective/scores` rises while `train/objective/kl` stays
bounded:

  python -c "import json; from data import preference_data as p; [print(json.dumps(
    {'prompt': r['prompt'], 'completion': r['chosen' if i % 2 else 'rejected']}))
    for i, r in enumerate(p.rule_pairs('train', 0.1))]" > /tmp/rules_sft.jsonl
  python -m train --config=configs/sft.py --workdir=/tmp/kiln_ppo_policy \
    --config.data.source=jsonl --config.data.path=/tmp/rules_sft.jsonl \
    --config.data.tokenizer.kind=byte --config.data.seq_len=80 --config.model.d_model=64 \
    --config.model.n_layers=2 --config.model.n_heads=4 --config.model.n_kv_heads=4 \
    --config.steps=2000 --config.batch_size=32 --config.optimizer.lr=3e-3 \
    --config.optimizer.end_lr=3e-4
  python -m train --config=configs/reward.py --workdir=/tmp/kiln_rm
  python -m train --config=configs/ppo.py --workdir=/tmp/kiln_ppo \
    --config.init_from=/tmp/kiln_ppo_policy --config.ppo.reward_model=/tmp/kiln_rm

With a Python reward instead of a model: `--config.ppo.reward_model= --config.ppo.reward_fn=NAME`
(train/rewards.py; prompts from a jsonl whose other fields the reward reads). LoRA:
`--config.model.lora.rank=8` (the reference is then the policy with its adapters off). A
separate critic: `--config.ppo.critic=separate` (started from the reward model, as TRL's).
`python docs/baselines/ppo_step.py --workdir=/tmp/kiln_ppo` times one step's parts.
"""

import ml_collections

from configs import lm


def get_config(preset: str = 'rules') -> ml_collections.ConfigDict:
  preset = preset or 'rules'
  if preset != 'rules':
    raise ValueError(f'Unknown preset {preset!r} for configs/ppo.py; choose rules.')
  c = lm.base()
  c.task = 'ppo'
  c.data = ml_collections.ConfigDict(dict(
      source='stdlib',  # stdlib (the rule set's prompts) | jsonl (data.path)
      path='',  # jsonl: a file, glob or URL with a prompt per row
      prompt_field='prompt',  # a string, or a list of messages (the run's chat template)
      val_fraction=0.1,  # held-out share (the rule set's own split for stdlib)
      max_prompt_len=40,  # prompts are padded to this many tokens; longer ones are skipped
      seq_len=72,  # the longest sequence: at least max_prompt_len + ppo.response_length
      tokenizer=ml_collections.ConfigDict(dict(
          kind='byte',  # sentencepiece | byte | char; init_from's when given
          vocab_size=4096,
          model_type='bpe',
          train_chars=20_000_000,
      )),
  ))
  c.ppo = ml_collections.ConfigDict(dict(
      reward_model='',  # the --workdir of a task='reward' run, frozen ...
      reward_fn='',  # ... or a Python reward function by name (train/rewards.py)
      critic='shared',  # shared (a head on the policy's trunk) | separate (its own trunk)
      critic_from='',  # separate: the run its trunk starts from; '' = reward_model, init_from
      response_length=32,  # new tokens per completion at most (TRL's response_length)
      temperature=1.0,  # sampling temperature; log-probs use logits / temperature (TRL)
      stop_token_id=-1,  # ends a completion; -1 = the tokenizer's EOS (none for bytes)
      missing_eos_penalty=0.0,  # subtracted from the score of a completion without a stop
      kl_coef=0.05,  # beta of the per-token KL penalty (TRL's kl_coef)
      kl_estimator='k1',  # k1 | k3 (TRL's kl_estimator)
      kl_target=0.0,  # > 0: adapt kl_coef toward this summed KL (Ziegler et al.)
      kl_horizon=10_000,  # the adaptive controller's horizon, in episodes
      gamma=1.0,  # discount
      lam=0.95,  # GAE lambda
      whiten_rewards=False,
      cliprange=0.2,  # policy ratio clip
      cliprange_value=0.2,  # value clip around the rollout's values
      vf_coef=0.1,  # weight of the value loss
      entropy_coef=0.0,  # weight of the entropy bonus (TRL has none: 0)
      num_ppo_epochs=4,  # passes over each rollout batch
      num_mini_batches=1,  # minibatches per pass; each is one optimizer update
  ))
  c.steps = 100
  c.batch_size = 32
  c.log_every = 5
  c.eval_every = 25
  c.eval_steps = 2
  c.checkpoint.update(every=100)
  c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, dtype='float32',
                 scan_unroll=-1)
  # kl_coef 0.05 with lr 3e-4 (TRL's kl_coef) hacked the tiny reward model within 100 steps
  # (samples such as 'apf fig zzzz zz', KL 50 nats): 0.1 and 1e-4 keep lists (docs/benchmarks.md).
  c.optimizer.update(lr=1e-4, warmup_steps=0, end_lr=1e-4, weight_decay=0.0)
  c.ppo.update(stop_token_id=ord('\n'), response_length=32, kl_coef=0.1)
  c.sample.update(prompt='sort: pear fig apple\n', max_new_tokens=24, temperature=0.0)
  return c

