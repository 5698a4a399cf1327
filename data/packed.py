"""Packed token shards in ArrayRecord: what `python -m data.tokenize` writes and the
LM loader reads with `--config.data.source=arrayrecord --config.data.path=DIR`.

  DIR/meta.json                          format, seq_len, dtype, vocabulary, splits
  DIR/tokenizer/                         the tokenizer, in data/tokenizers.py's cache layout
  DIR/train-00000-of-00008.array_record  records 0 .. n/8 of the train split, ...
  DIR/validation-00000-of-00001.array_record

A split's documents form one token stream (each document prefixed by BOS),
exactly as the LM pipeline builds it from text. Record i is window i of that
stream, stream[i*L : i*L + L + 1], stored as those L + 1 tokens followed by
the offsets in (0, L) where a document starts inside the window. Shards hold
consecutive records, so reading the shards in order gives record i at index
i. A record decodes to the same example (inputs, targets, segment_ids,
positions) that `windows.TokenWindows` makes from the stream; the
shuffling, process sharding and batching are the LM pipeline's own.
"""

import json
import os

import grain
import numpy as np
from etils import epath

from data import storage, tokenizers
from data.errors import DataError
from data.windows import TokenWindows

META_FILE = 'meta.json'
FORMAT_VERSION = 1


def shard_paths(directory: str, split: str, num_shards: int) -> list[str]:
  return [os.path.join(directory, f'{split}-{i:05d}-of-{num_shards:05d}.array_record')
          for i in range(num_shards)]


def encode_record(tokens_W: np.ndarray, doc_starts: np.ndarray, start: int, seq_len: int,
                  dtype) -> bytes:
  """Window [start, start + L + 1) of a stream as one record.

  Args:
    tokens_W: the window's L + 1 tokens.
    doc_starts: sorted stream offsets of every document start.
  """
  lo, hi = np.searchsorted(doc_starts, [start + 1, start + seq_len])
  inner_starts = doc_starts[lo:hi] - start
  return np.concatenate([tokens_W, inner_starts]).astype(dtype).tobytes()


def read_meta(directory: str) -> dict:
  path = epath.Path(directory) / META_FILE
  if not path.exists():
    raise DataError(f'data.path={directory!r} has no {META_FILE}; make packed shards with '
                    '`python -m data.tokenize --input=CURATED_DIR --output=DIR`.')
  meta = json.loads(path.read_text())
  if meta.get('format') != FORMAT_VERSION:
    raise DataError(f'{path} is format {meta.get("format")!r}; this Kiln reads format '
                    f'{FORMAT_VERSION}. Re-run python -m data.tokenize.')
  return meta


class PackedWindows:
  """The records of one split, decoded to LM examples (see windows.TokenWindows)."""

  def __init__(self, directory: str, split: str, seq_len: int):
    meta = read_meta(directory)
    if meta['seq_len'] != seq_len:
      raise DataError(f'The shards in data.path={directory!r} hold windows of seq_len='
                      f'{meta["seq_len"]}, but data.seq_len={seq_len}; set '
                      f'--config.data.seq_len={meta["seq_len"]} or re-run python -m data.tokenize '
                      f'with --seq_len={seq_len}.')
    if split not in meta['splits'] or meta['splits'][split]['records'] == 0:
      raise DataError(f'data.path={directory!r} has no {split} records; re-run '
                      'python -m data.tokenize with more data or a larger --val_fraction.')
    info = meta['splits'][split]
    self.seq_len = seq_len
    self._dtype = np.dtype(meta['dtype'])
    self._source = grain.sources.ArrayRecordDataSource(
        [os.path.join(directory, name) for name in info['shards']])
    if len(self._source) != info['records']:
      raise DataError(f'The {split} shards in {directory!r} hold {len(self._source)} records, '
                      f'but {META_FILE} says {info["records"]}; the directory is damaged or '
                      'incomplete. Re-run python -m data.tokenize.')

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    values = np.frombuffer(self._source[int(i)], dtype=self._dtype).astype(np.int64)
    tokens_W, inner_starts = values[:self.seq_len + 1], values[self.seq_len + 1:]
    # The window as a one-window stream whose first document starts at 0: the
    # LM pipeline's own definition of an example gives the same row.
    return TokenWindows(tokens_W, np.concatenate([[0], inner_starts]),
                                    self.seq_len)[0]


def adopt_tokenizer(directory: str, workdir: str) -> tokenizers.Tokenizer:
  """The tokenizer the shards in `directory` were made with, cached into `workdir`.

  With data.source=arrayrecord the shards fix the tokenizer, so data.tokenizer
  is not used: the shards' tokenizer is copied into WORKDIR/tokenizer (the
  cache that resuming and `python -m train.sample` read). A workdir that
  already holds a different tokenizer is an error.
  """
  source = epath.Path(directory) / 'tokenizer'
  target = epath.Path(workdir) / 'tokenizer'
  names = sorted(p.name for p in source.iterdir() if not p.name.startswith('.')) \
      if source.is_dir() else []
  if tokenizers.META_FILE not in names:
    raise DataError(f'data.path={directory!r} has no tokenizer/{tokenizers.META_FILE}; make '
                    'the shards with python -m data.tokenize.')
  if (target / tokenizers.META_FILE).exists():
    same = all((target / n).exists() and (target / n).read_bytes() == (source / n).read_bytes()
               for n in names)
    if not same:
      raise DataError(f'The workdir {workdir} holds a tokenizer other than the one of the shards '
                      f'in data.path={directory!r}; use a new --workdir for these shards.')
  else:
    # tokenizer.json last: its presence marks the cache as whole (data/tokenizers.py).
    for name in sorted(names, key=lambda n: n == tokenizers.META_FILE):
      storage.write_atomic(target / name, (source / name).read_bytes())
  return tokenizers.load_tokenizer(workdir)
