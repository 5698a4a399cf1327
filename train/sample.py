"""Samples from the latest checkpoint of a run.

  python -m train.sample --workdir=DIR --prompt='def' [--temperature=0.8 --top_k=40 --top_p=0.95
                                                      --min_p=0.05]
  python -m train.sample --workdir=DIR --out=grid.png [--scale=4]
  python -m train.sample --workdir=DIR --prompt='def' --quant=int8   # or int4, nf4

The run's resolved config (DIR/config.json) rebuilds the task, and the task's
`samples(state, seed)` makes them, from `task.inference_params(state)` (an EMA
where the task keeps one). What happens to a sample depends on what it is:
text is printed, an image grid is written as a PNG at --out (a task with
several grids writes one PNG per tag, `<out stem>_<tag><ext>`). The text flags
(--prompt, --temperature, ...) set the run's `sample.*` keys, for tasks that
have them. --quant samples a language model with its projection weights quantized at
load (model/quant.py; the same conversion as `python -m serve --quant`). Every flag is
checked before the model is restored. Notebooks and scripts call `sample(workdir, ...)`,
which returns the samples instead of printing or writing them.
"""

import os
import re
import types

import jax
import ml_collections
import numpy as np
from absl import app, flags

from data.errors import ConfigError, exit_on_user_error
from model import quant
from train import mesh as mesh_lib
from train.runs import load_run_config, restore_latest
from train.tasks import get_task


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
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
  paths = []
  for tag, grid in grids.items():
    path = out if len(grids) == 1 else _tagged(out, tag)
    image_eval.save_png(grid, path, scale)
    paths.append(path)
  return paths


def _tagged(out: str, tag: str) -> str:
  stem, ext = os.path.splitext(out)
  return f'{stem}_{re.sub(r"[^0-9A-Za-z]+", "_", tag)}{ext or ".png"}'


# Flags that set `config.sample.<key>` of a run whose task samples text from a prompt.
_TEXT_FLAGS = ('prompt', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'min_p')


def check_flags(f, config: ml_collections.ConfigDict) -> None:
  """Every check on the flags, before the model is restored or anything generated."""
  if f.num_samples < 1:
    raise ConfigError(f'--num_samples={f.num_samples} must be >= 1.')
  if f.scale < 1:
    raise ConfigError(f'--scale={f.scale} must be >= 1 (pixels per image pixel).')
  if f.max_new_tokens is not None and f.max_new_tokens < 1:
    raise ConfigError(f'--max_new_tokens={f.max_new_tokens} must be >= 1.')
  if f.temperature is not None and f.temperature < 0:
    raise ConfigError(f'--temperature={f.temperature} must be >= 0 (0 is greedy).')
  if f.top_k is not None and f.top_k < 0:
    raise ConfigError(f'--top_k={f.top_k} must be >= 0 (0 disables top-k).')
  if f.top_p is not None and not 0.0 < f.top_p <= 1.0:
    raise ConfigError(f'--top_p={f.top_p} must be in (0, 1] (1 disables nucleus sampling).')
  if f.min_p is not None and not 0.0 <= f.min_p < 1.0:
    raise ConfigError(f'--min_p={f.min_p} must be in [0, 1) (0 disables min-p filtering).')
  if f.quant not in quant.MODES:
    raise ConfigError(f'--quant={f.quant!r} is not allowed; choose one of '
                      f'{", ".join(quant.MODES)}.')
  given = [name for name in _TEXT_FLAGS if getattr(f, name) is not None]
  missing = [name for name in given if name not in config.get('sample', {})]
  if missing:
    raise ConfigError(f'--{missing[0]} does not apply to this run: its task '
                      f'({config.get("task")!r}) has no sample.{missing[0]}.')
  if f.out:
    outs = [f.out] if f.num_samples == 1 else [_numbered(f.out, i) for i in range(f.num_samples)]
    for out in outs:
      _check_writable(out, f.overwrite)


def _numbered(out: str, i: int) -> str:
  stem, ext = os.path.splitext(out)
  return f'{stem}_{i}{ext or ".png"}'


def _check_writable(path: str, overwrite: bool) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ConfigError(f'--out={path!r} is a directory; give a file name such as grid.png.')
  if os.path.exists(path) and not overwrite:
    raise ConfigError(f'--out={path!r} exists; choose another name or pass --overwrite.')
  if not os.path.isdir(parent):
    raise ConfigError(f'--out={path!r}: the directory {parent!r} does not exist.')
  if not os.access(parent, os.W_OK):
    raise ConfigError(f'--out={path!r}: the directory {parent!r} is not writable.')


def sample(workdir: str, *, seed: int = 0, num_samples: int = 1, quant: str = 'none',
           **settings) -> tuple[list[dict], int]:
  """Samples from the newest checkpoint of the run in `workdir`, as `python -m train.sample`
  does, for notebooks and scripts.

  `settings` change the run's `sample.*` keys for text tasks: prompt, max_new_tokens,
  temperature, top_k, top_p, min_p; they, `num_samples` and `quant` are checked as the
  command's flags of the same names, before the model is restored. Returns one dict of
  samples per seed (seed, seed + 1, ...), text (str) or image grids (uint8 [H, W, C]) by
  tag, and the checkpoint's step.
  """
  unknown = sorted(set(settings) - set(_TEXT_FLAGS))
  if unknown:
    raise ConfigError(f'{unknown[0]!r} is not a sample setting; choose from '
                      f'{", ".join(_TEXT_FLAGS)}.')
  config = load_run_config(workdir)
  check_flags(types.SimpleNamespace(num_samples=num_samples, scale=1, quant=quant, out=None,
                                    overwrite=False,
                                    **{name: settings.get(name) for name in _TEXT_FLAGS}),
              config)
  with config.unlocked():
    for name, value in settings.items():
      if value is not None:
        config.sample[name] = value
  task = get_task(config)
  task.setup_inference(workdir)
  if quant != 'none':
    if not hasattr(task, 'set_inference_quant'):
      raise ConfigError(f'--quant does not apply to this run: its task ({config.task!r}) '
                        'has no quantized inference.')
    task.set_inference_quant(quant)
  state, step = restore_latest(task, config, workdir)
  # As in training's evaluations, without pipeline stages (restore_latest's mesh).
  with jax.set_mesh(mesh_lib.make_mesh(mesh_lib.unpipelined(config.mesh))):
    return [task.samples(state, seed + i) for i in range(num_samples)], step


def _sample() -> None:
  f = flags.FLAGS
  if not f.workdir:
    raise ConfigError('--workdir is required: the --workdir of a training run.')
  check_flags(f, load_run_config(f.workdir))  # --out too, before anything is restored
  all_samples, step = sample(f.workdir, seed=f.seed, num_samples=f.num_samples, quant=f.quant,
                             **{name: getattr(f, name) for name in _TEXT_FLAGS})
  if jax.process_index() != 0:
    return
  for i, samples in enumerate(all_samples):
    texts = {tag: v for tag, v in samples.items() if isinstance(v, str)}
    for tag, text in texts.items():
      name = 'sample' if len(texts) == 1 else tag
      print(f'--- {name} {i} (step {step}) ---\n{text}')
    if any(isinstance(v, np.ndarray) for v in samples.values()):
      if not f.out:
        raise ConfigError('This run samples images: give --out=FILE.png to write them.')
      out = f.out if f.num_samples == 1 else _numbered(f.out, i)
      for path in write_image_samples(samples, out, f.scale):
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
  flags.DEFINE_float('min_p', None, 'Keep tokens at least this fraction as likely as the '
                     'likeliest; 0 disables.')
  flags.DEFINE_integer('num_samples', 1, 'How many samples (seeds seed, seed + 1, ...).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_string('out', None, 'Image samples: the PNG file to write (several samples or '
                      'grids get a suffix).')
  flags.DEFINE_integer('scale', 1, 'Image samples: each pixel becomes a scale x scale block.')
  flags.DEFINE_boolean('overwrite', False, 'Replace an existing --out file.')
  flags.DEFINE_string('quant', 'none', 'Language models: sample with the projection weights '
                      'quantized at load: none, int8, int4 or nf4.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
