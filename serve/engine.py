"""The inference engine: continuous batching over decode slots on a paged KV cache.

JetStream's split, on one host thread:
- *prefill*: a waiting request takes a free slot and its prompt runs through the model in
  chunks of at most `prefill_chunk` tokens (one jitted program per chunk-length bucket),
  writing K/V into its pages; the last chunk samples the first token;
- *insert*: the request's slot row (last token, position, page table, sampling params)
  joins the batch;
- *generate*: one jitted program runs one token for every slot at once.
Each iteration of the loop runs prompt chunks of at most `prefill_chunk` tokens in all and
then one decode step, so a long prompt never stalls the requests already generating, and a
request joins or leaves the batch at every step.

Memory: pages are allocated as a request's tokens arrive (serve/pages.py), so the cache in
use follows the tokens in flight. Requests never run out of pages halfway: a request is
admitted only when the free pages cover its own worst case (prompt plus `max_tokens`) and
what the running ones may still take; until then it waits (vLLM preempts instead; a wait
is simpler and never recomputes). Full pages of a prompt are shared with later prompts
that start the same way (prefix caching).

Determinism: each request samples with its own key, `sampling.request_keys(seed, count)`,
and its own SamplingParams row, so its tokens do not depend on what else is in the batch.
Repetition penalty reads a per-slot mask of the tokens seen so far, kept on the device and
passed only while some running request uses it.

Host <-> device traffic is explicit (`jax.device_put`, `np.asarray`), so the loop runs
under `jax.transfer_guard('disallow')`: per decode step two small host arrays go in and
one [slots, 2 + 2 * MAX_LOGPROBS] float32 array comes back (two columns when no running
request asked for log-probs).
"""

import asyncio
import collections
import dataclasses
import functools
import logging
import math
import secrets
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data.errors import ConfigError
from model import decode, kv_cache, sampling
from serve.detokenize import Detokenizer
from serve.pages import PageAllocator, block_hashes

MAX_LOGPROBS = 20          # OpenAI's limit on top log-probs; always computed, sliced per request
LATENCY_SAMPLES = 10_000   # latency samples kept for stats()
SMALL_BATCH = 8            # decode rows while only the first slots are busy (fewer FLOPs)
_INT_COLS = 5              # decode ints row: token, position, seed, count, top_k; then pages
# Decode floats row: temperature, top_p, min_p, repetition_penalty (an empty slot: greedy).
_IDLE_FLOATS = np.array([0.0, 1.0, 0.0, 1.0], np.float32)


@dataclasses.dataclass(frozen=True)
class Request:
  """One completion request, in token ids (the server tokenizes and adds EOS to stops)."""
  prompt_ids: tuple[int, ...]
  max_tokens: int                       # new tokens; 0 allowed (scoring only)
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  seed: int | None = None               # None: the engine draws one
  stop_token_ids: tuple[int, ...] = ()
  stop: tuple[str, ...] = ()            # matched on the detokenized output, not returned
  logprobs: int | None = None           # None: none; N >= 0: chosen token's + top N
  prompt_logprobs: int | None = None    # the same for every prompt token (first: None)


@dataclasses.dataclass
class Event:
  """One generated token. `text` is the new text (maybe '' while a character or a possible
  stop string is incomplete). `prompt_logprobs` (first event only, when asked) has one
  entry per prompt token: None for the first, else (logprob, [(id, logprob)] * N)."""
  token_id: int
  text: str
  logprob: float | None
  top_logprobs: list[tuple[int, float]] | None
  finish_reason: str | None             # None, 'stop' or 'length' (last event)
  prompt_logprobs: list | None = None


class QueueFull(Exception):
  """submit() when `max_queue` requests are already waiting."""


class EngineError(RuntimeError):
  """The engine's loop failed; every open stream raises it."""


_CANCELLED = object()  # ends a stream without an event


class Stream:
  """The events of one request, for a thread (`for ev in stream`) or a coroutine
  (`async for ev in stream`). Ends after the event with a finish_reason, or, after
  `cancel()`, without one."""

  def __init__(self, engine: 'Engine'):
    self._engine = engine
    self._cond = threading.Condition()
    self._items: collections.deque = collections.deque()
    self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
    self.cancelled = False

  def _put(self, item) -> None:
    with self._cond:
      self._items.append(item)
      self._cond.notify_all()
      waiter = self._waiter
    if waiter is not None:
      loop, event = waiter
      loop.call_soon_threadsafe(event.set)

  def _pop(self) -> Event | None:
    """The next event; None when the stream has ended. Call with an item present."""
    item = self._items.popleft()
    if item is _CANCELLED:
      return None
    if isinstance(item, BaseException):
      raise EngineError(f'The engine stopped: {item!r}') from item
    return item

  def __iter__(self):
    while True:
      with self._cond:
        self._cond.wait_for(lambda: self._items)
        event = self._pop()
      if event is None:
        return
      yield event
      if event.finish_reason is not None:
        return

  async def __aiter__(self):
    loop, ready = asyncio.get_running_loop(), asyncio.Event()
    with self._cond:
      self._waiter = (loop, ready)
    while True:
      with self._cond:
        has = bool(self._items)
        if not has:
          ready.clear()
        else:
          event = self._pop()
      if not has:
        await ready.wait()
        continue
      if event is None:
        return
      yield event
      if event.finish_reason is not None:
        return

  def poll(self) -> list[Event]:
    """The events that have arrived, without waiting (for a caller that steps the engine
    itself)."""
    events = []
    with self._cond:
      while self._items:
        event = self._pop()
        if event is None:
          break
        events.append(event)
    return events

  def cancel(self) -> None:
    """Ends the request: its slot and pages are freed at the engine's next step."""
    self._engine._cancel(self)


@dataclasses.dataclass(eq=False)
class _Seq:
  """A request's state inside the engine (owned by the loop thread)."""
  request: Request
  stream: Stream
  seed: int
  max_tokens: int                       # clipped to the context
  tokens: list[int]                     # prompt, then generated
  hashes: list[bytes]                   # the prompt's full-block hash chain
  detok: Detokenizer
  submitted: float
  pages: list[int] = dataclasses.field(default_factory=list)
  computed: int = 0                     # positions whose K/V are in the cache
  registered: int = 0                   # prompt pages named in the prefix cache
  slot: int = -1
  generated: int = 0
  last_event: float = 0.0
  prompt_logprobs: list | None = None

  @property
  def prompt_len(self) -> int:
    return len(self.request.prompt_ids)


# --- the device programs ---------------------------------------------------------


def _sampling_params(floats_Bx4: jax.Array, top_k_B: jax.Array) -> sampling.SamplingParams:
  return sampling.SamplingParams(
      temperature=floats_Bx4[:, 0], top_k=top_k_B, top_p=floats_Bx4[:, 1],
      min_p=floats_Bx4[:, 2], repetition_penalty=floats_Bx4[:, 3])


def _pick(logits_BxV, params, seeds_B, counts_B, seen_BxV, vocab_limit: int,
          top_n: int = MAX_LOGPROBS):
  """Samples one token per row and packs [token, logprob, top ids, top logprobs] in float32
  (ids are exact in float32 below 2**24), so the host copies one array."""
  # Padded vocabulary rows are not tokens; log-probs are over the real ones, as in score().
  logits_BxV = decode.mask_vocab(logits_BxV, vocab_limit)
  keys_B = sampling.request_keys(seeds_B, counts_B)
  tokens_B = sampling.sample(logits_BxV, params, keys_B, seen_BxV)
  lp_B, top_ids_BxN, top_lp_BxN = sampling.token_logprobs(logits_BxV, tokens_B, top_n)
  packed = jnp.concatenate([tokens_B[:, None].astype(jnp.float32), lp_B[:, None],
                            top_ids_BxN.astype(jnp.float32), top_lp_BxN], axis=1)
  return tokens_B, packed


def _decode_step(graphdef, params, cache, ints_SxC, floats_Sx4, seen_SxV, *, vocab_limit,
                 top_n):
  """One token for every slot. ints columns: token, position (-1: empty slot), seed,
  count, top_k, then the page table (only as wide as the longest row needs: attention
  reads every position of the table)."""
  tokens_S, positions_S = ints_SxC[:, 0], ints_SxC[:, 1]
  logits_Sx1xV, cache = decode.forward(graphdef, params, tokens_S[:, None], positions_S[:, None],
                                       cache, ints_SxC[:, _INT_COLS:])
  params_S = _sampling_params(floats_Sx4, ints_SxC[:, 4])
  next_S, packed = _pick(logits_Sx1xV[:, 0], params_S, ints_SxC[:, 2], ints_SxC[:, 3], seen_SxV,
                         vocab_limit, top_n)
  if seen_SxV is not None:
    seen_SxV = seen_SxV.at[jnp.arange(next_S.shape[0]), next_S].set(True)
  return cache, packed, seen_SxV


def _prefill_step(graphdef, params, cache, ints, floats_1x4, seen_1xV, *, vocab_limit,
                  chunk, prompt_logprobs):
  """One prompt chunk of one request. ints: tokens [C], positions [C] (-1: padding),
  targets [C] (the next prompt token, for prompt log-probs), then last, seed, top_k and
  the page table. Samples the token after position `last` (used after the last chunk)."""
  tokens_C, positions_C, targets_C = ints[:chunk], ints[chunk:2 * chunk], ints[2 * chunk:3 * chunk]
  last, seed, top_k = ints[3 * chunk], ints[3 * chunk + 1], ints[3 * chunk + 2]
  logits_1xCxV, cache = decode.forward(graphdef, params, tokens_C[None], positions_C[None], cache,
                                       ints[None, 3 * chunk + 3:])
  logits_1xV = jax.lax.dynamic_index_in_dim(logits_1xCxV[0], last, keepdims=True)
  _, packed = _pick(logits_1xV, _sampling_params(floats_1x4, top_k[None]), seed[None],
                    jnp.zeros((1,), jnp.int32), seen_1xV, vocab_limit)
  prompt = None
  if prompt_logprobs:
    lp_C, ids_CxN, top_CxN = sampling.token_logprobs(
        decode.mask_vocab(logits_1xCxV[0], vocab_limit), targets_C, MAX_LOGPROBS)
    prompt = jnp.concatenate([lp_C[:, None], ids_CxN.astype(jnp.float32), top_CxN], axis=1)
  return cache, packed, prompt


def _top(ids_then_lps, n: int) -> list[tuple[int, float]]:
  """The first n of a packed row's MAX_LOGPROBS top ids and their log-probs."""
  lps = ids_then_lps[MAX_LOGPROBS:]
  return [(int(ids_then_lps[i]), float(lps[i])) for i in range(n)]


def _set_row(seen_SxV, slot, row_V):
  return seen_SxV.at[slot].set(row_V)


def chunk_buckets(prefill_chunk: int, smallest: int = 16) -> tuple[int, ...]:
  """The chunk lengths prefill compiles for: powers of two from `smallest`, and
  `prefill_chunk` itself, so a chunk pads at most to twice its length."""
  sizes, size = [], smallest
  while size < prefill_chunk:
    sizes.append(size)
    size *= 2
  return (*sizes, prefill_chunk)


def _positive(**values) -> None:
  for name, value in values.items():
    if value is None or int(value) < 1:
      raise ConfigError(f'{name}={value} must be a positive integer.')


class Engine:
  """Continuous batching of `Request`s over `max_slots` decode slots (module docstring).

  Drive it with `start()` (a background thread) or, in tests and benchmarks, by calling
  `step()` until `idle`.
  """

  def __init__(self, graphdef, params, model_cfg, tokenizer, *, max_slots: int = 32,
               page_size: int = 16, num_pages: int | None = None,
               max_seq_len: int | None = None, prefill_chunk: int = 256, max_queue: int = 256,
               mesh: jax.sharding.Mesh | None = None, prefix_caching: bool = True,
               cache_dtype=None):
    if max_seq_len is None:
      max_seq_len = model_cfg.max_positions if model_cfg.position == 'learned' else 2048
    _positive(max_slots=max_slots, page_size=page_size, max_seq_len=max_seq_len,
              prefill_chunk=prefill_chunk, max_queue=max_queue)
    if model_cfg.position == 'learned' and max_seq_len > model_cfg.max_positions:
      raise ConfigError(f'max_seq_len={max_seq_len} is longer than the model\'s position table '
                        f'({model_cfg.max_positions}).')
    self.max_seq_len = max_seq_len
    self.max_slots, self.page_size = max_slots, page_size
    self.prefill_chunk, self.max_queue = prefill_chunk, max_queue
    self.prefix_caching = prefix_caching
    self._pages_per_seq = math.ceil(max_seq_len / page_size)
    num_pages = max_slots * self._pages_per_seq if num_pages is None else num_pages
    _positive(num_pages=num_pages)
    self.tokenizer = tokenizer
    self._vocab = model_cfg.vocab_size
    self._pages = PageAllocator(num_pages, page_size)
    self._buckets = chunk_buckets(prefill_chunk)

    # Device state. Host inputs go to `self._device` (one device, or replicated on the mesh).
    self._params = params
    if mesh is None:  # parameters restored onto a mesh (train.runs) bring it along
      sharding = getattr(jax.tree.leaves(params)[0], 'sharding', None)
      if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
        mesh = sharding.mesh
    if mesh is None:
      self._device = jax.devices()[0]
      cache_sharding = self._device
    else:
      spec = jax.sharding.PartitionSpec
      self._device = jax.sharding.NamedSharding(mesh, spec())
      heads = 'tensor' if model_cfg.n_kv_heads % mesh.shape.get('tensor', 1) == 0 else None
      # [N, K, G, S, Dh]: KV heads over tensor; the page pool whole (any row, any page).
      cache_sharding = jax.sharding.NamedSharding(mesh, spec(None, heads, None, None, None))
    self._cache = jax.device_put(kv_cache.init_cache(
        model_cfg.n_layers, model_cfg.n_kv_heads, model_cfg.head_dim, num_pages=num_pages,
        page_size=page_size, dtype=cache_dtype or model_cfg.dtype), cache_sharding)
    self._seen = None   # [slots, V] bool, made when a request first uses repetition_penalty
    limit = tokenizer.vocab_size
    self._decode = {
        top_n: jax.jit(functools.partial(_decode_step, graphdef, vocab_limit=limit, top_n=top_n),
                       donate_argnums=(1, 4))
        for top_n in (0, MAX_LOGPROBS)}
    self._prefill = {
        (chunk, want): jax.jit(functools.partial(_prefill_step, graphdef, vocab_limit=limit,
                                                 chunk=chunk, prompt_logprobs=want),
                               donate_argnums=(1,))
        for chunk in self._buckets for want in (False, True)}
    self._set_row = jax.jit(_set_row, donate_argnums=(0,))

    # Host mirrors of the decode batch: one row per slot.
    self._slots: list[_Seq | None] = [None] * max_slots
    self._ints = np.zeros((max_slots, _INT_COLS + self._pages_per_seq), np.int32)
    self._ints[:, 1] = -1
    # Empty slots are greedy rows, so a batch of greedy requests samples without sorting.
    self._floats = np.tile(_IDLE_FLOATS, (max_slots, 1))
    self._prefilling: _Seq | None = None

    # Shared with submitting threads, under `_cond`.
    self._cond = threading.Condition()
    self._waiting: collections.deque[_Seq] = collections.deque()
    self._cancelled: set[Stream] = set()
    self._stopping = False
    self._drain = True
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None
    self._counts = collections.Counter()
    self._ttft = collections.deque(maxlen=LATENCY_SAMPLES)
    self._itl = collections.deque(maxlen=LATENCY_SAMPLES)

  # --- the public API ------------------------------------------------------------

  def submit(self, request: Request) -> Stream:
    """Queues a request (thread-safe); raises QueueFull when `max_queue` are waiting and
    ConfigError for a request that cannot run (the server checks these first)."""
    seq = self._new_seq(request)
    with self._cond:
      if self._error is not None:
        raise EngineError(f'The engine stopped: {self._error!r}')
      if self._stopping:
        raise EngineError('The engine is shutting down.')
      if len(self._waiting) >= self.max_queue:
        raise QueueFull(f'{self.max_queue} requests are already waiting.')
      self._waiting.append(seq)
      self._cond.notify_all()
    return seq.stream

  def start(self) -> None:
    """Runs the step loop on a background thread."""
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name='kiln-engine', daemon=True)
      self._thread.start()

  def shutdown(self, drain: bool = True) -> None:
    """Stops the loop: after every queued request has finished (drain) or at once, ending
    the open streams (no drain)."""
    with self._cond:
      self._stopping, self._drain = True, drain
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    elif drain:
      while not self.idle:
        self.step()
    if not drain:
      self._abort_all(_CANCELLED)
    with self._cond:
      self._stopping = False  # a stopped engine may start again

  def stats(self) -> dict:
    with self._cond:
      waiting = len(self._waiting)
    running = sum(s is not None for s in self._slots)
    return {'waiting': waiting, 'running': running,
            'free_pages': self._pages.available, 'pages_in_use': self._pages.in_use,
            'cached_pages': self._pages.cached, 'num_pages': self._pages.num_pages,
            'tokens_generated': self._counts['tokens_generated'],
            'prompt_tokens': self._counts['prompt_tokens'],
            'prefix_cache_hit_tokens': self._counts['prefix_hit_tokens'],
            'requests_finished': self._counts['requests_finished'],
            'requests_cancelled': self._counts['requests_cancelled'],
            'ttft_s': list(self._ttft), 'inter_token_s': list(self._itl)}

  @property
  def idle(self) -> bool:
    with self._cond:
      waiting = bool(self._waiting) or bool(self._cancelled)
    return not waiting and all(s is None for s in self._slots)

  # --- request checks --------------------------------------------------------------

  def _new_seq(self, r: Request) -> _Seq:
    prompt = tuple(int(t) for t in r.prompt_ids)
    if not prompt:
      raise ConfigError('The prompt is empty; give at least one token.')
    if min(prompt) < 0 or max(prompt) >= self.tokenizer.vocab_size:
      raise ConfigError(f'Prompt token ids must lie in [0, {self.tokenizer.vocab_size}).')
    if len(prompt) > self.max_seq_len:
      raise ConfigError(f'The prompt has {len(prompt)} tokens; the context is '
                        f'{self.max_seq_len}.')
    if r.max_tokens < 0:
      raise ConfigError(f'max_tokens={r.max_tokens} must be >= 0.')
    if r.temperature < 0 or not 0 < r.top_p <= 1 or r.top_k < 0 or not 0 <= r.min_p <= 1 \
        or r.repetition_penalty <= 0:
      raise ConfigError('Sampling needs temperature >= 0, 0 < top_p <= 1, top_k >= 0, '
                        '0 <= min_p <= 1 and repetition_penalty > 0.')
    for name in ('logprobs', 'prompt_logprobs'):
      n = getattr(r, name)
      if n is not None and not 0 <= n <= MAX_LOGPROBS:
        raise ConfigError(f'{name}={n} must be between 0 and {MAX_LOGPROBS}.')
    max_tokens = min(r.max_tokens, self.max_seq_len - len(prompt))
    if self._pages_needed(len(prompt), max_tokens) > self._pages.num_pages:
      raise ConfigError(f'The request needs more than the {self._pages.num_pages} KV-cache '
                        'pages of this engine.')
    seed = secrets.randbits(31) if r.seed is None else r.seed % 2**31
    return _Seq(request=dataclasses.replace(r, prompt_ids=prompt), stream=Stream(self),
                seed=seed, max_tokens=max_tokens, tokens=list(prompt),
                hashes=block_hashes(prompt, self.page_size),
                detok=Detokenizer(self.tokenizer, prompt, r.stop), submitted=time.perf_counter())

  def _pages_needed(self, prompt_len: int, max_tokens: int) -> int:
    """Pages a request holds at its end: every position written, i.e. the prompt and each
    generated token but the last (whose K/V nobody reads)."""
    return math.ceil((prompt_len + max(max_tokens - 1, 0)) / self.page_size)

  # --- the loop ----------------------------------------------------------------------

  def _loop(self) -> None:
    try:
      while True:
        with self._cond:
          self._cond.wait_for(lambda: self._stopping or self._has_work())
          if self._stopping and (not self._drain or not self._has_work()):
            return
        self.step()
    except Exception as e:  # a bug: the streams must not wait forever
      logging.exception('The engine loop failed.')
      with self._cond:
        self._error = e
      self._abort_all(e)

  def _has_work(self) -> bool:
    return (bool(self._waiting) or bool(self._cancelled)
            or any(s is not None for s in self._slots))

  def step(self) -> None:
    """One iteration: cancellations; prompt chunks of at most `prefill_chunk` tokens in all
    (several whole short prompts, or one chunk of a long one), each admitting the next
    waiting request; then one decode step for every running request."""
    self._handle_cancels()
    budget = self.prefill_chunk
    while budget > 0:
      if self._prefilling is None:  # after the first chunk, only prompts that fit whole
        self._admit(None if budget == self.prefill_chunk else budget)
      if self._prefilling is None:
        break
      budget -= self._prefill_chunk(self._prefilling, budget)
    if any(s is not None and s is not self._prefilling for s in self._slots):
      self._decode_all()

  # --- scheduling ------------------------------------------------------------------

  def _cancel(self, stream: Stream) -> None:
    with self._cond:
      stream.cancelled = True
      self._cancelled.add(stream)
      self._cond.notify_all()

  def _handle_cancels(self) -> None:
    with self._cond:
      if not self._cancelled:
        return
      cancelled, self._cancelled = self._cancelled, set()
      kept = [s for s in self._waiting if s.stream not in cancelled]
      dropped = [s for s in self._waiting if s.stream in cancelled]
      self._waiting = collections.deque(kept)
    dropped += [s for s in self._slots if s is not None and s.stream in cancelled]
    for seq in dropped:
      if seq.slot >= 0:
        self._release(seq)
      seq.stream._put(_CANCELLED)
    self._counts['requests_cancelled'] += len(dropped)

  def _outstanding(self) -> int:
    """Pages the admitted requests may still take."""
    return sum(self._pages_needed(s.prompt_len, s.max_tokens) - len(s.pages)
               for s in self._slots if s is not None)

  def _admit(self, max_prompt: int | None = None) -> None:
    """Moves the first waiting request into a free slot when the pages allow and its prompt
    has at most `max_prompt` tokens (FIFO: a big request is not overtaken, so it never
    starves)."""
    if None not in self._slots:
      return
    with self._cond:
      if not self._waiting:
        return
      seq = self._waiting[0]
    if max_prompt is not None and seq.prompt_len > max_prompt:
      return
    hits = []
    if self.prefix_caching and seq.request.prompt_logprobs is None:
      # The last prompt token is always computed: its logits give the first token.
      hits = self._pages.lookup(seq.hashes[:(seq.prompt_len - 1) // self.page_size])
    unheld = sum(self._pages.refcount(p) == 0 for p in hits)
    new = self._pages_needed(seq.prompt_len, seq.max_tokens) - len(hits)
    if self._pages.available - unheld - new < self._outstanding():
      return
    with self._cond:
      self._waiting.popleft()
    self._pages.share(hits)
    seq.pages = list(hits)
    seq.computed, seq.registered = len(hits) * self.page_size, len(hits)
    self._counts['prefix_hit_tokens'] += seq.computed
    self._counts['prompt_tokens'] += seq.prompt_len
    seq.slot = self._slots.index(None)
    self._slots[seq.slot] = seq
    self._prefilling = seq

  def _grow(self, seq: _Seq, positions: int) -> None:
    """Allocates pages until `seq` has room for `positions` positions."""
    while len(seq.pages) * self.page_size < positions:
      seq.pages.append(self._pages.allocate())

  def _release(self, seq: _Seq) -> None:
    self._pages.release(seq.pages)
    seq.pages = []
    self._slots[seq.slot] = None
    self._ints[seq.slot, 1] = -1
    self._floats[seq.slot] = _IDLE_FLOATS
    if self._prefilling is seq:
      self._prefilling = None

  # --- prefill ---------------------------------------------------------------------

  def _prefill_chunk(self, seq: _Seq, budget: int) -> int:
    """Runs the next <= `budget` prompt tokens of `seq`; returns how many."""
    r, start = seq.request, seq.computed
    end = min(seq.prompt_len, start + budget)
    n = end - start
    chunk = next(b for b in self._buckets if b >= n)
    self._grow(seq, end)
    final = end == seq.prompt_len
    want_prompt = r.prompt_logprobs is not None
    ints = np.zeros(3 * chunk + 3 + self._pages_per_seq, np.int32)
    ints[:n] = r.prompt_ids[start:end]
    ints[chunk:2 * chunk] = -1
    ints[chunk:chunk + n] = np.arange(start, end)
    targets = r.prompt_ids[start + 1:end + 1]
    ints[2 * chunk:2 * chunk + len(targets)] = targets
    ints[3 * chunk:3 * chunk + 3] = n - 1, seq.seed, r.top_k
    ints[3 * chunk + 3:3 * chunk + 3 + len(seq.pages)] = seq.pages
    floats = np.array([[r.temperature, r.top_p, r.min_p, r.repetition_penalty]], np.float32)
    seen = None
    if r.repetition_penalty != 1.0:
      row = np.zeros((1, self._vocab), bool)
      row[0, list(r.prompt_ids)] = True
      seen = jax.device_put(row, self._device)
    put = functools.partial(jax.device_put, device=self._device)
    self._cache, packed, prompt = self._prefill[chunk, want_prompt](
        self._params, self._cache, put(ints), put(floats), seen)
    seq.computed = end
    if self.prefix_caching:
      for i in range(seq.registered, end // self.page_size):
        self._pages.register(seq.pages[i], seq.hashes[i])
      seq.registered = max(seq.registered, end // self.page_size)
    if want_prompt:
      self._add_prompt_logprobs(seq, np.asarray(prompt)[:len(targets)], targets)
    if final:
      self._prefilling = None
      if seq.max_tokens == 0:
        self._finish_scoring(seq)
      else:
        self._first_token(seq, np.asarray(packed)[0])
    return n

  def _add_prompt_logprobs(self, seq: _Seq, rows_Tx, targets: Sequence[int]) -> None:
    n = seq.request.prompt_logprobs
    if seq.prompt_logprobs is None:
      seq.prompt_logprobs = [None]
    for row in rows_Tx:
      seq.prompt_logprobs.append((float(row[0]), _top(row[1:], n)))

  def _finish_scoring(self, seq: _Seq) -> None:
    self._release(seq)
    self._counts['requests_finished'] += 1
    seq.stream._put(Event(token_id=-1, text='', logprob=None, top_logprobs=None,
                          finish_reason='length', prompt_logprobs=seq.prompt_logprobs))

  def _first_token(self, seq: _Seq, packed) -> None:
    """The insert: the token sampled by the last chunk, then the slot's decode row."""
    if self._emit(seq, packed):
      return
    r, b = seq.request, seq.slot
    self._ints[b, 2:_INT_COLS] = seq.seed, 0, r.top_k
    self._floats[b] = r.temperature, r.top_p, r.min_p, r.repetition_penalty
    self._ints[b, _INT_COLS:] = 0
    self._ints[b, _INT_COLS:_INT_COLS + len(seq.pages)] = seq.pages
    if r.repetition_penalty != 1.0:
      if self._seen is None:
        self._seen = jax.device_put(np.zeros((self.max_slots, self._vocab), bool), self._device)
      row = np.zeros(self._vocab, bool)
      row[seq.tokens] = True
      put = functools.partial(jax.device_put, device=self._device)
      self._seen = self._set_row(self._seen, put(np.int32(b)), put(row))

  # --- decode ----------------------------------------------------------------------

  def _decode_all(self) -> None:
    running = [s for s in self._slots if s is not None and s is not self._prefilling]
    for seq in running:
      b, position = seq.slot, len(seq.tokens) - 1
      had = len(seq.pages)
      self._grow(seq, position + 1)
      self._ints[b, _INT_COLS + had:_INT_COLS + len(seq.pages)] = seq.pages[had:]
      self._ints[b, 0:2] = seq.tokens[-1], position
      self._ints[b, 3] = seq.generated
    penalized = any(s.request.repetition_penalty != 1.0 for s in running)
    top_n = MAX_LOGPROBS if any(s.request.logprobs is not None for s in running) else 0
    # The page table's width: a power of two covering the longest row (few programs).
    width = min(self._pages_per_seq, 1 << (max(len(s.pages) for s in running) - 1).bit_length())
    # Slots fill lowest first, so while only the first SMALL_BATCH are busy the step runs
    # those rows alone (a lone request's step at 32 slots cost 6x its own). Two sizes keep
    # the compiled programs few; the penalty rows (`seen`) stay whole.
    busy_small = max(s.slot for s in running) < SMALL_BATCH and not penalized
    rows = min(self.max_slots, SMALL_BATCH) if busy_small else self.max_slots
    put = functools.partial(jax.device_put, device=self._device)
    self._cache, packed, seen = self._decode[top_n](
        self._params, self._cache, put(self._ints[:rows, :_INT_COLS + width]),
        put(self._floats[:rows]), self._seen if penalized else None)
    if penalized:
      self._seen = seen
    packed = np.asarray(packed)
    for seq in running:
      seq.computed = len(seq.tokens)
      if self._emit(seq, packed[seq.slot]):
        self._ints[seq.slot, 1] = -1

  # --- output ----------------------------------------------------------------------

  def _emit(self, seq: _Seq, packed) -> bool:
    """Hands one sampled token to the stream; True when the request is finished (then its
    slot and pages are free)."""
    r = seq.request
    token = int(packed[0])
    seq.tokens.append(token)
    seq.generated += 1
    self._counts['tokens_generated'] += 1
    if token in r.stop_token_ids:
      text, finish = seq.detok.flush(), 'stop'
    else:
      text, stopped = seq.detok.add(token)
      finish = 'stop' if stopped else None
      if finish is None and seq.generated >= seq.max_tokens:
        text, finish = text + seq.detok.flush(), 'length'
    logprob = top = None
    if r.logprobs is not None:
      n = r.logprobs
      logprob = float(packed[1])
      top = _top(packed[2:], n)
    now = time.perf_counter()
    if seq.generated == 1:
      self._ttft.append(now - seq.submitted)
    else:
      self._itl.append(now - seq.last_event)
    seq.last_event = now
    first = seq.generated == 1
    seq.stream._put(Event(token_id=token, text=text, logprob=logprob, top_logprobs=top,
                          finish_reason=finish,
                          prompt_logprobs=seq.prompt_logprobs if first else None))
    if finish is not None:
      self._release(seq)
      self._counts['requests_finished'] += 1
    return finish is not None

  def _abort_all(self, item) -> None:
    with self._cond:
      waiting, self._waiting = list(self._waiting), collections.deque()
    for seq in waiting + [s for s in self._slots if s is not None]:
      if seq.slot >= 0 and self._slots[seq.slot] is seq:
        self._release(seq)
      seq.stream._put(item)


QUANT_MODES = ('none', 'int8', 'int4')


def load_engine(workdir: str, *, quant: str = 'none', **engine_kwargs):
  """(Engine, tokenizer) for a Kiln LM run or an HF import (`train.convert import`), from its
  newest checkpoint. max_seq_len defaults to the run's `data.seq_len`.

  The engine serves the run's inference model (`task.inference_params`: a LoRA run's
  adapters merged into its weights). `quant` 'int8' (per output channel) or 'int4'
  (groups of 128 along the contraction axis) stores its projection weights quantized,
  converted here at load (model/quant.py); activations, embeddings and the KV cache stay in
  the model's dtypes.
  """
  from train import runs  # serve sits above train: loading a run is train's business
  from train.tasks import get_task
  if quant not in QUANT_MODES:
    raise ConfigError(f'quant={quant!r} is not available; choose one of '
                      f'{", ".join(QUANT_MODES)}.')
  from train.tasks.lm import LMTask
  config = runs.load_run_config(workdir)
  task = get_task(config)
  if not (isinstance(task, LMTask) and task.makes_text):  # SFT, DPO, distillation: the LM's
    raise ConfigError(f'{workdir} is a {config.task!r} run; the engine serves language models.')
  task.setup_inference(workdir)
  if quant != 'none':
    task.set_inference_quant(quant)  # checked on shapes, before the checkpoint is read
  state, _ = runs.restore_latest(task, config, workdir)
  params = task.inference_params(state)
  del state  # the float weights go once converted
  engine_kwargs.setdefault('max_seq_len', int(config.data.seq_len))
  engine = Engine(task.inference_graphdef, params, task.inference_model_cfg, task.tokenizer,
                  **engine_kwargs)
  return engine, task.tokenizer
