"""The shipped evaluation tasks, lm-eval's `kiln` model class, and tasks during training.

Oracles: the documents against the files and splits they come from (the stdlib modules
data/sources.py holds out, the last 10% of tiny Shakespeare, Python's own docstrings); the
scores against closed forms (bits per byte from the model's NLL summed by hand over
lm-eval's own rolling windows), against a model whose answers are known (exact match,
sacrebleu's BLEU and rouge-score's ROUGE of those answers), and against lm-eval itself
running the same YAML files (`--model kiln`, the class in evals/lm_eval_model.py). One
one-step training run with `eval.tasks` is checked several ways.
"""

import ast
import math
import pathlib

import jax
import numpy as np
import pytest

from configs import lm
from data import sources
from data.errors import ConfigError
from evals.tasks import shipped_data

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / 'evals' / 'tasks'
SHIPPED = ('stdlib_ppl', 'stdlib_completion', 'stdlib_docstring', 'shakespeare_bpb')


@pytest.fixture(autouse=True)
def offline(monkeypatch):
  """lm-eval must never reach the Hugging Face hub (it would retry for a minute)."""
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')


# --- the documents ---------------------------------------------------------------------


def _stdlib_text(module: str) -> str:
  return (pathlib.Path(sources.stdlib_root()) / module).read_text(encoding='utf-8')


def test_stdlib_ppl_reads_heads_of_held_out_modules():
  docs = shipped_data.stdlib_ppl(max_docs=5, max_chars=300, version=1.0, workdir='x')['test']
  assert len(docs) == 5 and len({d['module'] for d in docs}) == 5
  for doc in docs:
    assert sources.held_out(doc['module'], lm.base().data.val_fraction)
    whole = _stdlib_text(doc['module'])
    assert whole.startswith(doc['text']) and 0 < len(doc['text']) <= 300
    assert doc['text'] == whole or doc['text'].endswith('\n')  # cut at a line end
  assert docs.features.keys() == {'text', 'module'}  # what lm-eval reads of a Dataset


def test_completion_and_docstring_docs_are_held_out_functions():
  completion = shipped_data.stdlib_completion(max_docs=8)['test']
  docstring = shipped_data.stdlib_docstring(max_docs=8)['test']
  for doc in completion:
    assert sources.held_out(doc['module'], 0.1) and not doc['module'].startswith('test/')
    assert doc['context'].lstrip().startswith(('def ', 'async def '))
    assert doc['target'] and doc['target'] == doc['target'].strip()
    assert doc['target'] in _stdlib_text(doc['module'])
  for doc in docstring:
    # Python's own reading of the function's docstring: parse the module, find the function.
    tree = ast.parse(_stdlib_text(doc['module']))
    docs = {ast.get_docstring(n) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == doc['name']}
    assert doc['target'] in {' '.join(d.split('\n\n')[0].split()) for d in docs if d}
    assert '"""' not in doc['code'] or doc['target'] not in doc['code']
    assert len(doc['code']) <= 1500
  # a fixed order: the same documents on every call
  assert shipped_data.stdlib_completion(max_docs=8)['test'] == completion


def test_shakespeare_docs_are_the_trainers_validation_split(tmp_path):
  text = ''.join(f'SPEAKER {i}:\nLine {i} of the play.\n\n' for i in range(400))
  path = tmp_path / 'play.txt'
  path.write_text(text)
  docs = shipped_data.shakespeare_bpb(shakespeare_path=str(path), chunk_chars=200)['test']
  assert ''.join(d['text'] for d in docs) == text[int(len(text) * 0.9):]  # nanoGPT's split
  assert all(len(d['text']) >= 200 for d in docs[:-1]) and len(docs) > 3
  # by default the file README.md's nanogpt_cpu command trains on
  assert shipped_data.SHAKESPEARE == REPO.parent / 'shared' / 'data' / 'tinyshakespeare.txt'
  with pytest.raises(ValueError, match='does not exist'):
    shipped_data.shakespeare_bpb(shakespeare_path=str(tmp_path / 'missing.txt'))


# --- scores of answers known in advance -------------------------------------------------


class KnownAnswers:
  """A model whose answers are fixed in advance: `generate_until` returns `answers[context]`
  (a KeyError if a harness renders a prompt differently), and every text's rolling
  log-likelihood is -ln 2 per UTF-8 byte, so bits per byte is exactly 1."""

  def __init__(self, answers: dict[str, str]):
    self.answers = answers

  def generate_until(self, requests):
    return [self.answers[context] for context, _ in requests]

  def loglikelihood_rolling(self, texts):
    return [-math.log(2.0) * len(t.encode('utf-8')) for t in texts]

  def loglikelihood(self, requests):
    raise AssertionError('no shipped task asks for loglikelihood')

  def model_info(self) -> dict:
    return {'source': 'known answers'}


def _lm_eval(model, tasks, limit, **kwargs):
  """lm-eval's own evaluation of the shipped YAML files."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
  out = lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, bootstrap_iters=0,
                                task_manager=manager, **kwargs)
  return {task: {k.split(',')[0]: v for k, v in metrics.items()}
          for task, metrics in out['results'].items()}


def _ours(model, tasks, limit):
  from evals import runner
  return runner.evaluate(model, tasks, limit=limit, bootstrap_iters=0)['results']


@pytest.fixture(scope='module')
def known():
  """Answers to the first six completion and docstring documents, with their expected
  scores: exact match ignores surrounding whitespace (2 of 6 right); BLEU and ROUGE of
  three exact and three wrong docstrings, from sacrebleu and rouge-score directly."""
  import sacrebleu
  from rouge_score import rouge_scorer

  answers, expected = {}, {}
  completion = shipped_data.stdlib_completion(max_docs=6)['test']
  for i, doc in enumerate(completion):
    answers[doc['context']] = [f"  {doc['target']} \t", doc['target'] + ';', ''][i % 3]
  expected['stdlib_completion'] = {'exact_match': 2 / 6}
  refs, preds = [], []
  for i, doc in enumerate(shipped_data.stdlib_docstring(max_docs=6)['test']):
    pred = doc['target'] if i % 2 else 'Return the value of the thing.'
    answers[f"{doc['code']}\n# The docstring of {doc['name']}:\n\"\"\""] = pred
    refs.append(doc['target'])
    preds.append(pred)
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True)
  rouge = [scorer.score(r, p) for r, p in zip(refs, preds, strict=True)]
  expected['stdlib_docstring'] = {
      'bleu': sacrebleu.corpus_bleu(preds, [refs]).score,
      **{k: float(np.mean([s[k].fmeasure for s in rouge])) for k in ('rouge1', 'rouge2', 'rougeL')}}
  expected['stdlib_ppl'] = {'bits_per_byte': 1.0, 'byte_perplexity': 2.0}
  expected['shakespeare_bpb'] = {'bits_per_byte': 1.0, 'byte_perplexity': 2.0}
  return KnownAnswers(answers), expected


@pytest.mark.parametrize('harness', ['kiln', 'lm-eval'])
def test_shipped_tasks_score_known_answers(known, harness):
  model, expected = known
  if harness == 'lm-eval':
    from evals.lm_eval_model import KilnLMEval
    results = _lm_eval(KilnLMEval(backend=model), list(expected), limit=6)
  else:
    results = _ours(model, list(expected), limit=6)
  for task, metrics in expected.items():
    for metric, value in metrics.items():
      assert results[task][metric] == pytest.approx(value, rel=1e-9, abs=1e-12), (task, metric)


# --- one training run with eval.tasks, checked several ways -----------------------------

LIMIT = 3


def _run_config(corpus: pathlib.Path, **overrides):
  """A byte-level LM of two small layers, one step, evaluated once with stdlib_ppl (a
  generation task would add the engine's compile to the run; the parity test below runs one)."""
  c = lm.get_config('tiny')
  c.unlock()
  c.update(steps=1, batch_size=8, log_every=1, eval_every=1, eval_steps=1)
  c.checkpoint.update(every=1000, async_save=False)
  c.data.update(source='text', path=str(corpus), seq_len=64)
  c.data.tokenizer.update(kind='byte')
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, dtype='float32')
  c.optimizer.update(warmup_steps=1)
  c.sample.max_new_tokens = 4
  c.eval.update(tasks=' stdlib_ppl ', task_limit=LIMIT)
  c.update_from_flattened_dict(overrides)
  c.lock()
  return c


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp('corpus') / 'input.txt'
  path.write_text(_stdlib_text('textwrap.py')[:20_000])
  return path


@pytest.fixture(scope='module')
def run(corpus, tmp_path_factory):
  from train import trainer
  workdir = tmp_path_factory.mktemp('run')
  return workdir, trainer.train_and_evaluate(_run_config(corpus), str(workdir)).eval


@pytest.fixture(scope='module')
def stdlib_ppl_oracle(run) -> float:
  """stdlib_ppl's bits per byte on the run's checkpoint by hand: lm-eval's own rolling
  windows (lm_eval.utils) over the first LIMIT documents, each window's log-probabilities
  from `decode.score`, summed and divided by the documents' UTF-8 bytes and ln 2."""
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

  from model import decode
  from serve.engine import load_model
  m = load_model(str(run[0]))
  max_len = int(m.config.data.seq_len)
  texts = [d['text'] for d in shipped_data.stdlib_ppl()['test'][:LIMIT]]
  rows = []
  for text in texts:
    windows = get_rolling_token_windows(token_list=m.tokenizer.encode(text),
                                        prefix_token=m.tokenizer.bos_id,
                                        max_seq_len=max_len, context_len=1)
    for context, continuation in map(make_disjoint_window, windows):
      rows.append(((context + continuation)[-(max_len + 1):], len(continuation)))
  tokens = np.zeros((len(rows), max_len + 1), np.int32)
  for i, (seq, _) in enumerate(rows):
    tokens[i, :len(seq)] = seq
  lengths = np.asarray([len(seq) for seq, _ in rows], np.int32)
  lp, _, _ = jax.jit(decode.score, static_argnums=(0, 4, 5))(
      m.graphdef, m.params, tokens, lengths, 0, m.tokenizer.vocab_size)
  lp = np.asarray(lp, np.float64)
  total = sum(lp[i, len(seq) - n:len(seq)].sum() for i, (seq, n) in enumerate(rows))
  return -total / math.log(2.0) / sum(len(t.encode('utf-8')) for t in texts)


def test_training_logs_the_eval_tasks(run, stdlib_ppl_oracle):
  from test_run import scalars
  workdir, final = run
  assert final['eval/stdlib_ppl/bits_per_byte'] == pytest.approx(stdlib_ppl_oracle, rel=1e-5)
  assert final['eval/stdlib_ppl/byte_perplexity'] == pytest.approx(
      2.0 ** stdlib_ppl_oracle, rel=1e-5)
  assert not any(k.endswith('_stderr') for k in final)
  # written with the other eval scalars, at the step they were made
  for tag in ('eval/loss', 'eval/stdlib_ppl/bits_per_byte', 'eval/stdlib_ppl/word_perplexity'):
    assert scalars(workdir, tag) == {1: pytest.approx(final[tag], rel=1e-6)}


def test_lm_eval_kiln_model_matches_the_harness(run, stdlib_ppl_oracle):
  """lm-eval with its registered `kiln` model class (made from `workdir=DIR` as its CLI makes
  it) and Kiln's harness on that model agree metric by metric, and with the in-training
  numbers."""
  from lm_eval.api.registry import get_model

  import evals.lm_eval_model  # noqa: F401  (registers 'kiln')
  workdir, final = run
  model = get_model('kiln').create_from_arg_string(f'workdir={workdir}', {'batch_size': 8})
  tasks = ['stdlib_ppl', 'stdlib_completion']
  theirs = _lm_eval(model, tasks, LIMIT)
  ours = _ours(model.backend, tasks, LIMIT)
  for task, metric in (('stdlib_ppl', 'bits_per_byte'), ('stdlib_ppl', 'word_perplexity'),
                       ('stdlib_completion', 'exact_match')):
    assert ours[task][metric] == pytest.approx(theirs[task][metric], rel=1e-6), (task, metric)
  for metric in ('bits_per_byte', 'word_perplexity'):
    assert final[f'eval/stdlib_ppl/{metric}'] == pytest.approx(ours['stdlib_ppl'][metric], rel=1e-5)
  assert ours['stdlib_ppl']['bits_per_byte'] == pytest.approx(stdlib_ppl_oracle, rel=1e-5)


def test_bad_eval_tasks_fail_before_compiling(corpus):
  from train.tasks.lm import LMTask
  with pytest.raises(ConfigError, match=r"eval.tasks: unknown task 'no_such_task'.*stdlib_ppl"):
    LMTask(_run_config(corpus, **{'eval.tasks': 'stdlib_ppl,no_such_task'}))
  with pytest.raises(ConfigError, match='eval.task_limit=-1'):
    LMTask(_run_config(corpus, **{'eval.task_limit': -1}))
  # Every LM-family task checks them the same way; a reward model has no text to evaluate.
  from configs import grpo, reward
  from train.tasks import get_task
  config = grpo.get_config('')
  config.eval.tasks = 'no_such_task'
  with pytest.raises(ConfigError, match=r"eval.tasks: unknown task 'no_such_task'"):
    get_task(config)
  config = reward.get_config('')
  config.eval.tasks = 'stdlib_ppl'
  with pytest.raises(ConfigError, match=r"a 'reward' run makes no text"):
    get_task(config)
