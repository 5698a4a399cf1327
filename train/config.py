"""Overrides in Python, and checks on a resolved config, run before anything compiles.

Unknown keys are already rejected by ml_collections when a `--config.a.b=...`
flag (or an `override` assignment) names a key the schema does not have. This module
checks values and combinations, and says which key is wrong and what it may be.
"""

import copy
from collections.abc import Iterable

import ml_collections
from absl import flags
from ml_collections import config_flags

from data import cli
from data.errors import ConfigError, check_choice, check_positive, get, require
from train import mesh as mesh_lib


def override(config: ml_collections.ConfigDict,
             assignments: Iterable[str]) -> ml_collections.ConfigDict:
  """A copy of `config` with `key=value` assignments applied as the command line applies
  `--config.key=value` (the `--config.` prefix may be given too), locked like it.

  For notebooks and scripts that build a config in Python:
  `override(lm.get_config('tiny'), ['steps=300', 'model.n_layers=2'])`. The parsing is
  ml_collections' own (config_flags on a private FlagValues), so values are read by the
  key's type exactly as on the command line, and an unknown key or a bad value raises a
  ConfigError with the command line's one-line message.
  """
  argv = ['override']
  for assignment in assignments:
    key, eq, value = assignment.removeprefix('--').removeprefix('config.').partition('=')
    if not eq or not key:
      raise ConfigError(f'Override {assignment!r} is not key=value, e.g. model.n_layers=2.')
    argv.append(f'--config.{key}={value}')
  flag_values = flags.FlagValues()
  try:  # ml_collections reads the keys from sys_argv at definition, the values at parsing
    holder = config_flags.DEFINE_config_dict('config', copy.deepcopy(config),
                                             flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return holder.value  # ml_collections applies the overrides here
  except (AttributeError, KeyError, flags.Error) as e:
    raise ConfigError(cli.flag_error_message(e)) from None


def check_common(config: ml_collections.ConfigDict) -> None:
  """The keys every family shares (configs/common.py)."""
  check_positive(config, 'steps', 'batch_size', 'grad_accum', 'log_every', 'max_nonfinite_steps',
                 'checkpoint.every', 'checkpoint.keep')
  check_positive(config, 'eval_every', 'eval_steps', 'optimizer.warmup_steps',
                 'optimizer.weight_decay', 'optimizer.clip_norm', allow_zero=True)
  check_positive(config, 'optimizer.lr', 'optimizer.eps')
  check_choice(config, 'optimizer.name', ('adamw',))
  check_choice(config, 'optimizer.loss_scale', ('none', 'dynamic', 'static'))
  check_positive(config, 'optimizer.loss_scale_init', 'optimizer.loss_scale_growth_interval')
  for key in ('optimizer.b1', 'optimizer.b2'):
    value = get(config, key)
    require(0.0 <= value < 1.0, f'{key}={value!r} must be in [0, 1).')
  require(config.batch_size % config.grad_accum == 0,
          f'batch_size={config.batch_size} must be divisible by grad_accum={config.grad_accum}.')
  for axis in mesh_lib.AXES:
    value = config.mesh.get(axis, 1)
    require(value == -1 or value >= 1, f'mesh.{axis}={value!r} must be -1 (fill) or >= 1.')
  fills = [a for a in mesh_lib.AXES if config.mesh.get(a, 1) == -1]
  require(len(fills) <= 1, f'Only one mesh axis may be -1 (fill); got {", ".join(fills)}.')
