"""Speculative decoding: a cheap draft proposes k tokens, the target checks them in one pass.

Shape letters: B rows, L prompt length (padded), M new tokens, K proposed tokens per
round (`num_speculative_tokens`), T = K + 1 verified positions, V vocabulary,
H = L + M history length.

Each round, every live row runs the target once on K + 1 tokens: its last token and the
draft's K proposals. That gives the target's distribution p_j at each of the K + 1
following positions. Proposal x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j))
(q_j: the draft's distribution), left to right; at the first rejection the row's next
token is drawn from norm(max(0, p_j - q_j)), and if all K are accepted a bonus token is
drawn from p_K. So a round emits between 1 and K + 1 tokens and the output is distributed
exactly as the target's own sampling (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding", Theorem 1). Both p and q are the *filtered*
distributions (model/sampling.filter_logits: repetition penalty, temperature, top-k,
top-p, min-p), so the output follows the target's filtered sampling distribution. A greedy
row (temperature 0) has one-hot p and q: the rule then accepts exactly the proposals that
equal the target's argmax, and the output is plain greedy decoding's, token for token.

Two kinds of draft:
  DraftModel    a smaller LM with the target's tokenizer, sampling K tokens one at a time
                from its own KV cache.
  PromptLookup  no model: the row's most recent earlier occurrence of its last n tokens
                (n from max_ngram down to min_ngram) in prompt + output, and the K tokens
                that followed it. q is a point mass, so x is accepted with probability p(x)
                and a rejection draws from p with x removed.

Rejected tokens need no rollback in either cache: a query only sees cached keys at
positions <= its own (model/kv_cache.py), and the next round writes over them. Each row
advances by its own accepted count; the loop is a `lax.while_loop` with static shapes, so
the whole generation runs inside `jit`, like model/decode.generate.

Randomness: the round of a row that has generated n tokens uses
`sampling.request_keys(seed, n)`, folded with a distinct constant for the draft's draws,
the acceptance uniforms and the final (residual or bonus) draw. n grows every round, so no
key is used twice.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from data.errors import ConfigError
from model import decode, sampling

# Fold-ins that give a round's three kinds of draw independent keys.
_DRAFT, _ACCEPT, _FINAL = 0, 1, 2


@flax.struct.dataclass
class DraftModel:
  """A draft LM (nnx.split of a `Transformer`) with the target's tokenizer.

  A pytree whose graphdef is static, so it passes through `jax.jit` as an argument.
  """
  graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
  params: Any  # nested dicts of arrays, as the trainer keeps them


@flax.struct.dataclass
class PromptLookup:
  """Draft-free n-gram proposals (prompt lookup decoding); every field is static."""
  max_ngram: int = flax.struct.field(pytree_node=False, default=3)
  min_ngram: int = flax.struct.field(pytree_node=False, default=1)


@flax.struct.dataclass
class SpeculativeStats:
  """Per-row counts; acceptance rate = accepted / proposed."""
  proposed: jax.Array  # int32 [B]: draft tokens the target verified
  accepted: jax.Array  # int32 [B]: of those, accepted and emitted
  rounds: jax.Array  # int32 [B]: target calls after the prefill


def generate(
    graphdef,
    params,
    prompt_BxL: jax.Array,
    prompt_len_B: jax.Array,
    *,
    draft: DraftModel | PromptLookup,
    num_speculative_tokens: int,
    max_new_tokens: int,
    sampling_params: sampling.SamplingParams,
    seeds_B: jax.Array,
    stop_ids: tuple[int, ...] = (),
    top_n: int = 0,
    vocab_limit: int | None = None,
    page_size: int = 64,
    cache_dtype=None,
) -> tuple[decode.GenerateOutput, SpeculativeStats]:
  """`decode.generate` with speculative rounds (jittable; shapes are static).

  Arguments are those of model/decode.generate, plus the draft and K =
  `num_speculative_tokens`, the tokens it proposes per round. Greedy rows give
  decode.generate's tokens; sampled rows follow the same distribution (not the same
  draws). Returns the same GenerateOutput and the acceptance counts.
  """
  k = num_speculative_tokens
  _check(draft, k, max_new_tokens)
  b, length = prompt_BxL.shape
  m = max_new_tokens
  positions = length + m + k  # the last verify call writes up to position L + M + K - 2
  target_cfg = nnx.merge(graphdef, params).cfg
  vocab = target_cfg.vocab_size

  # Prefill every prompt token but the last: the first round's target call starts with it.
  arange_L = jnp.arange(length, dtype=jnp.int32)
  prefill_BxL = jnp.where(arange_L[None] < prompt_len_B[:, None] - 1, arange_L[None], -1)
  tcache = decode.contiguous_cache(target_cfg, b, positions, page_size, cache_dtype)
  _, tcache = decode.forward(graphdef, params, prompt_BxL, prefill_BxL, tcache)
  if isinstance(draft, DraftModel):
    draft_cfg = nnx.merge(draft.graphdef, draft.params).cfg
    dcache = decode.contiguous_cache(draft_cfg, b, positions, page_size, cache_dtype)
    _, dcache = decode.forward(draft.graphdef, draft.params, prompt_BxL, prefill_BxL, dcache)
  else:
    dcache = None

  valid_BxL = arange_L[None] < prompt_len_B[:, None]
  history_BxH = jnp.pad(prompt_BxL.astype(jnp.int32), ((0, 0), (0, m)))
  seen_BxV = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], prompt_BxL].max(valid_BxL)
  stop_V = jnp.zeros((vocab,), bool).at[jnp.asarray(stop_ids, jnp.int32)].set(True)
  out = decode.GenerateOutput(
      tokens=jnp.full((b, m), -1, jnp.int32),
      logprobs=jnp.zeros((b, m), jnp.float32),
      top_ids=jnp.zeros((b, m, top_n), jnp.int32),
      top_logprobs=jnp.zeros((b, m, top_n), jnp.float32),
      lengths=jnp.zeros((b,), jnp.int32), stopped=jnp.zeros((b,), bool))
  zeros_B = jnp.zeros((b,), jnp.int32)
  stats = SpeculativeStats(proposed=zeros_B, accepted=zeros_B, rounds=zeros_B)

  def live(out):
    return ~out.stopped & (out.lengths < m)

  def cond(carry):
    return jnp.any(live(carry[-2]))

  def body(carry):
    tcache, dcache, history_BxH, seen_BxV, out, stats = carry
    live_B = live(out)
    done_B = out.lengths
    len_B = prompt_len_B + done_B  # tokens in the row so far
    keys_B = sampling.request_keys(seeds_B, done_B)
    last_B = _at(history_BxH, len_B - 1)

    # Propose K tokens (x) and the draft's distribution at each (q).
    if dcache is None:
      x_BxK = _lookup(draft, history_BxH, len_B, k)
      q_BxKxV = jax.nn.one_hot(x_BxK, vocab, dtype=jnp.float32)
    else:
      x_BxK, q_BxKxV, dcache = _draft_model(
          draft, dcache, history_BxH, len_B, live_B, seen_BxV, sampling_params,
          _fold(keys_B, _DRAFT), k, vocab, vocab_limit)

    # Verify: the target's p at the K + 1 positions after the row's last token.
    tokens_BxT = jnp.concatenate([last_B[:, None], x_BxK], axis=1)
    positions_BxT = jnp.where(live_B[:, None], len_B[:, None] - 1 + jnp.arange(k + 1), -1)
    logits_BxTxV, tcache = decode.forward(graphdef, params, tokens_BxT, positions_BxT, tcache)
    logits_BxTxV = decode.mask_vocab(logits_BxTxV, vocab_limit)
    p_BxTxV = _probs(logits_BxTxV, sampling_params, _seen_before(seen_BxV, x_BxK))

    n_acc_B, final_B = _judge(p_BxTxV, q_BxKxV, x_BxK, keys_B)
    j_T = jnp.arange(k + 1)
    emitted_BxT = jnp.where(j_T[None] < n_acc_B[:, None],
                            jnp.concatenate([x_BxK, final_B[:, None]], axis=1), final_B[:, None])

    # Keep the first n_acc + 1, cut after a stop token and at M tokens.
    stop_BxT = stop_V[emitted_BxT] & (j_T[None] <= n_acc_B[:, None])
    first_stop_B = jnp.argmax(stop_BxT, axis=1)
    count_B = jnp.minimum(n_acc_B + 1, m - done_B)
    count_B = jnp.where(jnp.any(stop_BxT, axis=1), jnp.minimum(count_B, first_stop_B + 1), count_B)
    count_B = jnp.where(live_B, count_B, 0)
    keep_BxT = j_T[None] < count_B[:, None]

    lp, top_ids, top_lp = sampling.token_logprobs(
        logits_BxTxV.reshape(b * (k + 1), -1), emitted_BxT.reshape(-1), top_n)
    rows_Bx1 = jnp.arange(b)[:, None]
    cols_BxT = jnp.where(keep_BxT, done_B[:, None] + j_T[None], m)  # m: dropped
    out = out.replace(
        tokens=out.tokens.at[rows_Bx1, cols_BxT].set(emitted_BxT, mode='drop'),
        logprobs=out.logprobs.at[rows_Bx1, cols_BxT].set(lp.reshape(b, -1), mode='drop'),
        top_ids=out.top_ids.at[rows_Bx1, cols_BxT].set(
            top_ids.reshape(b, k + 1, top_n), mode='drop'),
        top_logprobs=out.top_logprobs.at[rows_Bx1, cols_BxT].set(
            top_lp.reshape(b, k + 1, top_n), mode='drop'),
        lengths=done_B + count_B,
        stopped=out.stopped | (jnp.any(stop_BxT, axis=1) & (first_stop_B < count_B)))
    history_BxH = history_BxH.at[rows_Bx1, jnp.where(keep_BxT, len_B[:, None] + j_T[None],
                                                     history_BxH.shape[1])].set(
        emitted_BxT, mode='drop')
    seen_BxV = seen_BxV.at[rows_Bx1, jnp.where(keep_BxT, emitted_BxT, vocab)].set(
        True, mode='drop')
    stats = SpeculativeStats(proposed=stats.proposed + k * live_B,
                             accepted=stats.accepted + jnp.minimum(n_acc_B, count_B),
                             rounds=stats.rounds + live_B)
    return tcache, dcache, history_BxH, seen_BxV, out, stats

  carry = (tcache, dcache, history_BxH, seen_BxV, out, stats)
  *_, out, stats = jax.lax.while_loop(cond, body, carry)
  return out, stats


def _check(draft, k: int, max_new_tokens: int) -> None:
  """Static arguments that cannot run, as one-line config errors."""
  if k < 1:
    raise ConfigError(f'num_speculative_tokens={k} must be at least 1.')
  if max_new_tokens < 1:
    raise ConfigError(f'max_new_tokens={max_new_tokens} must be at least 1.')
  if isinstance(draft, PromptLookup):
    if not 1 <= draft.min_ngram <= draft.max_ngram:
      raise ConfigError(f'Prompt lookup needs 1 <= min_ngram <= max_ngram; got '
                        f'min_ngram={draft.min_ngram}, max_ngram={draft.max_ngram}.')
  elif not isinstance(draft, DraftModel):
    raise ConfigError(f'draft must be a DraftModel or a PromptLookup, not {type(draft)}.')


def _judge(p_BxTxV: jax.Array, q_BxKxV: jax.Array, x_BxK: jax.Array, keys_B: jax.Array):
  """Leviathan et al.'s rule on the K proposals x: (n_acc_B, the number accepted, a
  prefix; final_B, the token after them, drawn from norm(max(0, p - q)) at the first
  rejection, or from p_K when all K pass)."""
  k = x_BxK.shape[1]
  u_BxK = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(_fold(keys_B, _ACCEPT))
  accept_BxK = _accepts(u_BxK, _pick(p_BxTxV[:, :k], x_BxK), _pick(q_BxKxV, x_BxK))
  n_acc_B = jnp.sum(jnp.cumprod(accept_BxK, axis=1), axis=1).astype(jnp.int32)
  q_BxTxV = jnp.pad(q_BxKxV, ((0, 0), (0, 1), (0, 0)))  # q = 0 after the last proposal
  residual_BxV = _residual(_row_at(p_BxTxV, n_acc_B), _row_at(q_BxTxV, n_acc_B))
  return n_acc_B, _draw(_fold(keys_B, _FINAL), residual_BxV)


def _accepts(u_BxK: jax.Array, px_BxK: jax.Array, qx_BxK: jax.Array) -> jax.Array:
  """Leviathan et al.'s test, u < min(1, p(x) / q(x)), written without the division (a
  proposal has q(x) > 0). Its own function so that a test can break it on purpose."""
  return u_BxK * qx_BxK < px_BxK


def _residual(p_BxV: jax.Array, q_BxV: jax.Array) -> jax.Array:
  """What a rejection samples from: max(0, p - q), unnormalised (`_draw` takes logs, so the
  scale is free). q = 0 after K accepted proposals, which gives p for the bonus token."""
  residual_BxV = jnp.maximum(p_BxV - q_BxV, 0.0)
  # p == q leaves nothing, but then a rejection has probability 0 (it is rounding).
  return jnp.where(residual_BxV.sum(-1, keepdims=True) > 0, residual_BxV, p_BxV)


def _draft_model(draft: DraftModel, dcache, history_BxH, len_B, live_B, seen_BxV,
                 params: sampling.SamplingParams, keys_B, k: int, vocab: int,
                 vocab_limit: int | None):
  """K tokens sampled one at a time from the draft: (x_BxK, q_BxKxV, new draft cache).

  The draft's cache holds every position up to len - 3 on entry (the last round may have
  accepted the draft's own last proposal, which it never ran), so the first call runs
  the row's last two tokens.
  """
  def step(tokens_BxT, positions_BxT, dcache, seen_BxV, j):
    logits_BxTxV, dcache = decode.forward(
        draft.graphdef, draft.params, tokens_BxT,
        jnp.where(live_B[:, None] & (positions_BxT >= 0), positions_BxT, -1), dcache)
    logits_BxV = decode.mask_vocab(_fit_vocab(logits_BxTxV[:, -1], vocab), vocab_limit)
    q_BxV = _probs(logits_BxV[:, None], params, seen_BxV[:, None])[:, 0]
    return _draw(_fold(keys_B, j), q_BxV), q_BxV, dcache

  positions_Bx2 = len_B[:, None] + jnp.array([-2, -1])
  tokens_Bx2 = jnp.take_along_axis(history_BxH, jnp.maximum(positions_Bx2, 0), axis=1)
  x0_B, q0_BxV, dcache = step(tokens_Bx2, positions_Bx2, dcache, seen_BxV, 0)

  def scan_step(carry, j):
    x_B, seen_BxV, dcache = carry
    seen_BxV = seen_BxV.at[jnp.arange(x_B.shape[0]), x_B].set(True)
    x_B, q_BxV, dcache = step(x_B[:, None], (len_B + j - 1)[:, None], dcache, seen_BxV, j)
    return (x_B, seen_BxV, dcache), (x_B, q_BxV)

  (_, _, dcache), (x_KxB, q_KxBxV) = jax.lax.scan(
      scan_step, (x0_B, seen_BxV, dcache), jnp.arange(1, k))
  x_BxK = jnp.concatenate([x0_B[:, None], x_KxB.T], axis=1)
  q_BxKxV = jnp.concatenate([q0_BxV[:, None], q_KxBxV.transpose(1, 0, 2)], axis=1)
  return x_BxK, q_BxKxV, dcache


def _lookup(lookup: PromptLookup, history_BxH: jax.Array, len_B: jax.Array,
            k: int) -> jax.Array:
  """Prompt-lookup proposals (x_BxK): for the longest n in [min_ngram, max_ngram] whose
  last-n-token suffix occurred earlier in the row, the tokens after its most recent
  earlier occurrence.

  With the match d tokens back, the proposal is history[len - d + (j mod d)]: it reads
  on past the row's end by repeating the matched span (d = 1 repeats the last token),
  which is also the proposal when nothing matches. Every comparison is a [B, H] array op,
  so a round costs O(B * H * max_ngram ** 2) comparisons, nothing next to a target call.
  """
  b, h = history_BxH.shape
  start_H = jnp.arange(h)
  back_B = jnp.ones((b,), jnp.int32)
  found_B = jnp.zeros((b,), bool)
  for n in range(lookup.max_ngram, lookup.min_ngram - 1, -1):
    suffix_BxN = jnp.take_along_axis(
        history_BxH, jnp.maximum(len_B[:, None] - n + jnp.arange(n), 0), axis=1)
    # An earlier occurrence starts at i < len - n (it ends before the suffix's last token).
    match_BxH = start_H[None] < (len_B - n)[:, None]
    for t in range(n):
      shifted_BxH = jnp.pad(history_BxH[:, t:], ((0, 0), (0, t)), constant_values=-1)
      match_BxH &= shifted_BxH == suffix_BxN[:, t:t + 1]
    start_B = jnp.max(jnp.where(match_BxH, start_H[None], -1), axis=1)
    use_B = (start_B >= 0) & ~found_B
    back_B = jnp.where(use_B, len_B - n - start_B, back_B)
    found_B |= start_B >= 0
  source_BxK = len_B[:, None] - back_B[:, None] + jnp.arange(k)[None] % back_B[:, None]
  return jnp.take_along_axis(history_BxH, jnp.clip(source_BxK, 0, h - 1), axis=1)


def _probs(logits_BxTxV: jax.Array, params: sampling.SamplingParams,
           seen_BxTxV: jax.Array) -> jax.Array:
  """The filtered sampling distribution at each position (float32 [B, T, V]); one-hot at
  the argmax for greedy rows, so the same acceptance rule serves them."""
  b, t, v = logits_BxTxV.shape
  rows = jax.tree.map(lambda a: jnp.repeat(jnp.asarray(a), t), params)
  logits, seen = logits_BxTxV.reshape(b * t, v), seen_BxTxV.reshape(b * t, v)

  def mixed():
    filtered = sampling.filter_logits(logits, rows, seen)
    greedy = jax.nn.one_hot(jnp.argmax(filtered, axis=-1), v, dtype=jnp.float32)
    return jnp.where(rows.temperature[:, None] > 0, jax.nn.softmax(filtered, axis=-1), greedy)

  def greedy():  # every row greedy: no sort (sampling.greedy)
    return jax.nn.one_hot(sampling.greedy(logits, rows, seen), v, dtype=jnp.float32)

  return jax.lax.cond(jnp.all(rows.temperature <= 0), greedy, mixed).reshape(b, t, v)


def _seen_before(seen_BxV: jax.Array, x_BxK: jax.Array) -> jax.Array:
  """Tokens seen before each of the K + 1 verified positions ([B, K + 1, V]): the row's
  history, then each proposal from the position after it (for the repetition penalty)."""
  onehot_BxKxV = jax.nn.one_hot(x_BxK, seen_BxV.shape[-1], dtype=jnp.int32)
  before_BxKxV = jnp.cumsum(onehot_BxKxV, axis=1) > 0
  return jnp.concatenate([seen_BxV[:, None], seen_BxV[:, None] | before_BxKxV], axis=1)


def _fit_vocab(logits_BxV: jax.Array, vocab: int) -> jax.Array:
  """A draft's logits at the target's padded vocabulary size (the tokenizer is shared; the
  padding may differ): extra rows cut, missing ones -inf."""
  have = logits_BxV.shape[-1]
  if have >= vocab:
    return logits_BxV[:, :vocab]
  return jnp.pad(logits_BxV, ((0, 0), (0, vocab - have)), constant_values=-jnp.inf)


def _fold(keys_B: jax.Array, i) -> jax.Array:
  return jax.vmap(lambda key: jax.random.fold_in(key, i))(keys_B)


def _draw(keys_B: jax.Array, probs_BxV: jax.Array) -> jax.Array:
  """One token per row from each row's distribution (int32 [B])."""
  return jax.vmap(jax.random.categorical)(keys_B, jnp.log(probs_BxV)).astype(jnp.int32)


def _at(history_BxH: jax.Array, index_B: jax.Array) -> jax.Array:
  return jnp.take_along_axis(history_BxH, jnp.maximum(index_B, 0)[:, None], axis=1)[:, 0]


def _pick(probs_BxKxV: jax.Array, x_BxK: jax.Array) -> jax.Array:
  """probs[b, j, x[b, j]]: [B, K]."""
  return jnp.take_along_axis(probs_BxKxV, x_BxK[..., None], axis=-1)[..., 0]


def _row_at(probs_BxTxV: jax.Array, j_B: jax.Array) -> jax.Array:
  """probs[b, j[b]]: [B, V]."""
  return jnp.take_along_axis(probs_BxTxV, j_B[:, None, None], axis=1)[:, 0]
