"""Stage 1, normalisation: Unicode NFC, control characters and whitespace.

Indentation inside lines is kept (code and poetry need it); only what no
reader sees is changed:
  control characters  C0/C1 controls other than tab and newline, lone
                      surrogates, U+FEFF (BOM) and U+FFFE/U+FFFF are deleted;
  line breaks         \\r\\n, \\r, \\v, \\f, U+0085, U+2028 and U+2029 become \\n;
  whitespace          other Unicode spaces (no-break, em, ideographic, ...)
                      become ' ', trailing spaces of each line are dropped,
                      runs of more than two blank lines become two, and the
                      document is stripped at both ends.
"""

import re
import unicodedata

import ml_collections

_LINE_BREAKS = re.compile('\r\n|[\r\v\f\x85\u2028\u2029]')
_CONTROL = re.compile('[\x00-\x08\x0b-\x1f\x7f-\x84\x86-\x9f\ufeff\ufffe\uffff\ud800-\udfff]')
_SPACES = re.compile('[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]')
_TRAILING = re.compile('[ \t]+$', re.MULTILINE)
_BLANK_RUNS = re.compile('\n{4,}')


class Normalizer:
  """Applies the switched-on parts of `config.normalize` to a text."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.nfc, self.control, self.whitespace = cfg.nfc, cfg.control_chars, cfg.whitespace

  def __call__(self, text: str) -> str:
    if self.control:
      # Line breaks first: \r, \v and \f are control characters too, but mean a new line.
      text = _CONTROL.sub('', _LINE_BREAKS.sub('\n', text))
    if self.nfc:
      text = unicodedata.normalize('NFC', text)
    if self.whitespace:
      text = _SPACES.sub(' ', text)
      text = _TRAILING.sub('', text)
      text = _BLANK_RUNS.sub('\n\n\n', text).strip()
    return text
