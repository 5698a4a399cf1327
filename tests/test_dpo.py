"""DPO (train/tasks/dpo.py) and its preference data (data/preference_data.py).

Oracles: each loss type and TRL's metrics against numpy closed forms on given log-probs;
ln 2, the sigmoid loss of a policy equal to its reference, at the first step of runs whose
reference is the seed's initialisation, a run directory, and a precomputed table (and the
table run against the frozen-model run: the same first step); the masked targets of a row
decoded back to the completion text; the bad-row counts of a file written with known
faults; held-out `rewards/accuracies` of the embedded rule set (chosen sorted) above 0.9
after training, against a control with shuffled labels at chance.
"""

import json
import math

import ml_collections
import numpy as np
import pytest

from configs import dpo as dpo_config
from data import chat, preference_data, tokenizers
from data.errors import ConfigError, DataError
from train import tasks, trainer
from train.tasks import dpo

STEPS = 40


def config(**overrides) -> ml_collections.ConfigDict:
  """The `rules` preset made small: 2 layers of width 64, bytes, 40 steps of 32 pairs."""
  c = dpo_config.get_config('rules')
  c.update(steps=STEPS, eval_every=20, log_every=1)
  c.checkpoint.update(every=1000, async_save=False)
  c.optimizer.update(lr=5e-3, end_lr=5e-4, warmup_steps=5)
  c.sample.update(max_new_tokens=2)
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope='module')
def rules_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('dpo_rules')
  return workdir, trainer.train_and_evaluate(config(), str(workdir))


# --- the loss ----------------------------------------------------------------------


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize('loss_type', dpo.LOSS_TYPES)
def test_loss_types_and_metrics_match_closed_forms(loss_type):
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-20.0, 5.0, 16) for _ in range(4))
  beta, eps = 0.3, 0.1
  losses, metrics = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                 label_smoothing=eps if loss_type == 'sigmoid' else 0.0)
  h = (pc - rc) - (pr - rr)
  expected = {
      'sigmoid': -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h),
      'hinge': np.maximum(0.0, 1.0 - beta * h),
      'ipo': (h - 1.0 / (2.0 * beta))**2,
  }[loss_type]
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['rewards/chosen'], beta * (pc - rc), rtol=1e-5)
  np.testing.assert_allclose(metrics['rewards/rejected'], beta * (pr - rr), rtol=1e-5)
  np.testing.assert_allclose(metrics['rewards/margins'], beta * h, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(metrics['rewards/accuracies'], (beta * h > 0).astype(float))
  np.testing.assert_allclose(metrics['logps/chosen'], pc, rtol=1e-6)
  np.testing.assert_allclose(metrics['logps/rejected'], pr, rtol=1e-6)


# --- data --------------------------------------------------------------------------


def _data_cfg(**overrides) -> ml_collections.ConfigDict:
  c = dpo_config.get_config('rules').data
  c.update_from_flattened_dict(overrides)
  return c


def test_rows_mask_exactly_the_completion_and_bad_rows_are_counted(tmp_path):
  rows = [
      {'prompt': 'Q: 1+1?\n', 'chosen': 'A: 2', 'rejected': 'A: 3'},
      {'prompt': 'Q: sky?\n', 'chosen': 'blue' * 40, 'rejected': 'red'},  # truncated
      {'prompt': 'x', 'chosen': '', 'rejected': 'y'},  # empty completion
      {'prompt': 'p' * 60, 'chosen': 'a', 'rejected': 'b'},  # over-long prompt
      {'prompt': 'p', 'chosen': 'same', 'rejected': 'same'},
      {'prompt': 'p', 'chosen': 'a'},  # no rejected
      {'prompt': [{'content': 'hi'}], 'chosen': [], 'rejected': []},  # no role
      {'prompt': 'p', 'chosen': [{'role': 'assistant', 'content': 'a'}], 'rejected': 'b'},
  ]
  path = tmp_path / 'prefs.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n{not json\n')
  data_cfg = _data_cfg(source='jsonl', path=str(path), seq_len=48, max_prompt_len=40)
  tok = tokenizers.ByteTokenizer()
  render = preference_data._Renderer(tok, None)
  pairs = preference_data.tokenize_pairs(
      [json.loads(line) if line.startswith('{"') else 'malformed JSON'
       for line in path.read_text().splitlines()], render, data_cfg, 'train')
  assert len(pairs) == 2 and pairs.truncated == 1
  assert pairs.skipped == {'an empty completion': 1, 'a prompt over data.max_prompt_len=40 '
                           'tokens': 1, 'chosen equal to rejected': 1, "no 'rejected'": 1,
                           'a message without a string role or content': 1,
                           'strings mixed with message lists': 1, 'malformed JSON': 1}
  example = pairs[0]
  for row, text in enumerate(('A: 2', 'A: 3')):
    targets = example['targets'][row][example['mask'][row] > 0]
    assert tok.decode(targets) == text
    prompt_len = 1 + len('Q: 1+1?\n')  # BOS + prompt
    assert list(example['inputs'][row][:prompt_len]) == [256, *b'Q: 1+1?\n']
    assert example['segment_ids'][row][prompt_len + 3] == 1  # the last real input
    assert example['segment_ids'][row][prompt_len + 4] == 2  # padding
  long = pairs[1]
  assert long['mask'][0].sum() == 48 + 1 - (1 + len('Q: sky?\n'))  # cut at seq_len
  assert long['index'] == 1


def test_message_rows_render_with_the_chat_template():
  tok = tokenizers.ByteTokenizer()
  template = chat.ChatTemplate(chat.DEFAULT_TEMPLATE, tok, chat.default_context(tok))
  render = preference_data._Renderer(tok, lambda: template)
  prompt = [{'role': 'user', 'content': 'Sort: b a'}]
  ids = render({'prompt': prompt, 'chosen': [{'role': 'assistant', 'content': 'a b'}],
                'rejected': [{'role': 'assistant', 'content': 'b a'}]})
  full = template.render(prompt + [{'role': 'assistant', 'content': 'a b'}])
  assert template.encode(full) == ids[0] + ids[1]
  assert tok.decode(ids[2]) == 'b a'  # the reply; its end of turn is BOS, not text
  assert ids[2][-1] == tok.bos_id


def test_rule_set_follows_its_rule_and_splits_without_overlap():
  train = list(preference_data.rule_pairs('train', 0.1))
  val = list(preference_data.rule_pairs('validation', 0.1))
  assert len(train) == preference_data.RULE_EXAMPLES['train']
  assert len(val) == preference_data.RULE_EXAMPLES['validation']
  for pair in train[:200] + val[:200]:
    words = pair['prompt'].removeprefix('sort: ').split()
    assert pair['chosen'].split() == sorted(words)
    assert pair['rejected'].split() == sorted(words)[::-1]
  word_sets = [{p['chosen'] for p in split} for split in (train, val)]
  assert [len(s) for s in word_sets] == [len(train), len(val)]  # each set of words once
  assert not word_sets[0] & word_sets[1]


def test_config_errors_name_the_key():
  with pytest.raises(ConfigError, match='dpo.loss_type'):
    tasks.get_task(config(**{'dpo.loss_type': 'kto'}))
  with pytest.raises(ConfigError, match='model.lora.rank'):
    tasks.get_task(config(**{'dpo.reference': 'lora_base'}))
  with pytest.raises(ConfigError, match='data.path'):
    tasks.get_task(config(**{'data.source': 'jsonl'}))


def test_an_unusable_split_is_one_data_error(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"prompt": "p", "chosen": "a"}\n' * 20)
  with pytest.raises(DataError, match='no usable preference pair'):
    preference_data.build_preference_data(
        _data_cfg(source='jsonl', path=str(path)), seed=0, global_batch_size=8, eval_steps=0,
        workdir=str(tmp_path / 'w'), process_index=0, process_count=1)


# --- training ----------------------------------------------------------------------


def test_first_step_loss_is_ln2(rules_run):
  _, result = rules_run
  np.testing.assert_allclose(result.losses[1], math.log(2.0), rtol=1e-6)


def test_held_out_accuracy_reaches_0_9_and_shuffled_labels_stay_at_chance(rules_run, tmp_path):
  workdir, result = rules_run
  assert result.eval['eval/rewards/accuracies'] >= 0.9, result.eval
  assert result.eval['eval/rewards/margins'] > 0.5, result.eval
  for key in dpo.PAIR_METRICS:
    assert f'train/{key}' in result.train and f'eval/{key}' in result.eval

  control = trainer.train_and_evaluate(config(**{'data.shuffle_labels': True}),
                                       str(tmp_path / 'control'))
  assert abs(control.eval['eval/rewards/accuracies'] - 0.5) < 0.15, control.eval
  assert abs(control.eval['eval/rewards/margins']) < result.eval['eval/rewards/margins'] / 3


def test_reference_from_a_run_and_precomputed_agree_at_ln2(rules_run, tmp_path):
  """A second DPO from the first run's parameters: its reference read from that run (a
  frozen input) or precomputed into the workdir gives ln 2 at step 1, and the same metrics
  at step 2 (after one update, so the rewards are not zero)."""
  start, _ = rules_run
  results = {}
  for reference in ('model', 'precomputed'):
    cfg = config(**{'init_from': str(start), 'dpo.reference': reference, 'steps': 2,
                    'optimizer.warmup_steps': 0,
                    'eval_every': 0})
    results[reference] = trainer.train_and_evaluate(cfg, str(tmp_path / reference))
  for result in results.values():
    np.testing.assert_allclose(result.losses[1], math.log(2.0), rtol=1e-6)
  model, table = results['model'].train, results['precomputed'].train
  for key in dpo.PAIR_METRICS:
    np.testing.assert_allclose(table[f'train/{key}'], model[f'train/{key}'], rtol=1e-5,
                               atol=1e-5, err_msg=key)
  assert model['train/logps/chosen'] < -1.0  # a real log-prob, not a zero
  assert abs(model['train/rewards/margins']) > 1e-4  # the policy moved from the reference
  assert list((tmp_path / 'precomputed' / 'reference_logps').glob('*.npy'))


def test_lora_base_reference_starts_at_ln2(tmp_path):
  """LoRA DPO whose reference is the policy with its adapters off: ln 2 at the first step
  (B = 0), then a policy that moved away from it; a frozen-model reference with adapters is
  refused (it would look for adapters in a run that has none)."""
  cfg = config(**{'model.lora.rank': 4, 'dpo.reference': 'lora_base', 'steps': 3,
                  'optimizer.warmup_steps': 0, 'eval_every': 0})
  result = trainer.train_and_evaluate(cfg, str(tmp_path / 'lora'))
  np.testing.assert_allclose(result.losses[1], math.log(2.0), rtol=1e-6)
  assert abs(result.train['train/rewards/margins']) > 1e-5
  with pytest.raises(ConfigError, match="use dpo.reference='lora_base'"):
    tasks.get_task(config(**{'model.lora.rank': 4, 'dpo.reference': 'model'}))
