"""Reading a model's parameters out of a Kiln run directory.

A run keeps its orbax checkpoints at `RUN/checkpoints/<step>/`, each with the
train state as the item `state` (`{'params': ..., 'opt_state': ..., ...}`).
train/checkpoint.py writes that layout with the names below; tools that only
need a model (an `init_from` warm start, the curation pipeline's scorer) read
one subtree of the state with these functions, without the optimizer state,
the task or the trainer.
"""

import jax
import orbax.checkpoint as ocp
from etils import epath

from data import storage

CHECKPOINTS_DIR = 'checkpoints'  # RUN/checkpoints/<step>/
STATE_ITEM = 'state'  # the train state inside each step's directory


def checkpoints_dir(run_dir: str) -> epath.Path:
  """`RUN/checkpoints`, absolute (a URL stays as it is)."""
  return storage.absolute(run_dir) / CHECKPOINTS_DIR


def latest_step(run_dir: str) -> int | None:
  """The newest complete checkpoint's step in `run_dir`, or None if it has none."""
  directory = checkpoints_dir(run_dir)
  if not directory.is_dir():
    return None
  with ocp.CheckpointManager(directory) as manager:
    return manager.latest_step()


def restore_params(run_dir: str, abstract, key: str = 'params', step: int | None = None):
  """`state[key]` of checkpoint `step` (default: the newest) in `run_dir`.

  Args:
    abstract: ShapeDtypeStructs with the tree, shapes, dtypes and shardings to restore
      into; the rest of the state is not read.

  Returns:
    (subtree, step), or (None, None) when `run_dir` has no checkpoint.

  Raises:
    ValueError: (orbax's) the checkpoint's subtree does not fit `abstract`.
  """
  step = latest_step(run_dir) if step is None else step
  if step is None:
    return None, None
  item = {key: abstract}
  args = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(item))
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(checkpoints_dir(run_dir) / str(step) / STATE_ITEM, args=args)
  return restored[key], step


def on_one_device(abstract, device: jax.Device | None = None):
  """`abstract` (ShapeDtypeStructs) placed whole on `device` (default: the first local one)."""
  sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                      abstract)
