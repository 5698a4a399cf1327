"""What annotators see and what they decided: each one's order of items and sides, and the
judgement and preference files.

Each annotator gets the items in their own shuffled order, and for each item model A's
completion on the left or on the right, both drawn from a hash of (seed, annotator, item):
the same on every page load and after a restart, different between annotators, and
recorded with every judgement.

`<output>/judgements.jsonl` gets one line per judgement: annotator, item, `left` (the
model shown on the left, "a" or "b"), `choice` (the button: "left", "right", "tie" or
"both_bad"), `winner` ("a", "b", "tie" or "both_bad"), reason and time (UTC, ISO 8601).
`<output>/preferences.jsonl` gets a line `{"prompt", "chosen", "rejected"}` per judgement
that chose a side, the format that the DPO and reward-model tasks read
(data/preference_data.py); a conversation's prompt stays a message list and the two
completions become assistant messages. Ties, "both bad" and identical completions give no
pair; an item judged by several annotators gives one pair per judgement, so agreement
weighs more. At start the preference file is rebuilt from the judgements, which are the
record.

One asyncio lock serialises the appends: the server is one process, and each line is
written whole.
"""

import asyncio
import datetime
import hashlib
import json
import pathlib
import random
import unicodedata

from data.errors import DataError

JUDGEMENTS_FILE = 'judgements.jsonl'
PREFERENCES_FILE = 'preferences.jsonl'
CHOICES = ('left', 'right', 'tie', 'both_bad')
MAX_NAME = 64
MAX_REASON = 2000


class InputError(ValueError):
  """A request the annotator's page should not have sent (the app answers 4xx)."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def check_name(name: str) -> str:
  """The annotator name, trimmed; InputError if empty, too long or holding control
  characters."""
  name = name.strip()
  if not name or len(name) > MAX_NAME:
    raise InputError(f'The annotator name must be 1 to {MAX_NAME} characters.')
  if any(unicodedata.category(c).startswith('C') for c in name):
    raise InputError('The annotator name must not hold control characters.')
  return name


def _draw(seed: int, *key) -> random.Random:
  digest = hashlib.sha256(json.dumps([seed, *key]).encode()).digest()
  return random.Random(int.from_bytes(digest[:8], 'little'))


class Store:
  """The items, every judgement so far, and the files they go to (module docstring)."""

  def __init__(self, output: str, items: list[dict], seed: int = 0):
    self.items, self.seed = items, seed
    self.dir = pathlib.Path(output)
    self.judgements = self._read_judgements()
    self.done = {(j['annotator'], j['item']) for j in self.judgements}
    self._lock = asyncio.Lock()
    self._rebuild_preferences()

  # --- what an annotator sees ----------------------------------------------------

  def left_model(self, annotator: str, item: int) -> str:
    """'a' or 'b': the model whose completion `annotator` sees on the left of `item`."""
    return 'a' if _draw(self.seed, 'side', annotator, item).random() < 0.5 else 'b'

  def order(self, annotator: str) -> list[int]:
    items = list(range(len(self.items)))
    _draw(self.seed, 'order', annotator).shuffle(items)
    return items

  def next_pair(self, annotator: str) -> dict:
    """The next item `annotator` has not judged, as the page shows it (no model names)."""
    judged = sum((annotator, i) in self.done for i in range(len(self.items)))
    progress = {'judged': judged, 'total': len(self.items)}
    item = next((i for i in self.order(annotator) if (annotator, i) not in self.done), None)
    if item is None:
      return {'done': True, 'progress': progress}
    left = self.left_model(annotator, item)
    right = 'b' if left == 'a' else 'a'
    record = self.items[item]
    return {'done': False, 'item': item, 'prompt': record['prompt'],
            'left': record[left], 'right': record[right], 'progress': progress}

  # --- judging -------------------------------------------------------------------

  async def judge(self, annotator: str, item: int, choice: str, reason: str) -> dict:
    """Records one judgement; InputError for an unknown item or choice, or a repeat."""
    annotator = check_name(annotator)
    if not 0 <= item < len(self.items):
      raise InputError(f'There is no item {item}; items are 0 to {len(self.items) - 1}.', 404)
    if choice not in CHOICES:
      raise InputError(f'choice={choice!r} is not one of {", ".join(CHOICES)}.')
    if len(reason) > MAX_REASON:
      raise InputError(f'The reason is {len(reason)} characters; keep it under {MAX_REASON}.')
    left = self.left_model(annotator, item)
    record = {'annotator': annotator, 'item': item, 'left': left, 'choice': choice,
              'winner': _winner(left, choice),
              'reason': reason.strip(),
              'time': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}
    async with self._lock:
      if (annotator, item) in self.done:
        raise InputError(f'{annotator} has already judged item {item}.', 409)
      _append(self.dir / JUDGEMENTS_FILE, record)
      if (pair := self.preference(record)) is not None:
        _append(self.dir / PREFERENCES_FILE, pair)
      self.done.add((annotator, item))
      self.judgements.append(record)
    return record

  def preference(self, judgement: dict) -> dict | None:
    """The preference pair of a judgement that chose a side, else None (also when the
    two completions are the same text, which no preference task can learn from)."""
    winner = judgement['winner']
    if winner not in ('a', 'b'):
      return None
    item = self.items[judgement['item']]
    chosen, rejected = item[winner], item['b' if winner == 'a' else 'a']
    if chosen == rejected:
      return None
    if isinstance(item['prompt'], list):
      chosen, rejected = ([{'role': 'assistant', 'content': text}]
                          for text in (chosen, rejected))
    return {'prompt': item['prompt'], 'chosen': chosen, 'rejected': rejected}

  # --- the files -----------------------------------------------------------------

  def _read_judgements(self) -> list[dict]:
    path = self.dir / JUDGEMENTS_FILE
    if not path.exists():
      return []
    out = []
    for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        ok = (isinstance(record, dict) and record.get('choice') in CHOICES
              and record.get('left') in ('a', 'b') and isinstance(record.get('item'), int)
              and 0 <= record['item'] < len(self.items)
              and isinstance(record.get('annotator'), str))
      except json.JSONDecodeError:
        ok = False
      if not ok:
        raise DataError(f'{path}:{number}: not a judgement of one of the {len(self.items)} '
                        'items; fix or remove the line.')
      record['winner'] = _winner(record['left'], record['choice'])
      out.append(record)
    return out

  def _rebuild_preferences(self) -> None:
    pairs = [p for j in self.judgements if (p := self.preference(j)) is not None]
    path = self.dir / PREFERENCES_FILE
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(''.join(json.dumps(p, ensure_ascii=False) + '\n' for p in pairs),
                   encoding='utf-8')
    tmp.replace(path)


def _winner(left: str, choice: str) -> str:
  """The model a choice of side picks ('a' or 'b'), or the choice itself (tie, both bad)."""
  return {'left': left, 'right': 'b' if left == 'a' else 'a'}.get(choice, choice)


def _append(path: pathlib.Path, record: dict) -> None:
  with path.open('a', encoding='utf-8') as f:
    f.write(json.dumps(record, ensure_ascii=False) + '\n')
