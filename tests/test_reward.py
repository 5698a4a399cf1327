"""Reward models (train/tasks/reward.py, model/reward_model.py) and AI feedback
(train/ai_feedback.py).

Oracles: the Bradley-Terry loss with margin and centring, and its metrics, against numpy;
ln 2 at the first step (the head starts at zero, so every reward is 0); held-out pairwise
accuracy of the embedded rule set (chosen sorted) well above chance after a short run; the
run's logged eval rewards and its printed sample rewards reproduced by `load_reward_model` +
`score`, on one device and on an 8-device mesh; a warm-started trunk's features equal to the
LM's own, and the head equal to a numpy dot product; pairs written by the rule judge read
back by data/preference_data.py with the rule's preference; a model judge's preference equal
to a numpy log-softmax of its answers, and mirrored exactly when the candidates swap.
"""

import ast
import json
import math
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import lm as lm_config
from configs import reward as reward_config
from data import preference_data, tokenizers
from data.errors import ConfigError, DataError
from model import transformer
from train import ai_feedback, runs, trainer
from train import mesh as mesh_lib
from train.state import setup_state
from train.tasks import kit, reward

STEPS = 30
REPO = __file__.rsplit('/tests/', 1)[0]
TINY = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, mlp_dim=64, dtype='float32')


def config(**overrides) -> ml_collections.ConfigDict:
  """The `rules` preset made small: 2 layers of width 32, bytes, 30 steps of 16 pairs."""
  c = reward_config.get_config('rules')
  c.update(steps=STEPS, batch_size=16, eval_every=STEPS, log_every=1)
  c.model.update(**TINY)
  c.checkpoint.update(every=1000, async_save=False)
  c.optimizer.update(warmup_steps=3)
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope='module')
def rm_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('rm_rules')
  return workdir, trainer.train_and_evaluate(config(), str(workdir))


@pytest.fixture(scope='module')
def lm_run(tmp_path_factory):
  """A two-step byte-level LM: a warm start, a policy and a judge."""
  c = lm_config.get_config('tiny')
  c.model.update(**TINY)
  c.data.update(seq_len=64)
  c.data.tokenizer.kind = 'byte'
  c.update(steps=2, batch_size=8, eval_every=0, log_every=1)
  c.checkpoint.update(async_save=False)
  workdir = tmp_path_factory.mktemp('lm')
  trainer.train_and_evaluate(c, str(workdir))
  return workdir


# --- the loss and the data -----------------------------------------------------------


def test_bradley_terry_loss_and_metrics_match_numpy():
  rng = np.random.default_rng(0)
  chosen, rejected, margin = rng.normal(size=16), rng.normal(size=16), rng.uniform(0, 1, 16)
  for c in (0.0, 0.05):
    losses, metrics = reward.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected),
                                                jnp.asarray(margin), center_coefficient=c)
    # TRL: -logsigmoid(r_c - r_r - m).mean() + c * mean((r_c + r_r)^2)
    expected = np.mean(np.logaddexp(0.0, -(chosen - rejected - margin))) + c * np.mean(
        (chosen + rejected) ** 2)
    np.testing.assert_allclose(np.mean(losses), expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['accuracy'], (chosen > rejected).astype(np.float32))
  np.testing.assert_allclose(metrics['rewards/margins'], chosen - rejected, rtol=1e-6)
  np.testing.assert_allclose(metrics['rewards/chosen'], chosen, rtol=1e-6)
  np.testing.assert_allclose(metrics['mean_reward'], (chosen + rejected) / 2, atol=1e-6)


def test_margins_are_read_and_bad_ones_counted(tmp_path):
  rows = [{'prompt': 'p1', 'chosen': 'a', 'rejected': 'b', 'margin': 1.5},
          {'prompt': 'p2', 'chosen': 'a', 'rejected': 'b'},
          {'prompt': 'p3', 'chosen': 'a', 'rejected': 'b', 'margin': 'big'},
          {'prompt': 'p4', 'chosen': 'a', 'rejected': 'b', 'margin': True, 'judge': 'x'}]
  data_cfg = ml_collections.ConfigDict(dict(source='jsonl', path='', val_fraction=0.5,
                                            seq_len=16, max_prompt_len=-1))
  render = preference_data._Renderer(tokenizers.ByteTokenizer(), None)
  pairs = preference_data.tokenize_pairs(rows, render, data_cfg, 'train')
  assert len(pairs) == 2 and pairs.skipped == {"a 'margin' that is not a finite number": 2}
  np.testing.assert_allclose([pairs[0]['margin'], pairs[1]['margin']], [1.5, 0.0])
  # lengths: BOS + prompt + completion (no EOS in bytes), the index of the last real input + 1
  np.testing.assert_array_equal(pairs[0]['lengths'], [4, 4])
  assert pairs[0]['inputs'][0, 3] == ord('a') and pairs[0]['inputs'][0, 4] == 0


def test_config_and_lora_freeze_the_right_parameters():
  with pytest.raises(ConfigError, match='reward.center_coefficient'):
    reward.RewardTask(config(**{'reward.center_coefficient': -1.0}))
  task = reward.RewardTask(config(**{'model.lora.rank': 4}))
  trainable = task.opt.trainable
  assert trainable['head'] and trainable['head_bias']
  attn = trainable['trunk']['blocks']['attn']
  assert attn['wq_lora_a'] and attn['wq_lora_b'] and not attn['wq']
  assert not trainable['trunk']['embedding']


# --- training and loading --------------------------------------------------------------


def test_first_step_is_ln2_and_held_out_accuracy_rises(rm_run):
  _, result = rm_run
  np.testing.assert_allclose(result.losses[1], math.log(2.0), rtol=1e-6)
  assert result.eval['eval/accuracy'] >= 0.7, result.eval
  assert result.eval['eval/loss'] < math.log(2.0) - 0.05, result.eval
  assert result.eval['eval/rewards/margins'] > 0.1, result.eval
  for key in reward.PAIR_METRICS:
    assert f'train/{key}' in result.train and f'eval/{key}' in result.eval


def test_loaded_model_reproduces_the_logged_rewards(rm_run):
  """The eval rewards logged in training (last step = the checkpoint), recomputed from the
  run directory by `load_reward_model` + `score`, on one device and sharded over 8."""
  workdir, result = rm_run
  c = runs.load_run_config(str(workdir))
  data = preference_data.build_preference_data(
      c.data, seed=c.seed, global_batch_size=c.batch_size, eval_steps=c.eval_steps,
      workdir=str(workdir), process_index=0, process_count=1)
  batches = list(data.eval_batches())
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  for where in (None, mesh):
    graphdef, params, tokenizer = reward.load_reward_model(str(workdir), where)
    assert tokenizer.vocab_size == 257
    fn = jax.jit(reward.score, static_argnums=0)
    rewards = np.concatenate([
        np.asarray(fn(graphdef, params, b['inputs'].reshape(-1, b['inputs'].shape[-1]),
                      b['lengths'].reshape(-1))).reshape(-1, 2) for b in batches])
    np.testing.assert_allclose(rewards[:, 0].mean(), result.eval['eval/rewards/chosen'],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rewards[:, 1].mean(), result.eval['eval/rewards/rejected'],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose((rewards[:, 0] > rewards[:, 1]).mean(),
                               result.eval['eval/accuracy'])
  # What train.sample prints: each sample completion's reward, best first.
  text = result.samples['samples/rewards']
  printed = {ast.literal_eval(m.group(2)): float(m.group(1))
             for m in re.finditer(r'^([+-]\d+\.\d+)  (.*)$', text, re.M)}
  assert sorted(printed) == sorted(c.sample.completions)
  rows = [reward.encode_pair(tokenizer, c.sample.prompt, x) for x in c.sample.completions]
  expected = fn(graphdef, params, *reward.pad_rows(rows))
  np.testing.assert_allclose([printed[x] for x in c.sample.completions], expected, atol=1e-4)


def test_warm_started_trunk_has_the_lms_features(lm_run):
  c = config(init_from=str(lm_run))
  task = reward.RewardTask(c)
  task.setup_inference(str(lm_run))
  mesh = mesh_lib.make_mesh(c.mesh)
  rng, _, _, init = setup_state(task, c, mesh)
  params = task.warm_start(init(rng)).params
  lm_params, _ = kit.load_run_params(
      str(lm_run), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding),
                                params['trunk']))
  tokens = np.asarray([list(b'sort: b a\nab'), list(b'def f(x): re')], np.int32)
  lm_model = nnx.merge(transformer.graphdef(task.model_cfg), lm_params)
  rm_model = nnx.merge(task.graphdef, params)
  np.testing.assert_array_equal(rm_model.trunk(tokens, features=True),
                                lm_model(tokens, features=True))
  # The head: values = features . head + bias.
  head = np.random.default_rng(0).normal(size=task.model_cfg.d_model).astype(np.float32)
  rm_model = nnx.merge(task.graphdef, dict(params, head=jnp.asarray(head),
                                           head_bias=jnp.asarray(0.5)))
  features = np.asarray(lm_model(tokens, features=True))
  np.testing.assert_allclose(rm_model(tokens), features @ head + 0.5, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(reward.reward_lib.sequence_values(
      jnp.arange(12.0).reshape(2, 6), jnp.asarray([3, 6])), [2.0, 11.0])


# --- AI feedback ------------------------------------------------------------------------


def feedback_flags(**overrides):
  values = dict(policy=None, prompts=None, output=None, judge='rule:shorter', principles='',
                samples=2, max_tokens=12, temperature=1.0, top_p=1.0, stop=[], seed=0,
                tie_margin=0.0, overwrite=False)
  values.update(overrides)
  return types.SimpleNamespace(**values)


def test_rules_rank_as_they_say():
  assert ai_feedback.sorted_rule('sort: pear fig apple\n', 'apple fig pear') > \
      ai_feedback.sorted_rule('sort: pear fig apple\n', 'apple pear fig') > \
      ai_feedback.sorted_rule('sort: pear fig apple\n', 'pear fig apple')
  assert ai_feedback.no_repeats_rule('', 'a b a a') == -2.0
  assert ai_feedback.shorter_rule('', ' ab ') == -2.0


def test_rule_judge_writes_pairs_the_preference_reader_takes(lm_run, tmp_path):
  prompts = [r['prompt'] for r, _ in zip(preference_data.rule_pairs('validation', 0.1),
                                          range(6), strict=False)]
  (tmp_path / 'prompts.jsonl').write_text(''.join(json.dumps({'prompt': p}) + '\n'
                                                  for p in prompts))
  out = tmp_path / 'prefs.jsonl'
  # The untrained policy draws bytes almost uniformly; frequent stop characters make the
  # candidates' lengths vary, so that `shorter` has something to prefer.
  stops = list(' etaoinshrdlu') + ['\\n']
  f = feedback_flags(policy=str(lm_run), prompts=str(tmp_path / 'prompts.jsonl'),
                     output=str(out), stop=stops, samples=3)
  written = ai_feedback.run(f)
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert written == len(records) >= 3
  for r in records:
    assert r['prompt'] in prompts and r['judge'] == 'rule:shorter'
    assert len(r['chosen'].strip()) < len(r['rejected'].strip())  # the rule's preference
    assert not set(r['chosen'] + r['rejected']) & set(stops[:-1] + ['\n'])  # cut at stops
  data_cfg = ml_collections.ConfigDict(dict(source='jsonl', path=str(out), val_fraction=0.5,
                                            seq_len=64, max_prompt_len=-1))
  raw = [*preference_data.read_pairs(data_cfg, 'train'),
         *preference_data.read_pairs(data_cfg, 'validation')]
  pairs = preference_data.tokenize_pairs(
      raw, preference_data._Renderer(tokenizers.ByteTokenizer(), None), data_cfg, 'all')
  assert len(pairs) == len(records) and not pairs.skipped


def _judge_model():
  """A random byte-level transformer with weights 3x their init: a judge with opinions
  (at the init scale they are ~1e-5 nats; much larger, attention saturates on one token)."""
  cfg = transformer.TransformerConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2,
                                      n_kv_heads=2, head_dim=16, mlp_dim=64,
                                      dtype=jnp.float32)
  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(transformer.Transformer(cfg, rngs=nnx.Rngs(3)))
  params = jax.tree.map(lambda x: x * 3.0, params)
  return graphdef, params


def test_model_judge_is_order_invariant_and_matches_a_log_softmax():
  graphdef, params = _judge_model()
  tok = tokenizers.ByteTokenizer()
  judge = ai_feedback.ModelJudge('random', graphdef, params, tok, ('Be brief.',))
  prompt, x, y, z = 'sort: b a\n', 'a b', 'zz yy xx', 'b b a'
  forward, backward = judge.preferences([prompt] * 2, [[x, y], [y, x]])

  forward_pass = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))

  def log_odds(a, b):  # lp('A') - lp('B') after the judge prompt, by a plain forward pass
    head = [tok.bos_id] + list(tok.encode(ai_feedback.judge_prompt(('Be brief.',), prompt, a,
                                                                   b)))
    logits = np.asarray(forward_pass(params, np.asarray([head], np.int32)))[0, -1]
    lp = logits - np.logaddexp.reduce(logits)
    return lp[ord('A')] - lp[ord('B')]

  expected = (log_odds(x, y) - log_odds(y, x)) / 2
  assert abs(expected) > 0.05  # an opinionated judge: the test can fail
  np.testing.assert_allclose(forward[0, 1], expected, rtol=1e-4)
  np.testing.assert_allclose(backward[0, 1], -forward[0, 1], rtol=1e-5)
  np.testing.assert_allclose(forward, -forward.T, atol=1e-6)
  a = ai_feedback.label([prompt] * 2, [[x, y], [y, x]], judge).records
  assert [(r['chosen'], r['rejected']) for r in a] == [(a[0]['chosen'], a[0]['rejected'])] * 2
  # Three candidates: all pairs compared, the top against the bottom.
  (three,) = judge.preferences([prompt], [[x, y, z]])
  np.testing.assert_allclose(three[:2, :2], forward, rtol=1e-4, atol=1e-6)
  (record,) = ai_feedback.label([prompt], [[x, y, z]], judge).records
  totals = three.sum(1)
  assert (record['chosen'], record['rejected']) == ([x, y, z][np.argmax(totals)],
                                                     [x, y, z][np.argmin(totals)])
  assert ai_feedback.label([prompt], [[x, y]], judge, tie_margin=abs(expected) + 1
                           ).skipped == {'a tie': 1}


def test_bad_inputs_are_one_line(rm_run, lm_run, tmp_path):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('sort: b a\n')
  base = dict(policy=str(lm_run), prompts=str(prompts), output=str(tmp_path / 'o.jsonl'))
  cases = [
      (dict(judge='rule:nope'), ConfigError, 'no such rule'),
      (dict(samples=1), ConfigError, '--samples=1'),
      (dict(policy=str(tmp_path)), ConfigError, '--policy=.*not a run directory'),
      (dict(judge=str(tmp_path / 'gone')), ConfigError, '--judge=.*not a run directory'),
      (dict(policy=str(rm_run[0])), ConfigError, "--policy: .*'reward' run"),
  ]
  for overrides, error, message in cases:
    with pytest.raises(error, match=message):
      ai_feedback.run(feedback_flags(**{**base, **overrides}))
  (tmp_path / 'empty.jsonl').write_text('\n')
  with pytest.raises(DataError, match='has no prompts'):
    ai_feedback.read_prompts(str(tmp_path / 'empty.jsonl'))
  with pytest.raises(ConfigError, match="'lm' run, not a reward model"):
    reward.load_reward_model(str(lm_run))
  with pytest.raises(ConfigError, match="a judge answers A or B"):
    ai_feedback.load_model_judge(str(rm_run[0]), ai_feedback.DEFAULT_PRINCIPLES)
  # The command line: one line on stderr, exit status 2.
  proc = subprocess.run([sys.executable, '-m', 'train.ai_feedback', f'--policy={lm_run}',
                         f'--prompts={prompts}', f'--output={tmp_path}/x.jsonl',
                         '--judge=rule:nope'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr.strip().count('\n') == 0, proc.stderr
  assert 'no such rule' in proc.stderr
