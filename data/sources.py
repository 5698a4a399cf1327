"""Text sources: each yields documents (strings) of one split, 'train' or 'validation'.

Every source splits deterministically, so that every process and every rerun
sees the same documents in the same order:

  stdlib  every *.py module of the running interpreter's standard library; a
          module is held out by a hash of its relative path.
  text    one document per file; the first (1 - val_fraction) of all characters
          train, the rest validate (nanoGPT's split).
  jsonl   one JSON object per line; held out by a hash of the text.
  tfds    a prepared TFDS dataset, read without tensorflow where possible.

`data.path` of text and jsonl may be a local path or a URL (gs://bucket/dir/*.txt),
read through etils.epath.

Problems a user can fix (a missing file, an empty source, a text file that is
not UTF-8) raise `DataError` before any training starts. Unreadable parts of
large corpora (stdlib files that are not UTF-8, malformed jsonl lines) are
skipped, counted and logged instead, because one bad record should not stop a
run.
"""

import collections
import glob
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator

import ml_collections
from absl import logging
from etils import epath

from data import storage
from data.errors import DataError

SPLITS = ('train', 'validation')
_EXCLUDED_STDLIB_DIRS = ('site-packages', 'dist-packages')


def read_documents(data_cfg: ml_collections.ConfigDict, split: str,
                   skipped: collections.Counter | None = None) -> Iterator[str]:
  """Yields the documents of `split` ('train' or 'validation') in a fixed order.

  Args:
    data_cfg: the `config.data` block (source, path, name, data_dir, text_field,
      val_fraction).
    split: 'train' or 'validation'.
    skipped: if given, receives counts of skipped records by reason (the same
      counts are logged).

  Raises:
    DataError: a missing path, no matching files, an empty source or split, or a
      text file that is not UTF-8.
  """
  if split not in SPLITS:
    raise ValueError(f'split={split!r} is not one of {SPLITS}.')
  readers = {'stdlib': _stdlib, 'text': _text, 'jsonl': _jsonl, 'tfds': _tfds}
  if data_cfg.source not in readers:
    raise DataError(f'data.source={data_cfg.source!r} has no documents to read; choose one '
                    f'of {", ".join(readers)}.')
  skipped = collections.Counter() if skipped is None else skipped
  count = 0
  for doc in readers[data_cfg.source](data_cfg, split, skipped):
    count += 1
    yield doc
  if skipped:
    # Callers read a split more than once (tokenizer training reads it twice);
    # logging.log_first_n would hide new counts, so dedupe by message instead.
    _warn_once('data.source=%r, split %r: skipped %s.', data_cfg.source, split,
               ', '.join(f'{n} {reason}' for reason, n in sorted(skipped.items())))
  if count == 0:
    raise DataError(f'data.source={data_cfg.source!r} gave no {split} documents'
                    f'{_where(data_cfg)}; check the data and data.val_fraction.')


_warned: set[str] = set()


def _warn_once(message: str, *args) -> None:
  text = message % args
  if text not in _warned:
    _warned.add(text)
    logging.warning(text)


def held_out(key: str, val_fraction: float) -> bool:
  """Whether the document named `key` belongs to validation (stable across runs)."""
  return zlib.crc32(key.encode('utf-8')) % 1000 < 1000 * val_fraction


def stdlib_root() -> str:
  return sysconfig.get_paths()['stdlib']


def stdlib_modules() -> list[str]:
  """Sorted paths, relative to the stdlib root, of its *.py files (no site-packages)."""
  root = stdlib_root()
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_STDLIB_DIRS]
    rel_dir = os.path.relpath(dirpath, root)
    for name in filenames:
      if name.endswith('.py'):
        found.append(os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, '/'))
  return sorted(found)


def _where(data_cfg) -> str:
  if data_cfg.source in ('text', 'jsonl'):
    return f' from data.path={data_cfg.path!r}'
  if data_cfg.source == 'tfds':
    return f' from TFDS dataset data.name={data_cfg.name!r}'
  return ''


def _stdlib(data_cfg, split, skipped) -> Iterator[str]:
  root = stdlib_root()
  want_validation = split == 'validation'
  for rel in stdlib_modules():
    if held_out(rel, data_cfg.val_fraction) != want_validation:
      continue
    try:
      with open(os.path.join(root, rel), encoding='utf-8') as f:
        text = f.read()
    except UnicodeDecodeError:
      # A few test fixtures (e.g. lib2to3's) are deliberately in other encodings.
      skipped['files that are not UTF-8'] += 1
      continue
    if text:
      yield text


def expand_path(path: str) -> list[str]:
  """The sorted files that `path` (a file or a glob, local or a URL) names; DataError if none."""
  if not path:
    raise DataError('data.path is empty; set it to a file or glob, e.g. '
                    '--config.data.path=/path/to/input.txt.')
  files = [p for p in storage.glob(os.path.expanduser(path)) if epath.Path(p).is_file()]
  if not files:
    if glob.has_magic(path):
      raise DataError(f'No files match data.path={path!r}; check the pattern.')
    raise DataError(f'data.path={path!r} does not exist; give an existing file or a glob.')
  return files


def _text(data_cfg, split, skipped) -> Iterator[str]:
  del skipped  # a text source is small and hand-made: every problem is an error
  texts = []
  for name in expand_path(data_cfg.path):
    try:
      texts.append(epath.Path(name).read_text(encoding='utf-8'))
    except UnicodeDecodeError as e:
      raise DataError(f'{name} (from data.path) is not UTF-8 text ({e.reason} at byte '
                      f'{e.start}); convert it, e.g. with iconv -t utf-8.') from None
  total = sum(len(t) for t in texts)
  if total == 0:
    raise DataError(f'data.path={data_cfg.path!r} holds no text (its files are empty); '
                    'point it at a non-empty file.')
  cut = int(total * (1.0 - data_cfg.val_fraction))
  start = 0
  for text in texts:
    # The file's part of the global character range [0, cut) or [cut, total).
    lo, hi = (0, cut - start) if split == 'train' else (cut - start, len(text))
    piece = text[max(lo, 0):max(hi, 0)]
    start += len(text)
    if piece:
      yield piece


def _jsonl(data_cfg, split, skipped) -> Iterator[str]:
  want_validation = split == 'validation'
  field = data_cfg.text_field
  for name in expand_path(data_cfg.path):
    with epath.Path(name).open('rb') as f:
      for line in f:
        text = _jsonl_text(line, field, skipped)
        if text and held_out(text, data_cfg.val_fraction) == want_validation:
          yield text


def _jsonl_text(line: bytes, field: str, skipped) -> str | None:
  """The text of one jsonl line, or None (counted in `skipped`) when it has none."""
  if not line.strip():
    return None  # blank lines (e.g. a trailing one) are not records
  try:
    record = json.loads(line)
  except (UnicodeDecodeError, json.JSONDecodeError):
    skipped['malformed lines'] += 1
    return None
  if not isinstance(record, dict) or field not in record:
    skipped[f'lines without text_field {field!r}'] += 1
    return None
  text = record[field]
  if not isinstance(text, str) or not text:
    skipped[f'lines with empty or non-string {field!r}'] += 1
    return None
  return text


def _tfds(data_cfg, split, skipped) -> Iterator[str]:
  import tensorflow_datasets as tfds  # slow to import; only this source needs it

  name, data_dir = data_cfg.name, data_cfg.data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f'There is no TFDS dataset data.name={name!r}; check the name against '
                    'the TFDS catalog.') from None
  if not builder.is_prepared():
    raise DataError(
        f'TFDS dataset {name!r} is not prepared under data.data_dir={data_cfg.data_dir!r} '
        f'({builder.data_dir}). Prepare it on a machine with internet: '
        f'`tfds build {name} --data_dir=DIR --file_format=array_record`, then set '
        'data.data_dir=DIR.')
  tfds_split = split
  if split == 'validation' and 'validation' not in builder.info.splits:
    tfds_split = 'test'
  if tfds_split not in builder.info.splits:
    raise DataError(f'TFDS dataset {name!r} has no {tfds_split!r} split (it has '
                    f'{sorted(builder.info.splits)}).')
  for example in _tfds_examples(builder, tfds_split):
    text = example.get(data_cfg.text_field) if isinstance(example, dict) else None
    if text is None:
      skipped[f'examples without text_field {data_cfg.text_field!r}'] += 1
      continue
    text = text.decode('utf-8', errors='replace') if isinstance(text, bytes) else str(text)
    if text:
      yield text


def _tfds_examples(builder, split: str) -> Iterator[dict]:
  """Examples as numpy dicts, by random access (array_record) or else through tensorflow."""
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError:
    source = None  # prepared as TFRecord, which only tensorflow reads
  if source is not None:
    for i in range(len(source)):
      yield source[i]
    return
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    raise DataError(
        f'TFDS dataset {builder.name!r} is stored as TFRecord, which needs tensorflow to read. '
        'Either `pip install tensorflow`, or re-prepare it with '
        f'`tfds build {builder.name} --file_format=array_record`.') from None
  yield from builder.as_dataset(split=split).as_numpy_iterator()
