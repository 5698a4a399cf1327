"""Files anywhere: local paths and URLs (gs://, s3://, ...) through etils.epath.

Object stores make an object visible only once its upload is complete, so a
write to a URL is already atomic; a local write goes to a temporary file that
is renamed into place. Renames are avoided on object stores, where they are
copies (and slow or unsupported on some emulators).

gs:// needs gcsfs (a core dependency); epath reaches it through fsspec.
"""

import glob as glob_lib
import os
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URL (gs://bucket/dir) rather than a local path."""
  return '://' in os.fspath(path)


def absolute(path: PathLike) -> epath.Path:
  """`path` as an epath.Path: a URL as it is, a local path made absolute (not resolved)."""
  return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def write_atomic(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that readers see either nothing or all of it.

  Processes sharing a workdir may write the same file at once; each writes its
  own temp file and the last rename wins, with identical content.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    path.write_bytes(data)
    return
  fd, tmp = tempfile.mkstemp(dir=os.fspath(path.parent), prefix='.tmp-')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the file is for every local process
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def stamp(path: PathLike) -> tuple[int, int]:
  """(size, mtime) of a file: mtime in ns locally, in whole seconds for a URL."""
  if is_remote(path):
    stat = epath.Path(path).stat()
    return int(stat.length), int(stat.mtime)
  stat = os.stat(path)
  return stat.st_size, stat.st_mtime_ns


def glob(pattern: str) -> list[str]:
  """The paths that match `pattern` (files and directories), sorted.

  Local patterns keep the semantics of the `glob` module; a URL is split at its
  first part with a wildcard, and the rest is matched by epath (fsspec).
  """
  if not is_remote(pattern):
    return sorted(glob_lib.glob(pattern))
  if not glob_lib.has_magic(pattern):
    return [pattern] if epath.Path(pattern).exists() else []
  parts = pattern.split('/')
  first = next(i for i, part in enumerate(parts) if glob_lib.has_magic(part))
  root = epath.Path('/'.join(parts[:first]))
  return sorted(os.fspath(p) for p in root.glob('/'.join(parts[first:])))


def upload_tree(local_dir: str, remote_dir: PathLike) -> None:
  """Copies every file under `local_dir` to the same relative path under `remote_dir`."""
  for src in _files_under(local_dir):
    dst = epath.Path(remote_dir) / os.path.relpath(src, local_dir)
    dst.parent.mkdir(parents=True, exist_ok=True)
    epath.Path(src).copy(dst, overwrite=True)


def _files_under(directory: str) -> Iterator[str]:
  for root, _, names in os.walk(directory):
    for name in sorted(names):
      yield os.path.join(root, name)


class LocalStaging:
  """A local directory that stands in for `target` when `target` is a URL.

  Tools that write only local files (TensorBoard's event writer, the profiler)
  write into `local`; `sync()` copies its files to `target`. For a local
  `target`, `local` is `target` itself and `sync()` does nothing.
  """

  def __init__(self, target: PathLike, prefix: str):
    self.target = target
    self.remote = is_remote(target)
    self.local = tempfile.mkdtemp(prefix=prefix) if self.remote else os.fspath(target)

  def sync(self) -> None:
    if self.remote:
      upload_tree(self.local, self.target)

  def close(self) -> None:
    """Syncs a last time and deletes the local copy."""
    if self.remote:
      self.sync()
      shutil.rmtree(self.local, ignore_errors=True)
