"""Checks on a resolved config, run before anything compiles.

Unknown keys are already rejected by ml_collections when a `--config.a.b=...`
flag names a key the schema does not have. This module checks values and
combinations, and says which key is wrong and what it may be.
"""

import sys
from collections.abc import Callable, Iterable

import ml_collections
from absl import logging

from data.sources import DataError


class ConfigError(ValueError):
  """A config value or combination that cannot run."""


# Problems in what a user gave (config, data, workdir): reported as one sentence, no traceback.
USER_ERRORS = (ConfigError, DataError)


def exit_on_user_error(fn: Callable[[], None]) -> None:
  """Runs `fn`; a user error becomes its message on stderr and exit status 2."""
  try:
    fn()
  except USER_ERRORS as e:
    kind = 'Config error' if isinstance(e, ConfigError) else 'Data error'
    logging.error('%s: %s', kind, e)
    print(f'{kind}: {e}', file=sys.stderr)
    sys.exit(2)


def require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def check_choice(config: ml_collections.ConfigDict, key: str, allowed: Iterable[str]) -> None:
  value = get(config, key)
  allowed = tuple(allowed)
  require(value in allowed, f'{key}={value!r} is not allowed; choose one of {", ".join(allowed)}.')


def check_positive(config: ml_collections.ConfigDict, *keys: str, allow_zero: bool = False) -> None:
  for key in keys:
    value = get(config, key)
    ok = value >= 0 if allow_zero else value > 0
    bound = '>= 0' if allow_zero else '> 0'
    require(ok, f'{key}={value!r} must be {bound}.')


def get(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split('.'):
    if part not in node:
      raise ConfigError(f'The config has no key {key!r}.')
    node = node[part]
  return node


def check_common(config: ml_collections.ConfigDict) -> None:
  """The keys every family shares (configs/common.py)."""
  check_positive(config, 'steps', 'batch_size', 'grad_accum', 'log_every', 'max_nonfinite_steps',
                 'checkpoint.every', 'checkpoint.keep')
  check_positive(config, 'eval_every', 'eval_steps', 'optimizer.warmup_steps',
                 'optimizer.weight_decay', 'optimizer.clip_norm', allow_zero=True)
  check_positive(config, 'optimizer.lr', 'optimizer.eps')
  check_choice(config, 'optimizer.name', ('adamw',))
  for key in ('optimizer.b1', 'optimizer.b2'):
    value = get(config, key)
    require(0.0 <= value < 1.0, f'{key}={value!r} must be in [0, 1).')
  require(config.batch_size % config.grad_accum == 0,
          f'batch_size={config.batch_size} must be divisible by grad_accum={config.grad_accum}.')
  for axis in ('data', 'fsdp', 'tensor'):
    value = config.mesh[axis]
    require(value == -1 or value >= 1, f'mesh.{axis}={value!r} must be -1 (fill) or >= 1.')
  fills = [a for a in ('data', 'fsdp', 'tensor') if config.mesh[a] == -1]
  require(len(fills) <= 1, f'Only one mesh axis may be -1 (fill); got {", ".join(fills)}.')
