"""Decoding with a KV cache: whole generations inside `jit`, and scoring given text.

`generate` prefills a batch of prompts in one pass, then samples token after token
in a `lax.while_loop` with static shapes: it runs inside a jitted training step
(RL rollouts), in batched evaluation and in `train.sample`. The serving engine
(serve/engine.py) drives the same `Transformer.decode` with a paged cache instead.

Shape letters: B rows, L prompt length (padded), M new tokens, V vocabulary,
N top log-probs per token.
"""

import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from model import kv_cache, sampling
from model.transformer import LOGICAL_AXIS_RULES, Transformer


@flax.struct.dataclass
class GenerateOutput:
  tokens: jax.Array  # int32 [B, M]; -1 after a row stopped
  logprobs: jax.Array  # float32 [B, M]: log p of each token under the raw logits
  top_ids: jax.Array  # int32 [B, M, N]
  top_logprobs: jax.Array  # float32 [B, M, N]
  lengths: jax.Array  # int32 [B]: tokens generated, a stop token included
  stopped: jax.Array  # bool [B]: ended on a stop token (else ran to M)


def forward(graphdef, params, tokens_BxT, positions_BxT, cache, page_table_BxP=None):
  """`Transformer.decode` of the model (graphdef, params): (logits_BxTxV, new cache)."""
  model: Transformer = nnx.merge(graphdef, params)
  return model.decode(tokens_BxT, positions_BxT, cache, page_table_BxP)


def mask_vocab(logits_BxV: jax.Array, vocab_limit: int | None) -> jax.Array:
  """Padded vocabulary rows (ids >= vocab_limit, the tokenizer's size) are not tokens."""
  if vocab_limit is None or vocab_limit >= logits_BxV.shape[-1]:
    return logits_BxV
  return jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab_limit, logits_BxV, -jnp.inf)


def generate(
    graphdef,
    params,
    prompt_BxL: jax.Array,
    prompt_len_B: jax.Array,
    *,
    max_new_tokens: int,
    sampling_params: sampling.SamplingParams,
    seeds_B: jax.Array,
    stop_ids: tuple[int, ...] = (),
    top_n: int = 0,
    vocab_limit: int | None = None,
    page_size: int = 64,
    cache_dtype=None,
) -> GenerateOutput:
  """Continues each prompt by up to `max_new_tokens` tokens (jittable; shapes are static).

  Args:
    graphdef, params: the transformer (nnx.split of a `Transformer`).
    prompt_BxL: prompts, left-aligned and padded to L (any pad id).
    prompt_len_B: each prompt's length, >= 1.
    max_new_tokens: M, static.
    sampling_params: per-row settings (model/sampling.py); temperature 0 is greedy.
    seeds_B: per-row seeds; a row's tokens depend only on its prompt, settings and seed.
    stop_ids: token ids that end a row (kept as its last token).
    top_n: how many top log-probs to return per token.
    vocab_limit: the tokenizer's vocabulary size; larger ids are never sampled.
    page_size: KV cache page size (contiguous layout; a tuning knob only).
    cache_dtype: the KV cache's dtype (default: the model's compute dtype).
  """
  model: Transformer = nnx.merge(graphdef, params)
  cfg = model.cfg
  b, length = prompt_BxL.shape
  total = length + max_new_tokens
  page_size = min(page_size, total)
  pages_per_row = math.ceil(total / page_size)
  cache = kv_cache.init_cache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim,
                              num_pages=b * pages_per_row, page_size=page_size,
                              dtype=cache_dtype or cfg.dtype)
  cache = kv_cache.constrain(cache, LOGICAL_AXIS_RULES, rows=b)
  arange_L = jnp.arange(length, dtype=jnp.int32)
  valid_BxL = arange_L[None] < prompt_len_B[:, None]
  logits_BxLxV, cache = model.decode(prompt_BxL, jnp.where(valid_BxL, arange_L[None], -1), cache)
  last_BxV = jnp.take_along_axis(
      logits_BxLxV, (prompt_len_B - 1)[:, None, None], axis=1)[:, 0]
  vocab = last_BxV.shape[-1]
  seen_BxV = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], prompt_BxL].max(valid_BxL)
  stop_V = jnp.zeros((vocab,), bool).at[jnp.asarray(stop_ids, jnp.int32)].set(True)

  out = GenerateOutput(
      tokens=jnp.full((b, max_new_tokens), -1, jnp.int32),
      logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
      top_ids=jnp.zeros((b, max_new_tokens, top_n), jnp.int32),
      top_logprobs=jnp.zeros((b, max_new_tokens, top_n), jnp.float32),
      lengths=jnp.zeros((b,), jnp.int32), stopped=jnp.zeros((b,), bool))

  def cond(carry):
    i, _, _, _, out = carry
    return (i < max_new_tokens) & ~jnp.all(out.stopped)

  def body(carry):
    i, logits_BxV, cache, seen_BxV, out = carry
    logits_BxV = mask_vocab(logits_BxV, vocab_limit)
    keys_B = sampling.request_keys(seeds_B, jnp.full((b,), i))
    token_B = sampling.sample(logits_BxV, sampling_params, keys_B, seen_BxV)
    lp_B, top_ids, top_lp = sampling.token_logprobs(logits_BxV, token_B, top_n)
    live_B = ~out.stopped
    out = out.replace(
        tokens=out.tokens.at[:, i].set(jnp.where(live_B, token_B, -1)),
        logprobs=out.logprobs.at[:, i].set(jnp.where(live_B, lp_B, 0.0)),
        top_ids=out.top_ids.at[:, i].set(top_ids),
        top_logprobs=out.top_logprobs.at[:, i].set(top_lp),
        lengths=out.lengths + live_B,
        stopped=out.stopped | (live_B & stop_V[token_B]))
    seen_BxV = seen_BxV.at[jnp.arange(b), token_B].set(True)
    positions_Bx1 = jnp.where(live_B, prompt_len_B + i, -1)[:, None]
    # Merged inside the loop body: an nnx module cannot cross into a lax trace.
    logits_Bx1xV, cache = forward(graphdef, params, token_B[:, None], positions_Bx1, cache)
    return i + 1, logits_Bx1xV[:, 0], cache, seen_BxV, out

  carry = (jnp.int32(0), last_BxV, cache, seen_BxV, out)
  return jax.lax.while_loop(cond, body, carry)[-1]


def score(graphdef, params, tokens_BxL: jax.Array, length_B: jax.Array, top_n: int = 0,
          vocab_limit: int | None = None):
  """Log-probabilities of given text: (lp_BxL, top_ids_BxLxN, top_lp_BxLxN), where
  lp[b, i] = log p(tokens[b, i] | tokens[b, :i]) for 0 < i < length[b], else 0, and the
  top-n alternatives at each such position (zeros elsewhere)."""
  model: Transformer = nnx.merge(graphdef, params)
  b, length = tokens_BxL.shape
  logits_BxLxV = model(tokens_BxL)
  prev_BxV = mask_vocab(logits_BxLxV[:, :-1].reshape(b * (length - 1), -1), vocab_limit)
  lp, top_ids, top_lp = sampling.token_logprobs(
      prev_BxV, tokens_BxL[:, 1:].reshape(-1), top_n)
  valid_BxL = (jnp.arange(1, length)[None] < length_B[:, None])
  pad = ((0, 0), (1, 0))
  lp_BxL = jnp.pad(jnp.where(valid_BxL, lp.reshape(b, length - 1), 0.0), pad)
  top_ids = jnp.pad(top_ids.reshape(b, length - 1, top_n) * valid_BxL[..., None], pad + ((0, 0),))
  top_lp = jnp.pad(top_lp.reshape(b, length - 1, top_n) * valid_BxL[..., None], pad + ((0, 0),))
  return lp_BxL, top_ids, top_lp
