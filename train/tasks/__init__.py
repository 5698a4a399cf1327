"""Tasks: the math of one model family or training method, behind one interface.

The trainer owns the mesh, jit, data iteration, checkpoints, preemption and
metrics; a task owns its model(s), optimizer(s) and step functions, and keeps
its state in the one `TrainState` (train/state.py). A task is a subclass of
`Task` registered by name:

    @tasks.register('my_task')
    class MyTask(tasks.Task):
      ...

and a config selects it with `config.task = 'my_task'`. The task files in this
package register themselves when `get_task` first looks a name up; a task defined
elsewhere registers when its module is imported (e.g. by its config file).

What the trainer calls, in order: `setup_data` (or nothing to read: return None),
`init_state` (jitted with the state's shardings) and `warm_start` on a fresh start,
`load_frozen` once per process start (also on resume), then every step
`train_step(state, collect(state, batch, frozen), frozen)` inside one jit, and at
each evaluation `eval_step` over `eval_batches`, `eval_summary` and `samples`.
"""

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import grain
import jax
import ml_collections
import numpy as np

from data.errors import ConfigError
from train.mesh import Rules
from train.state import TrainState

Batch = Mapping[str, Any]
Frozen = Any  # a pytree of placed arrays the step reads and never updates; {} if none


class Task:
  """The interface every task implements. Methods without a body here are required."""

  config: ml_collections.ConfigDict
  logical_rules: Rules  # logical axis -> mesh axes, for the task's parameters
  items_name: ClassVar[str] = 'examples'  # what throughput counts: 'tokens' or 'examples'

  # --- setup -----------------------------------------------------------------

  def setup_data(self, workdir: str, process_index: int,
                 process_count: int) -> grain.DatasetIterator | None:
    """Builds the data pipeline; returns this process's checkpointable train iterator,
    or None for a task that makes all its batches itself (`collect`)."""
    raise NotImplementedError

  def setup_inference(self, workdir: str) -> None:
    """Prepares what sampling from a checkpoint needs, without the training data."""
    raise NotImplementedError

  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh state. The trainer jits it with the state's shardings."""
    raise NotImplementedError

  def state_logical_specs(self, abstract_state: TrainState) -> TrainState:
    """A PartitionSpec of logical axis names for every leaf of the state."""
    raise NotImplementedError

  def abstract_batch(self) -> Batch:
    """The global batch the train step takes, as `jax.ShapeDtypeStruct`s (no data read).

    What ahead-of-time compiles (launch/compile.py) lower the step with. A task whose batch
    or frozen inputs come only from data or other runs keeps this default: it cannot be
    planned ahead of time."""
    raise ConfigError(f'task={self.config.task!r} has no ahead-of-time batch shape '
                      '(Task.abstract_batch); memory plans support the lm and sft tasks.')

  def warm_start(self, state: TrainState) -> TrainState:
    """Called on a fresh state (never on resume), e.g. to load pretrained parameters."""
    return state

  def load_frozen(self, mesh: jax.sharding.Mesh) -> Frozen:
    """Models or arrays the step reads but never updates (a DPO reference, a teacher),
    placed with their own shardings on `mesh`. Called at every start, resume included;
    never donated, never checkpointed. `train.tasks.kit.load_run_params` reads the
    parameters of a Kiln run directory (a training run or an HF import)."""
    del mesh
    return {}

  # --- steps (pure functions of arrays; the trainer jits them) ---------------

  def collect(self, state: TrainState, batch: Batch, frozen: Frozen) -> Batch:
    """The batch this step trains on, made from the current state (on-policy data:
    rollouts, generated samples) beside or instead of the iterator's `batch` (`{}` when
    `setup_data` returned None). Runs inside the jitted step; randomness must come from
    `state.rng` folded with `state.step`, so that a resumed run collects what the
    straight run did. The default trains on the iterator's batch."""
    del state, frozen
    return batch

  def train_step(self, state: TrainState, batch: Batch,
                 frozen: Frozen) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update. Metrics are scalars; `loss`, `grad_norm`, `lr` and `skipped` are required."""
    raise NotImplementedError

  def eval_batches(self) -> Iterator[Batch]:
    """One deterministic pass over this process's share of the evaluation data."""
    return iter(())

  def eval_step(self, state: TrainState, batch: Batch, frozen: Frozen) -> dict[str, jax.Array]:
    """Sums over one batch; the trainer adds them over the evaluation."""
    raise NotImplementedError

  def eval_summary(self, sums: Mapping[str, float], state: TrainState) -> dict[str, float]:
    """Scalars to log (`eval/...`) from the summed eval metrics.

    Metrics of the model's samples (an image family's FD) are computed here from `state`.
    """
    del state
    return dict(sums)

  # --- accounting ------------------------------------------------------------

  def items_per_step(self) -> int:
    """Tokens (or examples) in one global batch."""
    raise NotImplementedError

  def flops_per_step(self) -> float:
    """Model FLOPs of one train step, for MFU (0 if unknown)."""
    return 0.0

  # --- what tools read -------------------------------------------------------

  def inference_params(self, state: TrainState):
    """The parameters to sample from, evaluate or export (an EMA where the task keeps one)."""
    return state.params

  def samples(self, state: TrainState, seed: int) -> dict[str, 'str | np.ndarray']:
    """Samples by tag: text (str), or an image grid [H, W, C] uint8. The trainer logs
    text as TensorBoard text and arrays as images; `train.sample` prints text and writes
    arrays as PNGs."""
    del state, seed
    return {}


_REGISTRY: dict[str, type[Task]] = {}


def register(name: str):
  """Class decorator: makes the task available as `config.task = name`."""
  def add(cls: type[Task]) -> type[Task]:
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f'Two tasks are registered as {name!r}: {_REGISTRY[name]} and {cls}.')
    _REGISTRY[name] = cls
    return cls
  return add


def _import_builtin_tasks() -> None:
  for module in pkgutil.iter_modules(__path__):
    if module.name != 'kit':
      importlib.import_module(f'{__name__}.{module.name}')


def get_task(config: ml_collections.ConfigDict) -> Task:
  if config.task not in _REGISTRY:
    _import_builtin_tasks()
  if config.task not in _REGISTRY:
    raise ConfigError(f'task={config.task!r} is not a registered task; choose one of: '
                      f'{", ".join(sorted(_REGISTRY))}.')
  return _REGISTRY[config.task](config)
