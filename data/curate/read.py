"""Reading the input: jsonl, parquet and plain text files into documents.

A document is a dict:
  id        (path, record number): the record's place in the input, 1-based
            (the line of a jsonl file, the row of a parquet file, 1 for a text
            file); ids are unique and order the documents (dedup keeps the
            first of a cluster in this order);
  text      str;
  metadata  the record's other fields (jsonl, parquet), unchanged.

The format comes from the file name: *.jsonl / *.json / *.ndjson are one JSON
object per line, *.parquet is Parquet, anything else is one plain-text
document per file. Compressed files (.gz, .bz2, .zst, .deflate) are read
through Beam's filesystems, as are gs://, s3:// and hdfs:// paths.

Bad records never stop a run: malformed JSON lines, records without a string
text field, bytes that are not UTF-8, empty documents and documents larger
than input.max_doc_bytes are skipped and counted, by reason, in the report's
'read' row; every other record of the same file is still read.
"""

import json
from typing import NamedTuple

import ml_collections
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from data.curate import progress
from data.curate.report import CountingDoFn

_JSONL_SUFFIXES = ('.jsonl', '.json', '.ndjson')
_BAD_EXCERPT_BYTES = 200
_PARQUET_BATCH_ROWS = 1024


class _Record(NamedTuple):
  number: int
  text: str
  metadata: dict


class _Bad(NamedTuple):
  number: int
  reason: str
  excerpt: bytes  # the start of the raw record
  size: int  # bytes the raw record had


def _bad(number: int, reason: str, raw: bytes, size: int | None = None) -> _Bad:
  return _Bad(number, reason, raw[:_BAD_EXCERPT_BYTES], len(raw) if size is None else size)


def file_format(path: str) -> str:
  """'jsonl', 'parquet' or 'text', from the name (after any compression suffix)."""
  name = path.lower()
  for suffix in ('.gz', '.gzip', '.bz2', '.zst', '.zstd', '.deflate', '.xz', '.lzma'):
    if name.endswith(suffix):
      name = name[:-len(suffix)]
      break
  if name.endswith(_JSONL_SUFFIXES):
    return 'jsonl'
  if name.endswith('.parquet'):
    return 'parquet'
  return 'text'


class ReadFile(CountingDoFn):
  """path -> documents (main output) and the 'read' stage's counts (STATS output)."""

  def __init__(self, input_cfg: ml_collections.ConfigDict, max_examples: int,
               progress_dir: str | None = None, stage_name: str = 'read'):
    super().__init__(stage_name, max_examples)
    self.text_field = input_cfg.text_field
    self.max_doc_bytes = input_cfg.max_doc_bytes
    self.progress_dir = progress_dir

  def setup(self):
    self.progress = progress.Counter(self.progress_dir, 'read')

  def process(self, path: str):
    reader = {'jsonl': self._jsonl, 'parquet': self._parquet, 'text': self._text}
    for record in reader[file_format(path)](path):
      key = (path, record.number)
      if isinstance(record, _Bad):
        excerpt = record.excerpt.decode('utf-8', errors='replace')
        self.stats.add(key, record.size, None, record.reason, excerpt)
        self.progress.add(1, record.size)
        continue
      size = len(record.text.encode('utf-8', errors='surrogatepass'))
      self.stats.add(key, size, size, None)
      self.progress.add(1, size)
      yield {'id': key, 'text': record.text, 'metadata': record.metadata}

  def teardown(self):
    self.progress.flush()

  def _checked(self, number: int, text, metadata: dict, raw: bytes) -> _Record | _Bad:
    """The record, or why it is skipped; `raw` is what the input held for it."""
    if not isinstance(text, str):
      return _bad(number, f'no string field {self.text_field!r}', raw)
    if not text.strip():
      return _bad(number, 'empty document', raw)
    if len(raw) > self.max_doc_bytes:
      return _bad(number, self._huge, raw)
    return _Record(number, text, metadata)

  @property
  def _huge(self) -> str:
    return f'larger than input.max_doc_bytes={self.max_doc_bytes}'

  def _jsonl(self, path: str):
    with FileSystems.open(path) as f:
      # readline, not iteration: Beam's decompressing files only offer readline.
      for number, line in enumerate(iter(f.readline, b''), start=1):
        if not line.strip():
          continue  # blank lines (a trailing one, say) are not records
        if len(line) > self.max_doc_bytes:
          yield _bad(number, self._huge, line)
          continue
        try:
          record = json.loads(line.decode('utf-8'))
        except UnicodeDecodeError:
          yield _bad(number, 'bytes that are not UTF-8', line)
          continue
        except json.JSONDecodeError:
          yield _bad(number, 'malformed JSON', line)
          continue
        if not isinstance(record, dict):
          yield _bad(number, 'JSON line that is not an object', line)
          continue
        text = record.pop(self.text_field, None)
        yield self._checked(number, text, record, line)

  def _parquet(self, path: str):
    import pyarrow.parquet as pq

    number = 0
    try:
      with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        parquet = pq.ParquetFile(f)
        if self.text_field not in parquet.schema_arrow.names:
          yield _bad(1, f'parquet file without column {self.text_field!r}',
                     str(parquet.schema_arrow.names).encode())
          return
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
          for record in batch.to_pylist():
            number += 1
            yield self._parquet_record(number, record)
    except Exception as e:  # pyarrow raises many unrelated types for a damaged file
      yield _bad(number + 1, f'unreadable parquet data ({type(e).__name__})', str(e).encode())

  def _parquet_record(self, number: int, record: dict) -> _Record | _Bad:
    text = record.pop(self.text_field)
    raw = text if isinstance(text, bytes) else str(text).encode('utf-8', 'surrogatepass')
    if isinstance(text, bytes):
      try:
        text = text.decode('utf-8')
      except UnicodeDecodeError:
        return _bad(number, 'bytes that are not UTF-8', raw)
    return self._checked(number, text, _jsonable(record), raw)

  def _text(self, path: str):
    size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    if size > self.max_doc_bytes:
      yield _bad(1, self._huge, b'', size)
      return
    with FileSystems.open(path) as f:
      raw = f.read()
    try:
      text = raw.decode('utf-8')
    except UnicodeDecodeError:
      yield _bad(1, 'bytes that are not UTF-8', raw)
      return
    yield self._checked(1, text, {}, raw)


def _jsonable(record: dict) -> dict:
  """Parquet values (dates, decimals, bytes) as JSON can hold them."""
  return json.loads(json.dumps(record, default=str))
