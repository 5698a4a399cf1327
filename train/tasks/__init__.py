"""Tasks: the math of one model family, behind one small interface.

The trainer owns the mesh, jit, data iteration, checkpoints, preemption and
metrics; a task owns its model(s), optimizer(s) and step functions. The state
is any pytree of arrays (a GAN keeps two parameter sets and two optimizer
states in it), so one trainer serves every family unchanged.
"""

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import grain
import jax
import ml_collections
import numpy as np

from train.mesh import Rules

State = Any  # a pytree of arrays; the task decides its structure
Batch = Mapping[str, np.ndarray]


class Task(Protocol):
  config: ml_collections.ConfigDict
  logical_rules: Rules  # logical axis -> mesh axes, for the task's parameters
  items_name: str  # what throughput counts: 'tokens' or 'examples'

  def setup_data(self, workdir: str, process_index: int,
                 process_count: int) -> grain.DatasetIterator:
    """Builds the data pipeline; returns this process's checkpointable train iterator."""

  def setup_inference(self, workdir: str) -> None:
    """Prepares what sampling from a checkpoint needs, without the training data."""

  def init_state(self, rng: jax.Array) -> State:
    """A fresh state. The trainer jits it with the state's shardings."""

  def state_logical_specs(self, abstract_state: State) -> State:
    """A PartitionSpec of logical axis names for every leaf of the state."""

  def train_step(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
    """One update. Metrics are scalars; `loss`, `grad_norm`, `lr` and `skipped` are required."""

  def eval_batches(self) -> Iterator[Batch]:
    """One deterministic pass over this process's share of the evaluation data."""

  def eval_step(self, state: State, batch: Batch) -> dict[str, jax.Array]:
    """Sums over one batch; the trainer adds them over the evaluation."""

  def eval_summary(self, sums: Mapping[str, float], state: State) -> dict[str, float]:
    """Scalars to log (`eval/...`) from the summed eval metrics.

    Metrics of the model's samples (an image family's FD) are computed here from `state`.
    """

  def items_per_step(self) -> int:
    """Tokens (or examples) in one global batch."""

  def flops_per_step(self) -> float:
    """Model FLOPs of one train step, for MFU."""

  def samples(self, state: State) -> dict[str, 'str | np.ndarray']:
    """Samples to log at each evaluation, by tag: text, or an image grid [H, W, C] uint8."""

  # Optional: `warm_start(state) -> state`, called on a fresh state (not on resume),
  # e.g. to load pretrained parameters (LMTask's `init_from`). The trainer calls it
  # when the task has it.


def get_task(config: ml_collections.ConfigDict) -> Task:
  if config.task == 'lm':
    from train.tasks.lm import LMTask
    return LMTask(config)
  if config.task == 'diffusion':
    from train.tasks.diffusion import DiffusionTask
    return DiffusionTask(config)
  if config.task == 'gan':
    from train.tasks.gan import GANTask
    return GANTask(config)
  raise ValueError(f'task={config.task!r} is not a known task; choose one of: lm, diffusion, gan.')
