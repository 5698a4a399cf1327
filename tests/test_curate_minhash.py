"""MinHash LSH: signatures against a direct formula, words against a regex, and the
LSH's flagged pairs against exact Jaccard similarity on perturbed real documents.

The documents are the Python reference manual's topics that ship with CPython
(pydoc_data.topics), cut into 300-word pieces; near-duplicates are made by
replacing random words, and their exact Jaccard similarity is computed from
Python sets of word 5-grams, independently of the code under test.
"""

import pydoc_data.topics
import re

import numpy as np
import pytest

from configs import curate
from data.curate import minhash, words

CFG = curate.get_config().near_dedup


def hasher(**overrides) -> minhash.MinHasher:
  kw = dict(bands=CFG.bands, rows=CFG.rows, ngram=CFG.ngram, seed=CFG.seed)
  kw.update(overrides)
  return minhash.MinHasher(**kw)


def regex_words(text: str) -> list[str]:
  return re.findall(r'\w+', text.lower())


def shingle_set(text: str, n: int = 5) -> set:
  w = regex_words(text)
  return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)} if len(w) >= n else {tuple(w)}


def jaccard(a: str, b: str) -> float:
  x, y = shingle_set(a), shingle_set(b)
  return len(x & y) / len(x | y)


@pytest.fixture(scope='module')
def pieces() -> list[str]:
  """~370 real English documents of 150 words, no two sharing a word position."""
  out = []
  for text in pydoc_data.topics.topics.values():
    tokens = text.split()
    out += [' '.join(tokens[i:i + 150]) for i in range(0, len(tokens) - 149, 150)]
  return out


def perturb(text: str, replace: float, rng: np.random.Generator) -> str:
  """`text` with `replace` random words (a fraction, if below 1) replaced by new ones."""
  tokens = text.split()
  count = int(replace if replace >= 1 else replace * len(tokens))
  for i in rng.choice(len(tokens), count, replace=False):
    tokens[i] = f'zq{rng.integers(10**9)}'
  return ' '.join(tokens)


def test_words_match_regex_and_are_deterministic(pieces):
  text = pieces[0] + ' Ünïcödé wörds, ÉCOLE école; snake_case 42x'
  hashes, lengths = words.words(text)
  expected = regex_words(text)
  assert list(lengths) == [len(w) for w in expected]
  by_word = {}
  for word, h in zip(expected, hashes.tolist(), strict=True):
    assert by_word.setdefault(word, h) == h  # equal words hash equally...
  assert len(set(by_word.values())) == len(by_word)  # ...and different ones differently
  assert words.words('École')[0][0] == words.words('école')[0][0]
  # Fixed constants, not Python's per-process salted hash: a known value stays known.
  assert int(words.words('kiln')[0][0]) == int(words.words('KILN')[0][0])
  grams = words.ngrams(hashes, 5)
  assert len(grams) == len(expected) - 4 and len(words.ngrams(hashes[:4], 5)) == 0
  assert len(set(grams.tolist())) == len({tuple(expected[i:i + 5])
                                          for i in range(len(expected) - 4)})


def test_signatures_match_the_direct_formula(pieces):
  h = hasher()
  # Short and long documents, so that segments cross the 1024-row blocks.
  texts = [pieces[0], 'few words', pieces[1] * 5, '', pieces[2][:50], '!!!', pieces[3] * 2]
  sigs, has_words = h.signatures(texts)
  assert has_words.tolist() == [True, True, True, False, True, False, True]
  for text, sig, ok in zip(texts, sigs, has_words, strict=True):
    if not ok:
      assert (sig == 0xFFFFFFFF).all()
      continue
    x = h.shingles(text).astype(np.uint64)
    direct = ((x[:, None] * h._a[None, :] + h._b[None, :]) % 2**32).min(axis=0)
    np.testing.assert_array_equal(sig, direct.astype(np.uint32))
  again, _ = hasher().signatures(texts)
  np.testing.assert_array_equal(sigs, again)  # seeded: the same every time
  other, _ = hasher(seed=CFG.seed + 1).signatures(texts)
  assert (other[has_words] != sigs[has_words]).mean() > 0.9


def test_signature_agreement_estimates_jaccard(pieces):
  """The share of equal signature values estimates Jaccard similarity without bias, with
  the variance J(1 - J) / P of P independent permutations (no more: correlated
  permutations would inflate it)."""
  rng = np.random.default_rng(0)
  h = hasher(bands=64, rows=8)  # 512 permutations
  z = []
  for text in pieces[:60]:
    variant = perturb(text, rng.uniform(0.02, 0.3), rng)
    sigs, _ = h.signatures([text, variant])
    j = jaccard(text, variant)
    z.append(((sigs[0] == sigs[1]).mean() - j) / np.sqrt(j * (1 - j) / h.num_perm))
  z = np.array(z)
  # Standardised errors: mean 0 (standard error 0.13) and standard deviation 1 (about 0.09).
  assert abs(z.mean()) < 0.5 and 0.7 < z.std() < 1.4, (z.mean(), z.std())


def flagged_pairs(h: minhash.MinHasher, texts: list[str]) -> set:
  sigs, _ = h.signatures(texts)
  return {tuple(p) for p in minhash.candidate_pairs(h.band_keys(sigs)).tolist()}


def test_lsh_recall_and_precision_at_the_configured_threshold(pieces):
  """Each real piece gets one perturbed copy; truth is exact Jaccard >= the threshold.

  FineWeb's 14 x 8 banding has its threshold at (1/14)**(1/8) = 0.72 and an
  S-shaped flag probability around it; the copies are made at similarities
  0.12 or more away from it on either side (the S-curve itself is checked
  against its closed form in the next test).
  """
  h = hasher()
  threshold = (1 / h.bands) ** (1 / h.rows)
  rng = np.random.default_rng(1)
  texts, truth = [], set()
  near = dissimilar = 0
  for i, text in enumerate(pieces):
    # Of 150 words, 1, 2, 12 or 20 replaced: Jaccard about 0.93, 0.87, 0.5 and 0.3.
    variant = perturb(text, [1, 2, 2, 12, 20][i % 5], rng)
    j = jaccard(text, variant)
    if abs(j - threshold) < 0.1:
      continue
    a = len(texts)
    texts += [text, variant]
    if j >= threshold:
      truth.add((a, a + 1))
      near += 1
    else:
      dissimilar += 1
  assert near >= 150 and dissimilar >= 100
  # Every pair of the set is judged: a pair of different pieces (disjoint
  # words of the manual) is a negative, and any flagged pair's exact Jaccard
  # decides whether it was right.
  flagged = flagged_pairs(h, texts)
  true_positives = sum(jaccard(texts[a], texts[b]) >= threshold for a, b in flagged)
  recall = len(flagged & truth) / len(truth)
  precision = true_positives / max(len(flagged), 1)
  assert recall >= 0.95, (recall, precision)
  assert precision >= 0.95, (recall, precision)


def test_lsh_flag_rate_follows_the_closed_form(pieces):
  """P(flag | J) = 1 - (1 - J**rows)**bands, within 4 binomial standard deviations."""
  h = hasher()
  rng = np.random.default_rng(2)
  for fraction in (0.03, 0.06, 0.09):
    hits, expected = [], []
    for text in pieces:
      variant = perturb(text, fraction, rng)
      hits.append((0, 1) in flagged_pairs(h, [text, variant]))
      expected.append(minhash.collision_probability(jaccard(text, variant), h.bands, h.rows))
    expected = np.array(expected)
    sd = np.sqrt((expected * (1 - expected)).sum())
    assert abs(sum(hits) - expected.sum()) <= 4 * sd + 1, (fraction, sum(hits), expected.sum())


def test_candidate_pairs_oracle():
  keys = np.array([[1, 7], [2, 7], [1, 8], [3, 9]], np.uint64)  # 4 documents, 2 bands
  assert minhash.candidate_pairs(keys).tolist() == [[0, 1], [0, 2]]
