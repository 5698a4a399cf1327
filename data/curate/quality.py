"""Stage 5, quality rules: Gopher quality, Gopher repetition, C4, FineWeb.

Each rule family is a function of (text, its config block) that returns why
the document fails, or None when it passes; `c4` also edits, returning the
kept lines. Thresholds default to the published values (configs/curate.py):

  Gopher   Rae et al. 2021, "Scaling Language Models", appendix A.1.1 and table A1.
  C4       Raffel et al. 2020, as coded in TFDS's c4_utils.clean_page.
  FineWeb  Penedo et al. 2024, "The FineWeb Datasets", section 3.4.

Where a paper leaves a detail open, the choice is written beside the code.
A config block may be an ml_collections.ConfigDict or, for speed inside the
pipeline (ConfigDict attribute access is slow in per-line loops), a plain
namespace of the same fields (stages.plain).
"""

import re
import types

import ml_collections
import numpy as np

from data.curate import words

Settings = ml_collections.ConfigDict | types.SimpleNamespace

_BULLETS = ('•', '●', '○', '◦', '▪', '▫', '‣', '⁃', '-', '*', '–', '—')
_ELLIPSES = ('...', '…')
# Sentence- and quote-final punctuation of the scripts the default languages use.
TERMINAL_PUNCTUATION = ('.', '!', '?', '"', "'", '”', '’', '»', '…', '。', '！', '？', '؟', '।')


# --- Gopher quality ----------------------------------------------------------------

# A whitespace-separated token with at least one letter ([^\W\d_]: a word character
# that is neither a digit nor '_'); one match per such token.
_WORDS_WITH_A_LETTER = re.compile(r'\S*[^\W\d_]\S*')


def gopher_quality(text: str, cfg: Settings) -> str | None:
  """Gopher's quality filter. Words are whitespace-separated tokens, as in the paper."""
  tokens = text.split()
  n = len(tokens)
  if n < cfg.min_words:
    return f'fewer than {cfg.min_words} words'
  if n > cfg.max_words:
    return f'more than {cfg.max_words} words'
  mean_length = sum(map(len, tokens)) / n
  if not cfg.min_mean_word_length <= mean_length <= cfg.max_mean_word_length:
    return (f'mean word length outside [{cfg.min_mean_word_length}, '
            f'{cfg.max_mean_word_length}]')
  if text.count('#') / n > cfg.max_symbol_word_ratio:
    return f'hash-to-word ratio above {cfg.max_symbol_word_ratio}'
  if sum(text.count(e) for e in _ELLIPSES) / n > cfg.max_symbol_word_ratio:
    return f'ellipsis-to-word ratio above {cfg.max_symbol_word_ratio}'
  lines = [line.strip() for line in text.split('\n') if line.strip()]
  if sum(line.startswith(_BULLETS) for line in lines) / len(lines) > cfg.max_bullet_lines_ratio:
    return f'more than {cfg.max_bullet_lines_ratio:.0%} of lines start with a bullet'
  if sum(line.endswith(_ELLIPSES) for line in lines) / len(lines) > cfg.max_ellipsis_lines_ratio:
    return f'more than {cfg.max_ellipsis_lines_ratio:.0%} of lines end with an ellipsis'
  if len(_WORDS_WITH_A_LETTER.findall(text)) / n < cfg.min_alpha_words_ratio:
    return f'fewer than {cfg.min_alpha_words_ratio:.0%} of words have a letter'
  # "at least two of the following English words": distinct stop words, read literally.
  present = {t.strip('.,;:!?"\'()[]') for t in text.lower().split()} & set(cfg.stop_words)
  if len(present) < cfg.min_stop_words:
    return f'fewer than {cfg.min_stop_words} distinct stop words'
  return None


# --- Gopher repetition --------------------------------------------------------------


def gopher_repetition(text: str, cfg: Settings) -> str | None:
  """Gopher's repetition filter: repeated lines, paragraphs and word n-grams.

  A repeated line or paragraph is one whose text occurred earlier in the
  document; fractions of characters are of the whole text. n-gram character
  fractions count the characters of words (`words.words`), as the paper does.
  """
  for unit, parts in (('line', text.split('\n')), ('paragraph', re.split(r'\n{2,}', text))):
    parts = [p.strip() for p in parts if p.strip()]
    repeated = _repeats(parts)
    frac, char_frac = (getattr(cfg, f'max_dup_{unit}_frac'),
                       getattr(cfg, f'max_dup_{unit}_char_frac'))
    if parts and len(repeated) / len(parts) > frac:
      return f'more than {frac:.0%} of {unit}s repeated'
    if sum(map(len, repeated)) / max(len(text), 1) > char_frac:
      return f'more than {char_frac:.0%} of characters in repeated {unit}s'
  word_hashes, lengths = words.words(text)
  total_chars = int(lengths.sum())
  if total_chars == 0:
    return None
  for n, limit in zip(cfg.top_ngram_sizes, cfg.max_top_ngram_char_frac, strict=True):
    if top_ngram_char_frac(word_hashes, lengths, n) > limit:
      return f'most frequent {n}-gram covers more than {limit:.0%} of characters'
  for n, limit in zip(cfg.dup_ngram_sizes, cfg.max_dup_ngram_char_frac, strict=True):
    if dup_ngram_char_frac(word_hashes, lengths, n) > limit:
      return f'repeated {n}-grams cover more than {limit:.0%} of characters'
  return None


def _repeats(parts: list[str]) -> list[str]:
  """The parts whose text occurred earlier in `parts` (all but the first copy of each)."""
  seen, repeated = set(), []
  for p in parts:
    if p in seen:
      repeated.append(p)
    seen.add(p)
  return repeated


def top_ngram_char_frac(word_hashes: np.ndarray, lengths: np.ndarray, n: int) -> float:
  """Characters in all occurrences of the most frequent n-gram / characters in words.

  0 when no n-gram occurs twice. Among equally frequent n-grams, the longest counts.
  """
  grams = words.ngrams(word_hashes, n)
  if len(grams) == 0:
    return 0.0
  unique, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
  if counts.max() < 2:
    return 0.0
  gram_chars = _window_sums(lengths, n)
  chars_of_unique = np.zeros(len(unique), np.int64)
  chars_of_unique[inverse] = gram_chars
  best = np.flatnonzero(counts == counts.max())
  return float((counts[best] * chars_of_unique[best]).max() / lengths.sum())


def dup_ngram_char_frac(word_hashes: np.ndarray, lengths: np.ndarray, n: int) -> float:
  """Characters of the words inside any occurrence of a repeated n-gram / characters in words.

  Every occurrence of an n-gram that occurs more than once counts (the first
  too), and a word covered by several such occurrences counts once.
  """
  grams = words.ngrams(word_hashes, n)
  if len(grams) == 0:
    return 0.0
  _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
  starts = np.flatnonzero(counts[inverse] > 1)
  cover = np.zeros(len(lengths) + 1, np.int64)
  np.add.at(cover, starts, 1)
  np.add.at(cover, starts + n, -1)
  covered = np.cumsum(cover[:-1]) > 0
  return float(lengths[covered].sum() / lengths.sum())


def _window_sums(values: np.ndarray, n: int) -> np.ndarray:
  """[len(values) - n + 1]: the sum of each run of n consecutive values."""
  prefix = np.concatenate([[0], np.cumsum(values)])
  return prefix[n:] - prefix[:-n]


# --- C4 -----------------------------------------------------------------------------

_CITATION = re.compile(r'\[\d*\]|\[edit\]|\[citation needed\]')
_POLICY_SUBSTRINGS = ('terms of use', 'privacy policy', 'cookie policy', 'uses cookies',
                      'use of cookies', 'use cookies')
_C4_END_MARKS = ('.', '?', '!', '"')
# A sentence ends at terminal punctuation followed by space or the line's end.
_SENTENCE_END = re.compile(r'[.!?]+["\')\]]*(?=\s|$)')


def c4(text: str, cfg: Settings) -> tuple[str | None, str | None]:
  """C4's clean_page: (kept text, None), or (None, why the page is dropped).

  Line by line, in TFDS's order: lines with a word longer than max_word_length
  go; citation markers are deleted; lines not ending in terminal punctuation
  (or ending in an ellipsis), with fewer than min_words_per_line words,
  mentioning javascript, or quoting a cookie/terms policy go; "lorem ipsum" or
  a curly bracket drops the page. A page with fewer than min_sentences
  sentences left is dropped. TFDS counts sentences with NLTK's punkt, which
  needs a downloaded model; here a sentence ends at [.!?] before a space.
  """
  kept, sentences = [], 0
  for line in text.split('\n'):
    line = line.strip()
    if max(map(len, line.split()), default=0) > cfg.max_word_length:
      continue
    if cfg.remove_citations and '[' in line:
      line = _CITATION.sub('', line)
    if cfg.filter_no_terminal_punct and (not line.endswith(_C4_END_MARKS)
                                         or line.endswith('...')):
      continue
    if len(line.split()) < cfg.min_words_per_line:
      continue
    lower = line.lower()
    if cfg.filter_lorem_ipsum and 'lorem ipsum' in lower:
      return None, 'lorem ipsum'
    if cfg.filter_javascript and 'javascript' in lower:
      continue
    if cfg.filter_curly_bracket and '{' in line:
      return None, 'curly bracket'
    if cfg.filter_policy and any(p in lower for p in _POLICY_SUBSTRINGS):
      continue
    sentences += max(len(_SENTENCE_END.findall(line)), 1)
    kept.append(line)
  if sentences < cfg.min_sentences:
    return None, f'fewer than {cfg.min_sentences} sentences in kept lines'
  return '\n'.join(kept), None


# --- FineWeb ------------------------------------------------------------------------


def fineweb(text: str, cfg: Settings) -> str | None:
  """FineWeb's three extra rules, over the non-empty lines (stripped)."""
  lines = [line.strip() for line in text.split('\n') if line.strip()]
  if not lines:
    return 'no lines'
  punct = sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines)
  if punct <= cfg.min_line_punct_frac:
    return f'at most {cfg.min_line_punct_frac:.0%} of lines end in punctuation'
  short = sum(len(line) < cfg.short_line_chars for line in lines) / len(lines)
  if short >= cfg.max_short_line_frac:
    return (f'at least {cfg.max_short_line_frac:.0%} of lines are shorter than '
            f'{cfg.short_line_chars} characters')
  # Characters of the copies of a line after its first, over all line characters.
  dup_chars = sum(map(len, _repeats(lines))) / sum(map(len, lines))
  if dup_chars >= cfg.max_dup_line_char_frac:
    return f'at least {cfg.max_dup_line_char_frac:.0%} of characters in repeated lines'
  return None
