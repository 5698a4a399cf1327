"""Resuming past damaged checkpoints, from a chosen step, and never under a changed model.

Oracles: the per-step losses of one straight run (a resume from step s repeats its
steps after s exactly), and the exceptions orbax and TensorStore raise on files
damaged the way a copy that stopped short damages them.
"""

import json
import pathlib
import shutil

import jax
import ml_collections
import pytest
from test_train import small_config as train_config
from test_train import write_corpus

from data.errors import ConfigError
from train import checkpoint, resume, trainer
from train import mesh as mesh_lib
from train.tasks.lm import LMTask

STEPS = 6  # checkpoints at 2, 4 and 6


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> pathlib.Path:
  return write_corpus(tmp_path_factory)


def small_config(corpus: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
  """test_train's char-level LM, for STEPS steps with checkpoints at 2, 4 and 6."""
  return train_config(corpus, **{'steps': STEPS, 'checkpoint.every': 2, 'checkpoint.keep': 10,
                                 **overrides})


@pytest.fixture(scope='module')
def straight(corpus, tmp_path_factory) -> tuple[pathlib.Path, dict[int, float]]:
  """A run of STEPS steps, never interrupted: its workdir and its losses."""
  workdir = tmp_path_factory.mktemp('straight')
  losses = trainer.train_and_evaluate(small_config(corpus), str(workdir)).losses
  assert sorted(losses) == list(range(1, STEPS + 1))
  return workdir, losses


@pytest.fixture
def run(straight, tmp_path) -> pathlib.Path:
  """A copy of the straight run's workdir, free to damage."""
  workdir = tmp_path / 'run'
  shutil.copytree(straight[0], workdir)
  return workdir


# --- ways a checkpoint's files get damaged -------------------------------------------------


def _largest(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def truncate_array_data(step_dir: pathlib.Path) -> None:
  """Cuts the largest file of array chunks in half, as a copy that stopped short would."""
  path = _largest(step_dir / 'state' / 'ocdbt.process_0' / 'd')
  with open(path, 'r+b') as f:
    f.truncate(path.stat().st_size // 2)


def _flip_bytes(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 16):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


DAMAGE = {
    'truncated chunks': (truncate_array_data, 'shorter than its index says'),
    'corrupted index': (lambda d: [_flip_bytes(p) for p in (d / 'state' / 'd').iterdir()],
                        'corrupt'),
    'missing index': (lambda d: [p.unlink() for p in (d / 'state' / 'd').iterdir()],
                      'a file is missing'),
    'truncated manifest': (lambda d: (d / 'state' / 'manifest.ocdbt').write_bytes(b'OCDBT'),
                           'corrupt'),
    'broken metadata': (lambda d: (d / 'state' / '_METADATA').write_text('{"tree_metadata'),
                        'not valid JSON'),
    'missing iterator state': (lambda d: (d / 'data' / 'process_0-of-1.json').unlink(),
                               'a file is missing'),
    'missing state': (lambda d: shutil.rmtree(d / 'state'), 'an item is missing'),
}


def set_aside(workdir: pathlib.Path, kind: str) -> list[str]:
  return sorted(p.name.split('.')[0] for p in (workdir / 'checkpoints').glob(f'*.{kind}-*'))


def restore_target(config, workdir: pathlib.Path):
  """The trainer's restore target and data iterator for `config` in `workdir`."""
  task = trainer.validate(config, jax.device_count(), 1)
  data_iter = task.setup_data(str(workdir), 0, 1)
  _, abstract, shardings, _ = trainer.setup_state(task, config, mesh_lib.make_mesh(config.mesh))
  return checkpoint.abstract_with_shardings(abstract, shardings), data_iter


@pytest.mark.parametrize('kind', list(DAMAGE))
def test_each_kind_of_damage_falls_back_one_checkpoint(corpus, run, kind):
  damage, reason = DAMAGE[kind]
  damage(run / 'checkpoints' / '6')
  config = small_config(corpus)
  target, data_iter = restore_target(config, run)
  ckpt = checkpoint.Checkpointer(str(run), config.checkpoint)
  try:
    assert reason in damage_reason_of(ckpt, 6, target, data_iter)
    state, step = ckpt.restore_newest_good(target, data_iter)
  finally:
    ckpt.close()
  assert (step, int(state.step)) == (4, 4)
  assert set_aside(run, 'damaged') == ['6']
  assert sorted(p.name for p in (run / 'checkpoints').iterdir() if p.name.isdigit()) == ['2', '4']


def damage_reason_of(ckpt, step, target, data_iter) -> str:
  try:
    ckpt.restore(step, target, data_iter)
  except Exception as e:
    return checkpoint.damage_reason(e)
  raise AssertionError(f'step {step} restored despite the damage')


def test_a_changed_shape_is_not_taken_for_damage(corpus, run):
  """Orbax's shape error passes through unchanged, and nothing is set aside."""
  target, data_iter = restore_target(small_config(corpus, **{'model.d_model': 32}), run)
  ckpt = checkpoint.Checkpointer(str(run), small_config(corpus).checkpoint)
  try:
    with pytest.raises(ValueError, match='not compatible with the stored shape') as error:
      ckpt.restore_newest_good(target, data_iter)
  finally:
    ckpt.close()
  assert checkpoint.damage_reason(error.value) is None
  assert not set_aside(run, 'damaged')


# --- the trainer ---------------------------------------------------------------------------


def test_rerun_past_a_damaged_checkpoint_matches_the_straight_run(corpus, straight, run):
  truncate_array_data(run / 'checkpoints' / '6')
  losses = trainer.train_and_evaluate(small_config(corpus), str(run)).losses
  # Resumed from step 4: steps 5 and 6 again, exactly as the straight run took them.
  assert losses == {s: straight[1][s] for s in (5, 6)}
  assert set_aside(run, 'damaged') == ['6']
  assert (run / 'checkpoints' / '6').is_dir()  # saved again


def test_every_checkpoint_damaged_is_one_clear_error(corpus, run):
  for step in (2, 4, 6):
    truncate_array_data(run / 'checkpoints' / str(step))
  with pytest.raises(ConfigError, match=r'No checkpoint in .* could be read: steps 6, 4, 2 are '
                     r'damaged \(step 6: a file is shorter than its index says \(OUT_OF_RANGE '
                     r'reading .*\); the others are logged above\)') as error:
    trainer.train_and_evaluate(small_config(corpus), str(run))
  assert '\n' not in str(error.value)
  assert set_aside(run, 'damaged') == ['2', '4', '6']
  # A rerun does not start afresh over them.
  with pytest.raises(ConfigError, match='holds only checkpoints set aside as damaged'):
    trainer.train_and_evaluate(small_config(corpus), str(run))


def test_resume_step_resumes_from_that_step(corpus, straight, run):
  config = small_config(corpus, **{'checkpoint.resume_step': 2})
  losses = trainer.train_and_evaluate(config, str(run)).losses
  assert losses == {s: straight[1][s] for s in range(3, STEPS + 1)}
  assert set_aside(run, 'superseded') == ['4', '6']


def test_resume_step_that_does_not_exist(corpus, run):
  config = small_config(corpus, **{'checkpoint.resume_step': 3})
  with pytest.raises(ConfigError, match=r'resume_step=3: .* has no such checkpoint; it has '
                     r'steps 2, 4, 6\.'):
    trainer.train_and_evaluate(config, str(run))


def test_changed_model_is_refused_before_anything_compiles(corpus, run, monkeypatch):
  saved = (run / 'config.json').read_text()

  def setup_data(*args):
    raise AssertionError('the data was read (and the step would compile next)')

  monkeypatch.setattr(LMTask, 'setup_data', setup_data)
  config = small_config(corpus, **{'model.d_model': 128, 'steps': 8})
  with pytest.raises(ConfigError, match=r'changes model.d_model: 64 -> 128 \(saved -> now\)\. '
                     r'Use a new --workdir, or start one from its weights with '
                     r'--config.init_from=') as error:
    trainer.train_and_evaluate(config, str(run))
  assert '\n' not in str(error.value) and 'steps' not in str(error.value)
  assert (run / 'config.json').read_text() == saved


def test_changed_steps_and_schedule_resume(corpus, run):
  config = small_config(corpus, **{'steps': 8, 'optimizer.lr': 1e-3, 'log_every': 2})
  losses = trainer.train_and_evaluate(config, str(run)).losses
  assert sorted(losses) == [7, 8]
  assert json.loads((run / 'config.json').read_text())['steps'] == 8


# --- which keys may change -------------------------------------------------------------------


def test_fixed_key_changes():
  saved = {'steps': 10, 'batch_size': 8, 'model': {'d_model': 64, 'dtype': 'float32'},
           'optimizer': {'lr': 1e-3, 'clip_norm': 1.0}, 'd_optimizer': {'lr': 1e-4},
           'mesh': {'data': -1}, 'data': {'tokenizer': {'vocab_size': 512}}, 'old_key': 1}
  allowed = {'steps': 20, 'model': {'d_model': 64, 'dtype': 'bfloat16'},
             'optimizer': {'lr': 3e-4, 'clip_norm': 1.0}, 'd_optimizer': {'lr': 1e-3},
             'mesh': {'data': 2}, 'batch_size': 8, 'data': {'tokenizer': {'vocab_size': 512}},
             'new_key': 2}
  assert resume.fixed_key_changes(saved, allowed) == []
  fixed = json.loads(json.dumps(allowed))
  fixed['model']['d_model'] = 128
  fixed['batch_size'] = 16
  fixed['optimizer']['clip_norm'] = 0.0
  fixed['data']['tokenizer']['vocab_size'] = 1024
  assert resume.fixed_key_changes(saved, fixed) == [
      'batch_size: 8 -> 16', 'data.tokenizer.vocab_size: 512 -> 1024',
      'model.d_model: 64 -> 128', 'optimizer.clip_norm: 1.0 -> 0.0']


def test_unreadable_saved_config_is_a_config_error(corpus, run):
  (run / 'config.json').write_text('{"steps": 6,')
  with pytest.raises(ConfigError, match=r'config.json is not valid JSON .*use a new --workdir'):
    resume.check_config_unchanged(small_config(corpus), str(run))
