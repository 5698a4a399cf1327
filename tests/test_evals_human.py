"""`python -m evals.human`: the blind side-by-side page.

Oracles: scikit-learn's `cohen_kappa_score`; Fleiss' kappa of the 10-subject, 14-rater
worked example (Fleiss 1971, as worked on Wikipedia's "Fleiss' kappa" page: 0.210) and a
small table worked by hand; Wilson's interval in closed form at 0, n and n/2 successes and
Newcombe's (1998) 81/263 example; the preference file read back by the DPO reader
(data/preference_data.py); greedy completions against `model.decode.generate` on the
restored parameters; and the page itself in Debian's headless Chromium (selenium with the
Debian chromedriver), where model output holding <script> must show as text.
"""

import asyncio
import datetime
import json
import math
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import types
import warnings
from concurrent.futures import ThreadPoolExecutor

import httpx
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score
from test_server import ServerThread

from data import chat, preference_data, tokenizers
from data.errors import ConfigError, DataError
from evals.human import __main__ as cli
from evals.human import completions, stats
from evals.human.app import create_app
from evals.human.store import InputError, Store

REPO = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'


# --- statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize('labels1, labels2', [
    (['a', 'a', 'b', 'tie', 'a', 'both_bad', 'b', 'a'], ['a', 'b', 'b', 'tie', 'a', 'a', 'b',
                                                        'tie']),
    (['a', 'b', 'a', 'b'], ['b', 'a', 'b', 'a']),  # full disagreement: negative
    (['a', 'a', 'tie'], ['a', 'b', 'both_bad']),
])
def test_cohen_kappa_matches_sklearn(labels1, labels2):
  assert stats.cohen_kappa(labels1, labels2) == pytest.approx(
      cohen_kappa_score(labels1, labels2), abs=1e-12)


def test_cohen_kappa_is_undefined_when_chance_agreement_is_certain():
  with warnings.catch_warnings():  # sklearn warns that the labels are all one
    warnings.simplefilter('ignore')
    assert np.isnan(cohen_kappa_score(['a', 'a'], ['a', 'a']))  # sklearn: nan; here: None
  assert stats.cohen_kappa(['a', 'a'], ['a', 'a']) is None


# Fleiss (1971)'s example as worked on Wikipedia: 10 subjects, 14 raters, 5 categories.
FLEISS_TABLE = [
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
]


def test_fleiss_kappa_on_the_worked_example():
  assert stats.fleiss_kappa(np.array(FLEISS_TABLE)) == pytest.approx(0.210, abs=5e-4)
  # A subject with a single rating has no rater pairs and is left out.
  assert stats.fleiss_kappa(np.array(FLEISS_TABLE + [[0, 1, 0, 0, 0]])) == pytest.approx(
      stats.fleiss_kappa(np.array(FLEISS_TABLE)), abs=1e-12)


def test_wilson_interval_closed_forms():
  z, n = stats.Z_95, 20
  assert stats.wilson_interval(0, n) == pytest.approx((0.0, z * z / (n + z * z)))
  assert stats.wilson_interval(n, n) == pytest.approx((n / (n + z * z), 1.0))
  half = z / (2 * math.sqrt(n + z * z))
  assert stats.wilson_interval(n / 2, n) == pytest.approx((0.5 - half, 0.5 + half))
  # Newcombe (1998), Statistics in Medicine 17:857, method 3 on 81/263: 0.2553 to 0.3662.
  lo, hi = stats.wilson_interval(81, 263)
  assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)


def _judgement(annotator, item, winner, choice=None):
  return {'annotator': annotator, 'item': item, 'winner': winner,
          'choice': choice or {'a': 'left', 'b': 'right'}.get(winner, winner)}


def test_summary_of_three_annotators_uses_fleiss_kappa():
  judgements = [
      _judgement('ann', 0, 'a'), _judgement('bob', 0, 'a'), _judgement('cat', 0, 'a'),
      _judgement('ann', 1, 'a', 'right'), _judgement('bob', 1, 'a'),
      _judgement('cat', 1, 'b', 'left'),
      _judgement('ann', 2, 'tie'), _judgement('ann', 3, 'both_bad'),
  ]
  s = stats.summarize(judgements, num_items=4)
  w = s['a_vs_b']
  assert (w['a_wins'], w['b_wins'], w['ties'], w['both_bad'], w['trials']) == (5, 1, 1, 1, 7)
  assert w['win_rate_a']['rate'] == pytest.approx(5.5 / 7)
  assert w['win_rate_a']['ci95'] == pytest.approx(list(stats.wilson_interval(5.5, 7)))
  assert (s['position']['left_wins'], s['position']['right_wins']) == (5, 1)
  # By hand: items 0 and 1 have counts (3, 0, 0, 0) and (2, 1, 0, 0); pair agreement 1
  # and 1/3, mean 2/3; shares 5/6, 1/6, so chance 26/36; kappa (2/3 - 13/18) / (5/18).
  g = s['agreement']
  assert (g['statistic'], g['items'], g['annotators']) == ('fleiss', 2, ['ann', 'bob', 'cat'])
  assert g['kappa'] == pytest.approx(-0.2)
  assert s['annotators'] == {'ann': 4, 'bob': 2, 'cat': 2}


# --- prompts, completions and the judgement files -------------------------------------------


@pytest.mark.parametrize('name, text, message', [
    ('p.jsonl', '{"prompt": "a"}\n{"prompt": "b"\n', r'p.jsonl:2: not valid JSON'),
    ('p.jsonl', '{"prompt": "a"}\n\n{"text": "b"}\n', r'p.jsonl:3: give an object with exactly'),
    ('p.jsonl', '{"prompt": "a", "messages": []}\n', r'p.jsonl:1: give an object with exactly'),
    ('p.jsonl', '{"prompt": ""}\n', r'p.jsonl:1: "prompt" must be a nonempty string'),
    ('p.jsonl', '{"messages": [{"role": "user"}]}\n', r'p.jsonl:1: messages\[0\] must be'),
    ('p.txt', '\n  \n', r'p.txt holds no prompts'),
])
def test_bad_prompt_files_name_the_file_and_line(tmp_path, name, text, message):
  (tmp_path / name).write_text(text)
  with pytest.raises(DataError, match=message):
    completions.read_prompts(str(tmp_path / name))


def test_prompt_files_in_both_formats(tmp_path):
  (tmp_path / 'p.txt').write_text('first <b>\n\nsecond\n')
  assert completions.read_prompts(str(tmp_path / 'p.txt')) == (
      ['first <b>', 'second'], [f'{tmp_path}/p.txt:1', f'{tmp_path}/p.txt:3'])
  messages = [{'role': 'user', 'content': 'hi'}]
  (tmp_path / 'p.jsonl').write_text(json.dumps({'messages': messages}) + '\n')
  assert completions.read_prompts(str(tmp_path / 'p.jsonl'))[0] == [messages]


ITEMS = [
    {'prompt': 'Say <b>x</b> twice', 'a': 'x <script>window.pwned=1</script> x',
     'b': '<b>x</b><img src=x onerror="window.pwned=2">'},
    {'prompt': [{'role': 'user', 'content': 'Name a colour'}], 'a': 'red', 'b': 'blue'},
    {'prompt': 'Count to two', 'a': 'one two', 'b': '1 2'},
]


def write_items(output: pathlib.Path, items=ITEMS) -> None:
  """A hand-made completions.jsonl: the documented seam that serves completions made
  elsewhere (and the file a restart reads back)."""
  output.mkdir(parents=True, exist_ok=True)
  (output / completions.COMPLETIONS_FILE).write_text(''.join(
      json.dumps({'item': i, **item}) + '\n' for i, item in enumerate(items)))


def _judge(store, *args):
  return asyncio.run(store.judge(*args))


def test_preferences_are_read_back_by_the_dpo_reader_and_survive_a_restart(tmp_path):
  write_items(tmp_path)
  store = Store(str(tmp_path), completions.load(str(tmp_path)))
  for item, choice in [(0, 'left'), (1, 'right'), (2, 'tie'), (2, 'both_bad')]:
    _judge(store, 'ann' if choice != 'both_bad' else 'bob', item, choice, '')
  with pytest.raises(InputError, match='already judged') as e:
    _judge(store, 'ann', 0, 'right', '')
  assert e.value.status == 409
  winners = [(j['item'], j['winner']) for j in store.judgements]
  assert winners[2:] == [(2, 'tie'), (2, 'both_bad')]

  # The DPO task's reader: every line a pair, chosen the winner's text.
  cfg = ml_collections.ConfigDict(dict(
      source='jsonl', path=str(tmp_path / 'preferences.jsonl'), val_fraction=0.0, seq_len=128,
      max_prompt_len=-1))
  tok = tokenizers.ByteTokenizer()
  template = chat.ChatTemplate(chat.DEFAULT_TEMPLATE, tok, chat.default_context(tok))
  render = preference_data._Renderer(tok, lambda: template)
  pairs = preference_data.tokenize_pairs(preference_data.read_pairs(cfg, 'train'), render, cfg,
                                         'train', vocab_size=tok.vocab_size)
  assert len(pairs) == 2 and not pairs.skipped
  for k, (item, winner) in enumerate(winners[:2]):
    loser = 'b' if winner == 'a' else 'a'
    chosen, rejected = pairs.completions[k]
    if isinstance(ITEMS[item]['prompt'], str):
      assert tok.decode(chosen) == ITEMS[item][winner]
      assert tok.decode(rejected) == ITEMS[item][loser]
    else:  # a conversation: the completion is an assistant turn, ended by the template
      assert tok.decode(chosen).startswith(ITEMS[item][winner])
      assert tok.decode(rejected).startswith(ITEMS[item][loser])

  # A restart: the same judgements, order and sides; the preference file rebuilt as it was.
  before = (tmp_path / 'preferences.jsonl').read_text()
  (tmp_path / 'preferences.jsonl').write_text('')
  again = Store(str(tmp_path), completions.load(str(tmp_path)))
  assert again.judgements == store.judgements
  assert (tmp_path / 'preferences.jsonl').read_text() == before
  assert again.order('ann') == store.order('ann')
  assert again.next_pair('ann')['done'] and again.next_pair('bob')['item'] in (0, 1)


def test_each_annotator_has_an_own_order_and_sides(tmp_path):
  write_items(tmp_path, ITEMS * 10)
  store = Store(str(tmp_path), completions.load(str(tmp_path)))
  orders = {tuple(store.order(f'annotator {k}')) for k in range(10)}
  assert len(orders) > 1 and all(sorted(o) == list(range(30)) for o in orders)
  sides = [store.left_model(f'annotator {k}', i) for k in range(10) for i in range(30)]
  assert 0.4 < sides.count('a') / len(sides) < 0.6
  assert store.left_model('x', 3) == Store(str(tmp_path), store.items).left_model('x', 3)


# --- the HTTP server ------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
  """(a client of a server of ITEMS, its output folder)."""
  write_items(tmp_path)
  thread = ServerThread(create_app(Store(str(tmp_path), completions.load(str(tmp_path)))))
  with httpx.Client(base_url=thread.url) as client:
    yield client, tmp_path
  thread.stop()


def test_bad_requests_get_a_4xx_json_error_and_the_server_stays_up(server):
  client, _ = server
  judge = '/api/judge'
  ok = {'annotator': 'ann', 'item': 0, 'choice': 'tie'}
  cases = [
      (client.post(judge, content=b'{not json', headers={'content-type': 'application/json'}),
       400, 'not valid JSON'),
      (client.post(judge, json={'annotator': 'ann', 'choice': 'tie'}), 400,
       'item: Field required'),
      (client.post(judge, json={**ok, 'item': 'x'}), 400, 'item: Input should be a valid integer'),
      (client.post(judge, json={**ok, 'item': 7}), 404, 'There is no item 7'),
      (client.post(judge, json={**ok, 'choice': 'up'}), 400, "choice='up' is not one of"),
      (client.post(judge, json={**ok, 'annotator': '  '}), 400,
       'annotator name must be 1 to 64'),
      (client.post(judge, json={**ok, 'reason': 'x' * 2001}), 400, 'keep it under 2000'),
      (client.get('/api/next'), 400, 'annotator: Field required'),
      (client.get('/api/next', params={'annotator': 'a\x00b'}), 400, 'control characters'),
      (client.get('/nowhere'), 404, 'Not Found'),
  ]
  for response, status, message in cases:
    assert response.status_code == status, response.text
    assert message in response.json()['error']
  assert client.post(judge, json=ok).status_code == 200
  repeat = client.post(judge, json=ok)
  assert repeat.status_code == 409 and 'already judged' in repeat.json()['error']
  assert client.get('/api/summary').json()['judgements'] == 1


def test_annotators_judging_at_once_each_get_one_whole_line(server):
  client, output = server
  names = [f'annotator {k}' for k in range(6)]
  requests = [(name, item) for name in names for item in range(len(ITEMS))] * 2  # twice each

  def post(name_item):
    name, item = name_item
    return client.post('/api/judge', json={'annotator': name, 'item': item,
                                           'choice': 'left'}).status_code

  with ThreadPoolExecutor(8) as pool:
    codes = list(pool.map(post, requests))
  assert sorted(codes) == [200] * 18 + [409] * 18
  lines = (output / 'judgements.jsonl').read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert sorted((r['annotator'], r['item']) for r in records) == sorted(set(requests))
  assert len((output / 'preferences.jsonl').read_text().splitlines()) == 18


# --- the CLI and generation through the engine -----------------------------------------------


def _flags(**overrides):
  values = dict(a=None, b=None, prompts=None, output=None, host='127.0.0.1', port=8765,
                max_tokens=6, temperature=0.0, top_p=1.0, seed=0)
  values.update(overrides)
  return types.SimpleNamespace(**values)


def test_cli_refuses_bad_flags_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'evals.human', f'--output={tmp_path}/out',
                         '--a=/nonexistent'], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      'Config error: --b, --prompts required: the two runs to compare and the prompts file (or '
      'an --output that already holds completions.jsonl).']
  (tmp_path / 'p.txt').write_text('hi\n')
  for overrides, message in [
      ({}, '--output is required'),
      ({'output': str(tmp_path), 'port': 0}, r'--port=0 must be in \[1, 65535\]'),
      ({'output': str(tmp_path), 'top_p': 0.0}, r'--top_p=0.0 must be in \(0, 1\]'),
      ({'output': str(tmp_path), 'a': str(tmp_path), 'b': str(tmp_path),
        'prompts': str(tmp_path / 'p.txt')}, 'config.json does not exist'),
  ]:
    with pytest.raises(ConfigError, match=message):
      cli.check_flags(_flags(**overrides))


@pytest.fixture(scope='module')
def lm_run(tmp_path_factory):
  """A one-step char-level LM run, enough to load and generate from."""
  from configs import lm
  from train import trainer
  corpus = tmp_path_factory.mktemp('corpus') / 'input.txt'
  corpus.write_text('<|user|>\n<|assistant|>\ndef f(x):\n    return x + 1\n' * 100)
  c = lm.get_config('tiny')
  c.data.update(source='text', path=str(corpus), seq_len=64)
  c.data.tokenizer.kind = 'char'
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64)
  c.update(steps=1, batch_size=8, eval_every=0, eval_steps=0, log_every=1)
  c.checkpoint.async_save = False
  workdir = tmp_path_factory.mktemp('run')
  trainer.train_and_evaluate(c, str(workdir))
  return workdir


def _greedy(workdir, prompt_ids: list[list[int]], new: int) -> list[list[int]]:
  """Greedy tokens by `model.decode.generate` on the run's restored parameters."""
  from model import decode, sampling
  from train import runs
  task, state, _ = runs.load_latest(str(workdir))
  rows, width = len(prompt_ids), max(map(len, prompt_ids))
  x = np.zeros((rows, width), np.int32)
  for i, ids in enumerate(prompt_ids):
    x[i, :len(ids)] = ids
  out = decode.generate(
      task.inference_graphdef, task.inference_params(state), x,
      np.array([len(ids) for ids in prompt_ids], np.int32), max_new_tokens=new,
      sampling_params=sampling.SamplingParams.make(rows, temperature=0.0),
      seeds_B=jnp.zeros((rows,), jnp.int32), vocab_limit=task.tokenizer.vocab_size)
  return np.asarray(out.tokens).tolist()


def test_cli_generates_through_the_engine_and_restarts_from_its_folder(lm_run, tmp_path,
                                                                      monkeypatch):
  messages = [{'role': 'user', 'content': 'def f'}]
  prompts = ['def f(x):', 'return x', messages]
  path = tmp_path / 'prompts.jsonl'
  path.write_text(''.join(json.dumps({'messages': p} if isinstance(p, list) else {'prompt': p})
                          + '\n' for p in prompts))
  out = tmp_path / 'out'
  f = _flags(a=str(lm_run), b=str(lm_run), prompts=str(path), output=str(out), port=_free_port())
  store = cli.build(f)

  tok = tokenizers.load_tokenizer(str(lm_run))
  template = chat.load_chat_template(str(lm_run), tok)  # char tokenizer: no BOS, no stops
  ids = [template.encode(p if isinstance(p, str) else
                         template.render(p, add_generation_prompt=True)) for p in prompts]
  want = [tok.decode(t) for t in _greedy(lm_run, ids, f.max_tokens)]
  assert [item['a'] for item in store.items] == want
  assert [item['b'] for item in store.items] == want
  assert [item['prompt'] for item in store.items] == prompts

  # A restart reads the folder back and generates nothing; other settings are refused.
  monkeypatch.setattr(completions, 'generate', lambda *a, **k: pytest.fail('generated again'))
  assert cli.build(f).items == store.items
  assert cli.build(_flags(output=str(out), port=f.port)).items == store.items
  with pytest.raises(ConfigError, match='holds completions made with max_tokens=6'):
    cli.check_flags(_flags(**{**vars(f), 'max_tokens': 7}))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# --- the page in a real browser -----------------------------------------------------------


def _ensure_chromium() -> None:
  """Debian's Chromium and chromedriver, installed when missing (a fresh CI machine)."""
  if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
    return
  install = ['apt-get', 'install', '-y', '--no-install-recommends', 'chromium', 'chromium-driver']
  env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
  proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
  if proc.returncode:  # a machine whose package lists were never fetched
    subprocess.run(['apt-get', 'update'], capture_output=True, env=env, timeout=600)
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
  if proc.returncode or not os.path.exists(CHROMEDRIVER):
    last = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    pytest.fail(f'Cannot install Debian\'s chromium and chromium-driver with apt-get ({last}); '
                'the browser test needs them at /usr/bin.')


@pytest.fixture(scope='module')
def browser():
  """Headless Chromium through the Debian chromedriver; Selenium Manager (which would
  download a driver) must not run."""
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.selenium_manager import SeleniumManager
  _ensure_chromium()
  profile = tempfile.mkdtemp(prefix='kiln-chromium-')
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ('--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
              '--disable-background-networking', '--disable-component-update',
              '--disable-sync', '--disable-dev-shm-usage', f'--user-data-dir={profile}'):
    options.add_argument(arg)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(SeleniumManager, 'binary_paths',
               lambda *a, **k: pytest.fail('Selenium Manager ran (it downloads drivers)'))
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
  yield driver
  driver.quit()
  shutil.rmtree(profile, ignore_errors=True)


def _judge_in_page(driver, url: str, name: str, plan: dict) -> list[dict]:
  """Judges every item as `name` in the page: plan[item] is the model to pick ('a', 'b') or
  'tie' / 'both_bad'. Returns what the page showed for each item."""
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  find = lambda id_: driver.find_element(By.ID, id_)  # noqa: E731
  driver.get(url + '/')
  WebDriverWait(driver, 30).until(lambda d: find('name').is_displayed())
  find('name').clear()
  find('name').send_keys(name)
  find('start').click()
  shown, last = [], None
  while True:
    WebDriverWait(driver, 30).until(lambda d, last=last: find('done').is_displayed() or (
        find('pair').is_displayed() and find('pair').get_attribute('data-item') != last))
    if find('done').is_displayed():
      return shown
    last = find('pair').get_attribute('data-item')
    item = int(last)
    page = {'item': item, 'prompt': find('prompt').text, 'left': find('left').text,
            'right': find('right').text, 'pwned': driver.execute_script(
                'return typeof window.pwned'),
            'elements': len(driver.find_elements(By.CSS_SELECTOR,
                                                 '#pair b, #pair script, #pair img'))}
    want = plan[item]
    if want in ('a', 'b'):
      page['choice'] = 'left' if page['left'] == ITEMS[item][want] else 'right'
    else:
      page['choice'] = want
    if item == 0:
      find('reason').send_keys('clearer <i>answer</i>')
    find(f'choose-{page["choice"]}').click()
    shown.append(page)


def test_two_annotators_judge_in_a_headless_browser(browser, tmp_path):
  write_items(tmp_path)
  thread = ServerThread(create_app(Store(str(tmp_path), completions.load(str(tmp_path)))))
  try:
    plans = {'ann': {0: 'a', 1: 'a', 2: 'tie'}, 'bob': {0: 'a', 1: 'b', 2: 'both_bad'}}
    shown = {name: _judge_in_page(browser, thread.url, name, plan)
             for name, plan in plans.items()}
    summary = httpx.get(thread.url + '/api/summary').json()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(thread.url + '/summary')
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, 'summary-rows').get_attribute('data-ready'))
    summary_page = browser.find_element(By.ID, 'summary').text
  finally:
    thread.stop()

  # Shown as text: the markup is visible, nothing ran, no element was made from it.
  for pages in shown.values():
    assert sorted(p['item'] for p in pages) == [0, 1, 2]
    for p in pages:
      assert p['pwned'] == 'undefined' and p['elements'] == 0
      assert {p['left'], p['right']} == {ITEMS[p['item']]['a'], ITEMS[p['item']]['b']}
    first = next(p for p in pages if p['item'] == 0)
    assert first['prompt'] == 'Say <b>x</b> twice'
    assert '<script>window.pwned=1</script>' in first['left'] + first['right']
    conversation = next(p for p in pages if p['item'] == 1)['prompt']
    assert conversation.split('\n') == ['user', 'Name a colour']

  # The record: what each annotator saw on the left, their choice and the winner.
  records = [json.loads(line) for line in (tmp_path / 'judgements.jsonl').read_text()
             .splitlines()]
  assert len(records) == 6
  for r in records:
    page = next(p for p in shown[r['annotator']] if p['item'] == r['item'])
    assert ITEMS[r['item']][r['left']] == page['left']
    assert r['choice'] == page['choice'] and r['winner'] == plans[r['annotator']][r['item']]
    assert r['reason'] == ('clearer <i>answer</i>' if r['item'] == 0 else '')
    age = datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(r['time'])
    assert datetime.timedelta(0) <= age < datetime.timedelta(hours=1)
  pairs = [json.loads(line) for line in (tmp_path / 'preferences.jsonl').read_text()
           .splitlines()]
  decisive = [r for r in records if r['winner'] in ('a', 'b')]
  assert pairs == [{'prompt': ITEMS[r['item']]['prompt'],
                    'chosen': _as_reply(r['item'], ITEMS[r['item']][r['winner']]),
                    'rejected': _as_reply(r['item'], ITEMS[r['item']][
                        'b' if r['winner'] == 'a' else 'a'])} for r in decisive]

  # The summary: 3 wins for A, 1 for B, 1 tie (half), 1 both bad (left out).
  w = summary['a_vs_b']
  assert (w['a_wins'], w['b_wins'], w['ties'], w['both_bad']) == (3, 1, 1, 1)
  assert w['win_rate_a']['rate'] == pytest.approx(0.7)
  assert w['win_rate_a']['ci95'] == pytest.approx(list(stats.wilson_interval(3.5, 5)))
  sided = [p for pages in shown.values() for p in pages if p['choice'] in ('left', 'right')]
  assert summary['position']['left_wins'] == sum(p['choice'] == 'left' for p in sided)
  labels = [[plans[name][i] for i in range(3)] for name in ('ann', 'bob')]
  assert summary['agreement']['statistic'] == 'cohen'
  assert summary['agreement']['kappa'] == pytest.approx(cohen_kappa_score(*labels))
  lo, hi = stats.wilson_interval(3.5, 5)
  assert f'0.700 (95% CI {lo:.3f} to {hi:.3f})' in summary_page
  assert "Cohen's kappa" in summary_page

  # python -m evals.human --summary=DIR: the same numbers, as text and summary.json.
  text = cli.summary_text(str(tmp_path))
  assert f'Win rate of A: 0.700 (95% CI {lo:.3f}-{hi:.3f})' in text
  assert json.loads((tmp_path / 'summary.json').read_text()) == summary


def _as_reply(item: int, text: str):
  """A completion as the preference file holds it: a conversation's reply is a message."""
  if isinstance(ITEMS[item]['prompt'], list):
    return [{'role': 'assistant', 'content': text}]
  return text
