"""data.tokenize's packed ArrayRecord shards (library and command line), the LM loader's
arrayrecord source, a few training steps on them, and the curation pipeline's perplexity
filter on that run.

Oracles: the records against windows cut by hand from the tokenizer's own
encoding of each document; the command line's output against the library's;
the arrayrecord source against the jsonl source with the same tokenizer (the
same batches, so the same grain pipeline); the
scorer's per-document NLL against the model run on each window alone, without
padding or batching.
"""

import json
import os
import pathlib
import pydoc_data.topics
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import curate, lm
from data import lm_pipeline, packed, sources, tokenizers
from data import tokenize as tokenize_lib
from data.curate import pipeline
from data.errors import ConfigError, DataError
from model import scoring
from train import runs
from train.tasks import lm as lm_task

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQ_LEN = 32
VAL_FRACTION = 0.2


@pytest.fixture(scope='module')
def curated(tmp_path_factory) -> pathlib.Path:
  """A data.curate-style output directory: docs-*.jsonl of {id, text, metadata}."""
  d = tmp_path_factory.mktemp('curated')
  topics = list(pydoc_data.topics.topics.values())[:30]
  for shard in range(2):
    with open(d / f'docs-{shard:05d}-of-00002.jsonl', 'w') as f:
      for i, text in enumerate(topics[shard::2]):
        f.write(json.dumps({'id': f'x:{i}', 'text': text[:6000], 'metadata': {}}) + '\n')
  return d


@pytest.fixture(scope='module')
def tokens(curated, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp('tokens') / 'out'
  tok_cfg = ml_collections.ConfigDict(dict(kind='sentencepiece', vocab_size=600,
                                           model_type='bpe', train_chars=1_000_000))
  tokenize_lib.tokenize(tokenize_lib.input_glob(str(curated)), str(out), seq_len=SEQ_LEN,
                        tokenizer_cfg=tok_cfg, val_fraction=VAL_FRACTION, num_shards=3)
  return out


def documents(curated: pathlib.Path, split: str) -> list[str]:
  texts = []
  for shard in sorted(curated.glob('docs-*.jsonl')):
    for line in shard.read_text().splitlines():
      text = json.loads(line)['text']
      if sources.held_out(text, VAL_FRACTION) == (split == 'validation'):
        texts.append(text)
  return texts


def test_records_are_the_windows_of_the_token_stream(curated, tokens):
  tokenizer = tokenizers.load_tokenizer(str(tokens))
  assert sorted(os.listdir(tokens / 'tokenizer')) == ['spm.model', 'tokenizer.json']
  meta = json.loads((tokens / packed.META_FILE).read_text())
  for split in ('train', 'validation'):
    docs = [[tokenizer.bos_id] + tokenizer.encode(t) for t in documents(curated, split)]
    stream = np.concatenate(docs)
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    windows = packed.PackedWindows(str(tokens), split, SEQ_LEN)
    assert len(windows) == (len(stream) - 1) // SEQ_LEN == meta['splits'][split]['records']
    assert len(meta['splits'][split]['shards']) == 3
    for i in range(len(windows)):
      row, lo = windows[i], i * SEQ_LEN
      np.testing.assert_array_equal(row['inputs'], stream[lo:lo + SEQ_LEN])
      np.testing.assert_array_equal(row['targets'], stream[lo + 1:lo + SEQ_LEN + 1])
      # Segments change exactly where a document starts; positions count from each start.
      offsets = np.arange(lo, lo + SEQ_LEN)
      begins = np.isin(offsets, starts) & (offsets > lo)
      np.testing.assert_array_equal(row['segment_ids'], 1 + np.cumsum(begins))
      last_start = np.maximum.accumulate(np.where(np.isin(offsets, starts), offsets, lo))
      np.testing.assert_array_equal(row['positions'], offsets - last_start)
      assert all(a.dtype == np.int32 for a in row.values())


def test_command_line_writes_what_the_library_writes(curated, tokens, tmp_path):
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'data.tokenize', f'--input={curated}', f'--output={out}',
       f'--seq_len={SEQ_LEN}', '--vocab_size=600', '--model_type=bpe', '--train_chars=1000000',
       f'--val_fraction={VAL_FRACTION}', '--num_shards=3'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  meta = json.loads((tokens / packed.META_FILE).read_text())
  for split, info in meta['splits'].items():
    assert (f'{split}: {info["documents"]:,} documents, {info["tokens"]:,} tokens, '
            f'{info["records"]:,} records of seq_len {SEQ_LEN} in 3 shards') in proc.stdout
  assert f'--config.data.source=arrayrecord --config.data.path={out}' in proc.stdout
  assert (out / 'tokenizer' / 'spm.model').read_bytes() == (
      tokens / 'tokenizer' / 'spm.model').read_bytes()
  for split in ('train', 'validation'):
    ours, theirs = (packed.PackedWindows(str(d), split, SEQ_LEN) for d in (out, tokens))
    assert len(ours) == len(theirs) > 0
    for i in range(len(ours)):
      for key, x in theirs[i].items():
        np.testing.assert_array_equal(ours[i][key], x, err_msg=f'{split} {i} {key}')


def lm_data(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      source='arrayrecord', path='', name='', data_dir='', text_field='text',
      val_fraction=VAL_FRACTION, seq_len=SEQ_LEN,
      tokenizer=dict(kind='sentencepiece', vocab_size=600, model_type='bpe',
                     train_chars=1_000_000)))
  cfg.update(overrides)
  return cfg


def build(cfg, workdir, process_index=0, process_count=1):
  return lm_pipeline.build_lm_data(cfg, seed=3, global_batch_size=8, eval_steps=2,
                                   workdir=str(workdir), process_index=process_index,
                                   process_count=process_count)


def test_arrayrecord_source_gives_the_jsonl_sources_batches(curated, tokens, tmp_path):
  packed_data = build(lm_data(path=str(tokens)), tmp_path / 'a')
  for name in os.listdir(tokens / 'tokenizer'):  # the tokenizer was adopted by the workdir
    assert (tmp_path / 'a' / 'tokenizer' / name).read_bytes() == \
        (tokens / 'tokenizer' / name).read_bytes()
  # The same documents through the jsonl source, with the same tokenizer cached.
  shutil.copytree(tokens / 'tokenizer', tmp_path / 'b' / 'tokenizer')
  jsonl_data = build(lm_data(source='jsonl', path=str(curated / 'docs-*.jsonl')),
                     tmp_path / 'b')
  for _ in range(6):
    a, b = next(packed_data.train), next(jsonl_data.train)
    for key in ('inputs', 'targets', 'segment_ids', 'positions'):
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(packed_data.eval_batches(), jsonl_data.eval_batches(), strict=True):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])
  # Checkpointed iterator state: a restored iterator continues where the first stopped.
  state = packed_data.train.get_state()
  expected = next(packed_data.train)
  resumed = build(lm_data(path=str(tokens)), tmp_path / 'a')
  resumed.train.set_state(state)
  np.testing.assert_array_equal(next(resumed.train)['inputs'], expected['inputs'])
  # Two processes read disjoint halves of each global batch.
  halves = [next(build(lm_data(path=str(tokens)), tmp_path / 'a', p, 2).train) for p in (0, 1)]
  whole = next(build(lm_data(path=str(tokens)), tmp_path / 'a').train)
  assert {tuple(r) for h in halves for r in h['inputs']} == {tuple(r) for r in whole['inputs']}


def test_arrayrecord_errors_are_sentences(tokens, tmp_path):
  with pytest.raises(DataError, match='hold windows of seq_len=32, but data.seq_len=64'):
    build(lm_data(path=str(tokens), seq_len=64), tmp_path / 'w')
  with pytest.raises(DataError, match='has no meta.json'):
    build(lm_data(path=str(tmp_path)), tmp_path / 'w')
  other = tmp_path / 'other' / 'tokenizer'
  other.mkdir(parents=True)
  (other / tokenizers.META_FILE).write_text('{"config": {"kind": "byte"}}')
  with pytest.raises(DataError, match='holds a tokenizer other than the one of the shards'):
    build(lm_data(path=str(tokens)), tmp_path / 'other')
  config = lm.get_config()
  config.data.update(source='arrayrecord', path='')
  with pytest.raises(ConfigError, match="data.source='arrayrecord' needs data.path"):
    lm_task.check_config(config)


@pytest.fixture(scope='module')
def trained_run(tokens, tmp_path_factory) -> pathlib.Path:
  """A few LM training steps on the packed shards, as a user runs them."""
  workdir = tmp_path_factory.mktemp('run')
  cmd = [sys.executable, '-m', 'train', '--config=configs/lm.py', f'--workdir={workdir}',
         '--config.data.source=arrayrecord', f'--config.data.path={tokens}',
         f'--config.data.seq_len={SEQ_LEN}', '--config.model.d_model=64',
         '--config.model.n_layers=2', '--config.model.n_heads=4', '--config.model.n_kv_heads=2',
         '--config.model.dtype=float32', '--config.batch_size=8', '--config.steps=6',
         '--config.eval_every=0', '--config.log_every=1', '--config.checkpoint.every=6',
         '--config.optimizer.warmup_steps=1', '--config.optimizer.lr=1e-2',
         '--config.sample.max_new_tokens=4']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '1'}
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = [float(m) for m in re.findall(r'step \d+/6 \| loss ([\d.]+)', proc.stderr)]
  assert len(losses) == 6 and all(np.isfinite(losses)), proc.stderr[-2000:]
  assert losses[-1] < losses[0]  # it learned something from the shards
  return workdir


def test_scorer_matches_the_model_on_each_window_alone(trained_run):
  task, state, _ = runs.load_latest(str(trained_run))
  score = scoring.load_scorer(str(trained_run))
  texts = ['A short one.', list(pydoc_data.topics.topics.values())[40][:400]]
  got = score(texts)
  windows = []
  for text, value in zip(texts, got, strict=True):
    ids = [task.tokenizer.bos_id] + task.tokenizer.encode(text)
    nll = []
    for start in range(0, len(ids) - 1, SEQ_LEN):  # each window alone: no padding, batch of 1
      window = np.array(ids[start:start + SEQ_LEN + 1], np.int32)[None]
      length = window.shape[1] - 1
      batch = {'inputs': window[:, :-1], 'targets': window[:, 1:],
               'segment_ids': np.ones((1, length), np.int32),
               'positions': np.arange(length, dtype=np.int32)[None]}
      nll.append(np.asarray(task.token_nll(state.params, batch))[0])
    expected = np.concatenate(nll).mean()
    assert len(ids) - 1 == sum(len(n) for n in nll)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    windows.append(len(nll))
  assert windows[0] == 1 and windows[1] >= 3  # one window, and several with a partial last


def test_perplexity_filter_in_the_pipeline(trained_run, tmp_path):
  texts = [list(pydoc_data.topics.topics.values())[41][:600],
           ' '.join(f'qx{i * 7919 % 10007}zv' for i in range(80))]  # gibberish
  nll = scoring.load_scorer(str(trained_run))(texts)
  perplexity = np.exp(nll)
  assert perplexity[1] > perplexity[0]
  path = tmp_path / 'docs.jsonl'
  path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
  config = curate.get_config()
  for name in pipeline.STAGES:
    config[name].enabled = name == 'perplexity'
  config.perplexity.update(workdir=str(trained_run),
                           max_perplexity=float(np.sqrt(perplexity[0] * perplexity[1])))
  options = pipeline.pipeline_options(['--direct_running_mode=in_memory'])
  report = pipeline.run(config, str(path), str(tmp_path / 'out'), options)
  kept = [json.loads(line) for shard in sorted((tmp_path / 'out').glob('docs-*'))
          for line in shard.read_text().splitlines()]
  assert [k['id'] for k in kept] == [f'{path}:1']
  assert kept[0]['metadata']['perplexity'] == pytest.approx(perplexity[0], rel=1e-3)
  assert list(report['stages'][0]['reasons']) == [
      f'perplexity above {config.perplexity.max_perplexity}']


def test_record_layout():
  """A record is the window's L + 1 tokens, then the document starts strictly inside it."""
  stream = np.arange(100)
  record = packed.encode_record(stream[32:65], np.array([0, 40, 50, 64]), 32, 32, np.uint16)
  values = np.frombuffer(record, np.uint16)
  assert values[:33].tolist() == list(range(32, 65)) and values[33:].tolist() == [8, 18]
