"""The OpenAI-compatible server (serve/server.py) over the real engine, on a tiny random model.

One uvicorn server on a free port, in a background thread, is shared by every test. The
oracles: what the same request gives when submitted to the engine directly (text, tokens,
log-probs), `model.decode.score` for prompt log-probs, the real `openai` client parsing our
responses, prometheus_client's parser for /metrics, and lm-evaluation-harness's
`local-completions` against in-process scoring of the same task.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn
from flax import nnx
from prometheus_client.parser import text_string_to_metric_families

from data import chat, tokenizers
from model import decode
from model import transformer as tfm
from serve import engine as engine_lib
from serve import server as server_lib

MAX_SEQ_LEN = 128
MODEL = 'tiny'
SLOTS, QUEUE = 2, 4
GREEDY = dict(temperature=0.0)


def _tiny_model():
  """A random 2-layer transformer over the byte tokenizer, with peaked logits (scaled
  embeddings) so that greedy choices are clear, not near-ties."""
  cfg = tfm.TransformerConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                              head_dim=16, mlp_dim=64, dtype=jnp.dtype('float32'),
                              param_dtype=jnp.dtype('float32'))
  with nnx.use_eager_sharding(False):
    model = nnx.jit(lambda: tfm.Transformer(cfg, rngs=nnx.Rngs(0)))()
  graphdef, params = nnx.split(model)
  params = jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x, params)
  return cfg, graphdef, params


class ServerThread:
  """uvicorn serving `app` on a free local port from a daemon thread."""

  def __init__(self, app):
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    self.port = sock.getsockname()[1]
    self.url = f'http://127.0.0.1:{self.port}'
    self.server = uvicorn.Server(uvicorn.Config(app, log_level='warning', lifespan='off',
                                                timeout_graceful_shutdown=None))
    self.thread = threading.Thread(target=self.server.run, kwargs={'sockets': [sock]},
                                   daemon=True)
    self.thread.start()
    deadline = time.time() + 60
    while not self.server.started:
      assert time.time() < deadline and self.thread.is_alive(), 'uvicorn did not start'
      time.sleep(0.02)

  def stop(self):
    self.server.should_exit = True
    self.thread.join(60)


@pytest.fixture(scope='module')
def served():
  cfg, graphdef, params = _tiny_model()
  tok = tokenizers.ByteTokenizer()
  engine = engine_lib.Engine(graphdef, params, cfg, tok, max_slots=SLOTS, page_size=8,
                             max_seq_len=MAX_SEQ_LEN, prefill_chunk=16, max_queue=QUEUE)
  engine.start()
  template = chat.ChatTemplate(chat.DEFAULT_TEMPLATE, tok, chat.default_context(tok))
  app = server_lib.create_app(engine, tok, model_name=MODEL, chat_template=template, max_n=4,
                              tokenizer_info=server_lib.tokenizer_info(tok, template))
  thread = ServerThread(app)
  yield dict(engine=engine, tok=tok, url=thread.url, template=template, graphdef=graphdef,
             params=params, app=app)
  thread.stop()
  engine.shutdown(drain=False)


@pytest.fixture(scope='module')
def client(served):
  return openai.OpenAI(base_url=served['url'] + '/v1', api_key='unused', max_retries=0)


def direct(engine, prompt_ids, **kwargs):
  """The engine's events for one request, submitted without the server."""
  return list(engine.submit(engine_lib.Request(prompt_ids=tuple(prompt_ids), **kwargs)))


def _bos(tok, text):
  return [tok.bos_id, *tok.encode(text)]


def _wait_idle(engine, timeout=60.0):
  deadline = time.time() + timeout
  while engine.stats()['running'] or engine.stats()['waiting']:
    assert time.time() < deadline, engine.stats()
    time.sleep(0.01)


# --- completions and chat through the openai client ---------------------------------------


def test_models_and_health(served, client):
  assert [m.id for m in client.models.list()] == [MODEL]
  assert client.models.retrieve(MODEL).id == MODEL
  assert httpx.get(served['url'] + '/health').status_code == 200


def test_completion_is_what_the_engine_gives(served, client):
  tok, engine = served['tok'], served['engine']
  events = direct(engine, _bos(tok, 'def f(x):'), max_tokens=12, **GREEDY)
  out = client.completions.create(model=MODEL, prompt='def f(x):', max_tokens=12, temperature=0)
  assert out.choices[0].text == ''.join(e.text for e in events)
  assert out.choices[0].finish_reason == events[-1].finish_reason == 'length'
  assert out.usage.prompt_tokens == 10 and out.usage.completion_tokens == 12
  assert out.usage.total_tokens == 22


def test_prompt_forms_n_and_seeds(served, client):
  """Strings, token ids and lists of them; n choices per prompt in OpenAI's order, choice j
  sampled with seed + j; the same seed gives the same text."""
  tok, engine = served['tok'], served['engine']
  prompts = [_bos(tok, 'import'), [tok.bos_id, 40, 41]]
  out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, n=2, seed=7,
                                  temperature=1.0, extra_body={'top_k': 20, 'min_p': 0.01})
  assert [c.index for c in out.choices] == [0, 1, 2, 3]
  for c in out.choices:
    ids = prompts[c.index // 2]
    events = direct(engine, ids, max_tokens=6, temperature=1.0, top_k=20, min_p=0.01,
                    seed=7 + c.index % 2)
    assert c.text == ''.join(e.text for e in events)
  again = client.completions.create(model=MODEL, prompt='import', max_tokens=6, n=2, seed=7,
                                    temperature=1.0, extra_body={'top_k': 20, 'min_p': 0.01})
  assert [c.text for c in again.choices] == [c.text for c in out.choices[:2]]
  strings = client.completions.create(model=MODEL, prompt=['import', 'def'], max_tokens=3,
                                      temperature=0)
  assert strings.usage.prompt_tokens == 7 + 4


def test_stop_strings_and_repetition_penalty(served, client):
  """A stop string cuts the text before its first occurrence (finish_reason 'stop'); the
  penalty is passed through as vLLM's extra field."""
  tok, engine = served['tok'], served['engine']
  events = direct(engine, _bos(tok, 'while'), max_tokens=16, repetition_penalty=1.3, **GREEDY)
  full = ''.join(e.text for e in events)
  stop = full[5:7]
  out = client.completions.create(model=MODEL, prompt='while', max_tokens=16, temperature=0,
                                  stop=[stop], extra_body={'repetition_penalty': 1.3})
  assert out.choices[0].text == full[:full.index(stop)]
  assert out.choices[0].finish_reason == 'stop'


def test_echo_logprobs_equal_score(served, client):
  """lm-evaluation-harness's scoring request: token ids, echo, max_tokens 1, logprobs 1.
  The prompt's log-probs align one to one with its ids and equal model.decode.score."""
  tok = served['tok']
  ids = _bos(tok, 'for i in range(10):')
  out = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True, logprobs=2,
                                  temperature=0)
  lp = out.choices[0].logprobs
  assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
  assert lp.top_logprobs[0] is None
  want, _, _ = decode.score(served['graphdef'], served['params'], jnp.asarray([ids]),
                            jnp.asarray([len(ids)]), vocab_limit=tok.vocab_size)
  np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], np.asarray(want)[0, 1:], atol=2e-4)
  assert lp.tokens[:len(ids)] == [tok.decode([i]) for i in ids]
  assert out.choices[0].text.startswith('for i in range(10):')
  assert lp.text_offset[:3] == [0, 0, 1]  # BOS is no text
  for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
    assert 2 <= len(top) <= 3 and max(top.values()) >= chosen - 1e-6
  scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True,
                                     logprobs=0)
  assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(ids)]
  assert scored.usage.completion_tokens == 0


def test_chat_renders_the_template(served, client):
  tok, engine, template = served['tok'], served['engine'], served['template']
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
  ids = template.encode(template.render(messages, add_generation_prompt=True))
  assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 3  # BOS, two ends of turn
  events = direct(engine, ids, max_tokens=10, logprobs=2, stop_token_ids=(tok.bos_id,),
                  **GREEDY)
  out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                       temperature=0, logprobs=True, top_logprobs=2)
  choice = out.choices[0]
  assert choice.message.role == 'assistant'
  assert choice.message.content == ''.join(e.text for e in events)
  assert out.usage.prompt_tokens == len(ids)
  got = [(c.token, c.logprob) for c in choice.logprobs.content]
  want = [(tok.decode([e.token_id]), e.logprob) for e in events if e.token_id >= 0]
  assert [t for t, _ in got] == [t for t, _ in want]
  np.testing.assert_allclose([lp for _, lp in got], [lp for _, lp in want], atol=1e-6)
  assert all(len(c.top_logprobs) == 2 for c in choice.logprobs.content)


def test_streaming_with_usage(client):
  full = client.completions.create(model=MODEL, prompt='class A:', max_tokens=8, temperature=0)
  chunks = list(client.completions.create(model=MODEL, prompt='class A:', max_tokens=8,
                                          temperature=0, stream=True,
                                          stream_options={'include_usage': True}))
  assert ''.join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
  assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == 'length'
  messages = [{'role': 'user', 'content': 'Hi'}]
  full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                        temperature=0)
  chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                               temperature=0, stream=True,
                                               stream_options={'include_usage': True}))
  assert chunks[0].choices[0].delta.role == 'assistant'
  text = ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices)
  assert text == full.choices[0].message.content
  assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_stream_ends_with_done(served):
  body = {'model': MODEL, 'prompt': 'x', 'max_tokens': 3, 'stream': True}
  text = httpx.post(served['url'] + '/v1/completions', json=body, timeout=60).text
  events = [line for line in text.split('\n\n') if line]
  assert events[-1] == 'data: [DONE]' and len(events) == 4
  assert all('usage' not in json.loads(e[len('data: '):]) for e in events[:-1])


# --- bad input -----------------------------------------------------------------------------

_CHAT = [{'role': 'user', 'content': 'hi'}]
BAD = [  # (endpoint, body, status, param, code)
    ('completions', b'{"prompt": "x",', 400, None, None),
    ('completions', {'prompt': 'x', 'max_tokens': 'ten'}, 400, 'max_tokens', None),
    ('completions', {'prompt': 12}, 400, 'prompt', None),
    ('completions', {'prompt': [1, 2.5]}, 400, 'prompt', None),
    ('completions', {'prompt': [5, 99999]}, 400, 'prompt', None),
    ('completions', {'prompt': 'x' * MAX_SEQ_LEN, 'max_tokens': 1}, 400, 'max_tokens',
     'context_length_exceeded'),
    ('completions', {'prompt': 'x', 'max_tokens': 0}, 400, 'max_tokens', None),
    ('completions', {'prompt': 'x', 'max_tokens': -1, 'echo': True}, 400, 'max_tokens', None),
    ('completions', {'prompt': 'x', 'model': 'gpt-9'}, 404, 'model', 'model_not_found'),
    ('completions', {'prompt': 'x', 'n': 5}, 400, 'n', None),
    ('completions', {'prompt': 'x', 'temperature': -1.0}, 400, 'temperature', None),
    ('completions', {'prompt': 'x', 'logprobs': 21}, 400, 'logprobs', None),
    ('completions', [1, 2], 400, None, None),
    ('chat/completions', {'messages': 'hi'}, 400, 'messages', None),
    ('chat/completions', {'messages': [{'content': 'hi'}]}, 400, 'messages', None),
    ('chat/completions', {'messages': _CHAT, 'max_tokens': 0}, 400, 'max_tokens', None),
    ('chat/completions', {'messages': _CHAT, 'model': 'nope'}, 404, 'model', 'model_not_found'),
    ('chat/completions', {'messages': _CHAT, 'top_p': 0.0}, 400, 'top_p', None),
    ('chat/completions', {'messages': [{'role': 'user', 'content': 'x' * MAX_SEQ_LEN}]}, 400,
     'messages', 'context_length_exceeded'),
]


def test_bad_input_is_a_4xx_in_openai_shape_and_the_server_keeps_serving(served):
  for endpoint, body, status, param, code in BAD:
    kwargs = {'content': body} if isinstance(body, bytes) else {'json': body}
    r = httpx.post(f'{served["url"]}/v1/{endpoint}', headers={'content-type': 'application/json'},
                   timeout=60, **kwargs)
    assert r.status_code == status, (body, r.text)
    error = r.json()['error']
    assert set(error) == {'message', 'type', 'param', 'code'}, error
    assert error['message'] and (error['param'], error['code']) == (param, code), (body, error)
  good = httpx.post(f'{served["url"]}/v1/completions', timeout=60,
                    json={'prompt': 'x', 'max_tokens': 2})
  assert good.status_code == 200 and good.json()['usage']['completion_tokens'] == 2


def test_bad_input_through_the_openai_client(client):
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model='nope', prompt='x')
  with pytest.raises(openai.BadRequestError, match='maximum context length'):
    client.completions.create(model=MODEL, prompt='x' * 200, max_tokens=4)


# --- overload, disconnects, shutdown -------------------------------------------------------

_LONG = dict(model=MODEL, prompt='a', max_tokens=MAX_SEQ_LEN - 2, ignore_eos=True,
             temperature=1.0, stream=True)


def test_a_full_queue_is_a_429(served):
  """The slots and the queue fill with long requests; the next one gets a 429."""
  engine = served['engine']
  _wait_idle(engine)
  with httpx.Client(base_url=served['url'], timeout=60) as http:
    streams = [http.stream('POST', '/v1/completions', json=_LONG) for _ in range(SLOTS + QUEUE)]
    responses = [s.__enter__() for s in streams]
    try:
      assert [r.status_code for r in responses] == [200] * (SLOTS + QUEUE)
      r = http.post('/v1/completions', json={'prompt': 'x', 'max_tokens': 2})
      assert r.status_code == 429, r.text
      assert r.json()['error']['code'] == 'queue_full'
    finally:
      for s in streams:
        s.__exit__(None, None, None)
  _wait_idle(engine)
  assert httpx.post(served['url'] + '/v1/completions', timeout=60,
                    json={'prompt': 'x', 'max_tokens': 2}).status_code == 200


def test_a_client_that_disconnects_frees_its_slot(served):
  engine = served['engine']
  _wait_idle(engine)
  before = engine.stats()['tokens_generated']
  with httpx.Client(base_url=served['url'], timeout=60) as http:
    with http.stream('POST', '/v1/completions', json=_LONG) as r:
      first = next(r.iter_lines())
      assert first.startswith('data: ')
  _wait_idle(engine)  # the request left its slot ...
  # ... long before its max_tokens: the server cancelled it.
  assert engine.stats()['tokens_generated'] - before < MAX_SEQ_LEN // 2


def test_a_client_that_leaves_before_a_whole_answer_frees_its_slot(served):
  """Long streams hold both slots, so a non-streaming request waits; its client gives up,
  and the server cancels the request (the engine counts it) instead of running it."""
  engine = served['engine']
  _wait_idle(engine)
  cancelled = engine.stats()['requests_cancelled']
  with httpx.Client(base_url=served['url'], timeout=60) as http:
    streams = [http.stream('POST', '/v1/completions', json=_LONG) for _ in range(SLOTS)]
    try:
      for s in streams:
        s.__enter__()
      with pytest.raises(httpx.ReadTimeout):
        httpx.post(served['url'] + '/v1/completions', json={**_LONG, 'stream': False},
                   timeout=0.05)
      deadline = time.time() + 30
      while engine.stats()['requests_cancelled'] == cancelled:
        assert time.time() < deadline, engine.stats()
        time.sleep(0.01)
    finally:
      for s in streams:
        s.__exit__(None, None, None)
  _wait_idle(engine)


def test_graceful_shutdown_finishes_requests_in_flight(served):
  """What SIGTERM does to uvicorn (its exit handler): no new connections, but the response
  in flight streams to its end before the server stops."""
  other = ServerThread(served['app'])
  body = {**_LONG, 'max_tokens': 40}
  with httpx.Client(base_url=other.url, timeout=60) as http:
    with http.stream('POST', '/v1/completions', json=body) as r:
      it = r.iter_lines()
      lines = [next(it)]
      other.server.handle_exit(signal.SIGTERM, None)
      lines += [line for line in it if line]
  other.thread.join(60)
  assert not other.thread.is_alive()
  assert lines[-1] == 'data: [DONE]'
  chunks = [json.loads(line[len('data: '):]) for line in lines[:-1]]
  assert sum(1 for c in chunks if c['choices']) == 40
  assert chunks[-1]['choices'][0]['finish_reason'] == 'length'


# --- tokenizer endpoints and metrics -------------------------------------------------------


def test_tokenize_round_trip(served):
  url, tok = served['url'], served['tok']
  text = 'héllo <s> wörld'
  r = httpx.post(url + '/tokenize', json={'prompt': text, 'add_special_tokens': False}).json()
  assert r['tokens'] == [*tok.encode('héllo '), tok.bos_id, *tok.encode(' wörld')]
  assert r['count'] == len(r['tokens']) and r['max_model_len'] == MAX_SEQ_LEN
  with_bos = httpx.post(url + '/tokenize', json={'prompt': text}).json()['tokens']
  assert with_bos == [tok.bos_id, *r['tokens']]
  back = httpx.post(url + '/detokenize', json={'tokens': r['tokens']}).json()['prompt']
  assert back == 'héllo  wörld'  # BOS is no text
  info = httpx.get(url + '/tokenizer_info').json()
  assert info['eos_token'] is None and info['bos_token'] == '<s>'
  assert info['chat_template'] == chat.DEFAULT_TEMPLATE


def test_metrics_are_prometheus_text(served, client):
  client.completions.create(model=MODEL, prompt='x', max_tokens=3)
  text = httpx.get(served['url'] + '/metrics').text
  families = {f.name: f for f in text_string_to_metric_families(text)}
  requests = {(s.labels['endpoint'], s.labels['status']): s.value
              for s in families['kiln_requests'].samples if s.name == 'kiln_requests_total'}
  assert requests[('/v1/completions', '200')] >= 1
  assert families['kiln_generation_tokens'].samples[0].value >= 3
  for name in ('kiln_time_to_first_token_seconds', 'kiln_inter_token_latency_seconds'):
    count = [s.value for s in families[name].samples if s.name == name + '_count'][0]
    assert count >= 1, name
  assert families['kiln_queue_depth'].samples[0].value >= 0


# --- lm-evaluation-harness -----------------------------------------------------------------

DOCS = [
    {'question': 'def add(a, b):\n    return a', 'choices': ['+ b', '- b', 'pass'], 'answer': 0},
    {'question': 'for i in', 'choices': ['range(3):', 'while:', 'if'], 'answer': 0},
    {'question': 'import', 'choices': ['os', 'class', '3 4'], 'answer': 0},
    {'question': 'x = [1, 2', 'choices': [', 3]', ')', 'def'], 'answer': 0},
    {'question': 'print("hi', 'choices': ['")', '"(', ';;'], 'answer': 1},
]


def _task_yaml(path, data):
  return f"""task: kiln_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {path / 'hf_cache'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
num_fewshot: 0
metric_list:
  - metric: acc
"""


def _in_process_scores(served) -> list[list[float]]:
  """Each doc's choice log-likelihoods by model.decode.score (one batch), no server."""
  tok = served['tok']
  pairs = [(tok.encode(d['question']), tok.encode(' ' + c)) for d in DOCS for c in d['choices']]
  width = max(len(ctx) + len(cont) for ctx, cont in pairs)
  ids = np.zeros((len(pairs), width), np.int32)
  for row, (ctx, cont) in enumerate(pairs):
    ids[row, :len(ctx) + len(cont)] = ctx + cont
  lengths = np.asarray([len(ctx) + len(cont) for ctx, cont in pairs], np.int32)
  lp, _, _ = decode.score(served['graphdef'], served['params'], jnp.asarray(ids),
                          jnp.asarray(lengths), vocab_limit=tok.vocab_size)
  lp = np.asarray(lp)
  flat = [float(lp[row, len(ctx):n].sum())
          for row, ((ctx, _), n) in enumerate(zip(pairs, lengths, strict=True))]
  widths = np.cumsum([0] + [len(d['choices']) for d in DOCS])
  return [flat[a:b] for a, b in zip(widths[:-1], widths[1:], strict=True)]


def test_lm_eval_local_completions_matches_in_process_scoring(served, tmp_path, monkeypatch):
  """lm-eval's local-completions model, with its remote tokenizer (our /tokenize), scores a
  multiple-choice task through the server: the same log-likelihoods, so the same accuracy,
  as model.decode.score in process. (`evaluator.evaluate` rather than `simple_evaluate`,
  which only adds seeding torch and collecting environment info, 20 s of imports.)"""
  from lm_eval.evaluator import evaluate
  from lm_eval.models.openai_completions import LocalCompletionsAPI
  from lm_eval.tasks import TaskManager

  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  data = tmp_path / 'docs.jsonl'
  data.write_text(''.join(json.dumps(d) + '\n' for d in DOCS))
  (tmp_path / 'kiln_mc.yaml').write_text(_task_yaml(tmp_path, data))
  lm = LocalCompletionsAPI(base_url=f'{served["url"]}/v1/completions', model=MODEL,
                           tokenizer_backend='remote', max_length=MAX_SEQ_LEN)
  tasks = TaskManager(include_path=str(tmp_path), include_defaults=False).load(['kiln_mc'])
  results = evaluate(lm=lm, task_dict=tasks, log_samples=True, bootstrap_iters=0)
  scores = _in_process_scores(served)
  want_acc = np.mean([int(np.argmax(s)) == d['answer'] for s, d in zip(scores, DOCS,
                                                                       strict=True)])
  assert results['results']['kiln_mc']['acc,none'] == pytest.approx(want_acc)
  for sample in results['samples']['kiln_mc']:
    got = [r[0][0] for r in sample['resps']]
    np.testing.assert_allclose(got, scores[sample['doc_id']], atol=2e-4)


# --- the command line ----------------------------------------------------------------------


def test_serve_checks_its_flags_before_loading(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '1'}
  proc = subprocess.run([sys.executable, '-m', 'serve', f'--workdir={tmp_path}'], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
  assert 'config.json does not exist' in proc.stderr.strip().splitlines()[-1]
