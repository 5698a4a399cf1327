"""The LM input pipeline: documents -> one token stream -> packed windows -> batches.

Each split's documents are tokenized once into one flat stream (each document
prefixed by BOS when the tokenizer has one) and cached as .npy under
`{workdir}/data/<hash of data and tokenizer>/`, so reruns skip tokenizing. A
local cache is memory-mapped; one under a URL workdir (gs://) is built in a
local temporary directory, copied up, and read back whole into memory.

Example i is the window stream[i*L : i*L + L + 1] (stride L, no overlap), with
documents packed back to back (data/windows.py).

The order of training examples is global: one shuffle of the window indices
per epoch, truncated to whole global batches, repeated forever. Process p of
P takes global elements p, p+P, p+2P, ..., so the P processes' i-th batches
together are exactly the i-th global batch, whatever P is.
"""

import dataclasses
import hashlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator

import grain
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from data import packed, sources, storage, tokenizers
from data.errors import DataError
from data.windows import TokenWindows

Batch = dict[str, np.ndarray]
# Documents per call to the tokenizer: big enough to use its threads, small
# enough that the python lists of ids stay a few hundred MB at most.
_ENCODE_CHUNK_CHARS = 8_000_000
# Window indices of the synthetic source (the shuffle works on 32-bit indices).
_SYNTHETIC_WINDOWS = 2**24
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


@dataclasses.dataclass
class LMData:
  tokenizer: tokenizers.Tokenizer
  train: grain.DatasetIterator  # checkpointable: get_state() / set_state()
  # Each call: a fresh pass over this process's share of the first eval_steps batches.
  eval_batches: Callable[[], Iterator[Batch]]


def build_lm_data(data_cfg: ml_collections.ConfigDict, *, seed: int, global_batch_size: int,
                  eval_steps: int, workdir: str, process_index: int,
                  process_count: int) -> LMData:
  """Builds the tokenizer, this process's train iterator and its eval batches.

  Every batch is a dict of int32 arrays [b, L], b = global_batch_size //
  process_count, L = data_cfg.seq_len: inputs, targets, segment_ids, positions.

  Raises:
    DataError: bad data (see `sources`), or too little of it for one global batch.
  """
  if global_batch_size % process_count:
    raise DataError(f'batch_size={global_batch_size} must divide evenly over '
                    f'{process_count} processes.')
  seq_len = data_cfg.seq_len
  if data_cfg.source == 'synthetic':
    tokenizer = tokenizers.load_or_train_tokenizer(
        ml_collections.ConfigDict({'kind': 'byte'}), lambda: (), workdir)
    train = SyntheticWindows(tokenizer.vocab_size, seq_len, seed, split=0)
    val = SyntheticWindows(tokenizer.vocab_size, seq_len, seed, split=1)
  elif data_cfg.source == 'arrayrecord':
    # Shards written by `python -m data.tokenize` fix the packing and the tokenizer.
    train = packed.PackedWindows(data_cfg.path, 'train', seq_len)
    val = packed.PackedWindows(data_cfg.path, 'validation', seq_len) if eval_steps > 0 else None
    tokenizer = packed.adopt_tokenizer(data_cfg.path, workdir)
  else:
    tokenizer = tokenizers.load_or_train_tokenizer(
        data_cfg.tokenizer, lambda: sources.read_documents(data_cfg, 'train'), workdir)
    cache_dir = token_cache_dir(data_cfg, workdir)
    train = TokenWindows(*token_stream(data_cfg, 'train', tokenizer, cache_dir), seq_len)
    val = None
    if eval_steps > 0:
      val = TokenWindows(*token_stream(data_cfg, 'validation', tokenizer, cache_dir), seq_len)

  train_iter, eval_batches = iterators(
      train, val, seed=seed, global_batch_size=global_batch_size, eval_steps=eval_steps,
      process_index=process_index, process_count=process_count)
  return LMData(tokenizer=tokenizer, train=train_iter, eval_batches=eval_batches)


def iterators(train, val, *, seed: int, global_batch_size: int, eval_steps: int,
              process_index: int, process_count: int):
  """(this process's checkpointable train iterator, a function giving a fresh pass over its
  share of the evaluation batches) over two random-access sequences of examples, as every
  text task's data reads them (LM windows, preference pairs, RL prompts)."""
  shard = dict(global_batch_size=global_batch_size, process_index=process_index,
               process_count=process_count)
  train_ds = train_dataset(train, seed=seed, **shard)
  eval_ds = eval_dataset(val, eval_steps=eval_steps, **shard) if eval_steps > 0 else None
  return (iter(train_ds.to_iter_dataset(_READ_OPTIONS)),
          lambda: iter(eval_ds.to_iter_dataset(_READ_OPTIONS)) if eval_ds else iter(()))


# --- windows -------------------------------------------------------------------


class SyntheticWindows:
  """Uniform random tokens, for throughput benchmarks: window i depends only on (seed, i)."""

  def __init__(self, vocab_size: int, seq_len: int, seed: int, split: int):
    self.vocab_size, self.seq_len, self.key = vocab_size, seq_len, (seed, split)

  def __len__(self) -> int:
    return _SYNTHETIC_WINDOWS

  def __getitem__(self, i: int) -> Batch:
    rng = np.random.default_rng([*self.key, int(i)])
    window_W = rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int32)
    return {
        'inputs': window_W[:-1],
        'targets': window_W[1:],
        'segment_ids': np.ones(self.seq_len, np.int32),
        'positions': np.arange(self.seq_len, dtype=np.int32),
    }


# --- datasets ------------------------------------------------------------------


def train_dataset(windows, *, seed: int, global_batch_size: int, process_index: int,
                  process_count: int) -> grain.MapDataset:
  """This process's infinite, shuffled, batched share of the training windows."""
  n = len(windows)
  per_epoch = n // global_batch_size * global_batch_size
  if per_epoch == 0:
    raise DataError(f'The training split has {n} windows of seq_len+1 tokens, fewer than one '
                    f'global batch (batch_size={global_batch_size}); add data or lower '
                    'batch_size or data.seq_len.')
  # Index e*n + j of `order` is position j of epoch e's permutation; grain seeds
  # each epoch differently, so every epoch is reshuffled.
  order = grain.MapDataset.range(n).shuffle(seed=seed % 2**32)
  window_index = lambda g, _: order[g // per_epoch * n + g % per_epoch]
  ds = grain.MapDataset.range(per_epoch).repeat().map_with_index(window_index)
  return _shard_and_batch(ds, windows, global_batch_size, process_index, process_count)


def eval_dataset(windows, *, eval_steps: int, global_batch_size: int, process_index: int,
                 process_count: int) -> grain.MapDataset:
  """This process's share of the first `eval_steps` global batches, in order."""
  n_batches = min(eval_steps, len(windows) // global_batch_size)
  if n_batches == 0:
    raise DataError(f'The validation split has {len(windows)} windows, fewer than one global '
                    f'batch (batch_size={global_batch_size}); raise data.val_fraction, add data, '
                    'or set eval_steps=0 to skip evaluation.')
  if n_batches < eval_steps:
    logging.warning('The validation split holds %d global batches; evaluating on those instead '
                    'of eval_steps=%d.', n_batches, eval_steps)
  ds = grain.MapDataset.range(n_batches * global_batch_size)
  return _shard_and_batch(ds, windows, global_batch_size, process_index, process_count)


def _shard_and_batch(ds: grain.MapDataset, windows, global_batch_size: int, process_index: int,
                     process_count: int) -> grain.MapDataset:
  ds = ds[process_index::process_count].map(windows.__getitem__)
  return ds.batch(global_batch_size // process_count, drop_remainder=True)


# --- token streams -------------------------------------------------------------


def token_stream(data_cfg: ml_collections.ConfigDict, split: str,
                 tokenizer: tokenizers.Tokenizer,
                 cache_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [N], doc_starts [D]) of `split`, from the cache (built if absent)."""
  cache_dir = epath.Path(cache_dir)
  tokens_path = cache_dir / f'{split}.tokens.npy'
  starts_path = cache_dir / f'{split}.doc_starts.npy'
  if not tokens_path.exists():
    logging.info('Tokenizing the %s split into %s.', split, cache_dir)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    docs = sources.read_documents(data_cfg, split)
    # doc_starts first: tokens.npy existing means both are whole.
    _write_stream(_encode(docs, tokenizer, dtype), tokens_path, starts_path, dtype)
    if getattr(tokenizer, 'unknown_chars', 0):
      logging.warning('Dropped %d characters that are not in the char vocabulary (so far).',
                      tokenizer.unknown_chars)
  if storage.is_remote(cache_dir):  # np.load cannot memory-map a URL
    return (np.load(io.BytesIO(tokens_path.read_bytes())),
            np.load(io.BytesIO(starts_path.read_bytes())))
  return np.load(tokens_path, mmap_mode='r'), np.load(starts_path)


def _encode(docs: Iterable[str], tokenizer: tokenizers.Tokenizer,
            dtype) -> Iterator[list[np.ndarray]]:
  """Yields chunks of encoded documents (BOS first when the tokenizer has one)."""
  bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
  chunk, chars = [], 0
  for doc in docs:
    chunk.append(doc)
    chars += len(doc)
    if chars >= _ENCODE_CHUNK_CHARS:
      yield [np.asarray(bos + ids, dtype) for ids in tokenizer.encode_batch(chunk)]
      chunk, chars = [], 0
  if chunk:
    yield [np.asarray(bos + ids, dtype) for ids in tokenizer.encode_batch(chunk)]


def _write_stream(chunks: Iterator[list[np.ndarray]], tokens_path: epath.Path,
                  starts_path: epath.Path, dtype) -> None:
  """Streams the token arrays to disk, then writes both .npy files atomically."""
  if storage.is_remote(tokens_path):  # build both files locally, then copy them up
    with tempfile.TemporaryDirectory(prefix='kiln-tokens-') as local:
      local_tokens, local_starts = (epath.Path(local) / p.name for p in (tokens_path, starts_path))
      _write_stream(chunks, local_tokens, local_starts, dtype)
      for src, dst in ((local_starts, starts_path), (local_tokens, tokens_path)):  # tokens last
        src.copy(dst, overwrite=True)
    return
  directory = os.path.dirname(tokens_path)
  os.makedirs(directory, exist_ok=True)
  starts, n = [], 0
  with tempfile.TemporaryFile(dir=directory) as raw:
    for docs in chunks:
      for ids in docs:
        if len(ids):  # a document that encodes to nothing is no document
          starts.append(n)
          n += len(ids)
          raw.write(ids.tobytes())
    raw.flush()
    storage.write_atomic(starts_path, _npy_bytes(np.asarray(starts, np.int64)))
    _copy_to_npy(raw, n, dtype, tokens_path)


def _copy_to_npy(raw, n: int, dtype, path: os.PathLike) -> None:
  """Writes the n raw tokens in file `raw` as the .npy `path` (atomically), without loading all."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.tmp-')
  os.close(fd)
  try:
    out = np.lib.format.open_memmap(tmp, mode='w+', dtype=dtype, shape=(n,))
    if n:
      out[:] = np.memmap(raw, dtype=dtype, mode='r', shape=(n,))
    out.flush()
    del out
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def token_cache_dir(data_cfg: ml_collections.ConfigDict, workdir: str) -> epath.Path:
  """`{workdir}/data/<key>`: the key changes with anything that changes the tokens."""
  key = {
      'data': {k: data_cfg[k] for k in ('source', 'path', 'name', 'data_dir', 'text_field',
                                         'val_fraction')},
      'tokenizer': _files_digest(epath.Path(workdir) / 'tokenizer'),
      'inputs': _input_fingerprint(data_cfg),
  }
  blob = json.dumps(key, sort_keys=True).encode()
  directory = epath.Path(workdir) / 'data' / hashlib.sha256(blob).hexdigest()[:16]
  if not (directory / 'key.json').exists():
    storage.write_atomic(directory / 'key.json', blob)  # for people
  return directory


def _files_digest(directory: epath.Path) -> str:
  digest = hashlib.sha256()
  for path in sorted(directory.iterdir(), key=lambda p: p.name):
    if not path.name.startswith('.'):
      digest.update(path.name.encode() + path.read_bytes())
  return digest.hexdigest()


def _input_fingerprint(data_cfg: ml_collections.ConfigDict) -> list:
  """What identifies the input files: their names, sizes and mtimes (or the stdlib's)."""
  if data_cfg.source in ('text', 'jsonl'):
    return [(p, *storage.stamp(p)) for p in sources.expand_path(data_cfg.path)]
  if data_cfg.source == 'stdlib':
    return [sources.stdlib_root(), sys.version]
  return []
