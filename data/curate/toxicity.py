"""Stage 6, toxicity: a word-list filter, and a hook for a classifier.

The list is a text file (config.toxicity.word_list; Kiln's small default is
toxic_words.txt in this package): one word or phrase per line, '#' starts a
comment. A document is dropped when it holds more than `max_hits` occurrences
of listed entries, matched as whole words, case-insensitively (C4 drops a page
on its first listed word: max_hits=0).

The hook: config.toxicity.classifier names a function as 'module:function'
that takes a list of texts and returns one score in [0, 1] per text; documents
scoring at or above `classifier_threshold` are dropped. It is imported once per
worker, so it can load a model at import time.
"""

import importlib
import re
from collections.abc import Callable, Sequence

from apache_beam.io.filesystems import FileSystems

from data.errors import DataError


def read_word_list(path: str) -> list[str]:
  """The entries of the word list file at `path` (local or any Beam filesystem)."""
  try:
    with FileSystems.open(path) as f:
      raw = f.read()
  except OSError as e:  # BeamIOError, for every filesystem, is an OSError
    raise DataError(f'Cannot read the toxicity word list toxicity.word_list={path!r} ({e}); '
                    'give an existing file.') from None
  try:
    lines = raw.decode('utf-8').splitlines()
  except UnicodeDecodeError:
    raise DataError(f'The toxicity word list {path!r} is not UTF-8 text.') from None
  entries = [' '.join(line.split('#', 1)[0].lower().split()) for line in lines]
  entries = [e for e in entries if e]
  if not entries:
    raise DataError(f'The toxicity word list {path!r} has no entries.')
  return entries


_WORD = re.compile(r'\w+')


class WordListFilter:
  """Counts whole-word, case-insensitive occurrences of the listed words and phrases.

  Entries made of word characters (\\w) are looked up among the text's words,
  phrases among its runs of words (any whitespace or punctuation between them);
  entries with other characters ('a$$') fall back to a regex.
  """

  def __init__(self, entries: Sequence[str]):
    self._words = {e for e in entries if _WORD.fullmatch(e)}
    self._phrases = {' '.join(e.split()) for e in entries
                     if ' ' in e and all(_WORD.fullmatch(w) for w in e.split())}
    others = sorted(set(entries) - self._words - self._phrases, key=len, reverse=True)
    self._others = re.compile(
        r'(?<!\w)(?:' + '|'.join(re.escape(e).replace(r'\ ', r'\s+') for e in others) + r')(?!\w)',
        re.IGNORECASE) if others else None

  def hits(self, text: str) -> int:
    words = _WORD.findall(text.lower())
    count = sum(map(self._words.__contains__, words))
    if self._phrases:
      joined = f' {" ".join(words)} '
      count += sum(joined.count(f' {p} ') for p in self._phrases)
    if self._others is not None:
      count += sum(1 for _ in self._others.finditer(text))
    return count


def load_classifier(spec: str) -> Callable[[list[str]], Sequence[float]]:
  """The function named by 'module:function'."""
  module_name, _, function_name = spec.partition(':')
  if not module_name or not function_name:
    raise DataError(f"toxicity.classifier={spec!r} must be 'module:function'.")
  try:
    function = getattr(importlib.import_module(module_name), function_name)
  except (ImportError, AttributeError) as e:
    raise DataError(f'Cannot load toxicity.classifier={spec!r}: {e}.') from None
  if not callable(function):
    raise DataError(f'toxicity.classifier={spec!r} is not a function.')
  return function
