"""Orbax checkpoints in `workdir/checkpoints/<step>`: the train state, plus the
grain iterator state of every process, saved and restored together.

Orbax writes each step into a temporary directory and renames it only once
complete, so a process killed mid-save leaves the earlier checkpoints intact
and the half-written one invisible.
"""

import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from model import run_params


class Checkpointer:

  def __init__(self, workdir: str, ckpt_cfg: ml_collections.ConfigDict):
    self.directory = os.path.join(os.path.abspath(workdir), run_params.CHECKPOINTS_DIR)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep,
        enable_async_checkpointing=ckpt_cfg.async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iter: grain.DatasetIterator | None) -> None:
    items = {run_params.STATE_ITEM: ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iter: grain.DatasetIterator | None):
    """Restores into the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    items = {run_params.STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[run_params.STATE_ITEM]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)
