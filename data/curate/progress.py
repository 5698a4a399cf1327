"""A progress line for local runs.

Beam's DirectRunner reports its metrics only when the run ends, and in
multi-processing mode the work happens in worker processes. So each counting
DoFn (`Counter`) writes its running totals to a small file in a local
directory, at most once a second, and the driver (`Watcher`) sums the files
and prints one line every few seconds. Cluster runners show Beam's
counters instead (report.CountingDoFn: documents and bytes into and out of
every stage, namespace kiln_curate), in their UI while the job runs.
"""

import json
import os
import sys
import threading
import time
import uuid

_WRITE_EVERY_S = 1.0


class Counter:
  """Counts documents and bytes under `name`; shared through files in `directory`."""

  def __init__(self, directory: str | None, name: str):
    self.directory, self.name = directory, name
    self.docs = self.bytes = 0
    self._path = os.path.join(directory, f'{uuid.uuid4().hex}.json') if directory else None
    self._last_write = 0.0

  def add(self, docs: int, nbytes: int) -> None:
    self.docs += docs
    self.bytes += nbytes
    if self._path and time.monotonic() - self._last_write > _WRITE_EVERY_S:
      self.flush()

  def flush(self) -> None:
    if not self._path:
      return
    tmp = self._path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump({'name': self.name, 'docs': self.docs, 'bytes': self.bytes}, f)
    os.replace(tmp, self._path)
    self._last_write = time.monotonic()


def totals(directory: str) -> dict[str, tuple[int, int]]:
  """name -> (docs, bytes), summed over every counter's file in `directory`."""
  sums: dict[str, tuple[int, int]] = {}
  for entry in os.listdir(directory):
    if not entry.endswith('.json'):
      continue
    try:
      with open(os.path.join(directory, entry)) as f:
        c = json.load(f)
    except (OSError, ValueError):
      continue  # replaced while we read it; the next look sees it
    docs, nbytes = sums.get(c['name'], (0, 0))
    sums[c['name']] = (docs + c['docs'], nbytes + c['bytes'])
  return sums


class Watcher:
  """Prints 'curate: read N docs, X MB (Y MB/s); wrote M docs' every `every_s` seconds."""

  def __init__(self, directory: str, every_s: float = 10.0, stream=sys.stderr):
    self.directory, self.every_s, self.stream = directory, every_s, stream
    self._stop = threading.Event()
    self._start = time.monotonic()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.print_line()

  def _run(self):
    while not self._stop.wait(self.every_s):
      self.print_line()

  def line(self) -> str:
    sums = totals(self.directory)
    read_docs, read_bytes = sums.get('read', (0, 0))
    written_docs, _ = sums.get('written', (0, 0))
    elapsed = max(time.monotonic() - self._start, 1e-9)
    return (f'curate: {elapsed:.0f}s, read {read_docs:,} docs, {read_bytes / 1e6:.1f} MB '
            f'({read_bytes / 1e6 / elapsed:.2f} MB/s); wrote {written_docs:,} docs')

  def print_line(self) -> None:
    print(self.line(), file=self.stream, flush=True)
