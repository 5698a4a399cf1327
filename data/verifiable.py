"""Problems with checkable answers, for RL from verifiable rewards (GRPO) and its SFT start.

A problem is a dict with `prompt` (the text a model continues) and whatever its reward
function reads (train/rewards.py): `answer` for exact match, `tests` for unit tests.

Sources (`config.data.source`):

  addition  embedded: every sum "aa+bb=" of two whole numbers below 100, written with two
            digits each (10,000 problems), answer the decimal sum ("12+07=" -> "19"). The
            fixed width lines the digits up at fixed positions, so a byte-level model of a
            few hundred thousand parameters reaches a measurable held-out accuracy after a
            short SFT, far from perfect (carries are hard for it): room for RL to show.
  jsonl     one JSON object per line with a string `prompt` and the fields its reward reads;
            `data.path` is a file, glob or URL.

The split is a hash of the prompt (addition) or of the line (jsonl), `sources.held_out`, so
a problem is in one split for every run: the SFT model (configs/sft.py:addition) never
trains on GRPO's held-out problems.
"""

import json
from collections.abc import Iterator

from etils import epath

from data import sources
from data.errors import DataError

SOURCES = ('addition', 'jsonl')
ADDITION_MAX = 100  # operands are 0 .. ADDITION_MAX - 1


def addition_problems(split: str, val_fraction: float) -> Iterator[dict]:
  """The sums of `split`, in a fixed order."""
  held_out = split == 'validation'
  for a in range(ADDITION_MAX):
    for b in range(ADDITION_MAX):
      prompt = f'{a:02d}+{b:02d}='
      if sources.held_out(prompt, val_fraction) == held_out:
        yield {'prompt': prompt, 'answer': str(a + b)}


def jsonl_problems(path: str, split: str, val_fraction: float) -> Iterator[dict]:
  """The rows of `split` of a problem jsonl; a row that is not an object with a string
  `prompt` is a DataError naming the file and the line."""
  held_out = split == 'validation'
  for name in sources.expand_path(path):
    with epath.Path(name).open('rb') as f:
      for number, line in enumerate(f, 1):
        text = line.decode('utf-8', 'replace').strip()
        if not text or sources.held_out(text, val_fraction) != held_out:
          continue
        try:
          row = json.loads(text)
        except json.JSONDecodeError as e:
          raise DataError(f'{name}:{number}: not JSON ({e.msg}).') from None
        if not isinstance(row, dict) or not isinstance(row.get('prompt'), str):
          raise DataError(f'{name}:{number}: a problem needs a string field "prompt".')
        yield row


def problems(source: str, split: str, val_fraction: float, path: str = '') -> list[dict]:
  """Every problem of `split` ('train' or 'validation') of `source`."""
  if source == 'addition':
    return list(addition_problems(split, val_fraction))
  if source == 'jsonl':
    return list(jsonl_problems(path, split, val_fraction))
  raise DataError(f'data.source={source!r} has no problems; choose one of {", ".join(SOURCES)}.')
