"""The SFT input pipeline: examples -> ids with a loss mask -> packed rows -> batches.

An example becomes ids and a 0/1 weight per id:

  chat               the chat template's rendering (data/chat.py); weight 1 on assistant
                     turns (their content and end-of-turn token);
  prompt/completion  BOS (when the tokenizer has one), the prompt, the completion and the
                     end-of-turn token (EOS; see data/chat.py for tokenizers without one);
                     weight 1 on the completion and the end-of-turn token.

`data.loss_on='all'` puts weight 1 on every token instead. An example whose first weighted
token lies beyond `data.seq_len` is skipped (an over-long prompt); a longer one is cut to
`data.seq_len + 1` ids and counted as truncated.

Example k of n ids fills n - 1 positions of a row of `data.seq_len` (inputs ids[:-1],
targets ids[1:], weights of the targets). With `data.pack` rows hold several examples back
to back (next-fit, in a seeded shuffled order), each with its own segment id (1, 2, ...;
0 is padding) and positions restarting at 0, so attention never crosses examples; without
it, one example per row. Padding has weight 0.

Batches are dicts of [b, L] arrays: inputs, targets, segment_ids, positions (int32) and
weights (float32). The training rows are shuffled, sharded over processes, batched and
checkpointed as the LM pipeline's windows are (`lm_pipeline.train_dataset`).
"""

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import grain
import ml_collections
import numpy as np
from absl import logging

from data import chat, lm_pipeline, sft_examples, tokenizers
from data.errors import DataError
from data.sft_examples import Example, RowCounts

Batch = dict[str, np.ndarray]
FIELDS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


@dataclasses.dataclass
class SFTData:
  tokenizer: tokenizers.Tokenizer
  template: chat.ChatTemplate
  train: grain.DatasetIterator  # checkpointable: get_state() / set_state()
  # Each call: a fresh pass over this process's share of the first eval_steps batches.
  eval_batches: Callable[[], Iterator[Batch]]
  # The prompt of the first held-out example, as text to continue (for samples).
  sample_prompt: str
  counts: dict[str, RowCounts]


def build_sft_data(data_cfg: ml_collections.ConfigDict, *, template: chat.ChatTemplate,
                   seed: int, global_batch_size: int, eval_steps: int, process_index: int,
                   process_count: int) -> SFTData:
  """Reads, tokenizes and packs both splits; logs each split's summary of skipped rows.

  Raises:
    DataError: no usable example, or too few rows for one global batch.
  """
  if global_batch_size % process_count:
    raise DataError(f'batch_size={global_batch_size} must divide evenly over '
                    f'{process_count} processes.')
  counts = {split: RowCounts() for split in ('train', 'validation')}
  rng = np.random.default_rng(seed)
  train_rows = _rows(data_cfg, 'train', template, counts['train'], rng)
  shard = dict(global_batch_size=global_batch_size, process_index=process_index,
               process_count=process_count)
  train_ds = lm_pipeline.train_dataset(train_rows, seed=seed, **shard)
  eval_ds, sample_prompt = None, ''
  if eval_steps > 0:
    val_examples = list(sft_examples.read_examples(data_cfg, 'validation', counts['validation']))
    val_rows = _rows(data_cfg, 'validation', template, counts['validation'], None,
                     val_examples)
    eval_ds = lm_pipeline.eval_dataset(val_rows, eval_steps=eval_steps, **shard)
    sample_prompt = prompt_text(val_examples[0], template) if val_examples else ''
  return SFTData(
      tokenizer=template.tokenizer, template=template,
      train=iter(train_ds.to_iter_dataset(_READ_OPTIONS)),
      eval_batches=lambda: (iter(eval_ds.to_iter_dataset(_READ_OPTIONS))
                            if eval_ds else iter(())),
      sample_prompt=sample_prompt, counts=counts)


def _rows(data_cfg, split: str, template: chat.ChatTemplate, counts: RowCounts,
          rng: np.random.Generator | None, examples: Sequence[Example] | None = None
          ) -> 'Rows':
  if examples is None:
    examples = list(sft_examples.read_examples(data_cfg, split, counts))
  encoded = []
  for example in examples:
    item, problem = encode_example(example, template, data_cfg.seq_len, data_cfg.loss_on)
    if problem:
      counts[problem] += 1
      continue
    counts['kept'] += 1
    if item[2]:
      counts['truncated'] += 1
    encoded.append(item[:2])
  sft_examples.log_summary(counts, split)
  if rng is not None:
    encoded = [encoded[i] for i in rng.permutation(len(encoded))]
  rows = Rows(pack(encoded, data_cfg.seq_len, data_cfg.pack))
  logging.info('SFT %s split: %d examples in %d rows of %d positions, %.1f%% of them weighted.',
               split, len(encoded), len(rows), data_cfg.seq_len,
               100 * rows.arrays['weights'].mean() if len(rows) else 0.0)
  return rows


def encode_example(example: Example, template: chat.ChatTemplate, seq_len: int, loss_on: str
                   ) -> tuple[tuple[list[int], list[int], bool] | None, str | None]:
  """((ids, weights, truncated), None), or (None, why the example is skipped)."""
  if example.messages is not None:
    try:
      ids, mask = template.encode_chat(example.messages)
    except DataError:
      return None, 'chats the chat template cannot render'
  else:
    tokenizer = template.tokenizer
    head = ([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + list(
        tokenizer.encode(example.prompt))
    tail = list(tokenizer.encode(example.completion)) + template.encode(template.end_of_turn)
    ids, mask = head + tail, [False] * len(head) + [True] * len(tail)
  if True not in mask or mask.index(True) > seq_len:
    return None, 'prompts too long for data.seq_len (no completion token fits)'
  weights = [1] * len(ids) if loss_on == 'all' else [int(m) for m in mask]
  truncated = len(ids) > seq_len + 1
  return (ids[:seq_len + 1], weights[:seq_len + 1], truncated), None


def prompt_text(example: Example, template: chat.ChatTemplate) -> str:
  """The text a model continues to answer `example`: the prompt, or the chat up to its last
  assistant turn with the generation prompt (without a leading BOS, which sampling adds)."""
  if example.messages is None:
    return example.prompt
  last = max(i for i, m in enumerate(example.messages) if m['role'] == 'assistant')
  text = template.render(example.messages[:last], add_generation_prompt=True)
  bos = template.context.get('bos_token', '')
  return text[len(bos):] if bos and text.startswith(bos) else text


def pack(encoded: Sequence[tuple[list[int], list[int]]], seq_len: int,
         packed: bool = True) -> dict[str, np.ndarray]:
  """Rows [R, seq_len] of FIELDS from (ids, weights) examples of at most seq_len + 1 ids.

  Next-fit: an example goes into the current row if it fits, else it starts a new row.
  """
  placements, row, used, segment = [], -1, seq_len, 0
  for ids, _ in encoded:
    n = len(ids) - 1
    if n < 1:
      continue
    if not packed or used + n > seq_len:
      row, used, segment = row + 1, 0, 0
    segment += 1
    placements.append((row, used, segment))
    used += n
  arrays = {k: np.zeros((row + 1, seq_len), np.float32 if k == 'weights' else np.int32)
            for k in FIELDS}
  examples = [e for e in encoded if len(e[0]) > 1]
  for (ids, weights), (r, start, seg) in zip(examples, placements, strict=True):
    n = len(ids) - 1
    span = slice(start, start + n)
    arrays['inputs'][r, span] = ids[:-1]
    arrays['targets'][r, span] = ids[1:]
    arrays['weights'][r, span] = weights[1:]
    arrays['segment_ids'][r, span] = seg
    arrays['positions'][r, span] = np.arange(n)
  return arrays


class Rows:
  """Packed rows as a random-access source: row i is {field: [seq_len] array}."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  def __len__(self) -> int:
    return len(self.arrays['inputs'])

  def __getitem__(self, i: int) -> Batch:
    return {k: v[i] for k, v in self.arrays.items()}
