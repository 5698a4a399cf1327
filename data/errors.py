"""The user-error language of every Kiln entry point, and the config checks that speak it.

A `ConfigError` (a config key, a flag) or a `DataError` (data, a path, a run
directory) is a problem the user can fix: its message says what was wrong and
what to do. `exit_on_user_error` turns one into a single line on stderr and
exit status 2; anything else is a bug and keeps its traceback.

This module sits in data/, the lowest layer, so that every layer can raise and
check in one language.
"""

import sys
from collections.abc import Callable, Iterable

import ml_collections


class ConfigError(ValueError):
  """A config value, combination or flag that cannot run."""


class DataError(ValueError):
  """A problem with the data that the user can fix (the message says how)."""


# Problems in what a user gave (config, data, workdir): reported as one sentence, no traceback.
USER_ERRORS = (ConfigError, DataError)


def exit_on_user_error(fn: Callable[[], None]) -> None:
  """Runs `fn`; a user error becomes its message on stderr and exit status 2."""
  try:
    fn()
  except USER_ERRORS as e:
    kind = 'Config error' if isinstance(e, ConfigError) else 'Data error'
    print(f'{kind}: {e}', file=sys.stderr)  # one line: not also through absl's log
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
