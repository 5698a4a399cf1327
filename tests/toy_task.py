"""A toy task for the task-interface tests, and its config file.

A linear student x -> x W + b regresses a frozen linear teacher on inputs it
draws itself every step from the state's key (on-policy data, no dataset). The
teacher is a frozen input: the parameters of another Kiln run (`toy.teacher_dir`),
or, without one, fixed random arrays from `toy.teacher_seed`.

  python -m train --config=tests/toy_task.py --workdir=DIR
"""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import common
from train import optim, tasks
from train.state import TrainState
from train.tasks import kit

DIM = 16


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  del preset
  c = common.trainer_defaults()
  c.task = 'toy'
  c.update(steps=20, batch_size=8, log_every=1, eval_every=0)
  c.checkpoint.update(every=5, async_save=False)
  c.optimizer.update(lr=0.05, warmup_steps=0, end_lr=0.05, clip_norm=0.0)
  c.toy = ml_collections.ConfigDict(dict(teacher_dir='', teacher_seed=7, step_sleep=0.0))
  return c


@tasks.register('toy')
class ToyTask(tasks.Task):
  logical_rules = (('in', 'fsdp'), ('out', 'tensor'))
  specs = {'w': P('in', 'out'), 'b': P('out')}

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.opt = optim.make_optimizer(config.optimizer, config.steps, config.max_nonfinite_steps,
                                    self.specs)

  def setup_data(self, workdir, process_index, process_count):
    return None  # every batch is collected from the state

  def setup_inference(self, workdir):
    pass

  def init_state(self, rng):
    init_key, step_key = jax.random.split(rng)
    params = {'w': 0.1 * jax.random.normal(init_key, (DIM, DIM)), 'b': jnp.zeros(DIM)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.opt.init(params), rng=jax.random.key_data(step_key),
                      extras={})

  def state_logical_specs(self, abstract_state):
    return TrainState(step=P(), params=self.specs, rng=P(), extras={},
                      opt_state=self.opt.state_specs(abstract_state.opt_state, self.specs))

  def load_frozen(self, mesh):
    c = self.config.toy
    shardings = {'w': NamedSharding(mesh, P(None, 'tensor')), 'b': NamedSharding(mesh, P())}
    if c.teacher_dir:
      abstract = {k: jax.ShapeDtypeStruct((DIM, DIM) if k == 'w' else (DIM,), jnp.float32,
                                          sharding=s) for k, s in shardings.items()}
      teacher, _ = kit.load_run_params(c.teacher_dir, abstract)
    else:
      teacher = teacher_from_seed(c.teacher_seed)
      teacher = {k: jax.device_put(v, shardings[k]) for k, v in teacher.items()}
    return {'teacher': teacher}

  def collect(self, state, batch, frozen):
    del batch  # there is no dataset
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    x = jax.random.normal(key, (self.config.batch_size, DIM))
    if self.config.toy.step_sleep:  # slows a run down for the kill test; no numerical effect
      jax.debug.callback(lambda: time.sleep(self.config.toy.step_sleep))
    teacher = frozen['teacher']
    return {'x': x, 'y': x @ teacher['w'] + teacher['b']}

  def train_step(self, state, batch, frozen):
    def loss_fn(params, b):
      return jnp.mean(jnp.square(b['x'] @ params['w'] + params['b'] - b['y'])), {}
    (loss, _), grads = self.opt.value_and_grad(loss_fn, state.params, batch)
    params, opt_state, update = self.opt.apply(state.params, state.opt_state, grads, loss)
    metrics = {'loss': loss, 'lr': self.opt.schedule(state.step), **update}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def items_per_step(self):
    return self.config.batch_size


def teacher_from_seed(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {'w': rng.normal(size=(DIM, DIM)).astype(np.float32),
          'b': rng.normal(size=DIM).astype(np.float32)}
