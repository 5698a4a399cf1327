"""Orbax checkpoints in `workdir/checkpoints/<step>`: the train state, plus the
grain iterator state of every process, saved and restored together.

Orbax writes each step into a temporary directory and renames it only once
complete, so a process killed mid-save leaves the earlier checkpoints intact
and the half-written one invisible.
"""

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from data import storage


class Checkpointer:

  def __init__(self, workdir: str, ckpt_cfg: ml_collections.ConfigDict):
    # orbax writes arrays through TensorStore and the rest through etils.epath, so a
    # gs:// workdir works as a local one.
    self.directory = storage.absolute(workdir) / 'checkpoints'
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep,
        enable_async_checkpointing=ckpt_cfg.async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iter: grain.DatasetIterator | None) -> None:
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iter: grain.DatasetIterator | None):
    """Restores into the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def restore_subtree(workdir: str, key: str, abstract_subtree):
  """`state[key]` of the newest checkpoint in `workdir`, into the shardings of
  `abstract_subtree` (ShapeDtypeStructs); the rest of the state is not read.

  Returns (subtree, step), or (None, None) when `workdir` has no checkpoint.
  """
  directory = storage.absolute(workdir) / 'checkpoints'
  if not directory.is_dir():
    return None, None
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step()
  if step is None:
    return None, None
  item = {key: abstract_subtree}
  args = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(item))
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(directory / str(step) / 'state', args=args)
  return restored[key], step
