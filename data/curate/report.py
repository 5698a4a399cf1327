"""What each stage kept and removed: counted inside the pipeline, merged into one report.

Every stage's DoFn keeps a `StageStats` per bundle and emits it when the bundle
ends; `MergeStats` combines them into one `StageStats` per stage. Examples are
the removals (or edits) whose document ids hash lowest, so the report names
the same examples whatever the bundling, runner or number of workers.

Examples show text after normalisation; the PII stage's examples show the
scrubbed text, so a report never repeats the PII it removed.
"""

import dataclasses
import json
import zlib

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

EXAMPLE_CHARS = 300
STATS = 'stats'  # the tagged output that carries (stage name, StageStats)
METRICS_NAMESPACE = 'kiln_curate'


def doc_id(key: tuple[str, int]) -> str:
  """The printable id of the document read as record `key[1]` of file `key[0]`."""
  return f'{key[0]}:{key[1]}'


@dataclasses.dataclass
class StageStats:
  """Documents and UTF-8 bytes into and out of one stage, and why the rest went."""

  docs_in: int = 0
  bytes_in: int = 0
  docs_out: int = 0
  bytes_out: int = 0
  # reason -> [documents, bytes removed]. 'edited: ...' reasons count documents
  # that were kept but shortened (bytes are the bytes cut from them).
  reasons: dict = dataclasses.field(default_factory=dict)
  # (rank, id, reason, excerpt), the `max_examples` lowest ranks.
  examples: list = dataclasses.field(default_factory=list)
  max_examples: int = 3

  def add(self, key: tuple[str, int], bytes_in: int, bytes_out: int | None, reason: str | None,
          excerpt: str = '') -> None:
    """Counts one document; bytes_out None means it was removed."""
    self.docs_in += 1
    self.bytes_in += bytes_in
    if bytes_out is not None:
      self.docs_out += 1
      self.bytes_out += bytes_out
    if reason is None:
      return
    removed = bytes_in - (bytes_out or 0)
    entry = self.reasons.setdefault(reason, [0, 0])
    entry[0] += 1
    entry[1] += removed
    if self.max_examples:
      rank = zlib.crc32(f'{doc_id(key)}\0{reason}'.encode())
      if (len(self.examples) < self.max_examples or rank < self.examples[-1][0]):
        self.examples.append((rank, doc_id(key), reason, excerpt[:EXAMPLE_CHARS]))
        self.examples.sort()
        del self.examples[self.max_examples:]

  def merge(self, other: 'StageStats') -> None:
    self.docs_in += other.docs_in
    self.bytes_in += other.bytes_in
    self.docs_out += other.docs_out
    self.bytes_out += other.bytes_out
    for reason, (docs, nbytes) in other.reasons.items():
      entry = self.reasons.setdefault(reason, [0, 0])
      entry[0] += docs
      entry[1] += nbytes
    self.examples = sorted(self.examples + other.examples)[:self.max_examples]

  def to_json(self) -> dict:
    return {
        'docs_in': self.docs_in, 'bytes_in': self.bytes_in,
        'docs_out': self.docs_out, 'bytes_out': self.bytes_out,
        'docs_removed': self.docs_in - self.docs_out,
        'bytes_removed': self.bytes_in - self.bytes_out,
        'reasons': {r: {'docs': d, 'bytes': b} for r, (d, b) in sorted(self.reasons.items())},
        'examples': [{'id': i, 'reason': r, 'text': t} for _, i, r, t in self.examples],
    }


class CountingDoFn(beam.DoFn):
  """A DoFn that counts into `self.stats` and emits the counts once per bundle."""

  def __init__(self, stage_name: str, max_examples: int):
    self.stage_name = stage_name
    self.max_examples = max_examples

  def start_bundle(self):
    self.stats = StageStats(max_examples=self.max_examples)

  def finish_bundle(self):
    if self.stats.docs_in:
      # Beam's counters: what a cluster runner's UI shows while the job runs.
      for field in ('docs_in', 'bytes_in', 'docs_out', 'bytes_out'):
        Metrics.counter(METRICS_NAMESPACE, f'{self.stage_name}_{field}').inc(
            getattr(self.stats, field))
      yield beam.pvalue.TaggedOutput(
          STATS, GlobalWindows.windowed_value((self.stage_name, self.stats)))


class MergeStats(beam.CombineFn):
  """(stage name, StageStats) elements -> {stage name: StageStats}."""

  def create_accumulator(self) -> dict:
    return {}

  def add_input(self, accumulator: dict, element) -> dict:
    name, stats = element
    if name in accumulator:
      accumulator[name].merge(stats)
    else:
      accumulator[name] = stats
    return accumulator

  def merge_accumulators(self, accumulators) -> dict:
    merged = {}
    for accumulator in accumulators:
      for item in accumulator.items():
        self.add_input(merged, item)
    return merged

  def extract_output(self, accumulator: dict) -> dict:
    return accumulator


def build_report(stats: dict, stage_names: list[str], *, input_pattern: str,
                 output_dir: str) -> dict:
  """The JSON report: 'read' (bad input), then each stage in pipeline order."""
  empty = StageStats()
  read = stats.get('read', empty)
  stages = [{'stage': name, **stats.get(name, empty).to_json()} for name in stage_names]
  last = stats[stage_names[-1]] if stage_names and stage_names[-1] in stats else read
  return {
      'input': input_pattern,
      'output': output_dir,
      'read': {'stage': 'read', **read.to_json()},
      'stages': stages,
      'kept': {'docs': last.docs_out, 'bytes': last.bytes_out},
  }


def table(report: dict) -> str:
  """A readable table of the report: one row per stage, then the reasons."""
  rows = [report['read']] + report['stages']
  header = f'{"stage":<18} {"docs in":>10} {"removed":>10} {"docs out":>10} ' \
           f'{"MB in":>9} {"MB removed":>11} {"MB out":>9}'
  lines = [header, '-' * len(header)]
  for r in rows:
    lines.append(f'{r["stage"]:<18} {r["docs_in"]:>10,} {r["docs_removed"]:>10,} '
                 f'{r["docs_out"]:>10,} {r["bytes_in"] / 1e6:>9.3f} '
                 f'{r["bytes_removed"] / 1e6:>11.3f} {r["bytes_out"] / 1e6:>9.3f}')
  lines.append('')
  for r in rows:
    for reason, counts in r['reasons'].items():
      lines.append(f'  {r["stage"]}: {reason}: {counts["docs"]:,} docs, {counts["bytes"]:,} bytes')
  return '\n'.join(lines)


def dumps(report: dict) -> str:
  return json.dumps(report, indent=1, ensure_ascii=False)
