"""The encoder-decoder input pipelines: span corruption over a corpus, or (input, target) pairs.

Every example is fixed-length, as T5 feeds its encoder and decoder:

  inputs       int32 [data.input_len]   encoder ids, EOS last, then pad (0)
  input_mask   bool  [data.input_len]   False on padding
  targets      int32 [data.target_len]  decoder ids, EOS last, then pad
  target_mask  bool  [data.target_len]  the loss weights: False on padding

The task shifts `targets` right itself (with the model's decoder start id) to make the
decoder's inputs.

Two objectives (`objective`):

  span_corruption  the LM's documents (data/sources.py: the stdlib with the LM's module
                   split, a text file or a jsonl file's `data.text_field`), tokenized once
                   into one stream (cached as the LM caches it, data/lm_pipeline.py) and cut
                   into chunks of T5's raw length (`span_corruption.chunk_length`), each
                   corrupted by span_corruption.py. A training example's noise mask is drawn
                   from (seed, its global position in the training order), so every epoch
                   masks a chunk anew, and a resumed run draws what the straight one drew;
                   held-out chunks have fixed masks.
  pairs            (input, target) texts: the embedded demo, a stdlib function's docstring
                   summary from its code (data/stdlib_functions.py, the LM's module split),
                   or a jsonl file of {"input": ..., "target": ...} objects (the field names
                   are `data.input_field` and `data.target_field`). A pair's input and
                   target are each cut to their length minus one, then get EOS (seqio's
                   trim-then-append); the cut ones are counted and logged.

The tokenizer (data/tokenizers.py) is trained on the training text (the documents, or a
jsonl file's inputs and targets) with T5's id layout: pad 0, EOS 1, and
`data.tokenizer.extra_ids` sentinels at the top of the vocabulary.

Training examples are shuffled per epoch, sharded over processes (process p of P takes
global elements p, p + P, ...), batched and checkpointed as the LM's windows are.
"""

import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence

import grain
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from data import lm_pipeline, sources, span_corruption, stdlib_functions, tokenizers
from data.errors import DataError

Batch = dict[str, np.ndarray]
FIELDS = ('inputs', 'input_mask', 'targets', 'target_mask')
OBJECTIVES = ('span_corruption', 'pairs')
SPAN_SOURCES = ('stdlib', 'text', 'jsonl')
PAIR_SOURCES = ('stdlib', 'jsonl')
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
_TRAIN_SALT, _EVAL_SALT = 0, 1  # span corruption's masks: training and held-out draws


@dataclasses.dataclass
class Seq2SeqData:
  tokenizer: tokenizers.Tokenizer
  train: grain.DatasetIterator  # checkpointable: get_state() / set_state()
  # Each call: a fresh pass over this process's share of the first eval_steps batches.
  eval_batches: Callable[[], Iterator[Batch]]
  # The held-out examples (random access, FIELDS), None without evaluation.
  validation: 'SpanCorruptedChunks | EncodedPairs | None'
  # The reference targets of the first len(references) held-out pairs, to score the
  # model's generations from their inputs (pairs only).
  references: list[str]


def pairs_texts(data_cfg: ml_collections.ConfigDict, split: str) -> list[tuple[str, str]]:
  """The (input, target) texts of `split`: the stdlib docstring demo, or the jsonl pairs.

  Raises:
    DataError: a jsonl line that is not an object with string input and target fields
      (naming the file and line), or no pairs in the split.
  """
  if data_cfg.source == 'stdlib':
    pairs = [(e['input'], e['target']) for e in stdlib_functions.stdlib_examples(
        split, data_cfg.val_fraction, make=stdlib_functions.docstring_examples)]
  elif data_cfg.source == 'jsonl':
    path = data_cfg.path if split == 'train' or not data_cfg.val_path else data_cfg.val_path
    keep = None if data_cfg.val_path else split == 'validation'
    pairs = [pair for name in sources.expand_path(path)
             for pair in _jsonl_pairs(name, data_cfg.input_field, data_cfg.target_field)
             if keep is None or sources.held_out(pair[0], data_cfg.val_fraction) == keep]
  else:
    raise DataError(f'data.source={data_cfg.source!r} has no pairs; choose one of '
                    f'{", ".join(PAIR_SOURCES)} for objective=pairs.')
  if data_cfg.max_examples:
    pairs = pairs[:data_cfg.max_examples]
  if not pairs:
    raise DataError(f'data.source={data_cfg.source!r} gave no {split} pairs'
                    f'{" from " + repr(data_cfg.path) if data_cfg.source == "jsonl" else ""}; '
                    'check the data and data.val_fraction.')
  return pairs


def _jsonl_pairs(name: str, input_field: str, target_field: str) -> Iterator[tuple[str, str]]:
  """Every line of a user's pairs file, or one DataError naming the file and line."""
  with epath.Path(name).open('rb') as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f'{name}:{line_no}: not a JSON object ({e}).') from None
      fields = (input_field, target_field)
      if not isinstance(record, dict) or not all(
          isinstance(record.get(k), str) for k in fields):
        raise DataError(f'{name}:{line_no}: a pair needs string fields {input_field!r} and '
                        f'{target_field!r} (data.input_field, data.target_field).')
      yield record[input_field], record[target_field]


def tokenizer_texts(data_cfg: ml_collections.ConfigDict,
                    objective: str) -> Callable[[], Iterator[str]]:
  """What the tokenizer trains on: the training documents (the stdlib's for the demo, so
  that a `span` run and a `docstring` run share one tokenizer), or the jsonl pairs' texts."""
  if objective == 'pairs' and data_cfg.source == 'jsonl':
    pairs = pairs_texts(data_cfg, 'train')  # read here: SentencePiece would hide a DataError
    return lambda: (text for pair in pairs for text in pair)
  return lambda: sources.read_documents(data_cfg, 'train')


def build_seq2seq_data(data_cfg: ml_collections.ConfigDict, *, objective: str,
                       tokenizer: tokenizers.Tokenizer, seed: int, global_batch_size: int,
                       eval_steps: int, num_generate: int, workdir: str, process_index: int,
                       process_count: int) -> Seq2SeqData:
  """This process's train iterator, its eval batches, and the held-out examples to generate
  from (`num_generate` of them: pairs only).

  Raises:
    DataError: bad data, or too little of it for one global batch.
  """
  if global_batch_size % process_count:
    raise DataError(f'batch_size={global_batch_size} must divide evenly over '
                    f'{process_count} processes.')
  shard = dict(global_batch_size=global_batch_size, process_index=process_index,
               process_count=process_count)
  references: list[str] = []
  if objective == 'span_corruption':
    cache = lm_pipeline.token_cache_dir(data_cfg, workdir)
    train = SpanCorruptedChunks(*lm_pipeline.token_stream(data_cfg, 'train', tokenizer, cache),
                                data_cfg, tokenizer, seed, _TRAIN_SALT)
    train_ds = _per_draw_train_dataset(train, seed=seed, **shard)
    val = None
    if eval_steps > 0 or num_generate > 0:  # num_generate: the text sample's chunk
      val = SpanCorruptedChunks(
          *lm_pipeline.token_stream(data_cfg, 'validation', tokenizer, cache), data_cfg,
          tokenizer, seed, _EVAL_SALT)
  else:
    train = EncodedPairs(pairs_texts(data_cfg, 'train'), data_cfg, tokenizer, 'train')
    train_ds = lm_pipeline.train_dataset(train, seed=seed, **shard)
    val = None
    if eval_steps > 0 or num_generate > 0:
      texts = pairs_texts(data_cfg, 'validation')
      val = EncodedPairs(texts, data_cfg, tokenizer, 'validation')
      references = [target for _, target in texts[:num_generate]]
  eval_ds = lm_pipeline.eval_dataset(val, eval_steps=eval_steps, **shard) if eval_steps else None
  return Seq2SeqData(
      tokenizer=tokenizer, train=iter(train_ds.to_iter_dataset(_READ_OPTIONS)),
      eval_batches=lambda: (iter(eval_ds.to_iter_dataset(_READ_OPTIONS))
                            if eval_ds else iter(())),
      validation=val, references=references)


def first_example(data_cfg: ml_collections.ConfigDict, objective: str,
                  tokenizer: tokenizers.Tokenizer, seed: int) -> Batch:
  """The first held-out example (FIELDS), what `Seq2SeqData.validation[0]` is, read without
  building the pipelines (for samples from a checkpoint)."""
  if objective == 'pairs':
    return EncodedPairs(pairs_texts(data_cfg, 'validation')[:1], data_cfg, tokenizer,
                        'validation')[0]
  raw_len, _ = span_corruption.chunk_length(data_cfg.input_len, data_cfg.noise_density,
                                            data_cfg.mean_noise_span_length)
  tokens = []
  for doc in sources.read_documents(data_cfg, 'validation'):
    tokens += tokenizer.encode(doc)
    if len(tokens) >= raw_len:
      break
  if len(tokens) < raw_len:
    raise DataError(f'The validation split has fewer than the {raw_len} tokens of one chunk.')
  return SpanCorruptedChunks(np.asarray(tokens[:raw_len]), None, data_cfg, tokenizer, seed,
                             _EVAL_SALT)[0]


def _per_draw_train_dataset(examples: 'SpanCorruptedChunks', *, seed: int,
                            global_batch_size: int, process_index: int,
                            process_count: int) -> grain.MapDataset:
  """lm_pipeline.train_dataset's order (one shuffle per epoch, whole global batches), with
  each element made from (its global position, its chunk), so that its random draws are
  new in every epoch and the same on every process count."""
  n = len(examples)
  per_epoch = n // global_batch_size * global_batch_size
  if per_epoch == 0:
    raise DataError(f'The training split has {n} chunks of {examples.raw_len} tokens, fewer '
                    f'than one global batch (batch_size={global_batch_size}); add data or '
                    'lower batch_size or data.input_len.')
  order = grain.MapDataset.range(n).shuffle(seed=seed % 2**32)
  draw = lambda g, _: (g, order[g // per_epoch * n + g % per_epoch])  # noqa: E731
  ds = grain.MapDataset.range(per_epoch).repeat().map_with_index(draw)
  ds = ds[process_index::process_count].map(lambda gi: examples.example(*gi))
  return ds.batch(global_batch_size // process_count, drop_remainder=True)


def pad_example(inputs: Sequence[int], targets: Sequence[int], input_len: int,
                target_len: int) -> Batch:
  """One example of FIELDS from ids that fit (inputs and targets end with EOS)."""
  out = {'inputs': np.zeros(input_len, np.int32), 'input_mask': np.zeros(input_len, bool),
         'targets': np.zeros(target_len, np.int32), 'target_mask': np.zeros(target_len, bool)}
  out['inputs'][:len(inputs)], out['input_mask'][:len(inputs)] = inputs, True
  out['targets'][:len(targets)], out['target_mask'][:len(targets)] = targets, True
  return out


class SpanCorruptedChunks:
  """Chunks of a token stream, span-corrupted: chunk i is stream[i*R : (i+1)*R] with R
  T5's raw length for `data.input_len`; example(draw, i) corrupts it with a noise mask drawn
  from (seed, salt, draw), and [i] with draw = i (held-out: fixed masks)."""

  def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray,
               data_cfg: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
               seed: int, salt: int):
    del doc_starts  # T5 packs documents back to back without a separator
    self.tokens = tokens
    self.raw_len, _ = span_corruption.chunk_length(
        data_cfg.input_len, data_cfg.noise_density, data_cfg.mean_noise_span_length)
    self.input_len, self.target_len = data_cfg.input_len, data_cfg.target_len
    self.density, self.span_len = data_cfg.noise_density, data_cfg.mean_noise_span_length
    self.vocab_size, self.eos_id = tokenizer.vocab_size, tokenizer.eos_id
    self.key = (seed % 2**32, salt)

  def __len__(self) -> int:
    return len(self.tokens) // self.raw_len

  def __getitem__(self, i: int) -> Batch:
    return self.example(i, i)

  def example(self, draw: int, i: int) -> Batch:
    start = int(i) * self.raw_len
    chunk = np.asarray(self.tokens[start:start + self.raw_len], np.int32)
    rng = np.random.default_rng([*self.key, int(draw)])
    mask = span_corruption.noise_mask(self.raw_len, rng, self.density, self.span_len)
    inputs, targets = span_corruption.corrupt(chunk, mask, vocab_size=self.vocab_size,
                                              eos_id=self.eos_id)
    return pad_example(inputs, targets, self.input_len, self.target_len)


class EncodedPairs:
  """Tokenized (input, target) pairs as a random-access source of FIELDS."""

  def __init__(self, texts: Sequence[tuple[str, str]], data_cfg: ml_collections.ConfigDict,
               tokenizer: tokenizers.Tokenizer, split: str):
    s, t, eos = data_cfg.input_len, data_cfg.target_len, tokenizer.eos_id
    ins = tokenizer.encode_batch([x for x, _ in texts])
    outs = tokenizer.encode_batch([y for _, y in texts])
    cut = sum(len(a) > s - 1 or len(b) > t - 1 for a, b in zip(ins, outs, strict=True))
    rows = [pad_example(a[:s - 1] + [eos], b[:t - 1] + [eos], s, t)
            for a, b in zip(ins, outs, strict=True)]
    self.arrays = {k: np.stack([r[k] for r in rows]) for k in FIELDS}
    log = logging.warning if cut else logging.info
    log('Seq2seq %s split: %d pairs, %d cut to data.input_len=%d / data.target_len=%d.',
        split, len(rows), cut, s, t)

  def __len__(self) -> int:
    return len(self.arrays['inputs'])

  def __getitem__(self, i: int) -> Batch:
    return {k: v[i] for k, v in self.arrays.items()}
