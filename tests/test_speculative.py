"""Speculative decoding (model/speculative.py) is exact.

Greedy: token for token the output of plain decoding (model/decode.generate), for both
kinds of draft and several K, with rows of different prompt lengths and a stop id.
Sampling: over a few thousand seeds, the first three tokens follow the target's filtered
distribution, enumerated from the model's own full-sequence logits (an independent path:
no cache), by a chi-square test; and the same test rejects a broken rejection rule.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from data.errors import ConfigError
from model import decode, sampling, speculative
from model import transformer as tfm

VOCAB = 16  # small: the sampling tests enumerate VOCAB ** 3 continuations


@functools.cache
def _model(n_layers: int, seed: int):
  """(graphdef, params) of a random float32 model whose logits spread over a few units
  (an init-sized head gives near-uniform ones): distinct distributions, no near-ties.
  numpy's RNG: compiling jax.random's init costs seconds on CPU for nothing here."""
  cfg = tfm.TransformerConfig(
      vocab_size=VOCAB, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=8,
      mlp_dim=64, tie_embeddings=False, dtype=jnp.dtype('float32'),
      param_dtype=jnp.dtype('float32'))
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: tfm.Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def init(path, leaf):
    name = str(path[-1].key)
    if name == 'scale':  # norms
      return jnp.ones(leaf.shape, leaf.dtype)
    std = 0.4 if name == 'lm_head' else 0.05
    return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(init, nnx.to_pure_dict(state))


def _first_layer(graphdef, params):
  """The target cut to its first block (same embedding and head): a draft that agrees
  with the target often, but not always."""
  cfg = dataclasses.replace(nnx.merge(graphdef, params).cfg, n_layers=1)
  with nnx.use_eager_sharding(False):
    draft_graphdef = nnx.graphdef(nnx.eval_shape(lambda: tfm.Transformer(cfg, rngs=nnx.Rngs(0))))
  return draft_graphdef, {**params, 'blocks': jax.tree.map(lambda a: a[:1], params['blocks'])}


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'stop_ids'))
def _plain(graphdef, params, prompt, lengths, sampling_params, seeds, *, max_new_tokens,
           stop_ids):
  return decode.generate(graphdef, params, prompt, lengths, max_new_tokens=max_new_tokens,
                         sampling_params=sampling_params, seeds_B=seeds, stop_ids=stop_ids,
                         top_n=2, page_size=8)


def _speculative(graphdef, params, prompt, lengths, sampling_params, seeds, draft, *, k,
                 max_new_tokens, stop_ids=()):
  """A fresh jit each call, so a monkeypatched acceptance rule is traced, not cached."""
  fn = jax.jit(functools.partial(
      speculative.generate, graphdef, num_speculative_tokens=k,
      max_new_tokens=max_new_tokens, stop_ids=stop_ids, top_n=2, page_size=8))
  return fn(params, prompt, lengths, draft=draft, sampling_params=sampling_params,
            seeds_B=seeds)


# --- greedy: identical tokens -------------------------------------------------------------

MAX_NEW = 24
STOP = 5  # ends three of the rows below after 4 to 9 tokens


@pytest.fixture(scope='module')
def greedy_setup():
  graphdef, params = _model(n_layers=2, seed=1)
  rng = np.random.default_rng(0)
  lengths = np.array([3, 9, 1, 12, 6], np.int32)
  # Repeated spans, as in code, give prompt lookup something to find.
  prompt = np.tile(rng.integers(0, VOCAB, (len(lengths), 4)), 3).astype(np.int32)
  prompt[2, 1:] = 0  # padding of the one-token prompt: any id
  greedy = sampling.SamplingParams.make(len(lengths), temperature=0.0)
  seeds = np.arange(len(lengths), dtype=np.int32)
  want = _plain(graphdef, params, prompt, lengths, greedy, seeds, max_new_tokens=MAX_NEW,
                stop_ids=(STOP,))
  # Rows that stop mid-way and rows that run to MAX_NEW.
  assert 0 < int(want.stopped.sum()) < len(lengths)
  assert (np.asarray(want.lengths)[np.asarray(want.stopped)] > 3).all()
  return graphdef, params, prompt, lengths, greedy, seeds, want


@pytest.mark.parametrize('kind,k', [('first_layer', 1), ('self', 3), ('lookup', 4)])
def test_greedy_is_plain_decoding(greedy_setup, kind, k):
  graphdef, params, prompt, lengths, greedy, seeds, want = greedy_setup
  if kind == 'lookup':
    draft = speculative.PromptLookup(max_ngram=3, min_ngram=1)
  elif kind == 'self':  # every proposal accepted: K + 1 tokens a round
    draft = speculative.DraftModel(graphdef, params)
  else:
    draft = speculative.DraftModel(*_first_layer(graphdef, params))
  got, stats = _speculative(graphdef, params, prompt, lengths, greedy, seeds, draft, k=k,
                            max_new_tokens=MAX_NEW, stop_ids=(STOP,))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_array_equal(got.stopped, want.stopped)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
  inside = np.arange(MAX_NEW)[None] < np.asarray(want.lengths)[:, None]
  np.testing.assert_array_equal(np.asarray(got.top_ids)[inside], np.asarray(want.top_ids)[inside])

  proposed, accepted, rounds = (np.asarray(a) for a in (stats.proposed, stats.accepted,
                                                        stats.rounds))
  np.testing.assert_array_equal(proposed, k * rounds)
  # Each round emits its accepted proposals and one more token, except that a stop or
  # the length limit may cut the last round short.
  assert np.all(accepted + rounds - 1 <= got.lengths) and np.all(got.lengths <= accepted + rounds)
  if kind == 'self':
    np.testing.assert_array_equal(rounds, -(-np.asarray(want.lengths) // (k + 1)))
  else:  # some proposals accepted, some not: both paths ran
    assert 0 < accepted.sum() < proposed.sum()


def test_bad_arguments_are_one_line_errors(greedy_setup):
  graphdef, params, prompt, lengths, greedy, seeds, *_ = greedy_setup
  cases = [(speculative.PromptLookup(max_ngram=1, min_ngram=2), 2, 'min_ngram'),
           (speculative.PromptLookup(), 0, 'num_speculative_tokens'),
           ((graphdef, params), 2, 'DraftModel or a PromptLookup')]
  for draft, k, name in cases:
    with pytest.raises(ConfigError, match=name):
      speculative.generate(graphdef, params, prompt, lengths, draft=draft,
                           num_speculative_tokens=k, max_new_tokens=4,
                           sampling_params=greedy, seeds_B=seeds)


# --- sampling: the target's distribution ---------------------------------------------------

ROWS = 4000  # one seed per row
STEPS = 3  # tokens whose joint distribution is tested


def _exact_joint(graphdef, params, prompt: np.ndarray, settings: dict) -> np.ndarray:
  """P(first STEPS tokens) [V ** STEPS] under the target's filtered sampling: one full
  forward (no cache) over the prompt followed by every (STEPS - 1)-token prefix."""
  v = VOCAB
  prefixes = np.array(list(itertools.product(range(v), repeat=STEPS - 1)), np.int32)
  tokens = np.concatenate([np.tile(prompt, (len(prefixes), 1)), prefixes], axis=1)
  logits = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens))
  joint = np.ones(1)
  for step in range(STEPS):
    # One row per distinct `step`-token prefix (its later prefix tokens are 0), in order.
    rows = np.all(prefixes[:, step:] == 0, axis=1)
    seen = np.zeros((rows.sum(), v), bool)
    for col in range(len(prompt) + step):
      seen[np.arange(rows.sum()), tokens[rows, col]] = True
    probs_RxV = jax.nn.softmax(sampling.filter_logits(
        jnp.asarray(logits[rows, len(prompt) - 1 + step]),
        sampling.SamplingParams.make(int(rows.sum()), **settings), jnp.asarray(seen)), axis=-1)
    joint = (joint[:, None] * np.asarray(probs_RxV, np.float64)).reshape(-1)
  return joint


def _chi_square_pvalue(tokens_RxM: np.ndarray, joint: np.ndarray) -> float:
  """p-value of the sample under `joint` (Pearson's chi-square; outcomes expected fewer
  than 5 times are pooled into one bin). An outcome of probability 0 gives 0: it cannot
  happen."""
  observed = np.bincount(np.ravel_multi_index(tokens_RxM[:, :STEPS].T, (VOCAB,) * STEPS),
                         minlength=joint.size)
  if observed[joint == 0].any():
    return 0.0
  expected = joint * len(tokens_RxM)
  big, small = expected >= 5, (expected > 0) & (expected < 5)
  obs = np.append(observed[big], observed[small].sum())
  exp = np.append(expected[big], expected[small].sum())
  if not small.any():
    obs, exp = obs[:-1], exp[:-1]
  assert big.sum() >= 10  # a distribution with room to be wrong
  return scipy.stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


SAMPLING_CASES = {
    # The target's first layer as the draft, with temperature and top-k.
    'draft_model': dict(k=2, settings=dict(temperature=0.8, top_k=5)),
    # Prompt lookup on a repetitive prompt, with top-p, min-p and a repetition penalty.
    'lookup': dict(k=3, settings=dict(temperature=1.0, top_p=0.9, min_p=0.05,
                                      repetition_penalty=1.3)),
}


@pytest.fixture(scope='module')
def sampling_setup():
  graphdef, params = _model(n_layers=2, seed=1)
  draft = speculative.DraftModel(*_first_layer(graphdef, params))
  prompts = {'draft_model': np.array([3, 7, 1, 12, 5], np.int32),
             'lookup': np.array([4, 9, 2, 4, 9, 2, 4, 9], np.int32)}
  drafts = {'draft_model': draft, 'lookup': speculative.PromptLookup(max_ngram=2)}
  joints = {kind: _exact_joint(graphdef, params, prompts[kind], case['settings'])
            for kind, case in SAMPLING_CASES.items()}
  return graphdef, params, prompts, drafts, joints


def _sample(sampling_setup, kind):
  graphdef, params, prompts, drafts, _ = sampling_setup
  case = SAMPLING_CASES[kind]
  prompt = np.tile(prompts[kind], (ROWS, 1))
  lengths = np.full(ROWS, prompt.shape[1], np.int32)
  params_rows = sampling.SamplingParams.make(ROWS, **case['settings'])
  out, stats = _speculative(graphdef, params, prompt, lengths, params_rows,
                            np.arange(ROWS, dtype=np.int32), drafts[kind], k=case['k'],
                            max_new_tokens=STEPS)
  return np.asarray(out.tokens), stats


@pytest.mark.parametrize('kind', list(SAMPLING_CASES))
def test_sampling_follows_the_target_distribution(sampling_setup, kind):
  tokens, stats = _sample(sampling_setup, kind)
  assert (tokens >= 0).all()
  # Proposals are accepted and rejected (both paths of the rule run).
  assert 0 < int(stats.accepted.sum()) < int(stats.proposed.sum())
  # Correct code fails this with probability 1e-3 (the seeds are fixed: it never flakes).
  assert _chi_square_pvalue(tokens, sampling_setup[-1][kind]) > 1e-3


# A broken rule the test must catch: drawing a rejection's replacement from p instead of
# max(0, p - q). Its tokens stay inside the filtered support, so only the statistics can
# tell (with prompt lookup, a rejected token can come back).
@pytest.mark.parametrize('kind', list(SAMPLING_CASES))
def test_the_distribution_test_rejects_a_broken_rule(sampling_setup, kind, monkeypatch):
  monkeypatch.setattr(speculative, '_residual', lambda p_BxV, q_BxV: p_BxV)
  tokens, _ = _sample(sampling_setup, kind)
  joint = sampling_setup[-1][kind]
  assert (joint[np.ravel_multi_index(tokens.T, (VOCAB,) * STEPS)] > 0).all()
  assert _chi_square_pvalue(tokens, joint) < 1e-6


def test_greedy_shortcut_is_the_filtered_argmax():
  # sampling.greedy skips filter_logits for all-greedy batches (speculative._probs and
  # sampling.sample): the filters must never move the argmax, ties included.
  rng = np.random.default_rng(0)
  logits = np.round(rng.normal(0, 2, (64, VOCAB)), 0).astype(np.float32)  # many ties
  seen = rng.random((64, VOCAB)) < 0.3
  params = sampling.SamplingParams.make(
      64, temperature=0.0, top_k=rng.integers(0, 5, 64), top_p=rng.uniform(0.05, 1, 64),
      min_p=rng.uniform(0, 0.9, 64), repetition_penalty=rng.uniform(1, 2, 64))
  filtered = sampling.filter_logits(jnp.asarray(logits), params, jnp.asarray(seen))
  np.testing.assert_array_equal(sampling.greedy(jnp.asarray(logits), params, jnp.asarray(seen)),
                                jnp.argmax(filtered, axis=-1))
  assert (np.asarray(filtered) == -np.inf).any()  # the filters did remove tokens
