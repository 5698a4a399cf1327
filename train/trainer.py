"""The one training loop, shared by every task.

Sections, top to bottom: mesh -> data -> state -> shard & jit -> checkpoint
-> loop (step, metrics one step late, evals, saves, preemption).
"""

import dataclasses
import os
import signal
import time

import jax
import ml_collections
from absl import logging
from etils import epath

from data import storage
from data.errors import ConfigError
from train import checkpoint, resume
from train import mesh as mesh_lib
from train import metrics as metrics_lib
from train.config import check_common
from train.state import setup_state
from train.tasks import Task, get_task

# The jitted step runs under this transfer guard. Tests set 'disallow' (tests/conftest.py):
# an implicit host transfer inside the step (a NumPy array or Python scalar reaching it)
# is then an error rather than a silent per-step copy.
TRANSFER_GUARD = os.environ.get('KILN_TRANSFER_GUARD', 'allow')


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class _Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop checks once per step."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    logging.warning('Received signal %d: saving a checkpoint and stopping.', signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    # All processes must agree on the step to stop at; jax's preemption
    # service (started by jax.distributed) tells every process the same step.
    from jax.experimental import multihost_utils
    return self.requested or multihost_utils.reached_preemption_sync_point(step)


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> Task:
  """Every check that can fail on user input, before anything compiles."""
  check_common(config)
  mesh_shape = dict(zip(mesh_lib.AXES, mesh_lib.mesh_shape(config.mesh, num_devices),
                        strict=True))
  dp = mesh_lib.data_parallel_size(mesh_shape)
  micro = config.batch_size // config.grad_accum
  if micro % dp:
    raise ConfigError(
        f'batch_size={config.batch_size} (per microbatch {micro} with grad_accum='
        f'{config.grad_accum}) must be divisible by the data-parallel size '
        f'mesh.data*mesh.fsdp*mesh.expert = {dp}.')
  if config.batch_size % process_count:
    raise ConfigError(f'batch_size={config.batch_size} must be divisible by the number of '
                      f'processes ({process_count}).')
  task = get_task(config)
  task.check_mesh(mesh_shape)
  return task


def global_batch(local_batch, sharding):
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def compile_step(task: Task, state_shardings, mesh, frozen_shardings=None):
  """The jitted train and eval steps: (state, batch, frozen) -> ...

  The train step collects its batch (`task.collect`, on-policy data) and updates, in one
  program. The state is donated; frozen inputs are not (they live for the whole run).
  """
  repl = mesh_lib.replicated(mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  frozen_shardings = {} if frozen_shardings is None else frozen_shardings
  in_shardings = (state_shardings, batch_sharding, frozen_shardings)

  def step(state, batch, frozen):
    return task.train_step(state, task.collect(state, batch, frozen), frozen)
  train_step = jax.jit(step, in_shardings=in_shardings, out_shardings=(state_shardings, repl),
                       donate_argnums=0)
  eval_step = jax.jit(task.eval_step, in_shardings=in_shardings, out_shardings=repl)
  return train_step, eval_step


def lower_train_step(task: Task, config: ml_collections.ConfigDict, mesh):
  """The train step of `train_and_evaluate`, lowered for `mesh` from shapes alone:
  (jax.stages.Lowered, its (state, batch) arguments as ShapeDtypeStructs with shardings).

  Nothing is read or initialised: the state is `setup_state`'s abstract state with its
  shardings, the batch `task.abstract_batch()` with the batch sharding. `mesh` may hold
  compile-only devices (a TPU topology described on a CPU host), which is how
  launch/compile.py plans memory before a slice is rented. Tasks with frozen inputs
  refuse in `abstract_batch`, so the step gets none here.
  """
  batch = task.abstract_batch()  # first: a task that cannot be planned says so at once
  batch_sharding = mesh_lib.batch_sharding(mesh)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
                       batch)
  _, abstract, state_shardings, _ = setup_state(task, config, mesh)
  train_step, _ = compile_step(task, state_shardings, mesh)
  state = checkpoint.abstract_with_shardings(abstract, state_shardings)
  with jax.set_mesh(mesh):
    return train_step.lower(state, batch, {}), (state, batch)


def evaluate(task: Task, eval_step, state, batch_sharding, frozen) -> dict[str, float]:
  sums: dict[str, float] = {}
  for local in task.eval_batches():
    out = jax.device_get(eval_step(state, global_batch(local, batch_sharding), frozen))
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return task.eval_summary(sums, state)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    storage.write_atomic(epath.Path(workdir) / 'config.json',
                         config.to_json_best_effort(indent=2).encode())


@dataclasses.dataclass
class Result:
  train: dict[str, float]  # the last logged train scalars
  eval: dict[str, float]  # the last evaluation's scalars
  samples: dict  # the last evaluation's samples: text, or image grids [H, W, C] uint8
  losses: dict[int, float]  # train loss of every step this run took


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress_bar: bool = False) -> Result:
  """Trains `config.task` in `workdir`, resuming from its latest checkpoint.

  `progress_bar` adds a tqdm bar (a widget in notebooks) to the log lines.
  """
  # --- mesh ------------------------------------------------------------------
  task = validate(config, jax.device_count(), jax.process_count())
  mesh = mesh_lib.make_mesh(config.mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  logging.info('Mesh %s on %d devices in %d processes.', dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # Shapes that do not split over the mesh are config errors too: find them
  # before the data is read (the vocabulary, known after, is rounded to split).
  setup_state(task, config, mesh)

  # --- data ------------------------------------------------------------------
  resume.check_config_unchanged(config, workdir)  # before config.json is rewritten
  train_iter = task.setup_data(workdir, jax.process_index(), jax.process_count())
  write_config(config, workdir)

  # --- state, shardings, frozen inputs, jit -------------------------------------
  rng, abstract, state_shardings, init = setup_state(task, config, mesh)
  frozen = task.load_frozen(mesh)  # on every start: never checkpointed
  train_step, eval_step = compile_step(task, state_shardings, mesh, shardings_of(frozen))

  # --- checkpoint: resume or start -----------------------------------------------
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
  target = checkpoint.abstract_with_shardings(abstract, state_shardings)
  state, start = ckpt.restore_newest_good(target, train_iter, config.checkpoint.resume_step)
  if state is None:
    state = task.warm_start(init(rng))

  # --- loop ------------------------------------------------------------------
  writer = metrics_lib.SummaryWriter(workdir, enabled=jax.process_index() == 0)
  if start == 0:
    writer.text(0, 'config', '```\n' + str(config) + '\n```')
  progress = metrics_lib.Progress(config.steps, start, bar=progress_bar)
  profiler = metrics_lib.Profiler(workdir, config.profile.start_step, config.profile.num_steps)
  flops_per_step = task.flops_per_step()
  items_per_step = task.items_per_step()

  last_train: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  last_samples: dict = {}
  losses: dict[int, float] = {}
  pending = None  # (step, device metrics) of the previous step, read one step late
  consecutive_skips = 0
  interval_start, interval_steps = time.perf_counter(), 0
  paused = 0.0  # seconds spent on evals within the interval, left out of step times

  def read_pending():
    """Host-side bookkeeping for the previous step, once the next one is queued."""
    nonlocal consecutive_skips, interval_start, interval_steps, last_train, paused
    if pending is None:
      return
    step, device_metrics = pending
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    losses[step] = values['loss']
    progress.advance(step)
    interval_steps += 1
    if values['skipped'] and values.get('overflow'):
      # A dynamic loss scale backing off (train/optim.py): the loss was finite, the scaled
      # gradients overflowed and the scale halved. That is how the scale finds its level, so
      # it neither counts towards max_nonfinite_steps nor ends a run of counted steps. A
      # diverged run still stops: once the scale is at its floor (or the loss itself is
      # non-finite), its skipped steps count.
      logging.info('Step %d skipped: the loss scale overflowed and was halved.', step)
    elif values['skipped']:
      consecutive_skips += 1
      logging.warning('Step %d skipped: non-finite loss or gradients (%d in a row).', step,
                      consecutive_skips)
      if consecutive_skips >= config.max_nonfinite_steps:
        raise NonFiniteError(
            f'{consecutive_skips} consecutive steps had non-finite loss or gradients (last: step '
            f'{step}). Stopped; the last good checkpoint is kept in {ckpt.directory}.')
    else:
      consecutive_skips = 0
    if step % config.log_every == 0 or step == config.steps:
      elapsed = time.perf_counter() - interval_start - paused
      step_time = elapsed / max(interval_steps, 1)
      scalars = {f'train/{k}': v for k, v in values.items()}
      scalars[f'train/{task.items_name}_per_sec'] = items_per_step / step_time
      scalars['train/step_time'] = step_time
      scalars.update(metrics_lib.flops_metrics(flops_per_step, step_time, jax.devices()))
      writer.scalars(step, scalars)
      progress.line(step, scalars)
      last_train = scalars
      interval_start, interval_steps, paused = time.perf_counter(), 0, 0.0

  # Under the mesh context, model code can see the mesh (jax.sharding.get_abstract_mesh()),
  # e.g. to run a per-device kernel through jax.shard_map.
  with jax.set_mesh(mesh), _Preemption() as preemption:
    try:
      for step in range(start + 1, config.steps + 1):
        batch = {} if train_iter is None else global_batch(next(train_iter), batch_sharding)
        profiler.maybe_start(step)
        with jax.transfer_guard(TRANSFER_GUARD):
          state, device_metrics = train_step(state, batch, frozen)
        profiler.maybe_stop(step, block_on=device_metrics)
        read_pending()
        pending = (step, device_metrics)

        final = step == config.steps
        if config.eval_every and (step % config.eval_every == 0 or final):
          read_pending()
          pending = None
          eval_start = time.perf_counter()
          last_eval = evaluate(task, eval_step, state, batch_sharding, frozen)
          writer.scalars(step, last_eval)
          last_samples = task.samples(state, config.seed)
          for tag, sample in last_samples.items():
            if isinstance(sample, str):
              writer.text(step, tag, sample)
            else:
              writer.images(step, tag, sample[None])
          logging.info('step %d eval %s', step, {k: round(v, 4) for k, v in last_eval.items()})
          writer.flush()
          paused += time.perf_counter() - eval_start
        if step % config.checkpoint.every == 0 or final:
          ckpt.save(step, state, train_iter)
        if preemption.reached(step):
          read_pending()
          pending = None
          if step % config.checkpoint.every and not final:
            ckpt.save(step, state, train_iter)
          logging.warning('Stopped at step %d after a preemption signal.', step)
          break
      read_pending()
    finally:
      progress.close()
      ckpt.wait()
      ckpt.close()
      writer.close()
  return Result(last_train, last_eval, last_samples, losses)

