"""Writing the curated documents: jsonl shards whose bytes do not depend on the run.

Document d goes to shard crc32(id) % num_shards, and each shard is sorted by
id before it is written, so two runs over the same input write identical
files, whatever the runner, worker count or bundling. A line is
{"id": "path:record", "text": ..., "metadata": {...}}: the input record's
other fields, plus what stages added (language, language_score, perplexity).

A shard is written under a temporary name and renamed when complete.
"""

import json
import zlib

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from data.curate import progress, report

SHARD_PATTERN = 'docs-{index:05d}-of-{count:05d}.jsonl'
REPORT_FILE = 'report.json'


def shard_name(index: int, count: int) -> str:
  return SHARD_PATTERN.format(index=index, count=count)


def to_line(doc: dict) -> str:
  record = {'id': report.doc_id(doc['id']), 'text': doc['text'], 'metadata': doc['metadata']}
  return json.dumps(record, ensure_ascii=False) + '\n'


class _WriteShard(beam.DoFn):
  def __init__(self, output_dir: str, num_shards: int, progress_dir: str | None):
    self.output_dir, self.num_shards, self.progress_dir = output_dir, num_shards, progress_dir

  def setup(self):
    self.progress = progress.Counter(self.progress_dir, 'written')

  def process(self, element):
    index, docs = element
    path = FileSystems.join(self.output_dir, shard_name(index, self.num_shards))
    lines = [to_line(d) for d in sorted(docs, key=lambda d: d['id'])]
    write_atomic(path, ''.join(lines).encode('utf-8', errors='surrogatepass'))
    self.progress.add(len(lines), 0)
    yield path

  def teardown(self):
    self.progress.flush()


def write_atomic(path: str, data: bytes) -> None:
  """Writes `path` (on any Beam filesystem) so that it appears whole or not at all."""
  tmp = path + '.tmp'
  with FileSystems.create(tmp) as f:
    f.write(data)
  FileSystems.rename([tmp], [path])


class WriteShards(beam.PTransform):
  """documents -> the paths of the shards written (empty shards are written by the driver)."""

  def __init__(self, output_dir: str, num_shards: int, progress_dir: str | None):
    super().__init__()
    self.output_dir, self.num_shards, self.progress_dir = output_dir, num_shards, progress_dir

  def expand(self, docs):
    n = self.num_shards
    return (docs
            | 'Shard' >> beam.Map(
                lambda d: (zlib.crc32(report.doc_id(d['id']).encode('utf-8', 'surrogatepass')) % n,
                           d))
            | 'GroupShards' >> beam.GroupByKey()
            | 'Write' >> beam.ParDo(_WriteShard(self.output_dir, n, self.progress_dir)))


def write_empty_shards(output_dir: str, num_shards: int) -> None:
  """Creates the shards no document went to, so that all `num_shards` files exist."""
  for index in range(num_shards):
    path = FileSystems.join(output_dir, shard_name(index, num_shards))
    if not FileSystems.exists(path):
      write_atomic(path, b'')
