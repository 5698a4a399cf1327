"""The inference engine (serve/engine.py) on a tiny random transformer.

Oracles: the model's own full-recompute forward (greedy tokens, one host step per token),
`model.decode.score` (log-probs), the same request run alone (batching must not change a
request's tokens), and closed forms for the pages in use. Every engine is stepped under
`jax.transfer_guard('disallow')`, as the server runs it.
"""

import asyncio
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from data.errors import ConfigError
from data.tokenizers import ByteTokenizer, CharTokenizer
from model import decode
from model import transformer as tfm
from serve import engine as engine_lib
from serve.detokenize import Detokenizer
from serve.pages import PageAllocator, block_hashes

PAGE = 4
CHUNK = 16
CHARS = list('abcdefghijklmnopqrstuvwxyz .,;:!')  # 32 ids, each one printable character


@pytest.fixture(scope='module')
def model():
  cfg = tfm.TransformerConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              head_dim=8, mlp_dim=64, dtype=jnp.float32)
  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(nnx.jit(lambda: tfm.Transformer(cfg, rngs=nnx.Rngs(0)))())
  return graphdef, params, cfg, CharTokenizer(CHARS)


def make_engine(model, **kwargs):
  graphdef, params, cfg, tokenizer = model
  kwargs = {'max_slots': 3, 'page_size': PAGE, 'max_seq_len': 64, 'prefill_chunk': CHUNK,
            'num_pages': 40, **kwargs}
  return engine_lib.Engine(graphdef, params, cfg, tokenizer, **kwargs)


@pytest.fixture(scope='module')
def engine(model):
  return make_engine(model)


def run(engine, steps_between=None, requests=()):
  """Submits `requests` (one after each `steps_between[i]` steps), steps until idle under
  the transfer guard, and returns each request's events."""
  streams = []
  with jax.transfer_guard('disallow'):
    for i, request in enumerate(requests):
      for _ in range((steps_between or [0] * len(requests))[i]):
        engine.step()
      streams.append(engine.submit(request))
    while not engine.idle:
      engine.step()
  return [s.poll() for s in streams]


def greedy_oracle(model, prompt, n, length=64):
  """Greedy continuation by recomputing the whole sequence (padded to `length`; causal
  attention keeps the padding out of earlier positions) for every token."""
  graphdef, params, _, tokenizer = model
  logits_fn = jax.jit(lambda params, tokens_1xL: nnx.merge(graphdef, params)(tokens_1xL)[0])
  ids = list(prompt)
  for _ in range(n):
    with jax.transfer_guard('allow'):
      logits_LxV = np.asarray(logits_fn(params, jnp.asarray([ids + [0] * (length - len(ids))])))
    ids.append(int(np.argmax(logits_LxV[len(ids) - 1, :tokenizer.vocab_size])))
  return ids[len(prompt):]


def prompt_of(length, seed):
  return tuple(int(t) for t in np.random.default_rng(seed).integers(0, len(CHARS), length))


REQUESTS = [  # lengths around the page and chunk sizes; one prompt over two chunks
    engine_lib.Request(prompt_of(5, 0), max_tokens=7, temperature=0.0),
    engine_lib.Request(prompt_of(37, 1), max_tokens=4, temperature=0.0),
    engine_lib.Request(prompt_of(3, 2), max_tokens=9, temperature=1.0, seed=11),
    engine_lib.Request(prompt_of(16, 3), max_tokens=5, temperature=0.8, top_k=5, seed=12),
    engine_lib.Request(prompt_of(9, 4), max_tokens=6, temperature=1.0, top_p=0.9, seed=13,
                       repetition_penalty=1.3),
    engine_lib.Request(prompt_of(4, 5), max_tokens=3, temperature=0.0, min_p=0.1),
]


def tokens(events):
  return [e.token_id for e in events]


@pytest.fixture(scope='module')
def alone(engine):
  return [run(engine, requests=[r])[0] for r in REQUESTS]


def test_greedy_matches_full_recompute(model, alone):
  for request, events in zip(REQUESTS, alone, strict=True):
    assert len(events) == request.max_tokens and events[-1].finish_reason == 'length'
    if request.temperature == 0:
      assert tokens(events) == greedy_oracle(model, request.prompt_ids, request.max_tokens)


def test_continuous_batching_gives_each_request_its_tokens_alone(engine, alone):
  # More requests than slots, joining at different steps, one prompt over two chunks.
  batched = run(engine, steps_between=[0, 0, 2, 1, 3, 0], requests=REQUESTS)
  assert [tokens(e) for e in batched] == [tokens(e) for e in alone]
  stats = engine.stats()
  assert stats['pages_in_use'] == 0 and stats['running'] == 0 and stats['waiting'] == 0


def test_more_slots_than_the_small_batch_give_each_request_its_tokens_alone(model, alone):
  # Steps run only the first SMALL_BATCH rows while no higher slot is busy, all of them
  # after; requests that cross between the two keep their tokens.
  assert engine_lib.SMALL_BATCH < 12
  wide = make_engine(model, max_slots=12, num_pages=160)
  batched = run(wide, steps_between=[0] * 6 + [1] * 6, requests=REQUESTS * 2)
  assert [tokens(e) for e in batched] == [tokens(e) for e in alone] * 2


def test_background_thread_and_async_streams(engine, alone):
  engine.start()
  try:
    streams = [engine.submit(r) for r in REQUESTS[:3]]
    sync_tokens = [tokens(list(s)) for s in streams]

    async def consume():
      streams = [engine.submit(r) for r in REQUESTS[3:]]
      return [tokens([e async for e in s]) for s in streams]
    async_tokens = asyncio.run(consume())
  finally:
    engine.shutdown()
  assert sync_tokens + async_tokens == [tokens(e) for e in alone]


def test_prefix_caching_shares_pages_once_and_keeps_tokens(model):
  shared = prompt_of(2 * PAGE, 7)
  requests = [engine_lib.Request(shared + prompt_of(3, 8 + i), max_tokens=6, temperature=0.0)
              for i in range(2)]
  cached, plain = make_engine(model), make_engine(model, prefix_caching=False)
  with jax.transfer_guard('disallow'):
    streams = [cached.submit(r) for r in requests]
    cached.step()  # the first request's prefill (naming its two full pages) and a decode
    cached.step()  # the second one reuses them
    assert cached.stats()['prefix_cache_hit_tokens'] == 2 * PAGE
    got = [len(s.poll()) for s in streams]
    # Pages hold every position written: the prompt and all generated tokens but the last.
    written = [len(r.prompt_ids) + n - 1 for r, n in zip(requests, got, strict=True)]
    private = sum(math.ceil(w / PAGE) - 2 for w in written)
    assert cached.stats()['pages_in_use'] == 2 + private
  assert ([tokens(e) for e in run(cached, requests=requests)]
          == [tokens(e) for e in run(plain, requests=requests)])


def test_pages_in_use_track_tokens_in_flight(model):
  engine = make_engine(model, prefix_caching=False)
  requests = [engine_lib.Request(prompt_of(n, 20 + n), max_tokens=m, temperature=0.0)
              for n, m in ((6, 9), (13, 3), (2, 12), (16, 5))]
  with jax.transfer_guard('disallow'):
    streams = [engine.submit(r) for r in requests]
    seen = [[] for _ in requests]
    while not engine.idle:
      engine.step()
      expected = 0
      for r, s, events in zip(requests, streams, seen, strict=True):
        events += s.poll()
        if events and events[-1].finish_reason is None:
          expected += math.ceil((len(r.prompt_ids) + len(events) - 1) / PAGE)
      assert engine.stats()['pages_in_use'] == expected
    assert [len(e) for e in seen] == [r.max_tokens for r in requests]
    # A prompt over two chunks holds the first chunk's pages between them.
    long = engine.submit(engine_lib.Request(prompt_of(CHUNK + 5, 29), max_tokens=4))
    engine.step()
    assert engine.stats()['pages_in_use'] == CHUNK // PAGE and not long.poll()
    engine.step()
    assert len(long.poll()) == 2
    assert engine.stats()['pages_in_use'] == math.ceil((CHUNK + 5 + 1) / PAGE)


def test_requests_wait_when_pages_run_out(engine):
  # Each needs 40 + 24 - 1 = 63 positions, 16 of the 40 pages: the third waits.
  requests = [engine_lib.Request(prompt_of(40, 30 + i), max_tokens=24, temperature=0.0)
              for i in range(3)]
  with jax.transfer_guard('disallow'):
    streams = [engine.submit(r) for r in requests]
    for _ in range(6):
      engine.step()
    assert engine.stats()['running'] == 2 and engine.stats()['waiting'] == 1
    while not engine.idle:
      engine.step()
  assert [len(s.poll()) for s in streams] == [24, 24, 24]


def test_cancel_frees_slot_and_pages(engine):
  long = engine_lib.Request(prompt_of(10, 40), max_tokens=40, temperature=0.0)
  with jax.transfer_guard('disallow'):
    streams = [engine.submit(long) for _ in range(4)]  # three run, one waits
    engine.step()
    engine.step()
    assert engine.stats()['pages_in_use'] > 0
    for s in streams[1:]:
      s.cancel()
    engine.step()
    assert engine.stats()['waiting'] == 0 and engine.stats()['running'] == 1
    streams[0].cancel()
    engine.step()
  assert engine.idle and engine.stats()['pages_in_use'] == 0
  for s in streams:
    assert all(e.finish_reason is None for e in s)  # ends without a finish event


def test_queue_full(model):
  engine = make_engine(model, max_queue=2)
  request = engine_lib.Request(prompt_of(3, 50), max_tokens=1)
  engine.submit(request)
  engine.submit(request)
  with pytest.raises(engine_lib.QueueFull):
    engine.submit(request)


def test_stop_ids_and_stop_strings(engine, alone):
  base, events = REQUESTS[0], alone[0]
  ids = tokens(events)
  stop_id = ids[3]
  first = ids.index(stop_id)
  by_id = run(engine, requests=[engine_lib.Request(
      base.prompt_ids, max_tokens=base.max_tokens, temperature=0.0, stop_token_ids=(stop_id,))])[0]
  assert tokens(by_id) == ids[:first + 1] and by_id[-1].finish_reason == 'stop'
  text = ''.join(CHARS[i] for i in ids)
  assert ''.join(e.text for e in events) == text
  stop = text[2:4]
  by_text = run(engine, requests=[engine_lib.Request(
      base.prompt_ids, max_tokens=base.max_tokens, temperature=0.0, stop=('zzzz', stop))])[0]
  assert ''.join(e.text for e in by_text) == text[:text.index(stop)]
  assert by_text[-1].finish_reason == 'stop'
  assert tokens(by_text) == ids[:len(by_text)]


def test_logprobs_equal_score(model, engine):
  graphdef, params, _, tokenizer = model
  prompt = prompt_of(CHUNK + 5, 60)  # prompt log-probs from two chunks
  scoring, generating = run(engine, requests=[
      engine_lib.Request(prompt, max_tokens=0, prompt_logprobs=3),
      engine_lib.Request(prompt, max_tokens=4, temperature=0.0, logprobs=2, prompt_logprobs=0)])
  assert len(scoring) == 1 and scoring[0].token_id == -1
  assert scoring[0].finish_reason == 'length'
  full = prompt + tuple(tokens(generating))
  with jax.transfer_guard('allow'):
    expected = np.asarray(decode.score(graphdef, params, jnp.asarray([full]),
                                       jnp.asarray([len(full)]),
                                       vocab_limit=tokenizer.vocab_size)[0])[0]
  entries = scoring[0].prompt_logprobs
  assert entries[0] is None and len(entries) == len(prompt)
  np.testing.assert_allclose([lp for lp, _ in entries[1:]], expected[1:len(prompt)], atol=1e-4)
  for (lp, top), target in zip(entries[1:], prompt[1:], strict=True):
    assert len(top) == 3 and top[0][1] >= lp - 1e-6
    assert [t for t, _ in top] == sorted([t for t, _ in top], key=dict(top).get, reverse=True)
    assert (target in dict(top)) == (lp >= top[-1][1])
  assert [lp for lp, top in generating[0].prompt_logprobs[1:]] == [lp for lp, _ in entries[1:]]
  np.testing.assert_allclose([e.logprob for e in generating], expected[len(prompt):], atol=1e-4)
  for e in generating:  # greedy: the chosen token is the most likely one
    assert len(e.top_logprobs) == 2 and e.top_logprobs[0] == (e.token_id, pytest.approx(e.logprob))


def test_bad_requests_are_one_line_errors(engine):
  for bad, match in [
      (engine_lib.Request((), max_tokens=1), 'empty'),
      (engine_lib.Request((1,) * 65, max_tokens=1), 'context'),
      (engine_lib.Request((999,), max_tokens=1), 'token ids'),
      (engine_lib.Request((1,), max_tokens=1, top_p=0.0), 'top_p'),
      (engine_lib.Request((1,), max_tokens=1, logprobs=21), 'logprobs=21')]:
    with pytest.raises(ConfigError, match=match):
      engine.submit(bad)


# --- the parts without a model -------------------------------------------------------


def test_detokenizer_holds_partial_characters_and_stop_strings():
  tokenizer = ByteTokenizer()
  detok = Detokenizer(tokenizer, tokenizer.encode('say: '), stop=('lo w',))
  deltas = []
  for b in 'héllo world'.encode():
    delta, stopped = detok.add(b)
    deltas.append(delta)
    if stopped:
      break
  assert stopped and ''.join(deltas) == 'hél'
  assert deltas[1] == ''  # the first byte of 'é' alone is no text


def test_page_allocator_refcounts_and_prefix_cache():
  pages = PageAllocator(num_pages=4, page_size=2)
  hashes = block_hashes([1, 2, 3, 4, 5], 2)
  assert len(hashes) == 2 and block_hashes([1, 2, 3, 9], 2)[0] == hashes[0]
  assert block_hashes([1, 2, 3, 9], 2)[1] != hashes[1]
  a, b = pages.allocate(), pages.allocate()
  pages.register(a, hashes[0])
  pages.register(b, hashes[1])
  assert pages.lookup(hashes) == [a, b] and pages.lookup(block_hashes([9, 9, 3, 4], 2)) == []
  pages.share([a, b])
  assert pages.in_use == 2 and pages.refcount(a) == 2
  pages.release([a, b])
  pages.release([a, b])
  assert pages.in_use == 0 and pages.available == 4 and pages.cached == 2
  c, d = pages.allocate(), pages.allocate()  # unnamed pages first
  assert {c, d}.isdisjoint({a, b}) and pages.lookup(hashes) == [a, b]
  pages.share([a])
  assert pages.allocate() == b  # then the cached one nobody holds
  assert pages.lookup(hashes) == [a] and pages.available == 0
  with pytest.raises(Exception, match='in use'):
    pages.allocate()


def test_stream_ends_on_engine_error(model):
  engine = make_engine(model)
  stream = engine.submit(engine_lib.Request(prompt_of(3, 70), max_tokens=2))
  engine._params = None  # a bug inside the loop
  engine.start()
  with pytest.raises(engine_lib.EngineError):
    list(stream)
  engine._thread.join()
  with pytest.raises(engine_lib.EngineError):
    engine.submit(engine_lib.Request(prompt_of(3, 70), max_tokens=2))


def test_sharded_parameters_give_the_same_tokens(model, alone):
  """Parameters sharded as in training (heads over tensor, embed over fsdp) and the cache's
  KV heads over tensor: the engine finds the mesh on the parameters."""
  from train import mesh as mesh_lib
  graphdef, params, cfg, tokenizer = model
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(nnx.merge(graphdef, params))))
  shardings = mesh_lib.shardings(params, specs, mesh, tfm.LOGICAL_AXIS_RULES)
  sharded = jax.device_put(params, shardings)
  engine = make_engine((graphdef, sharded, cfg, tokenizer))
  assert engine._cache.k.sharding.spec[1] == 'tensor'
  got = run(engine, requests=REQUESTS[:4])
  assert [tokens(e) for e in got] == [tokens(e) for e in alone[:4]]


def test_load_engine_refuses_what_it_cannot_serve(tmp_path):
  with pytest.raises(ConfigError, match="quant='int3'"):
    engine_lib.load_engine(str(tmp_path), quant='int3')
  with pytest.raises(ConfigError, match='config.json does not exist'):
    engine_lib.load_engine(str(tmp_path))
