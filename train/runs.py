"""Reading a Kiln run directory back: its resolved config and its newest checkpoint.

The tools that work on a finished or running run (`train.sample`,
`train.convert export`) load it through these functions, in the task's own
shardings.
"""

import json

import ml_collections
from etils import epath

from data.errors import ConfigError
from train import checkpoint
from train import mesh as mesh_lib
from train.state import setup_state
from train.tasks import get_task


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise ConfigError(f'{path} does not exist: is {workdir!r} the --workdir of a training run?')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_latest(workdir: str):
  """(task, state, step) from the newest checkpoint in `workdir`."""
  config = load_run_config(workdir)
  task = get_task(config)
  task.setup_inference(workdir)
  return (task, *restore_latest(task, config, workdir))


def restore_latest(task, config: ml_collections.ConfigDict, workdir: str):
  """(state, step) of the newest checkpoint in `workdir`, in `task`'s shardings, on the
  run's mesh without pipeline stages (`mesh_lib.unpipelined`: tools never pipeline)."""
  mesh = mesh_lib.make_mesh(mesh_lib.unpipelined(config.mesh))
  _, abstract, shardings, _ = setup_state(task, config, mesh)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
  step = ckpt.latest_step()
  if step is None:
    raise ConfigError(f'No checkpoint in {ckpt.directory}; train first.')
  state = ckpt.restore(step, checkpoint.abstract_with_shardings(abstract, shardings), None)
  ckpt.close()
  return state, step
