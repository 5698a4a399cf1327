"""The OpenAI-compatible HTTP server over the engine (FastAPI; uvicorn runs it).

`create_app(engine, tokenizer, model_name=...)` builds the app. Endpoints:
- `GET /v1/models`, `GET /v1/models/{id}`: the one model served.
- `POST /v1/completions`: a prompt as a string, a list of strings, token ids or lists of
  token ids; `echo`, `logprobs` (the legacy shape: tokens, token_logprobs, top_logprobs,
  text_offset), `max_tokens` (0 with `echo` scores the prompt). Token-id prompts are used
  as given, so lm-evaluation-harness's `local-completions` gets log-probs aligned one to
  one with the ids it sent. String prompts get the tokenizer's BOS in front, as Kiln's
  training data has it.
- `POST /v1/chat/completions`: the run's chat template renders the messages.
- Both take `n`, `stop`, `seed`, `temperature`, `top_p`, vLLM's extra `top_k`, `min_p`,
  `repetition_penalty`, `ignore_eos`, `stop_token_ids`, and stream as server-sent events
  ending with `data: [DONE]` (`stream_options.include_usage` adds a last usage chunk).
- `/tokenize`, `/detokenize`, `/tokenizer_info` in the shapes lm-evaluation-harness's
  remote tokenizer reads, `/health`, and `/metrics` (Prometheus text).

Every error is a 4xx or 5xx in OpenAI's shape `{"error": {"message", "type", "param",
"code"}}`; a full engine queue is a 429. A streaming client that disconnects cancels its
requests, which frees their slots; so does one that leaves before a
non-streaming answer is complete.
"""

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from data.errors import ConfigError
from serve import engine as engine_lib
from serve import protocol as P
from serve.metrics import CONTENT_TYPE, ServerMetrics

MAX_LOGPROBS = 20


class APIError(Exception):
  """An error the client caused (or an overload), answered in OpenAI's error shape."""

  def __init__(self, message: str, *, status: int = 400, param: str | None = None,
               code: str | None = None, type: str = 'invalid_request_error'):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type = (
        status, message, param, code, type)


def _error_response(status: int, message: str, type: str, param=None, code=None) -> JSONResponse:
  body = P.ErrorResponse(error=P.ErrorBody(message=message, type=type, param=param, code=code))
  return JSONResponse(P.dump(body), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
  """One sentence for pydantic's first complaint, and the field it is about."""
  err = exc.errors()[0]
  loc = [str(x) for x in err.get('loc', ()) if x != 'body']
  if err.get('type') == 'json_invalid':
    detail = err.get('ctx', {}).get('error')
    return 'The request body is not valid JSON' + (f': {detail}.' if detail else '.'), None
  # Union members add their type to the location ('prompt.list[int].0'): name the field.
  field = loc[0] if loc else None
  got = repr(err.get('input'))[:80]
  return f'{field or "body"}: {err.get("msg", "invalid value")} (got {got}).', field


# --- the model's side: turning requests into engine requests ---------------------------


class _Served:
  """The engine, tokenizer and settings the endpoints share."""

  def __init__(self, engine, tokenizer, model_name: str, chat_template, max_n: int):
    self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
    self.chat_template, self.max_n = chat_template, max_n
    self.vocab_size = int(tokenizer.vocab_size)
    self.bos_id = int(getattr(tokenizer, 'bos_id', -1))
    self.eos_id = int(getattr(tokenizer, 'eos_id', -1))
    self.metrics = ServerMetrics(engine.stats)
    self._token_strings: dict[int, str] = {}

  @property
  def max_seq_len(self) -> int:
    return int(self.engine.max_seq_len)

  def token_string(self, token_id: int) -> str:
    if token_id not in self._token_strings:
      self._token_strings[token_id] = self.tokenizer.decode([token_id])
    return self._token_strings[token_id]

  def encode(self, text: str, add_bos: bool) -> list[int]:
    """Ids of `text`; special tokens written in it (`<s>`) become their ids, as Hugging Face
    tokenizers (and so vLLM) read them."""
    if self.chat_template is not None:
      ids = self.chat_template.encode(text)
    else:
      ids = list(self.tokenizer.encode(text))
    return [self.bos_id, *ids] if add_bos and self.bos_id >= 0 else ids

  def end_of_turn_id(self) -> int | None:
    """The special token that ends a turn in the chat template, if it is one token."""
    text = getattr(self.chat_template, 'end_of_turn', '')
    return getattr(self.tokenizer, 'special_tokens', {}).get(text)

  def check_model(self, name: str | None) -> None:
    if name is not None and name != self.model_name:
      raise APIError(f'The model {name!r} does not exist; this server serves '
                     f'{self.model_name!r}.', status=404, param='model',
                     code='model_not_found')

  def check_ids(self, ids: Sequence[int], param: str) -> None:
    if not ids:
      raise APIError(f'{param} is empty; give at least one token.', param=param)
    bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
    if bad is not None:
      raise APIError(f'{param} has the token id {bad}, outside the vocabulary '
                     f'[0, {self.vocab_size}).', param=param)

  def budget(self, n_prompt: int, max_tokens: int | None, param: str, prompt_param: str) -> int:
    """The new-token count (None: the rest of the context), checked against the context
    limit; `param` and `prompt_param` name the fields an error blames."""
    limit = self.max_seq_len
    if max_tokens is None:
      max_tokens = limit - n_prompt
      if max_tokens <= 0:
        raise APIError(f"This model's maximum context length is {limit} tokens, and the "
                       f'prompt has {n_prompt}; shorten it.', param=prompt_param,
                       code='context_length_exceeded')
    if n_prompt + max_tokens > limit:
      raise APIError(f"This model's maximum context length is {limit} tokens. However, you "
                     f'requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, '
                     f'{max_tokens} for the completion). Shorten the prompt or lower '
                     f'{param}.', param=param, code='context_length_exceeded')
    return max_tokens

  def sampling(self, req: P._SamplingFields) -> dict[str, Any]:
    """Request fields -> engine.Request keyword arguments (except the prompt and counts)."""
    if not 1 <= req.n <= self.max_n:
      raise APIError(f'n={req.n} must be between 1 and {self.max_n}.', param='n')
    temperature = 1.0 if req.temperature is None else req.temperature
    if temperature < 0:
      raise APIError(f'temperature={temperature} must be >= 0 (0 is greedy).',
                     param='temperature')
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
      raise APIError(f'top_p={top_p} must be in (0, 1].', param='top_p')
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    if top_k < 0:
      raise APIError(f'top_k={top_k} must be >= 0 (0 or -1 turn it off).', param='top_k')
    min_p = 0.0 if req.min_p is None else req.min_p
    if not 0 <= min_p <= 1:
      raise APIError(f'min_p={min_p} must be in [0, 1].', param='min_p')
    penalty = 1.0 if req.repetition_penalty is None else req.repetition_penalty
    if penalty <= 0:
      raise APIError(f'repetition_penalty={penalty} must be > 0 (1 is off).',
                     param='repetition_penalty')
    for name in ('presence_penalty', 'frequency_penalty'):
      if getattr(req, name):
        raise APIError(f'{name} is not supported; use repetition_penalty.', param=name)
    if req.logit_bias:
      raise APIError('logit_bias is not supported.', param='logit_bias')
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or ())
    if any(not s for s in stop):
      raise APIError('stop strings must not be empty.', param='stop')
    stop_ids = list(req.stop_token_ids or ())
    if stop_ids:
      self.check_ids(stop_ids, 'stop_token_ids')
    if self.eos_id >= 0 and not req.ignore_eos:
      stop_ids.append(self.eos_id)
    return dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                min_p=float(min_p), repetition_penalty=float(penalty),
                stop=tuple(stop), stop_token_ids=tuple(dict.fromkeys(stop_ids)))

  def render_chat(self, messages: list[P.ChatMessage], add_generation_prompt: bool) -> str:
    if self.chat_template is None:
      raise APIError('This model has no chat template; use /v1/completions.',
                     param='messages')
    if not messages:
      raise APIError('messages is empty.', param='messages')
    plain = []
    for i, m in enumerate(messages):
      d = m.model_dump(exclude_none=True)
      if isinstance(m.content, list):
        if any(part.type != 'text' or part.text is None for part in m.content):
          raise APIError(f'messages[{i}].content: only text parts are supported.',
                         param=f'messages.{i}.content')
        d['content'] = ''.join(part.text for part in m.content)
      d.setdefault('content', '')
      plain.append(d)
    try:
      return self.chat_template.render(plain, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # a template's raise_exception(), e.g. roles out of order
      raise APIError(f'The chat template cannot render these messages: {e}',
                     param='messages') from None

  def submit(self, requests: list) -> list:
    """Submits every request, or none: a full queue cancels those already in and is a 429;
    an engine that is stopping is a 503."""
    streams = []
    try:
      for r in requests:
        streams.append(self.engine.submit(r))
    except engine_lib.QueueFull:
      raise APIError('The server is overloaded (its request queue is full); retry later.',
                     status=429, type='server_overloaded', code='queue_full') from None
    except engine_lib.EngineError as e:
      raise APIError(f'The engine is not serving: {e}', status=503, type='server_error',
                     code='engine_unavailable') from None
    except ConfigError as e:  # a request the checks above let through (they should not)
      raise APIError(str(e)) from None
    finally:
      if len(streams) < len(requests):
        for stream in streams:
          stream.cancel()
    return streams

  async def events(self, stream, arrived: float) -> AsyncIterator:
    """The stream's events, timed into the latency histograms; cancelled if abandoned."""
    last = None
    done = False
    try:
      async for ev in stream:
        if ev.token_id >= 0:
          t = time.perf_counter()
          (self.metrics.ttft if last is None else self.metrics.itl).observe(
              t - (arrived if last is None else last))
          last = t
          self.metrics.generation_tokens.inc()
        done = ev.finish_reason is not None
        yield ev
    finally:
      if not done:
        stream.cancel()


async def _merged(served: _Served, streams: list, arrived: float) -> AsyncIterator[tuple]:
  """(choice index, event) from several streams as they come; all cancelled on exit."""
  # aclosing: an abandoned stream's events() finishes (and cancels it) now, not at GC.
  if len(streams) == 1:
    async with contextlib.aclosing(served.events(streams[0], arrived)) as events:
      async for ev in events:
        yield 0, ev
    return
  queue: asyncio.Queue = asyncio.Queue()

  async def pump(i, stream):
    try:
      async with contextlib.aclosing(served.events(stream, arrived)) as events:
        async for ev in events:
          await queue.put((i, ev))
    except Exception as e:  # handed to the consumer, which re-raises it
      await queue.put((i, e))

  tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
  try:
    remaining = len(streams)
    while remaining:
      i, ev = await queue.get()
      if isinstance(ev, Exception):
        raise ev
      remaining -= ev.finish_reason is not None
      yield i, ev
  finally:
    for t in tasks:  # each pump's events() cancels its stream if it had not finished
      t.cancel()


async def _unless_disconnected(http: Request, work: Coroutine):
  """Awaits `work` (a whole non-streaming answer) while the client is still connected; a
  client that leaves cancels it, which cancels its requests and frees their slots."""
  task = asyncio.ensure_future(work)
  try:
    while True:
      done, _ = await asyncio.wait({task}, timeout=0.1)
      if done:
        return task.result()
      if await http.is_disconnected():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
          await task
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
  finally:
    task.cancel()


def _seed(seed: int | None, choice: int) -> int | None:
  """Choice j of a seeded request samples with seed + j (as 32 bits, the engine's keys)."""
  return None if seed is None else (seed + choice) % 2**32


def _sse(payload: dict | str) -> str:
  return f'data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n'


def _usage(prompt_tokens: int, completion_tokens: int) -> P.Usage:
  return P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


# --- completions ------------------------------------------------------------------------


def _completion_prompts(served: _Served, prompt) -> list[tuple[list[int], str | None]]:
  """(ids, text or None) per prompt; strings get BOS, token ids are used as given."""
  if isinstance(prompt, str):
    items = [prompt]
  elif prompt and isinstance(prompt[0], int):
    items = [prompt]
  else:
    items = list(prompt)
  if not items:
    raise APIError('prompt is empty.', param='prompt')
  out = []
  for i, item in enumerate(items):
    ids = served.encode(item, add_bos=True) if isinstance(item, str) else list(item)
    served.check_ids(ids, 'prompt' if len(items) == 1 else f'prompt.{i}')
    out.append((ids, item if isinstance(item, str) else None))
  return out


class _LogprobBuilder:
  """The legacy completions log-probs of one choice, token by token."""

  def __init__(self, served: _Served, offset: int):
    self.served, self.offset = served, offset
    self.lp = P.CompletionLogprobs()

  def add(self, token_id: int, logprob: float | None, top: list | None) -> None:
    s = self.served.token_string(token_id)
    self.lp.tokens.append(s)
    self.lp.token_logprobs.append(None if logprob is None else float(logprob))
    if top is None:
      self.lp.top_logprobs.append(None)
    else:
      d: dict[str, float] = {}
      for tid, lp in top:
        d.setdefault(self.served.token_string(int(tid)), float(lp))
      if logprob is not None:  # as OpenAI: the chosen token is always among them
        d.setdefault(s, float(logprob))
      self.lp.top_logprobs.append(d)
    self.lp.text_offset.append(self.offset)
    self.offset += len(s)

  def add_prompt(self, ids: Sequence[int], prompt_logprobs: list | None) -> None:
    entries = prompt_logprobs or [None] * len(ids)
    for tid, entry in zip(ids, entries, strict=True):
      if entry is None:
        self.add(tid, None, None)
      else:
        logprob, top = entry
        self.add(tid, logprob, top)

  def take(self) -> P.CompletionLogprobs:
    lp, self.lp = self.lp, P.CompletionLogprobs()
    return lp


def _completion_requests(served: _Served, req: P.CompletionRequest):
  """The checked request as (prompts as (ids, text or None), engine requests); choice i
  answers prompt i // n, as OpenAI orders them."""
  served.check_model(req.model)
  if req.suffix:
    raise APIError('suffix is not supported.', param='suffix')
  if req.best_of not in (None, req.n):
    raise APIError('best_of other than n is not supported.', param='best_of')
  if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
    raise APIError(f'logprobs={req.logprobs} must be between 0 and {MAX_LOGPROBS}.',
                   param='logprobs')
  if req.max_tokens is not None and (req.max_tokens < 0 or
                                     (req.max_tokens == 0 and not req.echo)):
    raise APIError(f'max_tokens={req.max_tokens} must be >= 1 (0 only with echo, to score '
                   'the prompt).', param='max_tokens')
  sampling = served.sampling(req)
  prompts = _completion_prompts(served, req.prompt)
  requests = []
  for ids, _ in prompts:
    max_tokens = served.budget(len(ids), req.max_tokens, 'max_tokens', 'prompt')
    for j in range(req.n):
      requests.append(engine_lib.Request(
          prompt_ids=tuple(ids), max_tokens=max_tokens, **sampling,
          seed=_seed(req.seed, j), logprobs=req.logprobs,
          prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None))
  return prompts, requests


async def completions(served: _Served, req: P.CompletionRequest, arrived: float):
  prompts, requests = _completion_requests(served, req)
  served.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in prompts))
  streams = served.submit(requests)
  rid, created = P.new_id('cmpl'), P.now()
  prompt_tokens = sum(len(ids) for ids, _ in prompts)
  prompt_text = [text if text is not None else served.tokenizer.decode(ids)
                 for ids, text in prompts]
  # text_offset indexes the choice's text (which starts with the prompt under echo).
  builders = [_LogprobBuilder(served, 0) for _ in streams]

  def on_event(i: int, ev, first: bool) -> tuple[str, P.CompletionLogprobs | None]:
    """The text and log-probs that event `ev` adds to choice i."""
    text = ev.text
    b = builders[i]
    if first and req.echo:
      text = prompt_text[i // req.n] + text
      if req.logprobs is not None:
        b.add_prompt(prompts[i // req.n][0], ev.prompt_logprobs)
    if req.logprobs is not None and ev.token_id >= 0:
      b.add(ev.token_id, ev.logprob, ev.top_logprobs)
    return text, (b.take() if req.logprobs is not None else None)

  if req.stream:
    return StreamingResponse(_engine_errors_as_events(
        _stream_completion(served, req, streams, arrived, rid, created, prompt_tokens,
                           on_event)), media_type='text/event-stream')
  texts = [''] * len(streams)
  logprobs = [P.CompletionLogprobs() for _ in streams]
  finish = [None] * len(streams)
  generated = 0
  seen = set()
  async for i, ev in _merged(served, streams, arrived):
    text, lp = on_event(i, ev, i not in seen)
    seen.add(i)
    texts[i] += text
    generated += ev.token_id >= 0
    if lp is not None:
      for key in ('tokens', 'token_logprobs', 'top_logprobs', 'text_offset'):
        getattr(logprobs[i], key).extend(getattr(lp, key))
    finish[i] = ev.finish_reason or finish[i]
  choices = [P.CompletionChoice(index=i, text=texts[i], finish_reason=finish[i],
                                logprobs=logprobs[i] if req.logprobs is not None else None)
             for i in range(len(streams))]
  return P.dump(P.CompletionResponse(id=rid, created=created, model=served.model_name,
                                     choices=choices,
                                     usage=_usage(prompt_tokens, generated)))


async def _engine_errors_as_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
  """A stream whose engine fails midway ends with an error event and [DONE] (the status,
  200, is sent already), as vLLM ends it."""
  try:
    async for event in events:
      yield event
  except engine_lib.EngineError as e:
    error = P.ErrorBody(message=str(e), type='server_error', code='engine_error')
    yield _sse(P.dump(P.ErrorResponse(error=error)))
    yield _sse('[DONE]')


async def _stream_completion(served, req, streams, arrived, rid, created, prompt_tokens,
                             on_event):
  generated = 0
  seen = set()
  include_usage = bool(req.stream_options and req.stream_options.include_usage)
  async for i, ev in _merged(served, streams, arrived):
    text, lp = on_event(i, ev, i not in seen)
    seen.add(i)
    generated += ev.token_id >= 0
    chunk = P.CompletionResponse(
        id=rid, created=created, model=served.model_name,
        choices=[P.CompletionChoice(index=i, text=text, logprobs=lp,
                                    finish_reason=ev.finish_reason)])
    body = P.dump(chunk)
    if not include_usage:
      body.pop('usage')
    yield _sse(body)
  if include_usage:
    usage = P.CompletionResponse(id=rid, created=created, model=served.model_name, choices=[],
                                 usage=_usage(prompt_tokens, generated))
    yield _sse(P.dump(usage))
  yield _sse('[DONE]')


# --- chat completions -------------------------------------------------------------------


def _chat_logprobs(served: _Served, ev, top_n: int) -> P.ChatLogprobs:
  def entry(tid: int, lp: float) -> dict:
    s = served.token_string(tid)
    return dict(token=s, logprob=float(lp), bytes=list(s.encode('utf-8')))

  top = [P.TopLogprob(**entry(int(t), lp)) for t, lp in (ev.top_logprobs or [])[:top_n]]
  return P.ChatLogprobs(content=[P.ChatTokenLogprob(**entry(ev.token_id, ev.logprob),
                                                    top_logprobs=top)])


async def chat_completions(served: _Served, req: P.ChatCompletionRequest, arrived: float):
  served.check_model(req.model)
  if req.top_logprobs is not None:
    if not req.logprobs:
      raise APIError('top_logprobs needs logprobs=true.', param='top_logprobs')
    if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
      raise APIError(f'top_logprobs={req.top_logprobs} must be between 0 and {MAX_LOGPROBS}.',
                     param='top_logprobs')
  param = 'max_completion_tokens' if req.max_completion_tokens is not None else 'max_tokens'
  max_tokens = req.max_completion_tokens if param == 'max_completion_tokens' else req.max_tokens
  if max_tokens is not None and max_tokens <= 0:
    raise APIError(f'{param}={max_tokens} must be >= 1.', param=param)
  sampling = served.sampling(req)
  if (eot := served.end_of_turn_id()) is not None and not req.ignore_eos:
    sampling['stop_token_ids'] = tuple(dict.fromkeys((*sampling['stop_token_ids'], eot)))
  text = served.render_chat(req.messages, req.add_generation_prompt)
  ids = served.encode(text, add_bos=False)  # the template writes its own special tokens
  served.check_ids(ids, 'messages')
  max_tokens = served.budget(len(ids), max_tokens, param, 'messages')
  top_n = req.top_logprobs or 0
  requests = [engine_lib.Request(prompt_ids=tuple(ids), max_tokens=max_tokens, **sampling,
                                 seed=_seed(req.seed, j),
                                 logprobs=top_n if req.logprobs else None)
              for j in range(req.n)]
  served.metrics.prompt_tokens.inc(len(ids))
  streams = served.submit(requests)
  rid, created = P.new_id('chatcmpl'), P.now()
  if req.stream:
    return StreamingResponse(_engine_errors_as_events(
        _stream_chat(served, req, streams, arrived, rid, created, len(ids), top_n)),
        media_type='text/event-stream')
  texts = [''] * len(streams)
  content: list[list] = [[] for _ in streams]
  finish = [None] * len(streams)
  generated = 0
  async for i, ev in _merged(served, streams, arrived):
    texts[i] += ev.text
    generated += ev.token_id >= 0
    if req.logprobs and ev.token_id >= 0:
      content[i] += _chat_logprobs(served, ev, top_n).content
    finish[i] = ev.finish_reason or finish[i]
  choices = [P.ChatChoice(index=i, message=P.ChatResponseMessage(content=texts[i]),
                          finish_reason=finish[i],
                          logprobs=P.ChatLogprobs(content=content[i]) if req.logprobs else None)
             for i in range(len(streams))]
  return P.dump(P.ChatCompletionResponse(id=rid, created=created, model=served.model_name,
                                         choices=choices, usage=_usage(len(ids), generated)))


async def _stream_chat(served, req, streams, arrived, rid, created, prompt_tokens, top_n):
  include_usage = bool(req.stream_options and req.stream_options.include_usage)

  def chunk(choices, usage=None) -> str:
    body = P.dump(P.ChatCompletionChunk(id=rid, created=created, model=served.model_name,
                                        choices=choices, usage=usage))
    if not include_usage:
      body.pop('usage')
    return _sse(body)

  for i in range(len(streams)):  # the role comes first, as OpenAI streams it
    yield chunk([P.ChatChunkChoice(index=i, delta=P.ChatDelta(role='assistant', content=''))])
  generated = 0
  async for i, ev in _merged(served, streams, arrived):
    generated += ev.token_id >= 0
    lp = _chat_logprobs(served, ev, top_n) if req.logprobs and ev.token_id >= 0 else None
    yield chunk([P.ChatChunkChoice(index=i, delta=P.ChatDelta(content=ev.text), logprobs=lp,
                                   finish_reason=ev.finish_reason)])
  if include_usage:
    yield chunk([], _usage(prompt_tokens, generated))
  yield _sse('[DONE]')


def tokenizer_info(tokenizer, chat_template=None) -> dict:
  """`/tokenizer_info`'s fields from the tokenizer: its special tokens as text (what
  lm-evaluation-harness's remote tokenizer encodes back to ids) and the chat template."""
  names = {i: text for text, i in getattr(tokenizer, 'special_tokens', {}).items()}
  return {'eos_token': names.get(getattr(tokenizer, 'eos_id', -1)),
          'bos_token': names.get(getattr(tokenizer, 'bos_id', -1)),
          'chat_template': getattr(chat_template, 'source', None)}


# --- the app ----------------------------------------------------------------------------


class _CountRequests:
  """ASGI middleware counting responses by route and status. (Plain ASGI rather than
  `@app.middleware('http')`, which would wrap every streamed chunk.)"""

  def __init__(self, app, counter):
    self.app, self.counter = app, counter

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    status = 500

    async def send_counted(message):
      nonlocal status
      if message['type'] == 'http.response.start':
        status = message['status']
      await send(message)

    try:
      await self.app(scope, receive, send_counted)
    finally:
      # The router records the matched route in the scope; unmatched paths share one label.
      endpoint = getattr(scope.get('route'), 'path', 'unmatched')
      self.counter.labels(endpoint, str(status)).inc()


def create_app(engine, tokenizer, *, model_name: str, chat_template=None, max_n: int = 16,
               tokenizer_info: dict | None = None) -> FastAPI:
  """The server's ASGI app.

  Args:
    engine: a started `serve.engine.Engine` (the caller owns its lifecycle).
    tokenizer: the run's tokenizer (encode without special tokens, decode, vocab_size,
      bos_id, eos_id).
    model_name: the id clients send as `model`.
    chat_template: an object with `render(messages, add_generation_prompt)`; None: the
      chat endpoint answers 400.
    max_n: the largest `n` one request may ask for.
    tokenizer_info: what `/tokenizer_info` returns besides the defaults (special token
      strings, `chat_template` source).
  """
  served = _Served(engine, tokenizer, model_name, chat_template, max_n)
  app = FastAPI(title='Kiln', docs_url=None, redoc_url=None, openapi_url=None)
  app.state.served = served

  app.add_middleware(_CountRequests, counter=served.metrics.requests)

  @app.exception_handler(APIError)
  async def api_error(_, exc: APIError):
    return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

  @app.exception_handler(RequestValidationError)
  async def validation_error(_, exc: RequestValidationError):
    message, param = _validation_message(exc)
    return _error_response(400, message, 'invalid_request_error', param)

  @app.exception_handler(HTTPException)
  async def http_error(_, exc: HTTPException):
    return _error_response(exc.status_code, str(exc.detail), 'invalid_request_error')

  @app.exception_handler(Exception)
  async def internal_error(_, exc: Exception):
    return _error_response(500, f'Internal error: {type(exc).__name__}: {exc}',
                           'internal_error')

  @app.get('/health')
  async def health():
    return {'status': 'ok'}

  @app.get('/metrics')
  async def metrics():
    return Response(served.metrics.render(), media_type=CONTENT_TYPE)

  def model_card() -> dict:
    return {'id': served.model_name, 'object': 'model', 'created': P.now(),
            'owned_by': 'kiln', 'max_model_len': served.max_seq_len}

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [model_card()]}

  @app.get('/v1/models/{model_id:path}')
  async def model(model_id: str):
    served.check_model(model_id)
    return model_card()

  @app.post('/v1/completions')
  async def completions_endpoint(req: P.CompletionRequest, http: Request):
    return await _unless_disconnected(http, completions(served, req, time.perf_counter()))

  @app.post('/v1/chat/completions')
  async def chat_endpoint(req: P.ChatCompletionRequest, http: Request):
    return await _unless_disconnected(http, chat_completions(served, req, time.perf_counter()))

  @app.post('/tokenize')
  async def tokenize(req: P.TokenizeRequest):
    served.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
      raise APIError('Give exactly one of prompt and messages.', param='prompt')
    if req.messages is not None:
      ids = served.encode(served.render_chat(req.messages, req.add_generation_prompt), False)
    else:
      ids = served.encode(req.prompt, add_bos=req.add_special_tokens)
    return {'count': len(ids), 'max_model_len': served.max_seq_len, 'tokens': ids,
            'token_strs': None}

  @app.post('/detokenize')
  async def detokenize(req: P.DetokenizeRequest):
    served.check_model(req.model)
    if req.tokens:
      served.check_ids(req.tokens, 'tokens')
    return {'prompt': served.tokenizer.decode(req.tokens)}

  info = {'tokenizer_class': type(tokenizer).__name__, 'model_max_length': None,
          'eos_token': None, 'bos_token': None, 'pad_token': None, 'chat_template': None,
          'vocab_size': served.vocab_size, **(tokenizer_info or {})}

  @app.get('/tokenizer_info')
  async def tokenizer_info_endpoint():
    return {**info, 'model_max_length': served.max_seq_len}

  return app
