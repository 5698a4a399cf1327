"""Samples from the latest checkpoint of a run.

  python -m train.sample --workdir=DIR --prompt='def ' [--temperature=0.8 --top_k=40 --top_p=0.95]

The run's resolved config (DIR/config.json) rebuilds the model; the
tokenizer cached in DIR encodes the prompt.
"""

import json
import os

import jax
import ml_collections
from absl import app, flags

from train import checkpoint, trainer
from train import mesh as mesh_lib
from train.config import ConfigError, exit_on_user_error
from train.tasks import get_task

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory given to `python -m train`.')
_PROMPT = flags.DEFINE_string('prompt', None, 'Text to continue (default: the config\'s prompt).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', None, '0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', None, '0 disables top-k filtering.')
_TOP_P = flags.DEFINE_float('top_p', None, '1.0 disables nucleus filtering.')
_NUM = flags.DEFINE_integer('num_samples', 1, 'How many samples.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'{path} does not exist: is {workdir!r} the --workdir of a training run?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_latest(workdir: str):
  """(task, state) from the newest checkpoint in `workdir`."""
  config = load_run_config(workdir)
  task = get_task(config)
  task.setup_inference(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, abstract, shardings, _ = trainer.setup_state(task, config, mesh)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
  step = ckpt.latest_step()
  if step is None:
    raise ConfigError(f'No checkpoint in {ckpt.directory}; train first.')
  state = ckpt.restore(step, checkpoint.abstract_with_shardings(abstract, shardings), None)
  ckpt.close()
  return task, state, step


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required.')
  exit_on_user_error(_sample)


def _sample() -> None:
  task, state, step = load_latest(_WORKDIR.value)
  s = task.config.sample
  for i in range(_NUM.value):
    text = task.generate(
        state['params'], s.prompt if _PROMPT.value is None else _PROMPT.value,
        max_new_tokens=_MAX_NEW.value or s.max_new_tokens,
        temperature=s.temperature if _TEMPERATURE.value is None else _TEMPERATURE.value,
        top_k=s.top_k if _TOP_K.value is None else _TOP_K.value,
        top_p=s.top_p if _TOP_P.value is None else _TOP_P.value,
        seed=_SEED.value + i)
    if jax.process_index() == 0:
      print(f'--- sample {i} (step {step}) ---\n{text}')


if __name__ == '__main__':
  app.run(main)
