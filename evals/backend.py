"""`KilnLM`: a Kiln model answering lm-evaluation-harness's three request types, batched.

The methods follow lm-eval's semantics exactly (lm_eval/api/model.py `TemplateLM` and
lm_eval/models/huggingface.py `HFLM`), so a task scores the same here as under lm-eval:
- a (context, continuation) pair moves the context's trailing spaces to the continuation,
  encodes context + continuation whole and splits it after the context's own encoding;
  an empty context is the prefix token (BOS, else EOS);
- a scored sequence is left-truncated to `max_length` + 1 tokens and the model reads all
  but the last;
- `loglikelihood_rolling` cuts a text into lm-eval's disjoint rolling windows
  (`rolling_windows` below; the windows of every text are scored together);
- `generate_until` truncates the context on the left to `max_length - max_gen_toks`, stops
  at the first `until` string (and EOS), greedy unless `do_sample`.

Batching: log-likelihood rows are sorted by length and scored `batch_size` at a time by one
jitted program per (rows, length) bucket; generation runs every request through the
continuous-batching engine (serve/engine.py) with `batch_size` slots. `encode` never adds
BOS unless `add_bos_token` (HFLM's default for tokenizers like GPT-2's, and what lm-eval's
`local-completions` sends to `python -m serve`).
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data.errors import ConfigError
from model import decode
from serve import engine as engine_lib

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task gives none


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_seq_len: int,
                    context_len: int = 1) -> list[tuple[list[int], list[int]]]:
  """lm-eval's `make_disjoint_window(get_rolling_token_windows(...))` for each window:
  (context, continuation) pairs whose continuations cover `tokens` once, each window at most
  `max_seq_len` tokens of input. Written here because lm-eval is a test-only dependency;
  tests/test_evals_harness.py checks it against lm-eval's own functions."""
  tokens = list(tokens)
  if not tokens:
    return []
  pred_len = max_seq_len - context_len + 1
  first = min(max_seq_len, len(tokens))
  out = [([prefix_token], tokens[:first])]
  done = first
  while done < len(tokens):
    n = min(len(tokens) - done, pred_len)
    end = done + n
    window = tokens[max(end - max_seq_len - 1, 0):end - 1]
    out.append((window[:len(window) - (n - 1)], tokens[end - n:end]))
    done = end
  return out


def _until(kwargs: dict | None) -> list[str]:
  until = (kwargs or {}).get('until') or []
  return [s for s in ([until] if isinstance(until, str) else until) if s]


def _bucket(n: int, limit: int, smallest: int = 16) -> int:
  """The padded size for n: a power of two from `smallest`, at most `limit` (>= n)."""
  size = smallest
  while size < n:
    size *= 2
  return max(min(size, limit), n)


def _row_scores(graphdef, params, inp_BxL, tgt_BxL, mask_BxL, *, vocab_limit):
  """Per row: the summed log-prob of the masked targets, and whether each masked target is
  the model's argmax (lm-eval's is_greedy)."""
  model = nnx.merge(graphdef, params)
  logits_BxLxV = decode.mask_vocab(model(inp_BxL), vocab_limit)
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  lp_BxL = jnp.take_along_axis(logp_BxLxV, tgt_BxL[..., None], axis=-1)[..., 0]
  greedy_BxL = jnp.argmax(logits_BxLxV, axis=-1) == tgt_BxL
  return (jnp.sum(jnp.where(mask_BxL, lp_BxL, 0.0), axis=1),
          jnp.all(greedy_BxL | ~mask_BxL, axis=1))


def _last_features(graphdef, params, tokens_BxL, length_B):
  """The final-normed hidden state of each row's last token: x_BxD."""
  model = nnx.merge(graphdef, params)
  x_BxLxD = model(tokens_BxL, features=True)
  return jnp.take_along_axis(x_BxLxD, (length_B - 1)[:, None, None], axis=1)[:, 0]


def _jsonable(value):
  if dataclasses.is_dataclass(value):
    return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if value is None or isinstance(value, bool | int | float | str):
    return value
  return str(value)  # dtypes, enums


class KilnLM:
  """A Kiln transformer (graphdef, params) with its tokenizer, as an lm-eval style model.

  Args:
    batch_size: rows per scoring call, and decode slots of the generation engine.
    max_seq_len: lm-eval's `max_length` (default: the learned position table, else 2048).
    add_bos_token: put the tokenizer's BOS before every encoded string.
    step: the checkpoint step, reported by `model_info`.
    seed: the first generation seed (request i samples with seed + i).
    engine: an engine over the same model to generate with (default: one of `batch_size`
      slots, made at the first generation request).
  """

  def __init__(self, graphdef, params, model_cfg, tokenizer, *, batch_size: int = 32,
               max_seq_len: int | None = None, add_bos_token: bool = False,
               step: int | None = None, seed: int = 1234, source: str | None = None,
               engine: engine_lib.Engine | None = None):
    if max_seq_len is None:
      max_seq_len = model_cfg.max_positions if model_cfg.position == 'learned' else 2048
    if batch_size < 1 or max_seq_len < 2:
      raise ConfigError(f'batch_size={batch_size} must be >= 1 and max_seq_len={max_seq_len} '
                        '>= 2.')
    if model_cfg.position == 'learned' and max_seq_len > model_cfg.max_positions:
      raise ConfigError(f'max_seq_len={max_seq_len} is longer than the model\'s position table '
                        f'({model_cfg.max_positions}).')
    self.graphdef, self.params, self.model_cfg = graphdef, params, model_cfg
    self.tokenizer = tokenizer
    self.batch_size, self.max_length = int(batch_size), int(max_seq_len)
    self.add_bos_token, self.step, self.seed, self.source = add_bos_token, step, seed, source
    self._score = jax.jit(functools.partial(_row_scores, graphdef,
                                            vocab_limit=tokenizer.vocab_size))
    self._features = jax.jit(functools.partial(_last_features, graphdef))
    self._engine = engine

  @classmethod
  def from_run(cls, workdir: str, *, quant: str = 'none', **kw) -> 'KilnLM':
    """The newest checkpoint of a Kiln LM-family run (lm, sft, dpo, distill) or an HF
    import; max_seq_len defaults to the run's `data.seq_len`."""
    m = engine_lib.load_model(workdir, quant=quant)
    kw.setdefault('max_seq_len', int(m.config.data.seq_len))
    return cls(m.graphdef, m.params, m.model_cfg, m.tokenizer, step=m.step, source=workdir, **kw)

  # --- tokens ---------------------------------------------------------------------

  @property
  def prefix_token_id(self) -> int | None:
    """What an empty context conditions on: BOS, else EOS (lm-eval's rule), else None."""
    for token in (self.tokenizer.bos_id, self.tokenizer.eos_id):
      if token is not None and token >= 0:
        return int(token)
    return None

  @property
  def eot_token_id(self) -> int | None:
    eos = self.tokenizer.eos_id
    return int(eos) if eos is not None and eos >= 0 else None

  def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
    add = self.add_bos_token if add_special_tokens is None else add_special_tokens
    ids = [int(t) for t in self.tokenizer.encode(text)]
    bos = self.tokenizer.bos_id
    return [int(bos), *ids] if add and bos is not None and bos >= 0 else ids

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """TemplateLM.loglikelihood's split of one request into token lists."""
    if context == '':
      cont = self.tok_encode(continuation, add_special_tokens=False)
      prefix = self._require_prefix()
      if not cont or prefix != cont[0]:
        return [prefix], cont
      return cont[:1], cont[1:]
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = self.tok_encode(context + continuation)
    ctx = self.tok_encode(context)
    return ctx, whole[len(ctx):]

  def _require_prefix(self) -> int:
    prefix = self.prefix_token_id
    if prefix is None:
      raise ConfigError('The tokenizer has neither BOS nor EOS, so an empty context (and '
                        'rolling log-likelihood) has nothing to condition on.')
    return prefix

  # --- log-likelihoods --------------------------------------------------------------

  def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether the continuation is greedy)."""
    return self._loglikelihood_tokens([self._encode_pair(c, x) for c, x in requests])

  def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
    """Each text's total log-likelihood over lm-eval's disjoint rolling windows (the first
    token conditioned on the prefix token)."""
    windows, owner = [], []
    for i, text in enumerate(texts):
      tokens = self.tok_encode(text)
      pieces = rolling_windows(tokens, self._require_prefix() if tokens else 0, self.max_length)
      windows += pieces
      owner += [i] * len(pieces)
    totals = np.zeros(len(texts))
    for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
      totals[i] += lp
    return [float(t) for t in totals]

  def _loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]
                            ) -> list[tuple[float, bool]]:
    """Scores (context ids, continuation ids) pairs, longest first, `batch_size` rows per
    jitted call (HFLM._loglikelihood_tokens' truncation)."""
    rows = []
    for ctx, cont in pairs:
      if not ctx or not cont:
        raise ConfigError('A log-likelihood request needs a context and a continuation.')
      if len(cont) > self.max_length:
        raise ConfigError(f'A continuation of {len(cont)} tokens is longer than max_length='
                          f'{self.max_length}.')
      seq = (ctx + cont)[-(self.max_length + 1):]
      rows.append((seq[:-1], seq[1:], len(cont)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      b = self.batch_size  # one row count: a compile per length bucket only
      length = _bucket(max(len(rows[i][0]) for i in chunk), self.max_length)
      inp = np.zeros((b, length), np.int32)
      tgt = np.zeros((b, length), np.int32)
      mask = np.zeros((b, length), bool)
      for r, i in enumerate(chunk):
        x, y, n = rows[i]
        inp[r, :len(x)], tgt[r, :len(y)] = x, y
        mask[r, len(x) - n:len(x)] = True
      lp_B, greedy_B = jax.device_get(self._score(self.params, inp, tgt, mask))
      for r, i in enumerate(chunk):
        out[i] = (float(lp_B[r]), bool(greedy_B[r]))
    return out

  # --- generation -------------------------------------------------------------------

  def _get_engine(self) -> engine_lib.Engine:
    if self._engine is None:
      self._engine = engine_lib.Engine(
          self.graphdef, self.params, self.model_cfg, self.tokenizer,
          max_slots=self.batch_size, max_seq_len=self.max_length,
          prefill_chunk=min(256, self.max_length), max_queue=1 << 30)
    self._engine.start()  # a no-op for an engine already running
    return self._engine

  def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
    """Continues each context until one of `until` (or EOS), at most `max_gen_toks` tokens;
    the requests run together in the engine's decode slots (all queued at once, or as many
    as a shared engine's queue takes)."""
    engine = self._get_engine()
    texts: list[str | None] = [None] * len(requests)
    streams: list = []  # (index, stream) not yet read, oldest first
    for i, (context, kwargs) in enumerate(requests):
      request = self._generation_request(i, context, kwargs)
      while True:
        try:
          streams.append((i, engine.submit(request)))
          break
        except engine_lib.QueueFull:
          j, stream = streams.pop(0)
          texts[j] = ''.join(ev.text for ev in stream)
    for j, stream in streams:
      texts[j] = ''.join(ev.text for ev in stream)
    out = []
    for text, (_, kwargs) in zip(texts, requests, strict=True):
      for stop in _until(kwargs):  # the engine stops at them; lm-eval cuts again
        text = text.split(stop)[0]
      out.append(text)
    return out

  def _generation_request(self, i: int, context: str, kwargs: dict | None
                          ) -> engine_lib.Request:
    """HFLM.generate_until's reading of lm-eval's generation kwargs, as an engine request."""
    kwargs = dict(kwargs or {})
    max_gen = int(kwargs.get('max_gen_toks', DEFAULT_MAX_GEN_TOKS))
    sample = bool(kwargs.get('do_sample', False))
    temperature = float(kwargs.get('temperature', 1.0)) if sample else 0.0
    ids = self.tok_encode(context) or [self._require_prefix()]
    ids = ids[-max(self.max_length - max_gen, 1):]
    eos = self.eot_token_id
    return engine_lib.Request(
        prompt_ids=tuple(ids), max_tokens=max_gen, temperature=temperature,
        top_p=float(kwargs.get('top_p') or 1.0), top_k=int(kwargs.get('top_k') or 0),
        seed=self.seed + i, stop_token_ids=() if eos is None else (eos,),
        stop=tuple(_until(kwargs)))

  # --- features ---------------------------------------------------------------------

  def features(self, texts: Sequence[str]) -> np.ndarray:
    """[N, D] float32: the final-normed hidden state at each text's last token (the text
    left-truncated to max_length; an empty text is the prefix token)."""
    encoded = [(self.tok_encode(t) or [self._require_prefix()])[-self.max_length:]
               for t in texts]
    out = np.zeros((len(texts), self.model_cfg.d_model), np.float32)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      b = self.batch_size
      length = _bucket(max(len(encoded[i]) for i in chunk), self.max_length)
      tokens = np.zeros((b, length), np.int32)
      lengths = np.ones((b,), np.int32)
      for r, i in enumerate(chunk):
        tokens[r, :len(encoded[i])], lengths[r] = encoded[i], len(encoded[i])
      x_BxD = np.asarray(jax.device_get(self._features(self.params, tokens, lengths)))
      out[chunk] = x_BxD[:len(chunk)].astype(np.float32)
    return out

  def model_info(self) -> dict:
    """What the results JSON records about the model."""
    return {'source': self.source, 'step': self.step, 'max_length': self.max_length,
            'add_bos_token': self.add_bos_token, 'tokenizer': type(self.tokenizer).__name__,
            'model_config': _jsonable(self.model_cfg)}
