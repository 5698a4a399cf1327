"""Incremental detokenization and stop strings, per request.

Text arrives one token at a time, but a token's text depends on its neighbours: a
SentencePiece word piece drops its leading space at the start of a string, and a byte
fallback piece may be half of a UTF-8 character. So, as vLLM and TGI do, each step decodes
a short window (from `prefix` to the end) and emits what it adds to the window's older part;
nothing is emitted while the newest text ends in an incomplete character (U+FFFD). The
window starts with the last few prompt tokens, so the first word keeps its space.

Stop strings: the output text is searched for them as it grows. Text that could still be
the start of a stop string is held back (`max(len(stop)) - 1` characters), so a matched
stop string never reaches the client; the text after it is dropped.
"""

from collections.abc import Sequence

from data.tokenizers import Tokenizer

PROMPT_CONTEXT = 5  # prompt tokens the window starts with


class Detokenizer:
  """The text of one request's generated tokens, delta by delta, with stop strings."""

  def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
    self._tokenizer = tokenizer
    self._ids = list(prompt_ids[-PROMPT_CONTEXT:])
    self._prefix = 0                 # window start
    self._read = len(self._ids)      # tokens already turned into text
    self._stop = tuple(s for s in stop if s)
    self._hold = max((len(s) for s in self._stop), default=1) - 1
    self.text = ''                   # all decoded output text (before any stop string)
    self._sent = 0                   # characters of `text` already emitted

  def _decoded_delta(self) -> str:
    prefix_text = self._tokenizer.decode(self._ids[self._prefix:self._read])
    new_text = self._tokenizer.decode(self._ids[self._prefix:])
    if len(new_text) > len(prefix_text) and not new_text.endswith('\ufffd'):
      self._prefix, self._read = self._read, len(self._ids)
      return new_text[len(prefix_text):]
    return ''

  def add(self, token_id: int | None) -> tuple[str, bool]:
    """Adds a generated token (None: none, only flush) and returns (the text to emit now,
    whether a stop string matched). A stop token's own text is never added."""
    if token_id is not None:
      self._ids.append(int(token_id))
      start = max(0, len(self.text) - self._hold)
      self.text += self._decoded_delta()
      hits = [at for s in self._stop if (at := self.text.find(s, start)) >= 0]
      if hits:
        self.text = self.text[:min(hits)]
        return self.flush(), True
    end = len(self.text) - self._hold
    if end <= self._sent:
      return '', False
    delta, self._sent = self.text[self._sent:end], end
    return delta, False

  def flush(self) -> str:
    """Everything not yet emitted (at the end of the request)."""
    delta, self._sent = self.text[self._sent:], len(self.text)
    return delta
