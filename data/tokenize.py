"""Tokenizes curated text into packed ArrayRecord shards for LM training.

  python -m data.tokenize --input=CURATED_DIR --output=TOKENS_DIR [--seq_len=1024]
  python -m train --config=configs/lm.py --workdir=RUN \\
      --config.data.source=arrayrecord --config.data.path=TOKENS_DIR --config.data.seq_len=1024

--input is the output directory of `python -m data.curate` (its docs-*.jsonl)
or any glob of jsonl files with a "text" field. Documents are split into
train and validation by a hash of their text (`--val_fraction`), as the jsonl
source of the LM loader splits them. A SentencePiece tokenizer is trained on
the train split and saved in TOKENS_DIR/tokenizer in the layout of a run's
tokenizer cache; the LM loader copies it into the run's workdir. The token
streams and windows are the LM pipeline's own (data/lm_pipeline.py), written
as records by data/packed.py.
"""

import glob
import json
import os
import shutil
import tempfile

import ml_collections
import numpy as np
from absl import app, flags, logging
from array_record.python.array_record_module import ArrayRecordWriter

from data import cli, lm_pipeline, packed, sources, storage, tokenizers
from data.errors import ConfigError, DataError, exit_on_user_error

# One record per chunk: the loader reads records at random, and a chunk is read whole.
_WRITER_OPTIONS = 'group_size:1'


def tokenize(input_glob: str, output_dir: str, *, seq_len: int, tokenizer_cfg:
             ml_collections.ConfigDict, val_fraction: float, num_shards: int,
             text_field: str = 'text') -> dict:
  """Writes tokenizer/, the shards of both splits and meta.json; returns the meta."""
  # A byte or char tokenizer config has no vocab_size or train_chars to check.
  check_counts(seq_len=seq_len, vocab_size=tokenizer_cfg.get('vocab_size', 1),
               num_shards=num_shards, train_chars=tokenizer_cfg.get('train_chars', 1),
               val_fraction=val_fraction)
  if os.path.exists(os.path.join(output_dir, packed.META_FILE)):
    raise DataError(f'--output={output_dir} already holds packed shards; give a new '
                    'directory, or pass --overwrite.')
  data_cfg = ml_collections.ConfigDict(dict(
      source='jsonl', path=input_glob, name='', data_dir='', text_field=text_field,
      val_fraction=val_fraction))
  try:
    tokenizer = tokenizers.load_or_train_tokenizer(
        tokenizer_cfg, lambda: sources.read_documents(data_cfg, 'train'), output_dir)
  except DataError as e:  # named as the training config names it; here it is a flag
    raise DataError(str(e).replace('data.tokenizer.vocab_size', '--vocab_size')) from None
  dtype = np.uint16 if max(tokenizer.vocab_size, seq_len) <= 2**16 else np.int32
  meta = {'format': packed.FORMAT_VERSION, 'seq_len': seq_len, 'dtype': np.dtype(dtype).name,
          'vocab_size': tokenizer.vocab_size, 'input': input_glob, 'splits': {}}
  stream_dir = tempfile.mkdtemp(prefix='.streams-', dir=output_dir)
  try:
    for split in sources.SPLITS:
      tokens, doc_starts = lm_pipeline.token_stream(data_cfg, split, tokenizer, stream_dir)
      meta['splits'][split] = _write_split(output_dir, split, tokens, doc_starts, seq_len, dtype,
                                           num_shards)
      del tokens  # the memory map, before its file goes
  finally:
    shutil.rmtree(stream_dir, ignore_errors=True)
  storage.write_atomic(os.path.join(output_dir, packed.META_FILE),
                          json.dumps(meta, indent=1).encode())
  return meta


def _write_split(output_dir: str, split: str, tokens: np.ndarray, doc_starts: np.ndarray,
                 seq_len: int, dtype, num_shards: int) -> dict:
  """Writes the windows of one token stream as consecutive records over the shards."""
  n = max(len(tokens) - 1, 0) // seq_len
  num_shards = max(1, min(num_shards, n))
  paths = packed.shard_paths(output_dir, split, num_shards)
  bounds = np.linspace(0, n, num_shards + 1).astype(np.int64)
  for path, lo, hi in zip(paths, bounds[:-1], bounds[1:], strict=True):
    writer = ArrayRecordWriter(path, _WRITER_OPTIONS)
    for i in range(lo, hi):
      start = i * seq_len
      window_W = np.asarray(tokens[start:start + seq_len + 1])
      writer.write(packed.encode_record(window_W, doc_starts, start, seq_len, dtype))
    writer.close()
  logging.info('%s: %d records of %d tokens in %d shards.', split, n, seq_len + 1, num_shards)
  return {'records': int(n), 'tokens': int(len(tokens)), 'documents': int(len(doc_starts)),
          'shards': [os.path.basename(p) for p in paths]}


def input_glob(path: str) -> str:
  """A data.curate output directory means its shards; anything else is a glob already."""
  if os.path.isdir(path):
    return os.path.join(path, 'docs-*.jsonl')
  return path


def check_counts(*, seq_len: int, vocab_size: int, num_shards: int, train_chars: int,
                 val_fraction: float) -> None:
  for flag, value in (('--seq_len', seq_len), ('--vocab_size', vocab_size),
                      ('--num_shards', num_shards), ('--train_chars', train_chars)):
    if value < 1:
      raise ConfigError(f'{flag}={value} must be >= 1.')
  if not 0.0 < val_fraction < 1.0:
    raise ConfigError(f'--val_fraction={val_fraction} must be in (0, 1), e.g. 0.01.')


def check_args(f) -> None:
  """The flags, before any work: the numbers, an input that matches files, and an
  --output that is a directory holding nothing unless --overwrite (which deletes
  the shards, meta.json and tokenizer of an earlier run there, and nothing else)."""
  if not f.input or not f.output:
    raise ConfigError('--input and --output are required, e.g. python -m data.tokenize '
                      '--input=CURATED_DIR --output=TOKENS_DIR.')
  check_counts(seq_len=f.seq_len, vocab_size=f.vocab_size, num_shards=f.num_shards,
               train_chars=f.train_chars, val_fraction=f.val_fraction)
  pattern = input_glob(f.input)
  if '://' not in pattern and not glob.glob(pattern):
    raise DataError(f'--input={f.input} matches no files; give a data.curate output directory '
                    'or a glob of jsonl files.')
  cli.check_new_output_dir(f.output, '--output', overwrite=f.overwrite,
                           owned=(packed.META_FILE, 'tokenizer', '*.array_record', '.streams-*'))


def main(argv):
  f = flags.FLAGS
  tokenizer_cfg = ml_collections.ConfigDict(dict(
      kind='sentencepiece', vocab_size=f.vocab_size, model_type=f.model_type,
      train_chars=f.train_chars))

  def run():
    if len(argv) > 1:
      raise ConfigError(f'Unexpected arguments {argv[1:]}; every argument is a --flag.')
    check_args(f)
    meta = tokenize(input_glob(f.input), f.output, seq_len=f.seq_len, tokenizer_cfg=tokenizer_cfg,
                    val_fraction=f.val_fraction, num_shards=f.num_shards,
                    text_field=f.text_field)
    for split, info in meta['splits'].items():
      print(f'{split}: {info["documents"]:,} documents, {info["tokens"]:,} tokens, '
            f'{info["records"]:,} records of seq_len {meta["seq_len"]} in '
            f'{len(info["shards"])} shards')
    print(f'Train with: python -m train --config=configs/lm.py --workdir=RUN '
          f'--config.data.source=arrayrecord --config.data.path={f.output} '
          f'--config.data.seq_len={meta["seq_len"]}')

  exit_on_user_error(run)


def _define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program, so that
  importing its functions never clashes with another program's flags."""
  flags.DEFINE_string('input', None, 'A data.curate output directory, or a jsonl glob.')
  flags.DEFINE_string('output', None, 'Directory for the shards, meta.json, tokenizer/.')
  flags.DEFINE_integer('seq_len', 1024, 'Tokens per training example (data.seq_len).')
  flags.DEFINE_integer('vocab_size', 32000, 'SentencePiece vocabulary size.')
  flags.DEFINE_enum('model_type', 'bpe', ['bpe', 'unigram'], 'SentencePiece model.')
  flags.DEFINE_integer('train_chars', 20_000_000, 'At most this much text trains the tokenizer.')
  flags.DEFINE_float('val_fraction', 0.01, 'Share of documents held out.')
  flags.DEFINE_integer('num_shards', 8, 'Shards per split (fewer if too few records).')
  flags.DEFINE_string('text_field', 'text', 'The jsonl field with the text.')
  flags.DEFINE_bool('overwrite', False, 'Replace the shards of an earlier run in --output (else '
                    'a non-empty --output is refused).')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
