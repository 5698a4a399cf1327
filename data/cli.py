"""Argument checks shared by the command lines (train, train.convert, data.curate,
data.tokenize, serve, evals), made before any work starts.

Each failure is one line that names the argument and says what to do, in the
language of data/errors.py: flag values and config keys are ConfigErrors, paths
and what they hold DataErrors.
"""

import errno
import os
import socket
import sys
from collections.abc import Sequence

from absl import flags
from etils import epath

from data.errors import ConfigError, DataError


def parse_flags(argv: Sequence[str], *, known_only: bool = False,
                flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing, with every mistake in a flag or a `--config` file reported in
  one line and exit status 2 instead of a traceback; returns the remaining arguments.

  ml_collections defers a missing config file until the config is read, raises a bare
  AttributeError (with a did-you-mean hint) for an unknown `--config.key`, and wraps
  the config file's own ValueError (e.g. an unknown preset) in its traceback.
  """
  _check_config_files(argv, flag_values)
  try:
    return flag_values(list(argv), known_only=known_only)
  except (AttributeError, KeyError, flags.Error) as e:
    _exit('Config error', flag_error_message(e))


def flag_error_message(e: BaseException) -> str:
  """One line for a mistake in a flag, a `--config.key=value` override or a `--config` file,
  as absl and ml_collections raise it (see `parse_flags`)."""
  if isinstance(e, (AttributeError, KeyError)):  # an unknown key: AttributeError(KeyError(str))
    detail = e
    while isinstance(detail, BaseException) and detail.args:
      detail = detail.args[0]
    detail = str(detail).replace('\n', '. ')
    detail += '' if detail.endswith(('.', '?')) else '.'
    return (f'unknown config key {detail} Every key, with its default, is in the file named '
            'by --config.')
  message = str(e)
  if 'Error whilst parsing config file' in message:  # the config file's own error
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    flag = lines[0].split(':', 1)[0].removeprefix('flag ')
    reason = next((line for line in reversed(lines) if not line.startswith('Pass --help')), '')
    reason = reason.split(': ', 1)[-1] if reason.split(':', 1)[0].endswith('Error') else reason
    return f'{flag}: {reason}'
  return ' '.join(message.split())


def _check_config_files(argv: Sequence[str], flag_values: flags.FlagValues) -> None:
  """A `--config=FILE[:arg]` whose FILE is not a file, before ml_collections loads it."""
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition('=')
    if not name.startswith('--') or '.' in name:
      continue
    flag = flag_values[name[2:]] if name[2:] in flag_values else None
    if flag is None or flag.flag_type() != 'config object':  # a config_flags file flag
      continue
    if not eq:
      value = argv[i + 1] if i + 1 < len(argv) else ''
    path = value.split(':', 1)[0]
    if not os.path.isfile(path):
      _exit('Config error', f'{name}={value}: {path!r} is not a file; give a config file, '
            'e.g. --config=configs/lm.py[:preset].')


def _exit(kind: str, message: str) -> None:
  print(f'{kind}: {message}', file=sys.stderr)
  sys.exit(2)


def check_output_dir(path: str, flag: str) -> None:
  """`path` is a directory, or can be made one: not a file, nor under one, and writable.

  Nothing is created: a directory that does not exist is checked at its nearest
  existing ancestor.
  """
  p = epath.Path(path)
  if p.exists() and not p.is_dir():
    raise DataError(f'{flag}={path} is a file; give a directory.')
  existing = p
  while not existing.exists() and existing.parent != existing:
    existing = existing.parent
  if existing != p and not existing.is_dir():
    raise DataError(f'{flag}={path} cannot be created: {existing} is a file; give another '
                    'directory.')
  if '://' not in path and existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
    raise DataError(f'{flag}={path} cannot be written ({existing} is not writable); give a '
                    'directory you can write.')


def check_new_output_dir(path: str, flag: str, *, overwrite: bool,
                         owned: Sequence[str] = ()) -> None:
  """`check_output_dir`, and `path` must be empty or absent unless `overwrite`; with
  `overwrite`, the entries that match the glob patterns `owned` (what the command
  writes there) are deleted, and nothing else.
  """
  check_output_dir(path, flag)
  p = epath.Path(path)
  if not p.exists():
    return
  entries = sorted(e.name for e in p.iterdir())
  if entries and not overwrite:
    shown = ', '.join(entries[:3]) + (', ...' if len(entries) > 3 else '')
    raise DataError(f'{flag}={path} is not empty (it holds {shown}); give a new or empty '
                    'directory, or pass --overwrite to replace what this command wrote there.')
  for pattern in owned:
    for entry in p.glob(pattern):
      if entry.is_dir():
        entry.rmtree()
      else:
        entry.unlink()


def check_input(path: str, flag: str, *, directory: bool | None = None) -> None:
  """`path` exists (and is a directory, or a file, when `directory` says so)."""
  p = epath.Path(path)
  if not path or not p.exists():
    raise DataError(f'{flag}={path!r} does not exist; check the path.')
  if directory is True and not p.is_dir():
    raise DataError(f'{flag}={path} is not a directory.')
  if directory is False and p.is_dir():
    raise DataError(f'{flag}={path} is a directory; give a file.')


def check_port_free(host: str, port: int) -> None:
  """ConfigError unless a server could listen on (--host, --port): checked before any model
  loads (python -m serve, python -m evals.human)."""
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise ConfigError(f'--host={host!r} does not resolve: {e.strerror}.') from None
  family, _, _, _, address = infos[0]
  with socket.socket(family, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(address)
    except OSError as e:
      why = 'is in use' if e.errno == errno.EADDRINUSE else f'cannot be bound ({e.strerror})'
      raise ConfigError(f'--host={host} --port={port} {why}; choose another --port.') from None
