"""Samples from the latest checkpoint of a run.

  python -m train.sample --workdir=DIR --prompt='def' [--temperature=0.8 --top_k=40 --top_p=0.95]
  python -m train.sample --workdir=DIR --out=grid.png [--scale=4]

The run's resolved config (DIR/config.json) rebuilds the model. For a
language model, the tokenizer cached in DIR encodes the prompt. For an image
model (diffusion, GAN), the task's evaluation samples (`task.samples`, e.g. an
EMA grid with the config's guidance scale) are written as a PNG at --out; a
task with several grids writes one PNG per tag, named `<out stem>_<tag><ext>`.
"""

import os
import re

import jax
import numpy as np
from absl import app, flags

from data.errors import ConfigError, exit_on_user_error
from train import mesh as mesh_lib
from train.runs import load_latest


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
