"""Encoder-decoder training: T5's span corruption, the seq2seq data and task on the trainer.

Oracles: span corruption's closed forms (T5's counts of noise tokens and spans, the
composition it draws uniformly, T5's published 512 -> 568 / 114 lengths) and its inverse
(inputs and targets merged back by their sentinels give the chunk); a run cut and resumed
against one straight through (bitwise); a 2x2x2 mesh against one device; the task's
BLEU/ROUGE against sacrebleu and rouge-score called here on strings generated here with the
model's `generate`; errors in the user's data and config as one line before compilation.
"""

import collections
import json
import math
import types

import jax
import ml_collections
import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer
from test_run import assert_trees_equal, flat, restore, scalars

from configs import seq2seq as seq2seq_config
from data import seq2seq_data, span_corruption, stdlib_functions, tokenizers
from data.errors import ConfigError, DataError
from model import seq2seq
from train import runs, trainer
from train.tasks.seq2seq import Seq2SeqTask

# --- span corruption: closed forms -------------------------------------------------------


def runs_of(mask: np.ndarray) -> list[tuple[bool, int]]:
  """(value, length) of each run of equal values."""
  out = []
  for x in mask:
    if out and out[-1][0] == x:
      out[-1] = (bool(x), out[-1][1] + 1)
    else:
      out.append((bool(x), 1))
  return out


def test_noise_mask_has_t5s_counts_and_alternates():
  rng = np.random.default_rng(0)
  for length in [2, 3, 7, 20, 99, 141, 300, 568]:
    mask = span_corruption.noise_mask(length, rng)
    # T5: round(L * 0.15) noise tokens (1 <= n <= L - 1), round(n / 3) spans (at least 1).
    # None of these lengths is a rounding tie, so exact arithmetic is T5's float32.
    noise = min(max(round(length * 15 / 100), 1), length - 1)
    spans = max(round(noise / 3), 1)
    assert mask.shape == (length,) and mask.sum() == noise, length
    r = runs_of(mask)
    assert r[0][0] is False  # a non-noise span first, then alternating
    assert [v for v, _ in r] == [False, True] * spans, length
  # T5 counts in float32: 190 * 0.15 is 28.500002 there, so 29 noise tokens, where float64's
  # exact tie 28.5 would round (half to even) to 28.
  assert span_corruption.noise_mask(190, rng).sum() == 29


def test_span_lengths_are_uniform_over_compositions():
  """4 noise tokens in 2 spans: (1,3), (2,2), (3,1) equally likely, as T5's shuffle of span
  starts draws them. 3000 draws: each share within 4.5 standard errors of 1/3."""
  rng = np.random.default_rng(1)
  counts = collections.Counter()
  for _ in range(3000):
    mask = span_corruption.noise_mask(27, rng, noise_density=4 / 27, mean_noise_span_length=2)
    counts[tuple(n for v, n in runs_of(mask) if v)] += 1
  assert set(counts) == {(1, 3), (2, 2), (3, 1)}
  se = math.sqrt(1 / 3 * 2 / 3 / 3000)
  for n in counts.values():
    assert abs(n / 3000 - 1 / 3) < 4.5 * se, counts


def merge_back(inputs, targets, vocab_size: int, eos_id: int) -> list[int]:
  """The chunk, from its corrupted inputs and targets: each sentinel of the inputs replaced
  by what follows the same sentinel in the targets."""
  inputs, targets = list(inputs), list(targets)
  assert inputs[-1] == eos_id and targets[-1] == eos_id
  spans, current = {}, None
  for t in targets[:-1]:
    if t > vocab_size - 101:  # a sentinel (ids count down from the top)
      current = spans.setdefault(t, [])
    else:
      current.append(t)
  out = []
  for t in inputs[:-1]:
    out += spans.pop(t) if t in spans else [t]
  assert not spans  # every span went back in
  return out


def test_corruption_rebuilds_the_chunk_and_is_deterministic():
  vocab, eos = 1000, 1
  for seed, length in [(0, 141), (1, 568), (2, 12), (3, 2)]:
    tokens = np.random.default_rng(seed).integers(2, 800, length)
    mask = span_corruption.noise_mask(length, np.random.default_rng([7, seed]))
    inputs, targets = span_corruption.corrupt(tokens, mask, vocab_size=vocab, eos_id=eos)
    assert merge_back(inputs, targets, vocab, eos) == tokens.tolist()
    spans = sum(v for v, _ in runs_of(mask))
    assert len(inputs) == length - mask.sum() + spans + 1
    assert len(targets) == mask.sum() + spans + 1
    # <extra_id_0>, <extra_id_1>, ... in order: vocab - 1, vocab - 2, ...
    assert [t for t in targets if t >= 800] == list(range(vocab - 1, vocab - 1 - spans, -1))
    # The same seed draws the same mask; another seed another one.
    assert np.array_equal(span_corruption.noise_mask(length, np.random.default_rng([7, seed])),
                          mask)
  a, b = (span_corruption.noise_mask(141, np.random.default_rng(s)) for s in (5, 6))
  assert not np.array_equal(a, b)


def test_chunk_length_is_t5s_random_spans_helper():
  # T5's C4 span corruption: inputs_length 512 -> 568 raw tokens and 114 targets.
  assert span_corruption.chunk_length(512) == (568, 114)
  for input_len in (32, 100, 128, 192, 256, 512):
    raw, target_len = span_corruption.chunk_length(input_len)
    for n, fits in ((raw, True), (raw + 1, False)):
      noise = round(n * 0.15)  # float64, as T5's helper counts
      spans = round(noise / 3)
      assert (n - noise + spans + 1 <= input_len) == fits, (input_len, n)
    mask = span_corruption.noise_mask(raw, np.random.default_rng(input_len))
    inputs, targets = span_corruption.corrupt(np.arange(raw) + 2, mask, vocab_size=5000,
                                              eos_id=1)
    assert (len(inputs), len(targets)) == (input_len, target_len)


# --- tokenizers and data ------------------------------------------------------------------


def test_t5_layout_tokenizers(tmp_path):
  byte = tokenizers.T5ByteTokenizer(extra_ids=5)
  assert (byte.vocab_size, byte.pad_id, byte.eos_id) == (264, 0, 1)
  text = 'é<extra_id_0>x<extra_id_4><extra_id_5>'  # <extra_id_5> is not one: plain text
  ids = byte.encode(text)
  assert ids[:2] == [0xC3 + 3, 0xA9 + 3] and ids[2] == 263 and ids[4] == 259
  assert byte.decode(ids + [1, 0]) == text
  cfg = ml_collections.ConfigDict(dict(kind='sentencepiece', vocab_size=300, model_type='bpe',
                                       train_chars=100_000, extra_ids=8))
  sp = tokenizers.load_or_train_tokenizer(cfg, lambda: [PAIRS_TEXT], str(tmp_path))
  assert sp.vocab_size == 308 and sp.eos_id == 1 and sp.bos_id == -1
  assert [sp._sp.id_to_piece(i) for i in range(3)] == ['<pad>', '</s>', '<unk>']
  assert {sp.special_tokens[f'<extra_id_{i}>'] for i in range(8)} == set(range(300, 308))
  text = 'def f(x):<extra_id_0>\n    return x<extra_id_7>'
  assert sp.decode(sp.encode(text)) == text and 307 in sp.encode(text)
  reloaded = tokenizers.load_tokenizer(str(tmp_path))  # the cache gives the same ids
  assert isinstance(reloaded, tokenizers.T5SentencePieceTokenizer)
  assert reloaded.encode(text) == sp.encode(text)


def test_docstring_examples():
  source = '''
class A:
  @property
  def area(self, x):
    """Return the area
    of the thing.

    Args: more.
    """
    y = x * 2  # code
    return y

def short():
  """Only a docstring."""
'''
  (example,) = stdlib_functions.docstring_examples(source)
  assert example == {'input': 'def area(self, x):\n  y = x * 2  # code\n  return y\n',
                     'target': 'Return the area of the thing.', 'name': 'area'}


def write_pairs(path, n: int = 160):
  """Made-up functions and their one-line docstrings, deterministic."""
  ops = [('add', '+', 'Add {k} to x.'), ('mul', '*', 'Multiply x by {k}.'),
         ('sub', '-', 'Subtract {k} from x.'), ('mod', '%', 'Return x modulo {k}.')]
  with open(path, 'w') as f:
    for i in range(n):
      name, op, doc = ops[i % 4]
      k = i // 4
      f.write(json.dumps({'input': f'def {name}_{k}(x):\n    return x {op} {k}\n',
                          'target': doc.format(k=k)}) + '\n')


PAIRS_TEXT = ''.join(f'def add_{k}(x):\n    return x + {k}\nAdd {k} to x.\n' for k in range(200))


def test_bad_pairs_file_is_one_line(tmp_path):
  path = tmp_path / 'pairs.jsonl'
  write_pairs(path, 4)
  with open(path, 'a') as f:
    f.write('{"input": "x"}\n')
  config = small_config(**{'data.path': str(path)})
  with pytest.raises(DataError, match=rf'^{path}:5: a pair needs string fields \'input\' and '
                                      r"'target'") as e:
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert '\n' not in str(e.value)
  path.write_text('{"input": "x", "target": "y"}\nnot json\n')
  with pytest.raises(DataError, match=rf'^{path}:2: not a JSON object'):
    seq2seq_data.pairs_texts(config.data, 'train')


@pytest.mark.parametrize('overrides, message', [
    ({'objective': 'mlm'}, r"objective='mlm' is not allowed; choose one of span_corruption, "
                           'pairs'),
    ({'data.source': 'text'}, r"data.source='text' is not allowed with objective='pairs'"),
    # data.input_len=32: chunks of 34 tokens, 5 of them noise in 2 spans, 8 targets.
    ({'objective': 'span_corruption', 'data.path': 'x', 'data.tokenizer.extra_ids': 1},
     r'data.tokenizer.extra_ids=1 is fewer than the 2 sentinels a chunk of 34 tokens needs'),
    ({'objective': 'span_corruption', 'data.path': 'x', 'data.target_len': 7},
     r'data.target_len=7 is shorter than the 8 targets'),
    ({'data.path': 'x', 'model.mlp': 'swiglu'}, r"model.mlp='swiglu' is not allowed"),
])
def test_config_errors_before_compiling(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message):
    trainer.train_and_evaluate(small_config(**overrides), str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


# --- the task on the trainer ----------------------------------------------------------------


def small_config(**overrides) -> ml_collections.ConfigDict:
  """The pairs task on a tiny T5 v1.1 (2 + 2 layers of width 32) over made-up pairs, a
  SentencePiece of 360 pieces and 24 sentinels, fp32 so meshes agree tightly."""
  c = seq2seq_config.get_config('docstring')
  c.unlock()
  c.model.update(d_model=32, num_heads=2, head_dim=16, mlp_dim=64, dropout=0.1)
  c.data.update(source='jsonl', path='', input_len=32, target_len=12, val_fraction=0.2)
  c.data.tokenizer.update(vocab_size=360, extra_ids=24, train_chars=100_000)
  c.update(steps=4, batch_size=8, log_every=1, eval_every=0, eval_steps=2)
  c.eval.update(num_generate=12, generate_batch=8)
  c.checkpoint.update(every=1000, async_save=False)
  c.optimizer.update(warmup_steps=1, decay_steps=20, eps=1e-4)
  c.update_from_flattened_dict(overrides)
  c.lock()
  return c


MESH = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}


@pytest.fixture(scope='module')
def pairs_path(tmp_path_factory):
  path = tmp_path_factory.mktemp('pairs') / 'pairs.jsonl'
  write_pairs(path)
  return str(path)


@pytest.fixture(scope='module')
def straight(tmp_path_factory, pairs_path):
  """4 steps on a 2x2x2 mesh, checkpoints at 2 and 4, evaluated (with generation) at 4."""
  workdir = tmp_path_factory.mktemp('straight')
  config = small_config(steps=4, **MESH, **{'checkpoint.every': 2, 'data.path': pairs_path,
                                            'eval_every': 4})
  return workdir, trainer.train_and_evaluate(config, str(workdir))


def test_resume_is_exact(straight, pairs_path, tmp_path):
  straight_dir, result = straight
  overrides = {**MESH, 'checkpoint.every': 2, 'data.path': pairs_path, 'eval_every': 4}
  first = trainer.train_and_evaluate(small_config(steps=2, **overrides), str(tmp_path))
  second = trainer.train_and_evaluate(small_config(steps=4, **overrides), str(tmp_path))
  assert sorted(first.losses) == [1, 2] and sorted(second.losses) == [3, 4]
  assert {**first.losses, **second.losses} == result.losses  # bitwise
  assert_trees_equal(restore(straight_dir, 4), restore(tmp_path, 4))
  assert second.eval == result.eval


def test_meshes_match_one_device(straight, pairs_path, tmp_path):
  straight_dir, result = straight
  config = small_config(**{'data.path': pairs_path})
  task = Seq2SeqTask(config)
  train_iter = task.setup_data(str(tmp_path), 0, 1)
  state = jax.jit(task.init_state)(jax.random.key(config.seed))
  step_fn = jax.jit(lambda s, b: task.train_step(s, b, {}))
  single, grad_norms = {}, {}
  for step in range(1, 5):
    state, metrics = step_fn(state, next(train_iter))
    single[step], grad_norms[step] = float(metrics['loss']), float(metrics['grad_norm'])
  assert sorted(result.losses) == sorted(single)
  for step in single:
    np.testing.assert_allclose(result.losses[step], single[step], rtol=1e-4, err_msg=str(step))
  # A sum instead of a mean over an axis would move the gradient norm 2 to 8 times.
  logged = scalars(straight_dir, 'train/grad_norm')
  for step, want in grad_norms.items():
    np.testing.assert_allclose(logged[step], want, rtol=1e-5, err_msg=str(step))
  saved = flat(restore(straight_dir, 4)['params'])
  for name, x in flat(state.params).items():
    np.testing.assert_allclose(saved[name], x, rtol=0, atol=1e-4, err_msg=name)


def test_eval_scores_are_sacrebleu_and_rouge_score(straight, pairs_path):
  """The task's generation and scores against the model's `generate` and the libraries,
  called here on one device: on the real references, and on references made from the
  predictions."""
  straight_dir, result = straight
  config = runs.load_run_config(str(straight_dir))
  config.unlock()
  config.mesh.update(data=1, fsdp=1, tensor=1)
  task = Seq2SeqTask(config)
  task.setup_data(str(straight_dir), 0, 1)
  params = jax.tree.map(np.asarray, restore(straight_dir, 4)['params'])
  val, refs = task.data.validation, task.data.references
  assert len(refs) == 12
  # The task generates eval.generate_batch = 8 rows at a time (the last chunk padded with
  # rows of one visible pad token): the same shapes here, so the same greedy choices.
  inputs, masks = val.arrays['inputs'][:12], val.arrays['input_mask'][:12]
  pad = np.zeros((4, 32), np.int32), np.zeros((4, 32), bool)
  pad[1][:, 0] = True
  tokens = np.concatenate([np.asarray(seq2seq.generate(
      (task.graphdef, params), x, m, max_new_tokens=12, eos_id=1, vocab_limit=384))
      for x, m in ((inputs[:8], masks[:8]), (np.concatenate([inputs[8:], pad[0]]),
                                             np.concatenate([masks[8:], pad[1]])))])[:12]
  preds = []
  for row in tokens.tolist():
    row = row[:row.index(1)] if 1 in row else row
    preds.append(task.tokenizer.decode(row))
  assert len(set(preds)) > 1 and any(p.strip() for p in preds)

  def direct(refs, preds):
    scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'])
    scores = [scorer.score(r, p) for r, p in zip(refs, preds, strict=True)]
    return {'eval/bleu': sacrebleu.corpus_bleu(preds, [refs]).score,
            **{f'eval/{t}': float(np.mean([s[t].fmeasure for s in scores]))
               for t in ('rouge1', 'rouge2', 'rougeL')}}

  state = types.SimpleNamespace(params=params)
  assert task.eval_summary({}, state) == pytest.approx(direct(refs, preds), abs=1e-9)
  # References sharing words with the predictions (half of each, and a sentence), so that
  # the scores are far from 0.
  shared = [' '.join(p.split()[:max(1, len(p.split()) // 2)]) + ' Add 3 to x.' for p in preds]
  task.data.references = shared
  want = direct(shared, preds)
  assert want['eval/rouge1'] > 0.1 and want['eval/bleu'] > 1.0
  assert task.eval_summary({}, state) == pytest.approx(want, abs=1e-9)
  # The run logged them (on its 2x2x2 mesh, whose greedy choices may differ in near-ties).
  assert set(want) <= set(result.eval) and 'eval/token_accuracy' in result.eval
  # The run's text sample: the first held-out input, and what the model made of it.
  first = task.decode(val.arrays['inputs'][0])
  assert first.startswith('def ') and result.samples['samples/text'].startswith(f'{first}\n--> ')


def test_warm_start_adopts_the_run(straight, pairs_path, tmp_path):
  """init_from: the run's architecture and tokenizer replace this config's, and its newest
  parameters start the state, with a fresh optimizer."""
  straight_dir, _ = straight
  config = small_config(**{'data.path': pairs_path, 'init_from': str(straight_dir),
                           'model.d_model': 64, 'data.tokenizer.vocab_size': 500})
  task = Seq2SeqTask(config)
  assert config.model.d_model == 32 and config.data.tokenizer.vocab_size == 360
  task.setup_data(str(tmp_path), 0, 1)
  assert (tmp_path / 'tokenizer' / 'spm.model').read_bytes() == (
      straight_dir / 'tokenizer' / 'spm.model').read_bytes()
  fresh = jax.jit(task.init_state)(jax.random.key(1))
  warm = task.warm_start(fresh)
  saved = restore(straight_dir, 4)
  assert_trees_equal(jax.tree.map(np.asarray, warm.params), saved['params'])
  assert_trees_equal(jax.tree.map(np.asarray, warm.opt_state),
                     jax.tree.map(np.asarray, fresh.opt_state))
