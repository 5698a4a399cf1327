"""Supervised fine-tuning examples: reading and checking rows of chat or prompt/completion data.

A row of `data.path` (jsonl files or a glob, local or gs://, read through etils.epath) is
one of

  chat               {"messages": [{"role": "user", "content": "..."}, ...]}
  prompt/completion  {"prompt": "...", "completion": "..."}, each a string, or each a list
                     of messages (the conversational form TRL reads too).

(The field names are config keys.) `data.source='stdlib'` reads the embedded demo instead
(data/stdlib_functions.py), `data.source='addition'` the embedded sums of data/verifiable.py
(completion = the answer; GRPO's verifiable task, split as GRPO splits it). A row that
cannot be an example is skipped and counted under its reason (`RowCounts`): malformed JSON,
neither format, a message without a role or a string content, a chat with no assistant
turn, an empty completion. The counts are logged
as one summary per split; the tokenizer stage (data/sft_pipeline.py) adds its own reasons.

Validation is `data.val_path` when given, else the rows whose hash falls in
`data.val_fraction` (`sources.held_out`, so the split is stable across runs).
"""

import collections
import dataclasses
import json
from collections.abc import Iterator

import ml_collections
from absl import logging
from etils import epath

from data import sources, stdlib_functions, verifiable
from data.errors import DataError

Messages = list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Example:
  """One training example: a conversation (`messages`, loss on assistant turns) or a
  prompt and a completion (loss on the completion)."""

  messages: Messages | None = None
  prompt: str = ''
  completion: str = ''


class RowCounts(collections.Counter):
  """Rows read, kept and skipped (by reason), for the summary a split logs."""

  def summary(self, split: str) -> str:
    skipped = {k: n for k, n in self.items() if k not in ('read', 'kept', 'truncated')}
    parts = [f'{self["kept"]} of {self["read"]} rows kept']
    if skipped:
      parts.append('skipped: ' + ', '.join(f'{n} {k}' for k, n in sorted(skipped.items())))
    if self['truncated']:
      parts.append(f'{self["truncated"]} examples truncated to data.seq_len+1 tokens')
    return f'SFT data, {split} split: ' + '; '.join(parts) + '.'


def read_examples(data_cfg: ml_collections.ConfigDict, split: str,
                  counts: RowCounts) -> Iterator[Example]:
  """The examples of `split`, in file order; bad rows are counted in `counts` and skipped.

  Raises:
    DataError: no files match the path.
  """
  if data_cfg.source in ('stdlib', 'addition'):
    examples = (stdlib_functions.stdlib_examples(split, data_cfg.val_fraction)
                if data_cfg.source == 'stdlib' else
                ({'prompt': p['prompt'], 'completion': p['answer']}
                 for p in verifiable.addition_problems(split, data_cfg.val_fraction)))
    for i, row in enumerate(examples):
      if data_cfg.max_examples and i >= data_cfg.max_examples:
        break
      counts['read'] += 1
      yield Example(prompt=row['prompt'], completion=row['completion'])
    return
  if data_cfg.val_path:
    paths = sources.expand_path(data_cfg.path if split == 'train' else data_cfg.val_path)
    held_out = None
  else:
    paths = sources.expand_path(data_cfg.path)
    held_out = split == 'validation'
  n = 0
  for path in paths:
    with epath.Path(path).open('rb') as f:
      for line in f:
        if not line.strip():
          continue  # blank lines (a trailing one) are not rows
        if held_out is not None and sources.held_out(line.decode('utf-8', 'replace').strip(),
                                                     data_cfg.val_fraction) != held_out:
          continue
        if data_cfg.max_examples and n >= data_cfg.max_examples:
          return
        counts['read'] += 1
        example, problem = parse_row(line, data_cfg)
        if problem:
          counts[problem] += 1
          continue
        n += 1
        yield example


def parse_row(line: bytes | str, data_cfg: ml_collections.ConfigDict
              ) -> tuple[Example | None, str | None]:
  """(the example, None), or (None, why the row is skipped)."""
  try:
    row = json.loads(line)
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None, 'malformed JSON lines'
  if not isinstance(row, dict):
    return None, 'rows that are not JSON objects'
  messages_key = data_cfg.messages_field
  prompt_key, completion_key = data_cfg.prompt_field, data_cfg.completion_field
  if messages_key in row:
    messages, problem = _messages(row[messages_key])
    if problem:
      return None, problem
    if not any(m['role'] == 'assistant' for m in messages):
      return None, 'chats without an assistant turn'
    return Example(messages=messages), None
  if prompt_key not in row or completion_key not in row:
    return None, (f'rows with neither {messages_key!r} nor {prompt_key!r} and '
                  f'{completion_key!r}')
  prompt, completion = row[prompt_key], row[completion_key]
  if isinstance(prompt, list) and isinstance(completion, list):  # conversational form
    messages, problem = _messages(prompt + completion)
    if problem:
      return None, problem
    if not any(m['role'] == 'assistant' and m['content'] for m in messages[len(prompt):]):
      return None, 'empty completions'
    return Example(messages=messages), None
  if not isinstance(prompt, str) or not isinstance(completion, str):
    return None, 'prompts or completions that are not strings (or both lists of messages)'
  if not completion:
    return None, 'empty completions'
  return Example(prompt=prompt, completion=completion), None


def _messages(value) -> tuple[Messages | None, str | None]:
  if not isinstance(value, list) or not value:
    return None, 'empty or non-list messages'
  messages = []
  for m in value:
    if not isinstance(m, dict) or not isinstance(m.get('role'), str) or not m['role']:
      return None, 'messages without a role'
    if not isinstance(m.get('content'), str):
      return None, 'messages without a string content'
    messages.append({'role': m['role'], 'content': m['content']})
  return messages, None


def log_summary(counts: RowCounts, split: str) -> None:
  """Logs the split's summary: a warning when rows were skipped or truncated."""
  text = counts.summary(split)
  if set(counts) - {'read', 'kept'}:
    logging.warning(text)
  else:
    logging.info(text)
  if counts['read'] and not counts['kept']:
    raise DataError(text + ' No example is left; check the data against the formats in '
                    'data/sft_examples.py and data.seq_len.')
