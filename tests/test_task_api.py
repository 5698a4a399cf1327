"""The task interface (train/tasks/__init__.py) on a toy task (tests/toy_task.py): frozen
inputs, trainable subsets, parameter groups, on-policy batches and their exact resume, the
registry, the shared EMA and the transfer guard.

Oracles: a frozen input against the checkpoint it was read from and a copy taken before the
steps; the first loss against numpy on the same draws; frozen and zero-lr leaves against
their initial values; a group's lr multiplier against a run with the whole lr scaled; a
killed and resumed run against a straight one; the compiled program's argument bytes
against the optimizer state it should (not) hold.
"""

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_task
from toy_task import DIM

from data.errors import ConfigError
from train import checkpoint, optim, tasks, trainer
from train import mesh as mesh_lib
from train.state import TrainState, setup_state

REPO = pathlib.Path(__file__).resolve().parents[1]


def config(**overrides):
  c = toy_task.get_config()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def restore(workdir, cfg, step=None):
  task = tasks.get_task(cfg)
  ckpt = checkpoint.Checkpointer(str(workdir), cfg.checkpoint)
  step = ckpt.latest_step() if step is None else step
  abstract = jax.eval_shape(task.init_state, jax.random.key(0))
  state = ckpt.restore(step, abstract, None)
  ckpt.close()
  return state


def compiled(task, cfg, frozen=None):
  """The task's state, frozen inputs and jitted train step on the default mesh."""
  mesh = mesh_lib.make_mesh(cfg.mesh)
  rng, _, shardings, init = setup_state(task, cfg, mesh)
  frozen = task.load_frozen(mesh) if frozen is None else frozen
  step, _ = trainer.compile_step(task, shardings, mesh, trainer.shardings_of(frozen))
  return init(rng), frozen, step


@pytest.fixture(scope='module')
def teacher_run(tmp_path_factory):
  """A Kiln run of the toy task, whose final parameters serve as a frozen teacher."""
  workdir = tmp_path_factory.mktemp('teacher')
  trainer.train_and_evaluate(config(steps=5), str(workdir))
  return workdir


# --- frozen inputs ------------------------------------------------------------------


def test_frozen_input_comes_from_a_run_and_is_never_written(teacher_run, tmp_path):
  cfg = config(**{'toy.teacher_dir': str(teacher_run), 'steps': 6})
  task = tasks.get_task(cfg)
  state, frozen, step = compiled(task, cfg)
  source = restore(teacher_run, config(steps=5))
  jax.tree.map(np.testing.assert_array_equal, frozen['teacher'], source.params)
  copy = jax.tree.map(np.array, frozen)

  # The first loss on the step's own draws, in numpy: the teacher read is the run's.
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
  x = np.asarray(jax.random.normal(key, (cfg.batch_size, DIM)), np.float64)
  w, b = (np.asarray(state.params[k], np.float64) for k in ('w', 'b'))
  tw, tb = (np.asarray(source.params[k], np.float64) for k in ('w', 'b'))
  want = np.mean(np.square(x @ w + b - (x @ tw + tb)))
  losses = []
  for _ in range(cfg.steps):
    state, metrics = step(state, {}, frozen)
    losses.append(float(metrics['loss']))
  np.testing.assert_allclose(losses[0], want, rtol=1e-5)
  assert losses[-1] < losses[0]
  # Neither donated (still alive) nor changed.
  assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))
  jax.tree.map(np.testing.assert_array_equal, frozen, copy)

  # A whole run checkpoints the trainable state only.
  workdir = tmp_path / 'student'
  result = trainer.train_and_evaluate(cfg, str(workdir))
  np.testing.assert_allclose([result.losses[s] for s in range(1, 7)], losses, rtol=1e-6)
  meta = json.loads((workdir / 'checkpoints' / '6' / 'state' / '_METADATA').read_text())
  paths = [tuple(k['key'] for k in entry['key_metadata'])
           for entry in meta['tree_metadata'].values()]
  assert {p[0] for p in paths} == {'step', 'params', 'opt_state', 'rng', 'extras'}
  assert not any('teacher' in str(p) for p in paths)
  assert {p for p in paths if p[0] == 'params'} == {('params', 'w'), ('params', 'b')}

  # Resuming reads the teacher again from its source (and only then can it continue).
  more = trainer.train_and_evaluate(config(**{'toy.teacher_dir': str(teacher_run),
                                              'steps': 8}), str(workdir))
  assert sorted(more.losses) == [7, 8]


# --- trainable subsets and parameter groups -------------------------------------------


def opt_leaf_sizes(opt_state) -> list[int]:
  return sorted(x.size for x in jax.tree.leaves(opt_state) if x.ndim)


def test_frozen_leaves_stay_and_hold_no_optimizer_state():
  cfg = config(**{'optimizer.freeze': 'b'})
  task = tasks.get_task(cfg)
  state, frozen, step = compiled(task, cfg)
  b0, w0 = np.array(state.params['b']), np.array(state.params['w'])
  # Adam's two moments for w alone: nothing the size of b.
  assert opt_leaf_sizes(state.opt_state) == [DIM * DIM, DIM * DIM]
  for _ in range(4):
    state, metrics = step(state, {}, frozen)
  assert metrics['skipped'] == 0
  np.testing.assert_array_equal(state.params['b'], b0)
  assert not np.array_equal(state.params['w'], w0)

  # The compiled program's arguments are smaller by exactly b's two moments (float32).
  def argument_bytes(c):
    t = tasks.get_task(c)
    s, f, fn = compiled(t, c)
    return fn.lower(s, {}, f).compile().memory_analysis().argument_size_in_bytes
  assert argument_bytes(config()) - argument_bytes(cfg) == 2 * DIM * 4


def test_freeze_errors_name_the_key():
  with pytest.raises(ConfigError, match='optimizer.freeze'):
    tasks.get_task(config(**{'optimizer.freeze': '.*'}))
  with pytest.raises(ConfigError, match='optimizer.freeze has an invalid regular expression'):
    tasks.get_task(config(**{'optimizer.freeze': '(w'}))
  with pytest.raises(ConfigError, match='optimizer.lr_mults'):
    tasks.get_task(config(**{'optimizer.lr_mults': (('w', -1.0),)}))


def test_lr_multiplier_zero_holds_its_group_exactly():
  cfg = config(**{'optimizer.lr_mults': (('b', 0.0),), 'optimizer.weight_decay': 0.5,
                  'optimizer.wd_mults': ()})
  task = tasks.get_task(cfg)
  state, frozen, step = compiled(task, cfg)
  b0 = np.array(state.params['b'])
  assert opt_leaf_sizes(state.opt_state) == [DIM, DIM, DIM * DIM, DIM * DIM]  # b still trains
  for _ in range(4):
    state, _ = step(state, {}, frozen)
  np.testing.assert_array_equal(state.params['b'], b0)


def test_lr_multiplier_scales_its_group_like_the_learning_rate():
  """One step with w's lr multiplied by 0.5 moves w exactly as a run at half the lr does
  (both scale the same update by a power of two), and b as the full-lr run does."""
  def one_step(cfg):
    state, frozen, step = compiled(tasks.get_task(cfg), cfg)
    return step(state, {}, frozen)[0].params

  half_w = one_step(config(**{'optimizer.lr_mults': (('w', 0.5),)}))
  half_lr = one_step(config(**{'optimizer.lr': 0.025, 'optimizer.end_lr': 0.025}))
  full = one_step(config())
  np.testing.assert_array_equal(half_w['w'], half_lr['w'])
  np.testing.assert_array_equal(half_w['b'], full['b'])
  assert not np.array_equal(half_w['w'], full['w'])


# --- on-policy data: an exact resume after a kill -----------------------------------------


def test_on_policy_run_resumes_exactly_after_a_kill(tmp_path):
  straight = trainer.train_and_evaluate(config(), str(tmp_path / 'straight'))
  assert sorted(straight.losses) == list(range(1, 21))

  workdir = tmp_path / 'killed'
  cmd = [sys.executable, '-m', 'train', '--config=tests/toy_task.py', f'--workdir={workdir}',
         '--config.toy.step_sleep=0.2']  # time to kill it; no numerical effect
  proc = subprocess.Popen(cmd, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  while not (workdir / 'checkpoints' / '10').exists():
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert 10 in steps and steps[-1] < 20, steps

  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
  cfg = config()
  jax.tree.map(np.testing.assert_array_equal, restore(workdir, cfg).params,
               restore(tmp_path / 'straight', cfg).params)


# --- registry, hooks, EMA, transfer guard -----------------------------------------------


def test_registry_names_every_task():
  with pytest.raises(ConfigError, match=r"task='nope' is not a registered task; choose one of: "
                     r'diffusion, distill, dpo, gan, grpo, lm, ppo, reward, seq2seq, sft, toy, '
                     r'vae'):
    tasks.get_task(config(task='nope'))
  task = tasks.get_task(config())
  assert isinstance(task, toy_task.ToyTask)
  state = jax.eval_shape(task.init_state, jax.random.key(0))
  assert task.warm_start(state) is state and task.inference_params(state) is state.params


def test_ema_does_not_move_on_a_skipped_step():
  ema = {'a': jnp.array([1.0, 2.0])}
  params = {'a': jnp.array([3.0, -4.0])}
  step = jnp.int32(90)
  kept = optim.ema_update(ema, params, decay=0.9, step=step, skipped=jnp.float32(1.0))
  np.testing.assert_array_equal(kept['a'], ema['a'])
  moved = optim.ema_update(ema, params, decay=0.9, step=step, skipped=jnp.float32(0.0))
  np.testing.assert_allclose(moved['a'], 0.9 * np.array([1.0, 2.0]) + 0.1 * np.array([3, -4.0]),
                             rtol=1e-6)
  # Warm-up: at step 0 the decay is 1/10, whatever the configured one.
  early = optim.ema_update(ema, params, decay=0.9, step=jnp.int32(0), skipped=jnp.float32(0.0))
  np.testing.assert_allclose(early['a'], 0.1 * np.array([1.0, 2.0]) + 0.9 * np.array([3, -4.0]),
                             rtol=1e-6)


def test_trainer_steps_run_under_the_transfer_guard():
  # tests/conftest.py sets it for every test, so every trainer run checks its step.
  assert trainer.TRANSFER_GUARD == 'disallow'
  cfg = config()
  state, frozen, step = compiled(tasks.get_task(cfg), cfg)
  with jax.transfer_guard(trainer.TRANSFER_GUARD):
    state, _ = step(state, {}, frozen)  # everything on device: allowed
    host_teacher = {'teacher': jax.tree.map(np.asarray, frozen['teacher'])}
    with pytest.raises(Exception, match='[Dd]isallowed host-to-device transfer'):
      step(state, {}, host_teacher)


def test_train_state_is_the_documented_dataclass():
  cfg = config()
  state = jax.eval_shape(tasks.get_task(cfg).init_state, jax.random.key(0))
  assert isinstance(state, TrainState)
  assert [f for f in TrainState.__dataclass_fields__] == [
      'step', 'params', 'opt_state', 'rng', 'extras']
