"""The evaluation harness (evals/): lm-eval parity, metrics against their references, task
file errors and the command line.

Oracles: lm-evaluation-harness itself, running the same YAML tasks through our OpenAI
server (`local-completions`, its remote tokenizer) over the same tiny random model and the
same engine; sacrebleu and rouge-score called directly; closed forms for acc_norm and bits
per byte; lm-eval's own rolling-window functions.
"""

import json
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu
from flax import nnx
from rouge_score import rouge_scorer
from test_server import ServerThread, _tiny_model

from data import chat, tokenizers
from data.errors import ConfigError, DataError
from evals import backend as backend_lib
from evals import metrics, runner, task_config
from serve import engine as engine_lib
from serve import server as server_lib

MAX_SEQ_LEN = 128
BOOTSTRAP = 20  # small: lm-eval's bootstrap, with its seeding, runs the same count

MC_TRAIN = [
    {'question': 'def add(a, b):\n    return a', 'choices': ['+ b', '- b'], 'answer': 0},
    {'question': 'for i in', 'choices': ['range(3):', 'while:', 'if'], 'answer': 0},
    {'question': 'import', 'choices': ['os', 'class'], 'answer': 0},
]
MC_TEST = [
    {'question': 'x = [1, 2', 'choices': [', 3]', ')', 'def'], 'answer': 0},
    {'question': 'print("hi', 'choices': ['")', '"(', ';;'], 'answer': 1},
    {'question': 'class A', 'choices': [':', '(object):', ' = 3'], 'answer': 1},
    {'question': 'while True', 'choices': [':', ' break', '?'], 'answer': 0},
    {'question': 'return', 'choices': [' None', ' x', 'pass'], 'answer': 2},
    {'question': 'if x ==', 'choices': [' 1:', ' None:', ' =='], 'answer': 0},
]
GEN_PROMPTS = ['def f(x):', 'import o', 'x = 1\ny =', 'class Foo', 'for k in', 'print(']
PPL_TEXTS = ['def add(a, b):\n    return a + b\n', 'import os\nimport sys', 'x = [1, 2, 3]',
             'while True:\n    pass']


def _mc_yaml(tmp):
  return f"""task: kiln_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {tmp / 'mc_train.jsonl'}
    test: {tmp / 'mc_test.jsonl'}
training_split: train
test_split: test
fewshot_split: train
output_type: multiple_choice
description: "Complete the code.\\n\\n"
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
num_fewshot: 2
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_mutual_info
"""


def _ll_yaml(tmp):
  return f"""task: kiln_ll
dataset_path: json
dataset_kwargs:
  data_files: {{test: {tmp / 'mc_test.jsonl'}}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
metric_list: [{{metric: perplexity}}, {{metric: acc}}]
"""


def _gen_yaml(tmp):
  return f"""task: kiln_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {tmp / 'gen.jsonl'}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: target
generation_kwargs: {{until: ["\\n"], max_gen_toks: 6, do_sample: false}}
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
  - metric: bleu
  - metric: chrf
"""


def _ppl_yaml(tmp):
  return f"""task: kiln_ppl
dataset_path: json
dataset_kwargs:
  data_files: {{test: {tmp / 'ppl.jsonl'}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list: [{{metric: word_perplexity}}, {{metric: byte_perplexity}}, {{metric: bits_per_byte}}]
"""


def _write_jsonl(path, docs):
  path.write_text(''.join(json.dumps(d) + '\n' for d in docs))


@pytest.fixture(scope='module')
def stack(tmp_path_factory):
  """One tiny model and engine behind both our backend and the OpenAI server, and the
  four tasks written to a temporary directory. Half the generation targets are what the
  model generates (one in upper case), so exact_match is neither 0 nor 1."""
  tmp = tmp_path_factory.mktemp('evals')
  cfg, graphdef, params = _tiny_model()
  tok = tokenizers.ByteTokenizer()
  engine = engine_lib.Engine(graphdef, params, cfg, tok, max_slots=4, page_size=8,
                             max_seq_len=MAX_SEQ_LEN, prefill_chunk=32, max_queue=8)
  engine.start()
  lm = backend_lib.KilnLM(graphdef, params, cfg, tok, batch_size=8, max_seq_len=MAX_SEQ_LEN,
                          engine=engine)
  # With the chat template the server reads '<s>' back as BOS, which lm-eval's remote
  # tokenizer needs for its prefix token (the BOS of an empty context).
  template = chat.ChatTemplate(chat.DEFAULT_TEMPLATE, tok, chat.default_context(tok))
  app = server_lib.create_app(engine, tok, model_name='tiny', chat_template=template,
                              tokenizer_info=server_lib.tokenizer_info(tok, template))
  server = ServerThread(app)
  gen_kwargs = {'until': ['\n'], 'max_gen_toks': 6}
  outputs = lm.generate_until([(p, gen_kwargs) for p in GEN_PROMPTS])
  targets = [outputs[0], outputs[1].upper(), outputs[2], 'no', 'nope', 'never']
  _write_jsonl(tmp / 'gen.jsonl', [{'prompt': p, 'target': t}
                                   for p, t in zip(GEN_PROMPTS, targets, strict=True)])
  _write_jsonl(tmp / 'mc_train.jsonl', MC_TRAIN)
  _write_jsonl(tmp / 'mc_test.jsonl', MC_TEST)
  _write_jsonl(tmp / 'ppl.jsonl', [{'text': t} for t in PPL_TEXTS])
  for name, make in (('kiln_mc', _mc_yaml), ('kiln_ll', _ll_yaml), ('kiln_gen', _gen_yaml),
                     ('kiln_ppl', _ppl_yaml)):
    (tmp / f'{name}.yaml').write_text(make(tmp))
  ours = runner.evaluate(lm, [str(tmp / f'{n}.yaml') for n in
                              ('kiln_mc', 'kiln_ll', 'kiln_gen', 'kiln_ppl')],
                         bootstrap_iters=BOOTSTRAP, log_samples=True)
  yield dict(tmp=tmp, lm=lm, url=server.url, ours=ours, outputs=outputs, tok=tok)
  server.stop()
  engine.shutdown(drain=False)


def test_lm_eval_through_the_server_gives_our_numbers(stack, monkeypatch):
  """lm-eval's evaluator on the same four YAML files through local-completions: every
  metric and standard error equal (few-shot sampling seeded as simple_evaluate seeds it)."""
  from lm_eval.evaluator import evaluate
  from lm_eval.models.openai_completions import LocalCompletionsAPI
  from lm_eval.tasks import TaskManager

  for var in ('HF_DATASETS_OFFLINE', 'HF_HUB_OFFLINE', 'DISABLE_MULTIPROC'):
    monkeypatch.setenv(var, '1')
  tmp = stack['tmp']
  lm = LocalCompletionsAPI(base_url=f'{stack["url"]}/v1/completions', model='tiny',
                           tokenizer_backend='remote', max_length=MAX_SEQ_LEN)
  tasks = TaskManager(include_path=str(tmp), include_defaults=False).load(
      ['kiln_mc', 'kiln_ll', 'kiln_gen', 'kiln_ppl'])
  for task in tasks['tasks'].values():
    task.set_fewshot_seed(seed=1234)
  theirs = evaluate(lm=lm, task_dict=tasks, bootstrap_iters=BOOTSTRAP, log_samples=True)
  ours = stack['ours']
  compared = 0
  for task, values in theirs['results'].items():
    for key, value in values.items():
      if ',' not in key:
        continue
      metric, filt = key.split(',')
      assert filt == 'none'
      got = ours['results'][task][metric]
      if value == 'N/A':
        assert got is None, (task, metric)
      else:
        assert got == pytest.approx(value, rel=1e-4, abs=1e-4), (task, metric)
        compared += 1
  assert compared == 19  # values and stderrs; the rolling ones have no stderr (N/A)
  # The prompts themselves: few-shot contexts, delimiters, description.
  for task in ('kiln_mc', 'kiln_gen'):
    want = {s['doc_id']: s['arguments'] for s in theirs['samples'][task]}
    for sample in ours['samples'][task]:
      theirs_args = want[sample['doc_id']]
      assert [a[0] for a in sample['arguments']] == [
          str(list(a.values())[0] if isinstance(a, dict) else a[0]) for a in theirs_args]


def test_our_results_are_not_degenerate(stack):
  """The parity above means something: accuracies strictly between 0 and 1, exact match
  where the targets were built to match (ignore_case makes the upper-cased one count)."""
  results = stack['ours']['results']
  assert results['kiln_gen']['exact_match'] == pytest.approx(0.5)
  assert results['kiln_gen']['exact_match_stderr'] == pytest.approx(
      metrics.mean_stderr([1, 1, 1, 0, 0, 0]))
  assert 0 < results['kiln_ppl']['bits_per_byte'] < 20
  assert stack['ours']['n-samples']['kiln_mc'] == {'original': 6, 'effective': 6}


def test_bits_per_byte_closed_form(stack):
  """bits per byte = -sum log p / (ln 2 * sum bytes), from the backend's own rolling
  log-likelihoods; byte perplexity = 2 ** bits per byte."""
  lls = stack['lm'].loglikelihood_rolling(PPL_TEXTS)
  n_bytes = sum(len(t.encode()) for t in PPL_TEXTS)
  want = -sum(lls) / n_bytes / math.log(2)
  results = stack['ours']['results']['kiln_ppl']
  assert results['bits_per_byte'] == pytest.approx(want, rel=1e-6)
  assert results['byte_perplexity'] == pytest.approx(2 ** want, rel=1e-6)


def test_features_are_the_models_last_hidden_state(stack):
  """features() pads each batch to a length bucket; each row equals the unpadded model's
  final-normed state at the text's last token (texts of one length: one oracle call)."""
  lm, tok = stack['lm'], stack['tok']
  texts = ['def f(x):', 'import os', 'a' * 9]
  got = lm.features(texts)
  forward = jax.jit(lambda params, ids: nnx.merge(lm.graphdef, params)(ids, features=True))
  want = forward(lm.params, jnp.asarray([tok.encode(t) for t in texts]))[:, -1]
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
  assert got.shape == (3, lm.model_cfg.d_model)


def test_rolling_windows_are_lm_evals():
  from lm_eval import utils

  for n in (0, 1, 5, 9, 17, 40):
    tokens = list(range(100, 100 + n))
    for max_len in (1, 3, 8, 16):
      want = [utils.make_disjoint_window(w)
              for w in utils.get_rolling_token_windows(tokens, 7, max_len, 1)]
      assert backend_lib.rolling_windows(tokens, 7, max_len) == [tuple(w) for w in want] or \
          backend_lib.rolling_windows(tokens, 7, max_len) == [list(w) for w in want]


def test_acc_norm_by_hand(tmp_path):
  """Choices 'a' (1 char, ll -2) and 'bbbb' (4 chars, ll -4): acc picks 'a' (-2 > -4),
  acc_norm picks 'bbbb' (-4/4 = -1 > -2/1 = -2)."""
  _write_jsonl(tmp_path / 'd.jsonl', [{'q': 'x', 'c': ['a', 'bbbb'], 'answer': 1}])
  (tmp_path / 't.yaml').write_text(
      'task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: d.jsonl}}\n'
      'test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: c\n'
      'doc_to_target: answer\ntarget_delimiter: ""\n'
      'metric_list: [{metric: acc}, {metric: acc_norm}]\n')

  class Fixed:
    def loglikelihood(self, requests):
      assert requests == [('x', 'a'), ('x', 'bbbb')]
      return [(-2.0, False), (-4.0, False)]

  out = runner.evaluate(Fixed(), [str(tmp_path / 't.yaml')])['results']['t']
  assert out['acc'] == 0.0 and out['acc_norm'] == 1.0
  assert out['acc_stderr'] is None  # one document: lm-eval reports N/A


def test_corpus_metrics_match_their_libraries():
  refs = ['the cat sat on the mat', 'a quick brown fox', 'hello world again']
  preds = ['the cat sat on a mat', 'a quick fox', 'goodbye world']
  items = list(zip(refs, preds, strict=True))
  assert metrics.bleu(items) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
  assert metrics.chrf(items) == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
  assert metrics.ter(items) == pytest.approx(sacrebleu.corpus_ter(preds, [refs]).score)
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeLsum'])
  for ref, pred in items:
    want = scorer.score(ref, pred)
    got = metrics.rouge(pred, ref)
    assert got == {k: pytest.approx(v.fmeasure) for k, v in want.items()}


def test_bootstrap_and_exact_match_are_lm_evals(monkeypatch):
  from lm_eval.api import metrics as lm_metrics

  monkeypatch.setenv('DISABLE_MULTIPROC', '1')
  items = [('the cat', 'the cat'), ('a dog', 'a cat'), ('x y z', 'x y'), ('hi', 'ho')]
  assert metrics.bootstrap_stderr(metrics.bleu, items, 30) == pytest.approx(
      lm_metrics.bootstrap_stderr(lm_metrics.bleu, items, 30))
  lls = [-1.0, -2.5, -0.3, -4.0]
  assert metrics.bootstrap_stderr(metrics.perplexity, lls, 50) == pytest.approx(
      lm_metrics.bootstrap_stderr(lm_metrics.perplexity, lls, 50))
  preds, refs = ['Hello, World!', 'x = 12', 'abc'], ['hello world', 'x = 3', 'abd']
  for kw in ({}, {'ignore_case': True, 'ignore_punctuation': True},
             {'ignore_numbers': True}, {'regexes_to_ignore': [r'\s']}):
    assert metrics.exact_match(preds, refs, **kw) == pytest.approx(
        lm_metrics.exact_match_hf_evaluate(preds, refs, **kw)['exact_match'])


# --- bad task files -----------------------------------------------------------------------


def _task(tmp_path, body: str, docs=({'q': 'x', 'a': 'y'},)):
  _write_jsonl(tmp_path / 'd.jsonl', list(docs))
  path = tmp_path / 'bad.yaml'
  path.write_text('dataset_path: json\ndataset_kwargs: {data_files: {test: d.jsonl}}\n'
                  'test_split: test\n' + body)
  return str(path)


@pytest.mark.parametrize('body,docs,error,words', [
    ('task: t\noutput_type: generate_until\ndoc_to_text: q\n', None, ConfigError,
     'doc_to_target: missing'),
    ('task: t\ndoc_to_text: "{{ q "\ndoc_to_target: a\n', None, ConfigError,
     'doc_to_text: bad jinja template'),
    ('task: t\ndoc_to_text: q\ndoc_to_target: a\n', [], DataError, 'test_split'),
    ('task: t\noutput_type: guess\ndoc_to_text: q\ndoc_to_target: a\n', None, ConfigError,
     'output_type'),
    ('task: t\ndoc_to_text: q\ndoc_to_target: a\nmetric_list: [{metric: nope}]\n', None,
     ConfigError, 'metric_list[0].metric'),
])
def test_bad_task_files_name_the_file_and_field(tmp_path, body, docs, error, words):
  path = _task(tmp_path, body, *(() if docs is None else (docs,)))
  with pytest.raises(error) as e:
    task_config.load_tasks(path)
  message = str(e.value)
  assert path in message and words in message and '\n' not in message


def test_unreadable_data_and_undefined_template_field(tmp_path):
  path = tmp_path / 't.yaml'
  path.write_text('task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: no.jsonl}}\n'
                  'test_split: test\ndoc_to_text: q\ndoc_to_target: a\n')
  with pytest.raises(DataError, match='data_files.test: cannot read'):
    task_config.load_tasks(str(path))
  bad = _task(tmp_path, 'task: t\ndoc_to_text: "{{ missing }}"\ndoc_to_target: a\n')
  task = task_config.load_tasks(bad)[0]
  with pytest.raises(DataError, match='doc_to_text: the template fails'):
    task.contexts(task.docs, 0, 0)


def test_include_function_and_first_n(tmp_path):
  """`include` merges a base file, `!function` loads from a file beside the YAML, the
  first_n sampler takes the first documents in order."""
  _write_jsonl(tmp_path / 'd.jsonl', [{'q': f'q{i}', 'a': f'a{i}'} for i in range(4)])
  (tmp_path / 'fns.py').write_text('def text(doc):\n  return doc["q"].upper()\n')
  (tmp_path / 'base.yaml').write_text(
      'dataset_path: json\ndataset_kwargs: {data_files: {train: d.jsonl, test: d.jsonl}}\n'
      'test_split: test\nfewshot_split: train\ndoc_to_target: a\n')
  (tmp_path / 't.yaml').write_text(
      'include: base.yaml\ntask: t\ndoc_to_text: !function fns.text\n'
      'fewshot_config: {sampler: first_n}\nfewshot_delimiter: "|"\n')
  task = task_config.load_tasks(str(tmp_path / 't.yaml'))[0]
  assert task.contexts(task.docs[:1], 2, 0) == ['Q0 a0|Q1 a1|Q0']


def test_filters_groups_and_custom_functions(tmp_path):
  """A group of two tasks: regex and take_first filters scored separately; a
  process_results and an aggregation given as !function. Expected values by hand."""
  _write_jsonl(tmp_path / 'd.jsonl', [{'q': 'x=1', 'a': '1'}, {'q': 'y=2', 'a': '3'}])
  (tmp_path / 'fns.py').write_text(
      'def lengths(doc, results):\n  return {"chars": len(results[0])}\n'
      'def total(items):\n  return sum(items)\n')
  base = ('dataset_path: json\ndataset_kwargs: {data_files: {test: d.jsonl}}\n'
          'test_split: test\ndoc_to_text: q\ndoc_to_target: a\n')
  (tmp_path / 'em.yaml').write_text(
      base + 'task: em\nfilter_list:\n  - name: raw\n    filter: [{function: take_first}]\n'
      '  - name: strict\n    filter:\n      - {function: regex, regex_pattern: "#### (\\\\d)"}\n'
      '      - {function: take_first}\n')
  (tmp_path / 'custom.yaml').write_text(
      base + 'task: custom\nprocess_results: !function fns.lengths\n'
      'metric_list: [{metric: chars, aggregation: !function fns.total, '
      'higher_is_better: false}]\n')
  (tmp_path / 'g.yaml').write_text('group: g\ntask: [em.yaml, custom.yaml]\n')

  class Echo:
    def generate_until(self, requests):
      assert [r[1]['until'] for r in requests] == [['\n\n']] * len(requests)
      return [f'so #### {context[-1]}' for context, _ in requests]

  out = runner.evaluate(Echo(), [str(tmp_path / 'g.yaml')])
  assert out['results']['em'] == {'exact_match,raw': 0.0, 'exact_match_stderr,raw': 0.0,
                                  'exact_match,strict': 0.5,
                                  'exact_match_stderr,strict': pytest.approx(0.5)}
  assert out['results']['custom'] == {'chars': 18, 'chars_stderr': None}  # 2 x len('so #### 1')
  assert out['higher_is_better']['custom'] == {'chars': False}


# --- the command line ---------------------------------------------------------------------


def test_results_json_merges_and_tensorboard_has_each_metric(tmp_path):
  from test_run import scalars

  from evals import results

  first = {'results': {'a': {'acc': 0.25, 'acc_stderr': 0.1}}, 'configs': {'a': {}}}
  second = {'results': {'b': {'bits_per_byte': 1.5, 'bits_per_byte_stderr': None}},
            'configs': {'b': {}}, 'higher_is_better': {'b': {'bits_per_byte': False}}}
  path = results.results_path(str(tmp_path), 7)
  results.write_json(first, path)
  results.write_json(second, path)
  merged = results.read_results(str(tmp_path))  # the run directory's newest file
  assert merged['results'] == {**first['results'], **second['results']}
  results.write_tensorboard(merged, str(tmp_path), 7)
  assert scalars(tmp_path, 'evals/a/acc') == {7: 0.25}
  assert scalars(tmp_path, 'evals/b/bits_per_byte') == {7: 1.5}
  table = results.table(merged).splitlines()
  assert [c.strip() for c in table[2].split('|')[1:7]] == ['a', 'acc', '', '0.2500', '±',
                                                          '0.1000']
  assert [c.strip() for c in table[3].split('|')[1:7]] == ['b', 'bits_per_byte', '↓',
                                                          '1.5000', '±', 'N/A']


def _cli(*args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '1'}
  return subprocess.run([sys.executable, '-m', 'evals', *args], env=env, capture_output=True,
                        text=True, timeout=300)


def test_compare_prints_both_runs_and_the_difference(tmp_path):
  a = {'results': {'t': {'acc': 0.5, 'acc_stderr': 0.1, 'bits_per_byte': 2.0}},
       'model': {'step': 10}}
  b = {'results': {'t': {'acc': 0.75, 'acc_stderr': 0.1, 'bits_per_byte': 1.5}},
       'model': {'step': 20}}
  (tmp_path / 'a.json').write_text(json.dumps(a))
  (tmp_path / 'b.json').write_text(json.dumps(b))
  proc = _cli('--compare', str(tmp_path / 'a.json'), str(tmp_path / 'b.json'))
  assert proc.returncode == 0, proc.stderr
  rows = [line.split('|') for line in proc.stdout.splitlines() if line.startswith('|t')]
  cells = {r[2].strip(): [c.strip() for c in r[3:6]] for r in rows}
  assert cells['acc'] == ['0.5000', '0.7500', '+0.2500']
  assert cells['bits_per_byte'] == ['2.0000', '1.5000', '-0.5000']


def test_bad_flags_exit_2_in_one_line(tmp_path):
  proc = _cli(f'--workdir={tmp_path}', '--tasks=x.yaml', '--nope=1')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
  assert 'nope' in proc.stderr.strip().splitlines()[-1]


def test_flag_checks_name_the_problem(tmp_path):
  """What `python -m evals` checks before loading anything (exit 2 with the message)."""
  from evals.__main__ import check_flags

  task = _task(tmp_path, 'task: t\ndoc_to_text: q\ndoc_to_target: a\n')
  flags = dict(compare=False, tasks=[task], limit=None, num_fewshot=None, batch_size=8,
               workdir=None)
  with pytest.raises(ConfigError, match='--workdir is required'):
    check_flags(types.SimpleNamespace(**flags), ['evals'])
  with pytest.raises(ConfigError, match='config.json does not exist'):
    check_flags(types.SimpleNamespace(**{**flags, 'workdir': str(tmp_path)}), ['evals'])
  with pytest.raises(ConfigError, match="unknown task 'nothing_like_this'"):
    check_flags(types.SimpleNamespace(**{**flags, 'tasks': ['nothing_like_this']}), ['evals'])
  with pytest.raises(ConfigError, match='--compare takes two'):
    check_flags(types.SimpleNamespace(**{**flags, 'compare': True}), ['evals', 'a.json'])
