"""Data layer: sources, tokenizers and the packed, process-sharded LM pipeline.

Oracles: two builds against each other (determinism, resume), one process
against two (sharding), the token stream against the batches (packing), and
hand-made files against the promised errors and skip counts.
"""

import collections
import json
import os

import numpy as np
import pytest

from configs import lm
from data import lm_pipeline, sources, tokenizers
from data.errors import DataError
from data.windows import TokenWindows

TEXT = ''.join(
    f'def f{i}(x):\n    return x * {i}  # ünïcode ✓ line {i}\n\n' for i in range(400))


def data_config(**overrides):
  cfg = lm.base().data
  tokenizer = overrides.pop('tokenizer', {})
  cfg.update(overrides)
  cfg.tokenizer.update(tokenizer)
  return cfg


def write(path, content):
  mode = 'wb' if isinstance(content, bytes) else 'w'
  with open(path, mode, **({} if mode == 'wb' else {'encoding': 'utf-8'})) as f:
    f.write(content)
  return str(path)


def build(cfg, workdir, *, seed=0, batch=8, eval_steps=2, process_index=0, process_count=1):
  return lm_pipeline.build_lm_data(
      cfg, seed=seed, global_batch_size=batch, eval_steps=eval_steps, workdir=str(workdir),
      process_index=process_index, process_count=process_count)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def rows(batch):
  """The rows of a batch as hashable tuples (inputs and targets together)."""
  return {tuple(i) + tuple(t) for i, t in zip(batch['inputs'], batch['targets'], strict=True)}


@pytest.fixture
def text_cfg(tmp_path):
  """Two text files, byte tokenizer: no SentencePiece training, so fast."""
  a = write(tmp_path / 'a.txt', TEXT[:9000])
  write(tmp_path / 'b.txt', TEXT[9000:])
  return data_config(source='text', path=a.replace('a.txt', '*.txt'), seq_len=16,
                     tokenizer={'kind': 'byte'})


# --- pipeline: shapes, packing ------------------------------------------------


def test_batches_have_the_promised_shapes_and_dtypes(text_cfg, tmp_path):
  data = build(text_cfg, tmp_path / 'w', batch=8, process_count=2)
  for batch in [next(data.train), next(data.eval_batches())]:
    assert sorted(batch) == ['inputs', 'positions', 'segment_ids', 'targets']
    for array in batch.values():
      assert array.shape == (4, 16) and array.dtype == np.int32


def test_windows_shift_by_one_and_mark_documents():
  # Documents at offsets 0, 5 and 7 of a 12-token stream; L=4, so windows start at 0, 4, 8.
  tokens = np.arange(100, 112, dtype=np.uint16)
  windows = TokenWindows(tokens, np.array([0, 5, 7]), seq_len=4)
  assert len(windows) == 2  # (12 - 1) // 4
  w0, w1 = windows[0], windows[1]
  np.testing.assert_array_equal(w0['inputs'], [100, 101, 102, 103])
  np.testing.assert_array_equal(w0['targets'], [101, 102, 103, 104])
  np.testing.assert_array_equal(w1['inputs'], [104, 105, 106, 107])
  np.testing.assert_array_equal(w1['targets'], [105, 106, 107, 108])
  # Offset 4 ends document 1 (the row starts mid-document, so position 0), 5-6 are
  # document 2 and 7 starts document 3.
  np.testing.assert_array_equal(w1['segment_ids'], [1, 2, 2, 3])
  np.testing.assert_array_equal(w1['positions'], [0, 0, 1, 0])
  np.testing.assert_array_equal(w0['segment_ids'], [1, 1, 1, 1])
  np.testing.assert_array_equal(w0['positions'], [0, 1, 2, 3])


def test_pipeline_packs_the_bos_prefixed_stream(tmp_path):
  docs = ['first document\n', 'second\n', 'the third is a longer one, 0123456789.']
  path = write(tmp_path / 'd.jsonl', ''.join(json.dumps({'text': d}) + '\n' for d in docs))
  # val_fraction tiny so that (for these texts' hashes) every document trains.
  cfg = data_config(source='jsonl', path=path, val_fraction=0.001, seq_len=8,
                    tokenizer={'kind': 'byte'})
  assert list(sources.read_documents(cfg, 'train')) == docs
  data = build(cfg, tmp_path / 'w', batch=1, eval_steps=0)
  tok = data.tokenizer
  stream = [i for d in docs for i in [tok.bos_id] + tok.encode(d)]
  n = (len(stream) - 1) // 8
  seen = {}
  for _ in range(n):
    batch = next(data.train)
    seen[tuple(batch['inputs'][0])] = batch
  assert len(seen) == n  # one epoch: every window once
  for i in range(n):
    batch = seen[tuple(stream[i * 8:i * 8 + 8])]
    np.testing.assert_array_equal(batch['targets'][0], stream[i * 8 + 1:i * 8 + 9])
    starts = batch['inputs'][0] == tok.bos_id
    # A segment (after the first) begins exactly at each BOS, and positions restart there.
    np.testing.assert_array_equal(np.diff(batch['segment_ids'][0]), starts[1:].astype(int))
    assert batch['segment_ids'][0][0] == 1
    np.testing.assert_array_equal(batch['positions'][0][starts], 0)


# --- pipeline: determinism, sharding, resume ----------------------------------


def test_same_seed_same_batches_other_seed_other_batches(text_cfg, tmp_path):
  a = take(build(text_cfg, tmp_path / 'w', seed=3).train, 5)
  b = take(build(text_cfg, tmp_path / 'w2', seed=3).train, 5)
  c = take(build(text_cfg, tmp_path / 'w', seed=4).train, 5)
  for x, y in zip(a, b, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x['inputs'], z['inputs']) for x, z in zip(a, c, strict=True))


class IndexWindows:
  """Windows that are just their index, so the order itself can be checked."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'i': np.int64(i)}


@pytest.mark.parametrize('n', [40, 43])
def test_two_processes_split_each_global_batch(n):
  global_batch, per_epoch = 8, n // 8 * 8
  kw = dict(seed=1, global_batch_size=global_batch)
  one = lm_pipeline.train_dataset(IndexWindows(n), process_index=0, process_count=1, **kw)
  two = [lm_pipeline.train_dataset(IndexWindows(n), process_index=p, process_count=2, **kw)
         for p in (0, 1)]
  epochs = []
  for epoch in range(2):
    seen = []
    for step in range(epoch * per_epoch // 8, (epoch + 1) * per_epoch // 8):
      mine = [set(two[p][step]['i'].tolist()) for p in (0, 1)]
      assert not mine[0] & mine[1]
      assert mine[0] | mine[1] == set(one[step]['i'].tolist())
      seen += one[step]['i'].tolist()
    assert len(seen) == len(set(seen)) == per_epoch  # each window at most once an epoch
    if n == per_epoch:
      assert set(seen) == set(range(n))
    epochs.append(seen)
  assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_two_processes_see_the_single_process_global_batches(text_cfg, tmp_path):
  one = build(text_cfg, tmp_path / 'w', process_count=1)
  two = [build(text_cfg, tmp_path / 'w', process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(6):
    parts = [next(d.train) for d in two]
    assert rows(parts[0]) | rows(parts[1]) == rows(next(one.train))
  evals = [list(d.eval_batches()) for d in two]
  for i, batch in enumerate(one.eval_batches()):
    assert rows(evals[0][i]) | rows(evals[1][i]) == rows(batch)


def test_eval_batches_are_a_fresh_deterministic_pass(text_cfg, tmp_path):
  data = build(text_cfg, tmp_path / 'w', eval_steps=3)
  first, second = list(data.eval_batches()), list(data.eval_batches())
  assert len(first) == 3
  for x, y in zip(first, second, strict=True):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])


def test_resume_from_iterator_state(text_cfg, tmp_path):
  data = build(text_cfg, tmp_path / 'w')
  take(data.train, 3)
  state = data.train.get_state()
  expected = take(data.train, 4)
  fresh = build(text_cfg, tmp_path / 'w')
  fresh.train.set_state(state)
  for x, y in zip(expected, take(fresh.train, 4), strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_token_cache_is_reused(text_cfg, tmp_path, monkeypatch):
  first = next(build(text_cfg, tmp_path / 'w').train)

  def fail(*args, **kwargs):
    raise AssertionError('read the documents again instead of using the cache')

  monkeypatch.setattr(sources, 'read_documents', fail)
  np.testing.assert_array_equal(next(build(text_cfg, tmp_path / 'w').train)['inputs'],
                                first['inputs'])


def test_synthetic_source_needs_no_files(tmp_path):
  cfg = data_config(source='synthetic', seq_len=32)
  a, b = build(cfg, tmp_path / 'w'), build(cfg, tmp_path / 'w2')
  x, y = next(a.train), next(b.train)
  np.testing.assert_array_equal(x['inputs'], y['inputs'])
  assert x['inputs'].shape == (8, 32) and x['inputs'].max() < a.tokenizer.vocab_size == 257
  np.testing.assert_array_equal(x['inputs'][:, 1:], x['targets'][:, :-1])
  assert tokenizers.load_tokenizer(str(tmp_path / 'w')).vocab_size == 257
  assert list(build(cfg, tmp_path / 'w', eval_steps=0).eval_batches()) == []


def test_too_little_data_for_one_global_batch(tmp_path):
  cfg = data_config(source='text', path=write(tmp_path / 't.txt', 'x' * 200), seq_len=16,
                    tokenizer={'kind': 'byte'})
  with pytest.raises(DataError, match=r'training split has 11 windows.*batch_size=64'):
    build(cfg, tmp_path / 'w', batch=64)


# --- tokenizers ---------------------------------------------------------------

SPM = {'kind': 'sentencepiece', 'vocab_size': 320, 'model_type': 'bpe'}


def spm_tokenizer(workdir, texts=(TEXT,), **tok):
  cfg = data_config(tokenizer={**SPM, **tok}).tokenizer
  return tokenizers.load_or_train_tokenizer(cfg, lambda: iter(texts), str(workdir))


def test_sentencepiece_round_trips_any_text(tmp_path):
  tok = spm_tokenizer(tmp_path)
  assert tok.vocab_size == 320 and tok.bos_id >= 0
  for text in ['def f(x):\n\n        return  x\t# spaces kept\n', 'ünseen: 漢字 🙂 \x00', '']:
    assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode('return x * 1')) < len('return x * 1')  # it learned merges


def test_sentencepiece_training_is_deterministic(tmp_path):
  spm_tokenizer(tmp_path / 'a')
  spm_tokenizer(tmp_path / 'b')
  model = lambda d: (d / 'tokenizer' / tokenizers.SPM_FILE).read_bytes()
  assert model(tmp_path / 'a') == model(tmp_path / 'b')


def test_tokenizer_cache_is_reused_not_retrained(tmp_path, monkeypatch):
  first = spm_tokenizer(tmp_path)

  def fail(*args, **kwargs):
    raise AssertionError('retrained a cached tokenizer')

  monkeypatch.setattr(tokenizers, 'train_sentencepiece', fail)
  again = spm_tokenizer(tmp_path)
  loaded = tokenizers.load_tokenizer(str(tmp_path))
  assert again.encode(TEXT[:200]) == loaded.encode(TEXT[:200]) == first.encode(TEXT[:200])


def test_tokenizer_cache_with_another_config_is_an_error(tmp_path):
  spm_tokenizer(tmp_path)
  with pytest.raises(DataError, match=r'made with .*vocab_size.*320.*now asks for.*321'):
    spm_tokenizer(tmp_path, vocab_size=321)


def test_training_subset_is_bounded_and_spread():
  docs = [''.join(f'd{d}l{i}\n' for i in range(50)) for d in range(10)]
  lines = list(tokenizers._training_lines(lambda: iter(docs), 1000))
  assert sum(map(len, lines)) <= 1000
  assert any(line.startswith('d0') for line in lines) and any(
      line.startswith('d9') for line in lines)


def test_char_and_byte_tokenizers(tmp_path):
  cfg = data_config(tokenizer={'kind': 'char'}).tokenizer
  char = tokenizers.load_or_train_tokenizer(cfg, lambda: ['hello', ' world'], str(tmp_path))
  assert char.chars == sorted(set('hello world')) and char.bos_id == -1
  assert char.decode(char.encode('low doll')) == 'low doll'
  assert char.decode(char.encode('hello?')) == 'hello'  # '?' is not in the vocabulary
  assert tokenizers.load_tokenizer(str(tmp_path)).chars == char.chars
  byte = tokenizers.ByteTokenizer()
  assert (byte.vocab_size, byte.bos_id) == (257, 256)
  assert byte.decode(byte.encode('ünï 🙂')) == 'ünï 🙂'


def test_load_tokenizer_without_a_cache(tmp_path):
  with pytest.raises(DataError, match='No tokenizer in'):
    tokenizers.load_tokenizer(str(tmp_path))


# --- sources ------------------------------------------------------------------


def test_text_split_is_by_characters_across_files(tmp_path):
  write(tmp_path / 'a.txt', 'a' * 60)
  write(tmp_path / 'b.txt', 'b' * 40)
  cfg = data_config(source='text', path=str(tmp_path / '*.txt'), val_fraction=0.3)
  assert list(sources.read_documents(cfg, 'train')) == ['a' * 60, 'b' * 10]
  assert list(sources.read_documents(cfg, 'validation')) == ['b' * 30]


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
  cases = {
      str(tmp_path / 'nope.txt'): 'does not exist',
      str(tmp_path / '*.nope'): 'No files match',
      write(tmp_path / 'empty.txt', ''): 'holds no text',
      write(tmp_path / 'latin1.txt', 'caf\xe9'.encode('latin-1')): 'latin1.txt .* not UTF-8',
  }
  for path, message in cases.items():
    cfg = data_config(source='text', path=path, tokenizer={'kind': 'byte'})
    with pytest.raises(DataError, match=message):
      build(cfg, tmp_path / 'w')


def test_bad_jsonl_lines_are_counted_and_skipped(tmp_path):
  lines = [
      json.dumps({'text': 'good one'}), '{not json', json.dumps({'body': 'x'}),
      json.dumps({'text': ''}), json.dumps(['a list']), '', json.dumps({'text': 'good two'}),
  ]
  path = write(tmp_path / 'd.jsonl', '\n'.join(lines) + '\n')
  cfg = data_config(source='jsonl', path=path, val_fraction=0.001)
  skipped = collections.Counter()
  assert list(sources.read_documents(cfg, 'train', skipped)) == ['good one', 'good two']
  assert skipped == {'malformed lines': 1, "lines without text_field 'text'": 2,
                     "lines with empty or non-string 'text'": 1}


def test_jsonl_without_any_text_is_an_error(tmp_path):
  cfg = data_config(source='jsonl', path=write(tmp_path / 'd.jsonl', '{"body": "x"}\n'))
  with pytest.raises(DataError, match='gave no train documents'):
    list(sources.read_documents(cfg, 'train'))


def test_stdlib_split_is_by_module_and_deterministic():
  modules = sources.stdlib_modules()
  assert modules == sorted(modules) and len(modules) > 500
  assert 'os.py' in modules and not any('site-packages' in m for m in modules)
  held = [m for m in modules if sources.held_out(m, 0.1)]
  assert 0.05 < len(held) / len(modules) < 0.15
  cfg = data_config(source='stdlib', val_fraction=0.1)
  skipped = collections.Counter()
  validation = list(sources.read_documents(cfg, 'validation', skipped))
  root = sources.stdlib_root()
  held = [m for m in held if os.path.getsize(os.path.join(root, m))]  # empty files are no text
  assert len(validation) + sum(skipped.values()) == len(held)
  with open(os.path.join(root, held[0]), encoding='utf-8') as f:
    assert validation[0] == f.read()


def test_unknown_tfds_dataset_is_a_clear_error(tmp_path):
  cfg = data_config(source='tfds', name='no_such_dataset_kiln', data_dir=str(tmp_path))
  with pytest.raises(DataError, match='no TFDS dataset'):
    list(sources.read_documents(cfg, 'train'))
  cfg = data_config(source='tfds', name='tiny_shakespeare', data_dir=str(tmp_path))
  with pytest.raises(DataError, match='not prepared'):
    list(sources.read_documents(cfg, 'train'))


@pytest.fixture(scope='module')
def toy_tfds_dir(tmp_path_factory):
  """A tiny TFDS dataset prepared as array_record (readable without tensorflow)."""
  import tensorflow_datasets as tfds  # a dependency: a broken install fails here

  class KilnToyText(tfds.core.GeneratorBasedBuilder):  # registers itself by this name
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(5), 'test': self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'text': f'document {i} of {n} ünï'}

  data_dir = str(tmp_path_factory.mktemp('tfds'))
  KilnToyText(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir


def test_tfds_reads_train_and_falls_back_to_test_for_validation(toy_tfds_dir):
  cfg = data_config(source='tfds', name='kiln_toy_text', data_dir=toy_tfds_dir)
  assert sorted(sources.read_documents(cfg, 'train')) == [
      f'document {i} of 5 ünï' for i in range(5)]
  assert sorted(sources.read_documents(cfg, 'validation')) == [
      f'document {i} of 2 ünï' for i in range(2)]
