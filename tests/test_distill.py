"""Distillation (train/tasks/distill.py).

Oracles: the soft-target KL against numpy on random logits; a student distilled from a
trained teacher ends closer to the teacher's held-out distributions (`eval/teacher_kl`)
than the same student, from the same initialisation and data, trained on the LM loss alone
(alpha = 0); the teacher's frozen parameters equal its checkpoint's; a student whose
`init_from` run has another tokenizer is a config error naming both.
"""

import json
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from test_train import write_corpus

from configs import distill as distill_config
from configs import lm as lm_config
from data.errors import ConfigError
from model import run_params
from train import mesh as mesh_lib
from train import tasks, trainer
from train.tasks import distill

STEPS = 40


def lm_run_config(corpus, **overrides) -> ml_collections.ConfigDict:
  """A byte-level LM on a small text file, the teacher's and the students' data."""
  c = lm_config.get_config('tiny')
  c.update(steps=STEPS, batch_size=16, log_every=1, eval_every=STEPS, eval_steps=2)
  c.checkpoint.update(every=1000, async_save=False)
  c.data.update(source='text', path=str(corpus), seq_len=32)
  c.data.tokenizer.update(kind='byte')
  c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4)
  c.optimizer.update(lr=1e-2, end_lr=1e-3, warmup_steps=5)
  c.sample.update(max_new_tokens=2)
  c.update_from_flattened_dict(overrides)
  return c


def student_config(corpus, teacher, **overrides) -> ml_collections.ConfigDict:
  c = distill_config.get_config('tiny')
  base = lm_run_config(corpus)
  for key in ('steps', 'batch_size', 'log_every', 'eval_every', 'eval_steps', 'checkpoint',
              'data', 'optimizer', 'sample'):
    c[key] = base[key]
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, dtype='float32')
  c.distill.teacher = str(teacher)
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory)


@pytest.fixture(scope='module')
def teacher(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('teacher')
  trainer.train_and_evaluate(lm_run_config(corpus), str(workdir))
  return workdir


def test_soft_target_kl_matches_numpy():
  rng = np.random.default_rng(0)
  t, s = rng.normal(size=(2, 3, 11)), rng.normal(size=(2, 3, 11))
  T = 2.5

  def log_softmax(x):
    x = x / T
    return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(
        -1, keepdims=True)
  expected = np.sum(np.exp(log_softmax(t)) * (log_softmax(t) - log_softmax(s)), -1)
  np.testing.assert_allclose(distill.distill_kl(t, s, T), expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(distill.distill_kl(t, t, T), 0.0, atol=1e-6)


def test_distilled_student_is_closer_to_the_teacher_than_lm_alone(corpus, teacher, tmp_path):
  results = {}
  for alpha in (0.5, 0.0):
    cfg = student_config(corpus, teacher, **{'distill.alpha': alpha})
    results[alpha] = trainer.train_and_evaluate(cfg, str(tmp_path / str(alpha))).eval
  distilled, alone = results[0.5]['eval/teacher_kl'], results[0.0]['eval/teacher_kl']
  assert distilled < 0.8 * alone, results


def test_teacher_is_a_frozen_input_read_from_its_checkpoint(corpus, teacher, tmp_path):
  cfg = student_config(corpus, teacher)
  task = tasks.get_task(cfg)
  task.setup_data(str(tmp_path), 0, 1)
  frozen = task.load_frozen(mesh_lib.make_mesh(cfg.mesh))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen['teacher'])
  saved, _ = run_params.restore_params(str(teacher), run_params.on_one_device(abstract))
  jax.tree.map(np.testing.assert_array_equal, frozen['teacher'], saved)
  assert task.teacher_cfg.d_model == 64 and task.model_cfg.d_model == 32


def test_another_tokenizer_is_a_config_error_naming_both(corpus, teacher, tmp_path):
  # A run directory whose tokenizer is characters, not the teacher's bytes.
  other = tmp_path / 'char_run'
  shutil.copytree(teacher / 'tokenizer', other / 'tokenizer')
  shutil.copy(teacher / 'config.json', other / 'config.json')
  chars = sorted(set(corpus.read_text()))
  (other / 'tokenizer' / 'tokenizer.json').write_text(
      json.dumps({'config': {'kind': 'char'}, 'chars': chars}))
  task = tasks.get_task(student_config(corpus, teacher, init_from=str(other)))
  with pytest.raises(ConfigError, match=r"distill.teacher=.*'kind': 'byte'.*init_from=.*"
                                        r"'kind': 'char'"):
    task.setup_data(str(tmp_path / 'student'), 0, 1)


def test_config_errors_name_the_key(corpus, teacher):
  with pytest.raises(ConfigError, match='distill.teacher is empty'):
    tasks.get_task(student_config(corpus, '', **{'distill.teacher': ''}))
  with pytest.raises(ConfigError, match='distill.alpha'):
    tasks.get_task(student_config(corpus, teacher, **{'distill.alpha': 1.5}))
  with pytest.raises(ConfigError, match='distill.temperature'):
    tasks.get_task(student_config(corpus, teacher, **{'distill.temperature': 0.0}))
