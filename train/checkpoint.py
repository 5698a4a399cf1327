"""Orbax checkpoints in `workdir/checkpoints/<step>`: the train state, plus the
grain iterator state of every process, saved and restored together.

Orbax writes each step into a temporary directory and renames it only once
complete, so a process killed mid-save leaves the earlier checkpoints intact
and the half-written one invisible. Files damaged after that (a copy between
disks or buckets that stopped short) are found on restore: `restore_newest_good`
sets such a checkpoint aside and falls back to the newest one that reads.
"""

import datetime
import json
import re

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from data.errors import ConfigError
from model import run_params


class Checkpointer:

  def __init__(self, workdir: str, ckpt_cfg: ml_collections.ConfigDict):
    # orbax writes arrays through TensorStore and the rest through etils.epath, so a
    # gs:// workdir works as a local one.
    self.directory = run_params.checkpoints_dir(workdir)
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
    # Through the handler, not `self._manager.restore`: that ends in a barrier, which a
    # process whose read failed never reaches, so the processes could not go on together
    # to agree on an older step (restore_newest_good).
    handler = ocp.CompositeCheckpointHandler()
    try:
      restored = handler.restore(self.directory / str(step),
                                 args=ocp.args.Composite(**items))
    finally:
      handler.close()
    return restored[run_params.STATE_ITEM]

  def restore_newest_good(self, abstract_state, data_iter: grain.DatasetIterator | None,
                          resume_step: int = -1):
    """Restores the newest checkpoint that reads, or `resume_step` when it is not -1.

    A checkpoint whose files are damaged (`damage_reason`) is renamed to
    `<step>.damaged-<time>`, outside orbax's step names, and the next older one is
    tried; if none reads, a ConfigError. Any other failure (a shape or tree that does
    not match, a bug) is raised as it is. Resuming from an older `resume_step` sets
    the newer checkpoints aside as `<step>.superseded-<time>`, since the run
    continues from there and will save those steps again.

    Every process must restore the same step. Process 0 names each step to try, and
    the step is taken only if it restored on every process (damage may lie in the
    shards only one process reads); process 0 then does the renaming.

    Returns (state, step), or (None, 0) when there is no checkpoint to resume from.
    """
    steps = self._steps_to_try(resume_step)
    damaged = []
    while True:
      step = _from_process_0(steps[0] if steps else -1)
      if step < 0:
        break
      steps = [s for s in steps if s < step]
      state, reason = self._try_restore(step, abstract_state, data_iter)
      if _on_every_process(reason is None):
        logging.info('Resuming from step %d in %s.', step, self.directory)
        newer = [s for s in self._manager.all_steps() if s > step]  # with resume_step only
        if newer:
          self._set_aside(newer, 'superseded')
          logging.warning('Resuming from step %d: the newer checkpoints %s are set aside as '
                          '<step>.superseded-*.', step, newer)
        return state, step
      reason = reason or 'it failed to read on another process'
      damaged.append((step, reason))
      name = self._set_aside([step], 'damaged')
      logging.error('Checkpoint %d in %s cannot be read: %s. Set aside as %s.', step,
                    self.directory, reason, name)
    if not damaged:
      return None, 0
    others = '; the others are logged above' if len(damaged) > 1 else ''
    raise ConfigError(
        f'No checkpoint in {self.directory} could be read: steps '
        f'{", ".join(str(s) for s, _ in damaged)} are damaged (step {damaged[0][0]}: '
        f'{damaged[0][1]}{others}) and set aside as <step>.damaged-*. Start a new --workdir, or '
        'put an intact copy of a checkpoint back.')

  def _steps_to_try(self, resume_step: int) -> list[int]:
    """Newest first; for a chosen step, that step alone."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    if resume_step == -1:
      set_aside = sorted(p.name for p in self.directory.glob('*.damaged-*'))
      if not steps and set_aside:  # a fresh start here would silently drop the run
        raise ConfigError(f'{self.directory} holds only checkpoints set aside as damaged '
                          f'({", ".join(set_aside)}); move them away to start this run '
                          'afresh, or use a new --workdir.')
      return steps
    if resume_step not in steps:
      raise ConfigError(
          f'checkpoint.resume_step={resume_step}: {self.directory} has no such checkpoint; it '
          f'has steps {", ".join(map(str, sorted(steps))) or "(none)"}. Use -1 for the newest.')
    return [resume_step]

  def _try_restore(self, step: int, abstract_state, data_iter):
    """(state, None), or (None, why) when the checkpoint's files are damaged."""
    try:
      return self.restore(step, abstract_state, data_iter), None
    # orbax wraps TensorStore's read errors in a bare Exception (the ValueError that
    # names the file is its cause), so the type alone cannot tell damage from a bug:
    # `damage_reason` reads the chain, and anything it does not recognise is re-raised.
    except Exception as e:
      reason = damage_reason(e)
      if reason is None:
        raise
      return None, reason

  def _set_aside(self, steps: list[int], why: str) -> str:
    """Renames each step's directory to `<step>.<why>-<UTC time>` (process 0) and
    reloads the step list on every process. Returns the last new name."""
    stamp = datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%S')
    name = ''
    for step in steps:
      name = f'{step}.{why}-{stamp}'
      if jax.process_index() == 0:
        (self.directory / str(step)).rename(self.directory / name)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'kiln_checkpoint_set_aside_{why}_{steps[0]}')
    self._manager.reload()
    return name

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


# TensorStore status codes that mean stored bytes are missing, short or do not decode. Others
# (UNAVAILABLE, DEADLINE_EXCEEDED, PERMISSION_DENIED, ...) are transient or the user's to fix:
# they are raised as they are, so that a good checkpoint is never set aside for them.
_STORAGE_DAMAGE = {
    'OUT_OF_RANGE': 'a file is shorter than its index says',
    'DATA_LOSS': 'a file is corrupt (its checksum or length is wrong)',
    'NOT_FOUND': 'a file is missing',
    'FAILED_PRECONDITION': 'a file does not decode',  # e.g. a truncated Zstd stream
}
_TENSORSTORE_ERROR = re.compile(r'^([A-Z_]+): .*Error (?:reading|decoding)')
_FILE = re.compile(r'file "([^"]+)"')
_KEY = re.compile(r'Error reading "([^"]+)"')


def damage_reason(error: BaseException) -> str | None:
  """Why a checkpoint cannot be read when its files are damaged, else None.

  Recognised, from orbax 0.12 and TensorStore on a truncated, missing or corrupted
  file: TensorStore read errors with a status in `_STORAGE_DAMAGE`, JSON metadata that
  does not parse, a missing file or checkpoint item. A shape or tree mismatch (a
  changed model) is a ValueError without a TensorStore status, so it is not damage.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    message = str(error).split(' [tensorstore_spec')[0]
    match = _TENSORSTORE_ERROR.match(message) if isinstance(error, ValueError) else None
    if match and match.group(1) in _STORAGE_DAMAGE:
      # The file when TensorStore names it, else the array chunk it was reading.
      files = [f for f in _FILE.findall(message) if not f.endswith('/')]
      keys = _KEY.findall(message)
      where = files[-1] if files else keys[0] if keys else 'the checkpoint'
      return f'{_STORAGE_DAMAGE[match.group(1)]} ({match.group(1)} reading {where})'
    if isinstance(error, json.JSONDecodeError):
      return f'a metadata file is not valid JSON ({error.msg} at char {error.pos})'
    if isinstance(error, FileNotFoundError):
      return f'a file is missing ({error.filename or error})'
    if isinstance(error, ValueError) and (m := re.fullmatch(r'File (.+) does not exist\.',
                                                              message)):
      return f'a file is missing ({m.group(1)})'  # grain's iterator state
    if isinstance(error, KeyError) and 'was not found in the checkpoint' in message:
      return f'an item is missing: {error.args[0]}'
    # Only explicit causes (orbax's `raise ... from`): an error merely raised while another
    # was handled says nothing about the files.
    error = error.__cause__
  return None


def _from_process_0(value: int) -> int:
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _on_every_process(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.bool_(ok))))
