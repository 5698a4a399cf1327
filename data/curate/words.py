"""Words and word n-grams of a text as 64-bit hashes, computed with numpy.

A word is a maximal run of the characters that regex `\\w` matches (letters and
digits of every script, and '_'); text is lowercased first. MinHash shingles,
the Gopher repetition rules and decontamination all use these words, so "the
same 5-gram" means the same thing everywhere.

Everything is vectorised over the characters: the text becomes an array of
code points, words are runs of a lookup table, and a word's hash is a
polynomial in its code points read off one prefix sum. Hashes are
deterministic (unlike Python's `hash`, which is salted per process), so every
worker of a distributed run agrees on them.
"""

import functools
import re
import sys

import numpy as np

_U64 = np.uint64
_MAX_CODE_POINT = sys.maxunicode + 1
# Odd 64-bit constants: the polynomial base and the n-gram position weights
# (from a fixed seed, so hashes never change between versions or machines).
_BASE = 0x9E3779B97F4A7C15
_BASE_INV = pow(_BASE, -1, 2**64)
_POSITION_WEIGHTS = np.random.default_rng(20240601).integers(
    0, 2**63, size=64, dtype=np.uint64) * _U64(2) + _U64(1)


@functools.cache
def _word_char_table() -> np.ndarray:
  """bool[sys.maxunicode + 1]: whether a code point is a word character (`\\w`)."""
  table = np.zeros(_MAX_CODE_POINT, dtype=bool)
  every_char = ''.join(map(chr, range(_MAX_CODE_POINT)))
  for match in re.finditer(r'\w+', every_char):
    table[match.start():match.end()] = True
  return table


class _Powers:
  """BASE**i and BASE**-i mod 2**64 for i < n, grown on demand (one copy per process)."""

  def __init__(self):
    self.pow = np.ones(1, _U64)
    self.inv = np.ones(1, _U64)

  def upto(self, n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(self.pow) < n:
      size = max(n, 2 * len(self.pow))
      self.pow = _power_series(_BASE, size)
      self.inv = _power_series(_BASE_INV, size)
    return self.pow[:n], self.inv[:n]


def _power_series(base: int, n: int) -> np.ndarray:
  """[base**0, base**1, ..., base**(n-1)] mod 2**64."""
  factors = np.full(n, base, _U64)
  factors[0] = 1
  return np.cumprod(factors, dtype=_U64)  # uint64 products wrap mod 2**64


_POWERS = _Powers()


def mix64(x: np.ndarray) -> np.ndarray:
  """A bijective finaliser (splitmix64's) that spreads every input bit over the output."""
  x = x.astype(_U64, copy=True)
  x ^= x >> _U64(30)
  x *= _U64(0xBF58476D1CE4E5B9)
  x ^= x >> _U64(27)
  x *= _U64(0x94D049BB133111EB)
  x ^= x >> _U64(31)
  return x


def words(text: str) -> tuple[np.ndarray, np.ndarray]:
  """(hashes uint64 [W], lengths int64 [W]) of the words of `text`, in order.

  Lengths are in characters. Case is ignored: 'The' and 'the' hash alike.
  """
  hashes, starts, ends = _spans(text.lower())
  return hashes, (ends - starts).astype(np.int64)


def words_of_many(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(hashes uint64 [W], text index int64 [W]) of the words of all `texts`, in order.

  One pass over all the texts at once, so that numpy's per-call cost is paid
  once per batch rather than once per text.
  """
  lowered = [t.lower() for t in texts]
  # '\n' is not a word character, so no word spans two texts.
  hashes, starts, _ = _spans('\n'.join(lowered))
  text_starts = np.cumsum([0] + [len(t) + 1 for t in lowered[:-1]])
  return hashes, np.searchsorted(text_starts, starts, side='right') - 1


def _spans(lowered: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(hashes uint64, start and end character offsets) of the words of a lowercased text."""
  code_points = np.frombuffer(lowered.encode('utf-32-le', errors='surrogatepass'),
                              dtype=np.uint32)
  if not len(code_points):
    empty = np.zeros(0, np.int64)
    return np.zeros(0, _U64), empty, empty
  is_word = _word_char_table()[code_points]
  edges = np.diff(is_word.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
  starts = np.flatnonzero(edges == 1)
  ends = np.flatnonzero(edges == -1)
  powers, inverse_powers = _POWERS.upto(len(code_points))
  # prefix[i] = sum_{j < i} cp[j] * BASE**j, so a word's polynomial (in the
  # positions from its own start) is (prefix[end] - prefix[start]) * BASE**-start.
  prefix = np.zeros(len(code_points) + 1, _U64)
  np.cumsum(code_points.astype(_U64) * powers, out=prefix[1:])
  hashes = (prefix[ends] - prefix[starts]) * inverse_powers[starts]
  return mix64(hashes), starts, ends


def ngrams(word_hashes: np.ndarray, n: int) -> np.ndarray:
  """uint64 [W - n + 1]: the hash of each run of `n` consecutive words (empty if W < n)."""
  if n < 1 or n > len(_POSITION_WEIGHTS):
    raise ValueError(f'n-gram size {n} must be in [1, {len(_POSITION_WEIGHTS)}].')
  count = len(word_hashes) - n + 1
  if count <= 0:
    return np.zeros(0, _U64)
  combined = word_hashes[:count] * _POSITION_WEIGHTS[0]
  for j in range(1, n):
    combined += word_hashes[j:j + count] * _POSITION_WEIGHTS[j]
  return mix64(combined)
