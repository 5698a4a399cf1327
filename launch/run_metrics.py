"""What the planner reads back from Kiln run directories: the final eval loss, the training
compute that reached it, and the measured MFU.

Scalars come from the run's TensorBoard events through tensorboard's own reader (the
trainer writes them with train/metrics.py); compute from its config.json, as the trainer
counts it: steps x the task's FLOPs per step (for the LM family, batch x seq_len x
`model.transformer.train_flops_per_token`, the count behind `train/mfu`).
"""

import dataclasses

import numpy as np
from etils import epath

from data.errors import ConfigError, DataError

EVAL_LOSS = 'eval/loss'
MFU = 'train/mfu'


@dataclasses.dataclass(frozen=True)
class RunPoint:
  """One finished run: the eval loss at its last evaluation, and the compute spent by then."""
  workdir: str
  step: int
  loss: float
  flops: float
  flops_per_step: float


def _scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar tag of the run's event files -> [(step, value)], the last write per step
  winning (a resumed run repeats the steps after its last checkpoint)."""
  from tensorboard.backend.event_processing import event_accumulator

  if not epath.Path(workdir).is_dir():
    raise DataError(f'{workdir} is not a directory; give the --workdir of a Kiln run.')
  acc = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()['scalars']:
    by_step = {e.step: float(e.value) for e in acc.Scalars(tag)}
    out[tag] = sorted(by_step.items())
  return out


def flops_per_step(workdir: str) -> float:
  """The run's training FLOPs per step, by its task's own count (the one MFU uses)."""
  # Imported here: the trainer's modules (orbax, grain) take seconds to import, and a plan
  # without `fit` never needs them.
  from train import runs
  from train.tasks import get_task

  config = runs.load_run_config(workdir)
  try:
    task = get_task(config)
    task.setup_inference(workdir)  # resolves the model (its vocabulary from the tokenizer)
  except (ConfigError, DataError) as e:
    raise DataError(f'{workdir}: cannot rebuild its model to count FLOPs: {e}') from None
  flops = float(task.flops_per_step())
  if flops <= 0:
    raise DataError(f'{workdir}: its task ({config.task}) does not count training FLOPs; '
                    'the fit needs LM-family runs.')
  return flops


def final_eval_loss(workdir: str) -> tuple[int, float]:
  """(step, loss) of the run's last `eval/loss`."""
  losses = _scalars(workdir).get(EVAL_LOSS)
  if not losses:
    raise DataError(f'{workdir} has no {EVAL_LOSS} in its TensorBoard events; the fit needs '
                    'runs that evaluated (config.eval_every > 0) and finished at least one '
                    'evaluation.')
  return losses[-1]


def read_run(workdir: str) -> RunPoint:
  """The run's last `eval/loss` and the FLOPs of the steps up to it."""
  step, loss = final_eval_loss(workdir)
  per_step = flops_per_step(workdir)
  return RunPoint(str(workdir), int(step), loss, per_step * step, per_step)


def measured_mfu(workdir: str) -> float:
  """The median `train/mfu` a run logged, leaving out its first interval (compilation)."""
  scalars = _scalars(workdir)
  values = [v for _, v in scalars.get(MFU, [])]
  if not values:
    hint = (' It logged train/model_tflops instead: its devices (CPU?) have no known peak, '
            'so give --mfu.' if scalars.get('train/model_tflops') else '')
    raise DataError(f'--mfu_from={workdir}: no {MFU} in its TensorBoard events.{hint}')
  values = values[1:] or values
  return float(np.median(values))
