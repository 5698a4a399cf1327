"""MinHash signatures and LSH band keys, vectorised over many documents at once.

A document's shingles are its word 5-grams (`words.ngrams`), each hashed to 32
bits. Permutation p maps shingle x to (a_p * x + b_p) mod 2**32, with a_p
random and odd (so the map is a bijection of 32-bit values) and b_p random; a
document's signature is its minimum under each of the bands * rows maps.
Shingles are already well-mixed hashes, so the multiply-add only has to
reorder them independently per permutation (the tests check the estimate's
bias and the banding's collision curve against their closed forms). In 32-bit
arithmetic numpy multiplies 8 lanes per AVX2 instruction; 64-bit products,
and datasketch's modulo of a Mersenne prime, have no such instruction.

Two documents share a band's key when all `rows` of their minima in that band
agree, which happens with probability J**rows for Jaccard similarity J. So a
pair shares at least one of `bands` keys with probability
1 - (1 - J**rows)**bands (FineWeb: 14 bands x 8 rows).

Documents with fewer words than the shingle size get one shingle of all their
words, so that short duplicates are found too; documents without words have no
signature.
"""

import numpy as np

from data.curate import words

_U64 = np.uint64
# Shingles per block of the permutation x shingle product: big enough that
# numpy's per-call cost is negligible, small enough to stay in cache.
_BLOCK = 4096


class MinHasher:
  """Seeded MinHash with `bands` x `rows` permutations over word `ngram`-shingles."""

  def __init__(self, *, bands: int, rows: int, ngram: int, seed: int):
    if bands < 1 or rows < 1 or ngram < 1:
      raise ValueError(f'bands={bands}, rows={rows} and ngram={ngram} must all be >= 1.')
    self.bands, self.rows, self.ngram = bands, rows, ngram
    rng = np.random.default_rng(seed)
    n = bands * rows
    self._a = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    self._b = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    self._band_weights = rng.integers(0, 2**63, size=rows, dtype=np.uint64) * _U64(2) + _U64(1)

  @property
  def num_perm(self) -> int:
    return self.bands * self.rows

  def shingles(self, text: str) -> np.ndarray:
    """uint32 [S]: the shingle hashes of `text` (S = 0 if it has no words)."""
    word_hashes, _ = words.words(text)
    n = min(self.ngram, len(word_hashes))
    if n == 0:
      return np.zeros(0, np.uint32)
    return (words.ngrams(word_hashes, n) >> _U64(32)).astype(np.uint32)

  def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(signatures uint32 [D, bands*rows], has_words bool [D]) of `texts`.

    Rows of documents without words are all 0xFFFFFFFF and have has_words False.
    """
    x_S, doc_S = self._batch_shingles(texts)
    has_words = np.zeros(len(texts), bool)
    has_words[doc_S] = True
    signatures_DxP = np.full((len(texts), self.num_perm), 0xFFFFFFFF, np.uint32)
    if len(x_S):
      starts = np.flatnonzero(np.r_[True, doc_S[1:] != doc_S[:-1]])
      signatures_DxP[has_words] = self._segment_min(x_S, starts).T
    return signatures_DxP, has_words

  def _batch_shingles(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(shingle hashes uint32 [S], document index int64 [S]) of all texts, by document."""
    word_hashes, doc_W = words.words_of_many(texts)
    n = self.ngram
    grams = words.ngrams(word_hashes, n)
    inside = doc_W[:len(grams)] == doc_W[n - 1:]  # the n-gram does not cross a document end
    x, doc = [grams[inside]], [doc_W[:len(grams)][inside]]
    counts = np.bincount(doc_W, minlength=len(texts))
    for d in np.flatnonzero((counts > 0) & (counts < n)):  # short: one shingle of all words
      x.append(words.ngrams(word_hashes[doc_W == d], int(counts[d])))
      doc.append(np.array([d]))
    x_S, doc_S = np.concatenate(x), np.concatenate(doc)
    order = np.argsort(doc_S, kind='stable')
    return (x_S[order] >> _U64(32)).astype(np.uint32), doc_S[order]

  def _segment_min(self, x_S: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """uint32 [P, len(starts)]: min of a*x + b over each segment [starts[i], starts[i+1])."""
    total = len(x_S)
    # Cut the shingles at segment starts and at block boundaries; each piece
    # lies in one segment and one block, and reduces to one column of minima.
    cuts = np.union1d(starts, np.arange(0, total, _BLOCK))
    piece_min = np.empty((self.num_perm, len(cuts)), np.uint32)
    block = np.empty((self.num_perm, _BLOCK), np.uint32)
    for lo in range(0, total, _BLOCK):
      hi = min(lo + _BLOCK, total)
      first, last = np.searchsorted(cuts, [lo, hi])
      out = block[:, :hi - lo]
      np.multiply(self._a[:, None], x_S[None, lo:hi], out=out)  # wraps mod 2**32
      np.add(out, self._b[:, None], out=out)
      piece_min[:, first:last] = np.minimum.reduceat(out, cuts[first:last] - lo, axis=1)
    segment_of_piece = np.searchsorted(starts, cuts, side='right') - 1
    first_piece = np.searchsorted(segment_of_piece, np.arange(len(starts)))
    return np.minimum.reduceat(piece_min, first_piece, axis=1)

  def band_keys(self, signatures_DxP: np.ndarray) -> np.ndarray:
    """uint64 [D, bands]: one hash per band of `rows` signature values."""
    d = signatures_DxP.shape[0]
    rows_DxBxR = signatures_DxP.reshape(d, self.bands, self.rows).astype(_U64)
    return words.mix64((rows_DxBxR * self._band_weights).sum(axis=-1, dtype=_U64))


def candidate_pairs(band_keys_DxB: np.ndarray) -> np.ndarray:
  """int64 [K, 2]: every pair i < j of documents that share a key in some band, once."""
  pairs = []
  for band in range(band_keys_DxB.shape[1]):
    keys = band_keys_DxB[:, band]
    order = np.argsort(keys, kind='stable')
    sorted_keys = keys[order]
    run_starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    run_ends = np.r_[run_starts[1:], len(keys)]
    for lo, hi in zip(run_starts[run_ends - run_starts > 1], run_ends[run_ends - run_starts > 1],
                      strict=True):
      members = np.sort(order[lo:hi])
      i, j = np.triu_indices(len(members), k=1)
      pairs.append(np.stack([members[i], members[j]], axis=1))
  if not pairs:
    return np.zeros((0, 2), np.int64)
  return np.unique(np.concatenate(pairs), axis=0)


def collision_probability(jaccard: float | np.ndarray, bands: int, rows: int):
  """The chance that two documents of Jaccard similarity `jaccard` share a band key."""
  return 1.0 - (1.0 - np.asarray(jaccard, np.float64) ** rows) ** bands
