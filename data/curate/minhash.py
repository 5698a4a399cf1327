"""MinHash signatures and LSH band keys, vectorised over many documents at once.

A document's shingles are its word 5-grams (`words.ngrams`), each reduced to 32
bits. Permutation p maps shingle x to (a_p * x + b_p) mod 2**64 >> 32 with
random odd 64-bit a_p and random b_p: Dietzfelbinger's multiply-shift scheme,
strongly universal for 32-bit keys, and one multiply-add per element instead of
datasketch's modulo of a Mersenne prime. Since `>> 32` preserves order, the
minimum is taken before the shift. A document's signature is its minimum under
each of the bands * rows permutations; two documents share a band's key when
all `rows` of their minima in that band agree, which happens with probability
J**rows for Jaccard similarity J. So a pair shares at least one of `bands` keys
with probability 1 - (1 - J**rows)**bands (FineWeb: 14 bands x 8 rows).

Documents with fewer words than the shingle size get one shingle of all their
words, so that short duplicates are found too; documents without words have no
signature.
"""

import numpy as np

from data.curate import words

_U64 = np.uint64
# Rows of the shingle x permutation block computed at once: small enough to
# stay in cache, big enough that numpy's per-call overhead is negligible.
_BLOCK_ROWS = 1024


class MinHasher:
  """Seeded MinHash with `bands` x `rows` permutations over word `ngram`-shingles."""

  def __init__(self, *, bands: int, rows: int, ngram: int, seed: int):
    if bands < 1 or rows < 1 or ngram < 1:
      raise ValueError(f'bands={bands}, rows={rows} and ngram={ngram} must all be >= 1.')
    self.bands, self.rows, self.ngram = bands, rows, ngram
    rng = np.random.default_rng(seed)
    n = bands * rows
    self._a = rng.integers(0, 2**63, size=n, dtype=np.uint64) * _U64(2) + _U64(1)
    self._b = rng.integers(0, 2**63, size=n, dtype=np.uint64) * _U64(2)
    self._band_weights = rng.integers(0, 2**63, size=rows, dtype=np.uint64) * _U64(2) + _U64(1)

  @property
  def num_perm(self) -> int:
    return self.bands * self.rows

  def shingles(self, text: str) -> np.ndarray:
    """uint64 [S]: the 32-bit shingle hashes of `text` (S = 0 if it has no words)."""
    word_hashes, _ = words.words(text)
    n = min(self.ngram, len(word_hashes))
    if n == 0:
      return np.zeros(0, _U64)
    return words.ngrams(word_hashes, n) >> _U64(32)

  def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(signatures uint32 [D, bands*rows], has_words bool [D]) of `texts`.

    Rows of documents without words are all 0xFFFFFFFF and have has_words False.
    """
    shingles = [self.shingles(t) for t in texts]
    counts = np.array([len(s) for s in shingles], np.int64)
    has_words = counts > 0
    signatures_DxP = np.full((len(texts), self.num_perm), 0xFFFFFFFF, np.uint32)
    if has_words.any():
      x_S = np.concatenate(shingles)
      starts = np.concatenate([[0], np.cumsum(counts[has_words])[:-1]])
      signatures_DxP[has_words] = (self._segment_min(x_S, starts) >> _U64(32)).astype(np.uint32)
    return signatures_DxP, has_words

  def _segment_min(self, x_S: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """uint64 [len(starts), P]: min over each segment [starts[i], starts[i+1]) of a*x + b."""
    total = len(x_S)
    # Cut the shingles at segment starts and at block boundaries; each piece
    # lies in one segment and one block, and reduces to one row of minima.
    cuts = np.union1d(starts, np.arange(0, total, _BLOCK_ROWS))
    piece_min = np.empty((len(cuts), self.num_perm), _U64)
    block = np.empty((_BLOCK_ROWS, self.num_perm), _U64)
    for lo in range(0, total, _BLOCK_ROWS):
      hi = min(lo + _BLOCK_ROWS, total)
      first, last = np.searchsorted(cuts, [lo, hi])
      out = block[:hi - lo]
      np.multiply(x_S[lo:hi, None], self._a[None, :], out=out)  # wraps mod 2**64
      np.add(out, self._b[None, :], out=out)
      piece_min[first:last] = np.minimum.reduceat(out, cuts[first:last] - lo, axis=0)
    segment_of_piece = np.searchsorted(starts, cuts, side='right') - 1
    return np.minimum.reduceat(piece_min, np.searchsorted(segment_of_piece, np.arange(len(starts))),
                               axis=0)

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
