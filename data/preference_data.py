"""Preference pairs for DPO and reward models: (prompt, chosen, rejected) -> two token rows
with completion masks.

Sources (`config.data.source`):

  stdlib  an embedded rule-based set, no downloads: each prompt is `sort: ` and the distinct
          short lowercase words of one line of the standard library, in their order in the
          line; `chosen` lists them sorted, `rejected` in reverse order. A tiny model learns
          to prefer sorted lists in ~50 steps. Each set of words appears once, in one split
          (held out by a hash of the sorted words).
  jsonl   one JSON object per line with `prompt`, `chosen` and `rejected`, each a string, or
          each a list of messages (`{"role": ..., "content": ...}`) rendered with the run's
          chat template (data/chat.py) as TRL does: the prompt with the generation prompt,
          each completion as the rest of the rendered conversation. `data.path` is a file,
          a glob or a URL (gs://...), read through etils.epath. Held out by a hash of the line.
          An optional number `margin` says by how much chosen is preferred (TRL's
          RewardTrainer: the reward model's loss subtracts it); DPO ignores it, and any other
          field (a judge's metadata, train/ai_feedback.py) is ignored too.

Each example becomes two rows of `seq_len + 1` tokens, chosen first: the prompt then the
completion, zero-padded. String fields get BOS before the prompt and EOS after each
completion when the tokenizer has them; message lists get what the template writes. Prompt
and completion are tokenized separately and joined (as TRL does), so the boundary is exact.
The mask covers the targets that are completion tokens; DPO sums log-probs over them. A
reward model reads its score at each row's last real token, `lengths` - 1.

Bad rows are counted by reason, skipped and summarised in one warning per split: malformed
JSON, a missing or mistyped field, a message without a role or content, an empty
completion, a prompt longer than `data.max_prompt_len` (-1: half of seq_len), chosen equal
to rejected, a `margin` that is not a finite number. Completions cut to fit `seq_len` are
kept and counted as truncated.

The examples are tokenized at every start and held in memory (ragged, unpadded); the
batches come from the same grain pipeline as the LM's (data/lm_pipeline.py): one global
shuffle per epoch, process p of P takes global elements p, p+P, ..., and the iterator's
position is saved in checkpoints. Every element carries `index`, the example's place in
train-then-validation order, which keys a reference table precomputed over all examples.
"""

import collections
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import grain
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from data import lm_pipeline, sources, tokenizers
from data.errors import DataError

Batch = dict[str, np.ndarray]
Messages = list[dict]
# The embedded rule set: at most this many examples per split, and per module (for variety).
RULE_EXAMPLES = {'train': 4096, 'validation': 512}
_RULE_LINES_PER_MODULE = 4
_RULE_WORD = re.compile(r'\b[a-z]{2,6}\b')
_RULE_WORDS = (3, 5)  # distinct words per prompt, at least and at most


@dataclasses.dataclass
class PreferenceData:
  tokenizer: tokenizers.Tokenizer
  train: grain.DatasetIterator  # checkpointable: get_state() / set_state()
  # Each call: a fresh pass over this process's share of the first eval_steps batches.
  eval_batches: Callable[[], Iterator[Batch]]
  train_pairs: 'PreferencePairs'
  validation_pairs: 'PreferencePairs'

  def all_pairs(self) -> Iterator[Batch]:
    """Every example, train then validation, in `index` order."""
    for pairs in (self.train_pairs, self.validation_pairs):
      for i in range(len(pairs)):
        yield pairs[i]

  def digest(self) -> str:
    """Identifies the tokenized examples (their ids and lengths), for caches keyed by them."""
    return hashlib.sha256((self.train_pairs.digest() + self.validation_pairs.digest()).encode()
                          ).hexdigest()[:16]


class PreferencePairs:
  """Tokenized pairs of one split; pairs[i] is one example's rows, padded to seq_len.

  Element i: inputs, targets, positions, segment_ids int32 [2, L] and mask float32 [2, L]
  (row 0 chosen, row 1 rejected), lengths int32 [2] (each row's real tokens in `inputs`:
  prompt + completion, at most L), margin float32 [] (the row's `margin`, 0 without one)
  and index int32 [] (= offset + i).
  """

  def __init__(self, prompts: Sequence[np.ndarray], completions: Sequence[tuple],
               seq_len: int, offset: int = 0, margins: Sequence[float] | None = None):
    self.prompts, self.completions = list(prompts), list(completions)
    self.seq_len, self.offset = seq_len, offset
    self.margins = np.zeros(len(self.prompts), np.float32) if margins is None else (
        np.asarray(margins, np.float32))

  def __len__(self) -> int:
    return len(self.prompts)

  def __getitem__(self, i: int) -> Batch:
    i = int(i)
    L = self.seq_len
    tokens_2xW = np.zeros((2, L + 1), np.int32)
    mask_2xL = np.zeros((2, L), np.float32)
    segments_2xL = np.full((2, L), 2, np.int32)  # padding is its own segment
    lengths_2 = np.zeros((2,), np.int32)
    prompt = self.prompts[i]
    for row, completion in enumerate(self.completions[i]):
      n = len(prompt) + len(completion)
      tokens_2xW[row, :n] = np.concatenate([prompt, completion])
      mask_2xL[row, len(prompt) - 1:n - 1] = 1.0  # targets that are completion tokens
      segments_2xL[row, :n] = 1
      lengths_2[row] = min(n, L)
    return {
        'inputs': tokens_2xW[:, :-1], 'targets': tokens_2xW[:, 1:], 'mask': mask_2xL,
        'segment_ids': segments_2xL,
        'positions': np.broadcast_to(np.arange(L, dtype=np.int32), (2, L)).copy(),
        'lengths': lengths_2, 'margin': self.margins[i], 'index': np.int32(self.offset + i),
    }

  def swap_labels(self, seed: int) -> None:
    """Swaps chosen and rejected in a random half of the pairs (the shuffled-label control):
    exactly half, so the labels carry no net preference for either side."""
    flips = np.random.default_rng(seed).permutation(len(self)) < len(self) // 2
    self.completions = [(r, c) if flip else (c, r)
                        for (c, r), flip in zip(self.completions, flips, strict=True)]

  def digest(self) -> str:
    h = hashlib.sha256(f'{self.seq_len},{self.offset},{len(self)}'.encode())
    for prompt, (chosen, rejected) in zip(self.prompts, self.completions, strict=True):
      for ids in (prompt, chosen, rejected):
        h.update(np.int64(len(ids)).tobytes() + np.asarray(ids, np.int32).tobytes())
    return h.hexdigest()


def build_preference_data(data_cfg: ml_collections.ConfigDict, *, seed: int,
                          global_batch_size: int, eval_steps: int, workdir: str,
                          process_index: int, process_count: int,
                          chat_template: Callable[[tokenizers.Tokenizer], object] | None = None
                          ) -> PreferenceData:
  """The tokenizer, this process's train iterator and eval batches of preference pairs.

  Every batch is a dict [b, 2, L] (b = global_batch_size // process_count) as
  `PreferencePairs` describes, plus index [b].

  Args:
    data_cfg: `config.data` (source, path, val_fraction, seq_len, max_prompt_len,
      shuffle_labels, tokenizer).
    chat_template: the tokenizer -> the template that renders message lists (called once,
      only when a row has messages), e.g. `lambda tok: chat.load_chat_template(workdir, tok)`.

  Raises:
    DataError: no file, no usable pair in a split, or fewer pairs than one global batch.
  """
  if global_batch_size % process_count:
    raise DataError(f'batch_size={global_batch_size} must divide evenly over '
                    f'{process_count} processes.')
  tokenizer = tokenizers.load_or_train_tokenizer(
      data_cfg.tokenizer, lambda: _tokenizer_texts(data_cfg), workdir)
  render = _Renderer(tokenizer, chat_template and (lambda: chat_template(tokenizer)))
  vocab = tokenizer.vocab_size
  train = tokenize_pairs(read_pairs(data_cfg, 'train'), render, data_cfg, 'train',
                         vocab_size=vocab)
  val = tokenize_pairs(read_pairs(data_cfg, 'validation'), render, data_cfg, 'validation',
                       offset=len(train), vocab_size=vocab)
  if data_cfg.shuffle_labels:
    train.swap_labels(seed)
  if len(train) < global_batch_size:
    raise DataError(f'The training split has {len(train)} usable pairs, fewer than one global '
                    f'batch (batch_size={global_batch_size}); add data or lower batch_size.')
  if eval_steps > 0 and len(val) < global_batch_size:
    raise DataError(f'The validation split has {len(val)} usable pairs, fewer than one global '
                    f'batch (batch_size={global_batch_size}); raise data.val_fraction, add '
                    'data, or set eval_steps=0.')
  train_iter, eval_batches = lm_pipeline.iterators(
      train, val, seed=seed, global_batch_size=global_batch_size, eval_steps=eval_steps,
      process_index=process_index, process_count=process_count)
  return PreferenceData(tokenizer=tokenizer, train=train_iter, eval_batches=eval_batches,
                        train_pairs=train, validation_pairs=val)


# --- reading -------------------------------------------------------------------


def read_pairs(data_cfg: ml_collections.ConfigDict, split: str) -> Iterator[object]:
  """The raw records of `split`: dicts as read (validated later), or a str for bad JSON."""
  if data_cfg.source == 'stdlib':
    yield from rule_pairs(split, data_cfg.val_fraction)
  elif data_cfg.source == 'jsonl':
    yield from _jsonl_records(data_cfg.path, split, data_cfg.val_fraction)
  else:
    raise DataError(f'data.source={data_cfg.source!r} has no preference pairs; choose one of '
                    'stdlib, jsonl.')


def _jsonl_records(path: str, split: str, val_fraction: float) -> Iterator[object]:
  want_validation = split == 'validation'
  for name in sources.expand_path(path):
    with epath.Path(name).open('rb') as f:
      for line in f:
        if not line.strip():
          continue
        if sources.held_out(line.decode('utf-8', 'replace'), val_fraction) != want_validation:
          continue
        try:
          yield json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
          yield 'malformed JSON'


def rule_pairs(split: str, val_fraction: float) -> Iterator[dict]:
  """The embedded rule set (module docstring): prompts from stdlib lines, sorted lists chosen.

  Deterministic: the same split gives the same pairs on every machine with this Python.
  """
  want_validation = split == 'validation'
  seen = set()
  root = epath.Path(sources.stdlib_root())
  for rel in sources.stdlib_modules():
    try:
      text = (root / rel).read_text(encoding='utf-8')
    except UnicodeDecodeError:
      continue
    taken = 0
    for line in text.splitlines():
      words = list(dict.fromkeys(_RULE_WORD.findall(line)))
      if not _RULE_WORDS[0] <= len(words) <= _RULE_WORDS[1]:
        continue
      ordered = sorted(words)
      key = ' '.join(ordered)
      if key in seen or sources.held_out(key, val_fraction) != want_validation:
        continue
      seen.add(key)
      yield {'prompt': 'sort: ' + ' '.join(words) + '\n', 'chosen': key + '\n',
             'rejected': ' '.join(ordered[::-1]) + '\n'}
      taken += 1
      if len(seen) == RULE_EXAMPLES[split]:
        return
      if taken == _RULE_LINES_PER_MODULE:
        break


def _tokenizer_texts(data_cfg: ml_collections.ConfigDict) -> Iterator[str]:
  """Training text for a new tokenizer: the string fields of the training split."""
  for record in read_pairs(data_cfg, 'train'):
    if isinstance(record, dict):
      for key in ('prompt', 'chosen', 'rejected'):
        value = record.get(key)
        if isinstance(value, str):
          yield value
        elif isinstance(value, list):
          yield from (m['content'] for m in value
                      if isinstance(m, dict) and isinstance(m.get('content'), str))


# --- tokenizing ----------------------------------------------------------------


class _Renderer:
  """(prompt ids, chosen ids, rejected ids) of a record, or the reason it is a bad row.

  Strings: BOS + the prompt, and each completion followed by EOS (when the tokenizer has
  them), as TRL does. Message lists: the chat template's rendering, which writes its own
  special tokens (BOS, end-of-turn), encoded by the template.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer,
               chat_template: Callable[[], object] | None):
    self.tokenizer = tokenizer
    self._make_template = chat_template
    self._template = None

  def __call__(self, record: object) -> tuple[list[int], list[int], list[int]] | str:
    if isinstance(record, str):
      return record
    if not isinstance(record, dict):
      return 'not a JSON object'
    fields = []
    for key in ('prompt', 'chosen', 'rejected'):
      if key not in record:
        return f'no {key!r}'
      value = record[key]
      if isinstance(value, list):
        if not all(isinstance(m, dict) and isinstance(m.get('role'), str)
                   and isinstance(m.get('content'), str) for m in value):
          return 'a message without a string role or content'
      elif not isinstance(value, str):
        return f'{key!r} neither a string nor a list of messages'
      fields.append(value)
    if len({isinstance(f, str) for f in fields}) > 1:
      return 'strings mixed with message lists'
    prompt, chosen, rejected = fields
    if chosen == rejected:
      return 'chosen equal to rejected'
    if isinstance(prompt, list):
      return self._render_messages(prompt, chosen, rejected)
    tok = self.tokenizer
    bos = [tok.bos_id] if tok.bos_id >= 0 else []
    eos = [tok.eos_id] if getattr(tok, 'eos_id', -1) >= 0 else []
    chosen_ids, rejected_ids = tok.encode_batch([chosen, rejected])
    if not chosen_ids or not rejected_ids:
      return 'an empty completion'
    return bos + tok.encode(prompt), chosen_ids + eos, rejected_ids + eos

  def _render_messages(self, prompt: Messages, chosen: Messages, rejected: Messages):
    if self._template is None:
      if self._make_template is None:
        raise DataError('Preference rows with message lists need a chat template; this task '
                        'gave none.')
      self._template = self._make_template()
    head = self._template.render(prompt, add_generation_prompt=True)
    out = [self._template.encode(head)]
    for completion in (chosen, rejected):
      if not completion:
        return 'an empty completion'
      full = self._template.render(prompt + completion, add_generation_prompt=False)
      if not full.startswith(head):
        return "a conversation whose rendering does not extend its prompt's"
      out.append(self._template.encode(full[len(head):]))
    return tuple(out)


def tokenize_pairs(records: Iterable[object], render: Callable, data_cfg: ml_collections.ConfigDict,
                   split: str, offset: int = 0, vocab_size: int = 2**16) -> PreferencePairs:
  """Tokenizes `records` into pairs, skipping and counting bad rows (module docstring)."""
  seq_len = data_cfg.seq_len
  max_prompt = data_cfg.max_prompt_len if data_cfg.max_prompt_len > 0 else seq_len // 2
  dtype = np.uint16 if vocab_size <= 2**16 else np.int32
  skipped: collections.Counter = collections.Counter()
  truncated = 0
  prompts, completions, margins = [], [], []
  for record in records:
    ids = render(record)
    if isinstance(ids, str):
      skipped[ids] += 1
      continue
    prompt, chosen, rejected = ids
    margin = record.get('margin', 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(
        margin):
      skipped["a 'margin' that is not a finite number"] += 1
      continue
    if not chosen or not rejected:
      skipped['an empty completion'] += 1
      continue
    if not prompt or len(prompt) > max_prompt:
      skipped[f'a prompt over data.max_prompt_len={max_prompt} tokens' if prompt
              else 'an empty prompt and no BOS'] += 1
      continue
    room = seq_len + 1 - len(prompt)
    truncated += len(chosen) > room or len(rejected) > room
    prompts.append(np.asarray(prompt, dtype))
    completions.append((np.asarray(chosen[:room], dtype), np.asarray(rejected[:room], dtype)))
    margins.append(margin)
  if skipped or truncated:
    logging.warning('Preference data, %s split: %d pairs kept; %d truncated to data.seq_len=%d; '
                    'skipped %s.', split, len(prompts), truncated, seq_len,
                    ', '.join(f'{n} with {reason}' for reason, n in sorted(skipped.items()))
                    or 'none')
  if not prompts:
    where = f' at data.path={data_cfg.path!r}' if data_cfg.source == 'jsonl' else ''
    raise DataError(f'The {split} split of data.source={data_cfg.source!r}{where} has no '
                    f'usable preference pair (skipped: {dict(skipped)}).')
  pairs = PreferencePairs(prompts, completions, seq_len, offset, margins)
  pairs.skipped, pairs.truncated = skipped, truncated
  return pairs
