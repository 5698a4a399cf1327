"""Prompts for on-policy training (PPO): tokenized, padded on the right, with their lengths.

Sources (`config.data.source`):

  stdlib  the prompts of the embedded rule-based preference set (data/preference_data.py:
          `sort: ` and a few words of a standard-library line), with its split.
  jsonl   one JSON object per line with `prompt` (`data.prompt_field`): a string, or a list
          of messages rendered with the run's chat template and its generation prompt, as
          TRL does. Other fields (a preference file's chosen/rejected) are ignored, so a DPO
          or reward-model file serves as well. Held out by a hash of the line.

A string prompt gets BOS first when the tokenizer has one. Prompts longer than
`data.max_prompt_len` tokens, empty ones and malformed rows are skipped, counted, and
reported in one warning per split.

Element i: `prompt` int32 [P] (P = max_prompt_len, zero-padded after the prompt),
`prompt_len` int32 [] and `index` int32 [] (train then validation order), which finds the
prompt's record (`PromptData.record`) for a reward function that reads its other fields.
Batches come from the LM's grain pipeline (data/lm_pipeline.py): a
global shuffle per epoch, process p of P takes elements p, p+P, ..., and the iterator's
position is saved in checkpoints.
"""

import collections
import dataclasses
from collections.abc import Callable, Iterator

import grain
import ml_collections
import numpy as np
from absl import logging

from data import lm_pipeline, preference_data, tokenizers
from data.errors import DataError

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class PromptData:
  tokenizer: tokenizers.Tokenizer
  train: grain.DatasetIterator  # checkpointable: get_state() / set_state()
  eval_batches: Callable[[], Iterator[Batch]]  # a fresh pass over the first eval_steps batches
  train_prompts: 'Prompts'
  validation_prompts: 'Prompts'

  def record(self, index: int) -> dict:
    """The JSON record (or rule-set pair) of the element with this `index`."""
    train = self.train_prompts
    if index < len(train):
      return train.records[index]
    return self.validation_prompts.records[index - len(train)]


class Prompts:
  """Tokenized prompts of one split; prompts[i] is one padded element (module docstring),
  with `index` = offset + i, the key of its record (`records`) for reward functions."""

  def __init__(self, ids: list[np.ndarray], records: list[dict], max_len: int, offset: int = 0):
    self.ids, self.records, self.max_len, self.offset = ids, records, max_len, offset

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, i: int) -> Batch:
    ids = self.ids[int(i)]
    prompt = np.zeros((self.max_len,), np.int32)
    prompt[:len(ids)] = ids
    return {'prompt': prompt, 'prompt_len': np.int32(len(ids)),
            'index': np.int32(self.offset + int(i))}


def build_prompt_data(data_cfg: ml_collections.ConfigDict, *, seed: int, global_batch_size: int,
                      eval_steps: int, workdir: str, process_index: int, process_count: int,
                      chat_template: Callable[[tokenizers.Tokenizer], object] | None = None
                      ) -> PromptData:
  """The tokenizer, this process's train iterator and eval batches of prompts.

  Args:
    data_cfg: `config.data` (source, path, prompt_field, val_fraction, max_prompt_len,
      tokenizer).
    chat_template: the tokenizer -> the template that renders message lists (called once,
      only when a row has messages).

  Raises:
    DataError: no usable prompt in a split, or fewer prompts than one global batch.
  """
  tokenizer = tokenizers.load_or_train_tokenizer(
      data_cfg.tokenizer, lambda: _texts(data_cfg), workdir)
  template = {}

  def render(record):
    if isinstance(record, str):
      return record
    if not isinstance(record, dict):
      return 'not a JSON object'
    value = record.get(data_cfg.prompt_field)
    if isinstance(value, str):
      bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
      return bos + list(tokenizer.encode(value))
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get('role'), str)
        and isinstance(m.get('content'), str) for m in value):
      if chat_template is None:
        raise DataError('Prompts given as message lists need a chat template; this task gave '
                        'none.')
      if 't' not in template:
        template['t'] = chat_template(tokenizer)
      t = template['t']
      return t.encode(t.render(value, add_generation_prompt=True))
    if value is None:
      return f'no {data_cfg.prompt_field!r}'
    return f'{data_cfg.prompt_field!r} neither a string nor a list of messages'

  train = _tokenize(data_cfg, 'train', render)
  val = _tokenize(data_cfg, 'validation', render, offset=len(train))
  if len(train) < global_batch_size:
    raise DataError(f'The training split has {len(train)} usable prompts, fewer than one global '
                    f'batch (batch_size={global_batch_size}); add data or lower batch_size.')
  train_iter, eval_batches = lm_pipeline.iterators(
      train, val, seed=seed, global_batch_size=global_batch_size, eval_steps=eval_steps,
      process_index=process_index, process_count=process_count)
  return PromptData(tokenizer=tokenizer, train=train_iter, eval_batches=eval_batches,
                    train_prompts=train, validation_prompts=val)


def _records(data_cfg: ml_collections.ConfigDict, split: str) -> Iterator[object]:
  """Raw records of `split` (dicts, or a str naming why a line is bad)."""
  if data_cfg.source == 'stdlib':
    return preference_data.rule_pairs(split, data_cfg.val_fraction)
  return preference_data.read_pairs(data_cfg, split)  # jsonl, or a DataError naming the source


def _texts(data_cfg: ml_collections.ConfigDict) -> Iterator[str]:
  """Training text for a new tokenizer: the string prompts of the training split."""
  for record in _records(data_cfg, 'train'):
    if isinstance(record, dict):
      value = record.get(data_cfg.prompt_field)
      if isinstance(value, str):
        yield value
      elif isinstance(value, list):
        yield from (m['content'] for m in value
                    if isinstance(m, dict) and isinstance(m.get('content'), str))
      for key in ('chosen', 'completion'):  # completions teach the tokenizer the replies too
        if isinstance(record.get(key), str):
          yield record[key]


def _tokenize(data_cfg: ml_collections.ConfigDict, split: str, render, offset: int = 0
              ) -> Prompts:
  max_len = data_cfg.max_prompt_len
  skipped: collections.Counter = collections.Counter()
  ids_list, records = [], []
  for record in _records(data_cfg, split):
    ids = render(record)
    if isinstance(ids, str):
      skipped[ids] += 1
    elif not ids:
      skipped['an empty prompt and no BOS'] += 1
    elif len(ids) > max_len:
      skipped[f'a prompt over data.max_prompt_len={max_len} tokens'] += 1
    else:
      ids_list.append(np.asarray(ids, np.int32))
      records.append(record)
  if skipped:
    logging.warning('Prompt data, %s split: %d prompts kept; skipped %s.', split, len(ids_list),
                    ', '.join(f'{n} with {reason}' for reason, n in sorted(skipped.items())))
  if not ids_list:
    where = f' at data.path={data_cfg.path!r}' if data_cfg.source == 'jsonl' else ''
    raise DataError(f'The {split} split of data.source={data_cfg.source!r}{where} has no '
                    f'usable prompt (skipped: {dict(skipped)}).')
  prompts = Prompts(ids_list, records, max_len, offset)
  prompts.skipped = skipped
  return prompts
