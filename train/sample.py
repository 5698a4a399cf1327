"""Samples from the latest checkpoint of a run.

  python -m train.sample --workdir=DIR --prompt='def' [--temperature=0.8 --top_k=40 --top_p=0.95]
  python -m train.sample --workdir=DIR --out=grid.png [--scale=4]

The run's resolved config (DIR/config.json) rebuilds the model. For a
language model, the tokenizer cached in DIR encodes the prompt. For an image
model (diffusion, GAN), the task's evaluation samples (`task.samples`, e.g. an
EMA grid with the config's guidance scale) are written as a PNG at --out; a
task with several grids writes one PNG per tag, named `<out stem>_<tag><ext>`.
"""

import json
import os
import re
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags

from data.errors import ConfigError, exit_on_user_error
from train import checkpoint, trainer
from train import mesh as mesh_lib
from train.tasks import get_task


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
  return (task, *restore_latest(task, config, workdir))


def restore_latest(task, config: ml_collections.ConfigDict, workdir: str):
  """(state, step) of the newest checkpoint in `workdir`, in `task`'s shardings."""
  mesh = mesh_lib.make_mesh(config.mesh)
  _, abstract, shardings, _ = trainer.setup_state(task, config, mesh)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
  step = ckpt.latest_step()
  if step is None:
    raise ConfigError(f'No checkpoint in {ckpt.directory}; train first.')
  state = ckpt.restore(step, checkpoint.abstract_with_shardings(abstract, shardings), None)
  ckpt.close()
  return state, step


def load_scorer(workdir: str, batch_rows: int = 8) -> Callable[[Sequence[str]], np.ndarray]:
  """`document_scorer` of the newest checkpoint in `workdir`."""
  task, state, _ = load_latest(workdir)
  return document_scorer(task, state['params'], batch_rows)


def document_scorer(task, params, batch_rows: int = 8) -> Callable[[Sequence[str]], np.ndarray]:
  """A function from documents to their mean next-token NLL (nats per token), float64 [D].

  A document is tokenized as in training (BOS first, when the tokenizer has
  one) and read in windows of seq_len + 1 tokens with stride seq_len, each
  window a fresh context, as the training batches are; every token after the
  first is predicted once. Documents with nothing to predict (no BOS and one
  token) score NaN. Windows go through the model `batch_rows` at a time, so
  one program serves all.
  """
  tokenizer, seq_len = task.tokenizer, task.config.data.seq_len
  token_nll = jax.jit(task.token_nll)
  bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []

  def score(texts: Sequence[str]) -> np.ndarray:
    windows, owners = [], []
    for d, ids in enumerate(tokenizer.encode_batch(list(texts))):
      ids = bos + list(ids)
      for start in range(0, len(ids) - 1, seq_len):
        windows.append(ids[start:start + seq_len + 1])
        owners.append(d)
    nll_sum, count = np.zeros(len(texts)), np.zeros(len(texts))
    for lo in range(0, len(windows), batch_rows):
      batch, mask_BxL = _padded_batch(windows[lo:lo + batch_rows], batch_rows, seq_len)
      nll_BxL = np.asarray(token_nll(params, batch), np.float64)
      rows = np.asarray(owners[lo:lo + batch_rows])
      np.add.at(nll_sum, rows, (nll_BxL * mask_BxL)[:len(rows)].sum(axis=1))
      np.add.at(count, rows, mask_BxL[:len(rows)].sum(axis=1))
    with np.errstate(invalid='ignore'):
      return nll_sum / count

  return score


def _padded_batch(windows: list[list[int]], rows: int,
                  seq_len: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """An LM batch [rows, seq_len] of the windows, zero-padded, and the mask of real targets."""
  tokens_BxW = np.zeros((rows, seq_len + 1), np.int32)
  mask_BxL = np.zeros((rows, seq_len), np.float64)
  for i, window in enumerate(windows):
    tokens_BxW[i, :len(window)] = window
    mask_BxL[i, :len(window) - 1] = 1.0
  batch = {
      'inputs': tokens_BxW[:, :-1],
      'targets': tokens_BxW[:, 1:],
      # Padding is its own segment: real tokens never attend to it (nor could, being causal).
      'segment_ids': np.where(mask_BxL > 0, 1, 2).astype(np.int32),
      'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
  }
  return batch, mask_BxL


def main(argv):
  del argv
  if not flags.FLAGS.workdir:
    raise app.UsageError('--workdir is required.')
  exit_on_user_error(_sample)


def write_image_samples(samples: dict, out: str, scale: int = 1) -> list[str]:
  """Writes each image grid (uint8 [H, W, C]) of `samples` as a PNG; returns the paths.

  One grid goes to `out`; several go to `<out stem>_<tag><ext>`, the tag's
  non-alphanumerics as '_'.
  """
  from train import image_eval

  grids = {tag: v for tag, v in samples.items() if isinstance(v, np.ndarray)}
  if not grids:
    raise ConfigError('The task returned no image samples to write.')
  stem, ext = os.path.splitext(out)
  paths = []
  for tag, grid in grids.items():
    path = out if len(grids) == 1 else f'{stem}_{re.sub(r"[^0-9A-Za-z]+", "_", tag)}{ext or ".png"}'
    image_eval.save_png(grid, path, scale)
    paths.append(path)
  return paths


def _sample() -> None:
  f = flags.FLAGS
  task, state, step = load_latest(f.workdir)
  if task.items_name != 'tokens':  # an image family: write its sample grids
    _sample_images(task, state, step)
    return
  s = task.config.sample
  for i in range(f.num_samples):
    text = task.generate(
        state['params'], s.prompt if f.prompt is None else f.prompt,
        max_new_tokens=f.max_new_tokens or s.max_new_tokens,
        temperature=s.temperature if f.temperature is None else f.temperature,
        top_k=s.top_k if f.top_k is None else f.top_k,
        top_p=s.top_p if f.top_p is None else f.top_p,
        seed=f.seed + i)
    if jax.process_index() == 0:
      print(f'--- sample {i} (step {step}) ---\n{text}')


def save_image_samples(task, state, out: str, scale: int = 1) -> list[str]:
  """Writes an image task's evaluation samples (`task.samples`) as PNGs at `out`, on
  process 0; returns the paths written. E.g. `save_image_samples(*load_latest(dir)[:2], out)`.
  """
  with jax.set_mesh(mesh_lib.make_mesh(task.config.mesh)):  # as in training's evaluations
    samples = task.samples(state)
  return write_image_samples(samples, out, scale) if jax.process_index() == 0 else []


def _sample_images(task, state, step: int) -> None:
  f = flags.FLAGS
  if not f.out:
    raise app.UsageError('--out=FILE.png is required for an image model.')
  for path in save_image_samples(task, state, f.out, f.scale):
    print(f'Wrote {path} (step {step}).')


def _define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program, so that
  importing its functions never clashes with another program's flags."""
  flags.DEFINE_string('workdir', None, 'The run directory given to `python -m train`.')
  flags.DEFINE_string('prompt', None, 'Text to continue (default: the config\'s prompt).')
  flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate.')
  flags.DEFINE_float('temperature', None, '0 is greedy.')
  flags.DEFINE_integer('top_k', None, '0 disables top-k filtering.')
  flags.DEFINE_float('top_p', None, '1.0 disables nucleus filtering.')
  flags.DEFINE_integer('num_samples', 1, 'How many samples.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_string('out', None, 'Image models: the PNG file for the sample grid.')
  flags.DEFINE_integer('scale', 1, 'Image models: each pixel becomes a scale x scale block.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
