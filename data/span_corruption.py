"""T5's span corruption objective, in numpy.

Raffel et al. (2020), section 3.1.4: a random 15% of a chunk's tokens, in spans of mean
length 3, are dropped from the encoder input, each span replaced by one sentinel; the
decoder target is each sentinel followed by the span it replaced. For a chunk

  tokens   N0 S0 N1 S1 ... Nk Sk        (non-noise spans N, noise spans S; N first)
  inputs   N0 <x0> N1 <x1> ... Nk <xk> EOS
  targets  <x0> S0 <x1> S1 ... <xk> Sk EOS

with <xi> = `<extra_id_i>`, id vocab_size - 1 - i (T5's convention: sentinels count down
from the top of the vocabulary).

`noise_mask` has the semantics of T5's `random_spans_noise_mask` (t5/data/preprocessors.py):
the number of noise tokens round(length * density) (at least 1, at most length - 1), the
number of spans round(noise / mean_span_length) (at least 1), both counts split into that
many non-empty spans uniformly at random, spans alternating non-noise, noise. T5 computes
the counts in float32 with round-half-to-even; so does this. `chunk_length` is T5's
`random_spans_helper`: the raw chunk length whose inputs (with EOS) fill exactly
`input_len` positions, and the target length it yields.

Written here in numpy because T5's and seqio's implementations are TensorFlow graph code,
which Kiln does not depend on; randomness comes from a numpy Generator the caller seeds,
so a pipeline can make each example's mask a function of (seed, example index).
"""

import numpy as np


def noise_counts(length: int, noise_density: float,
                 mean_noise_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a chunk of `length` tokens, as T5 counts them."""
  length = max(length, 2)  # T5: avoid the degenerate lengths 0 and 1
  num_noise = int(np.round(np.float32(length) * np.float32(noise_density)))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = int(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length)))
  return num_noise, max(num_spans, 1)


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
  """Lengths of `num_segments` non-empty segments that add up to `num_items`, uniformly
  over all such compositions: segment starts are a random subset of the item boundaries."""
  first_in_segment = np.zeros(num_items, np.int64)
  cuts = rng.choice(num_items - 1, size=num_segments - 1, replace=False) + 1
  first_in_segment[cuts] = 1
  segment_id = np.cumsum(first_in_segment)
  return np.bincount(segment_id, minlength=num_segments)


def noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
               mean_noise_span_length: float = 3.0) -> np.ndarray:
  """bool [length]: True on noise tokens; spans alternate, the first one is not noise."""
  orig_length = length
  length = max(length, 2)
  num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
  interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
  is_noise = np.repeat(np.tile([False, True], num_spans), interleaved)
  return is_noise[:orig_length]


def sentinel_id(vocab_size: int, i: int) -> int:
  """The id of `<extra_id_i>`: T5's sentinels count down from the top of the vocabulary."""
  return vocab_size - 1 - i


def _spans_to_sentinels(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> np.ndarray:
  """`tokens` with each run of True in `mask` replaced by the next sentinel (T5's
  `noise_span_to_unique_sentinel`)."""
  previous = np.concatenate([[False], mask[:-1]])
  first = mask & ~previous
  out = tokens.copy()
  out[first] = vocab_size - np.cumsum(first)[first]  # <extra_id_0>, <extra_id_1>, ...
  return out[~(mask & previous)]


def corrupt(tokens: np.ndarray, mask: np.ndarray, *, vocab_size: int,
            eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) of one chunk and its noise mask, each ending in `eos_id`."""
  tokens = np.asarray(tokens)
  inputs = _spans_to_sentinels(tokens, mask, vocab_size)
  targets = _spans_to_sentinels(tokens, ~mask, vocab_size)
  eos = np.asarray([eos_id], tokens.dtype)
  return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def chunk_length(input_len: int, noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0) -> tuple[int, int]:
  """(raw tokens per chunk, target length): the longest chunk whose corrupted inputs, with
  one sentinel per span and EOS, fit `input_len`; and its targets' length (sentinels, noise
  tokens, EOS). T5's `random_spans_helper` with one extra token per span on each side."""
  def lengths(n: int) -> tuple[int, int]:
    num_noise = int(round(n * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    return n - num_noise + num_spans + 1, num_noise + num_spans + 1

  n = input_len - 1
  while lengths(n + 1)[0] <= input_len:
    n += 1
  inputs_length, targets_length = lengths(n)
  if noise_density == 0.5 and targets_length > inputs_length:  # T5's own adjustment
    n -= 1
    targets_length -= 1
  return n, targets_length
