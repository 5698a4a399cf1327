"""Tokenizers: SentencePiece (bpe or unigram), UTF-8 bytes, characters, and imported HF ones.

A run trains its tokenizer once, on the training split only, and caches it
under `{workdir}/tokenizer/`: `tokenizer.json` (kind, the config that made it
and, for characters, the vocabulary) beside `spm.model` for SentencePiece.
`tokenizer.json` is written last, so its presence means the cache is whole.
Reruns and the sampling command load the cache instead of retraining.

A run imported by `python -m train.convert import` from a checkpoint whose tokenizer is not
SentencePiece (GPT-2's or Llama 3's byte-level BPE) has no such cache; `load_tokenizer` then
returns an `HFTokenizer` over the Hugging Face `tokenizer.json` the import keeps under
`{workdir}/tokenizer/hf/`.

Every tokenizer has `bos_id` and `eos_id` (-1 when it has none) and `special_tokens`, the
text form of each special token mapped to its id (what chat templates write, data/chat.py).
`encode` never adds special tokens.

With `data.tokenizer.extra_ids` set (the encoder-decoder family, configs/seq2seq.py), a
SentencePiece or byte tokenizer has T5's id layout instead: pad 0, EOS 1, unknown 2, no BOS,
and `extra_ids` sentinels `<extra_id_i>` = vocab_size - 1 - i on top of the vocabulary
(SentencePiece itself cannot place pieces there, so they sit above its model, as in T5's
seqio vocabulary). The byte form is ByT5's: byte b is id b + 3.
"""

import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import ml_collections
import sentencepiece as spm
from absl import logging
from etils import epath

from data.errors import DataError
from data.storage import write_atomic

META_FILE = 'tokenizer.json'
SPM_FILE = 'spm.model'
# SentencePiece drops training sentences longer than this (in bytes); we feed lines.
_MAX_SENTENCE_BYTES = 16384


# Where an imported HF tokenizer lives under {workdir}/tokenizer/ (train.convert.HF_TOKENIZER_DIR).
HF_DIR = 'hf'
HF_FILE = 'tokenizer.json'
HF_CONFIG_FILE = 'tokenizer_config.json'


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int  # -1 when the tokenizer has none (char level)
  eos_id: int  # -1 when the tokenizer has none (bytes, characters)
  special_tokens: dict[str, int]  # text form -> id of each special token

  def encode(self, text: str) -> list[int]: ...

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
  """A SentencePiece model; byte fallback makes every string encodable."""

  def __init__(self, model_proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    self.special_tokens = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)
                           if self._sp.is_control(i)}

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


_SENTINEL = re.compile(r'<extra_id_(\d+)>')


class _Sentinels:
  """T5's sentinels above a base vocabulary of `base_size` ids whose pad, EOS and unknown
  are 0, 1 and 2. Text may write a sentinel as `<extra_id_i>` (as Hugging Face's T5
  tokenizer reads it), and `decode` writes it so."""

  pad_id = 0
  eos_id = 1
  bos_id = -1

  def _add_sentinels(self, base_size: int, extra_ids: int) -> None:
    self.base_size, self.extra_ids = base_size, extra_ids
    self.vocab_size = base_size + extra_ids
    self.special_tokens = {**self.special_tokens, **{
        f'<extra_id_{i}>': self.vocab_size - 1 - i for i in range(extra_ids)}}

  def _encode_base(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode_base(self, ids: list[int]) -> str:
    raise NotImplementedError

  def encode(self, text: str) -> list[int]:
    ids, start = [], 0
    for m in _SENTINEL.finditer(text):
      if int(m[1]) < self.extra_ids:
        ids += self._encode_base(text[start:m.start()]) + [self.vocab_size - 1 - int(m[1])]
        start = m.end()
    return ids + self._encode_base(text[start:])

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    parts, run = [], []
    for i in (int(i) for i in ids):
      if self.base_size <= i < self.vocab_size:
        parts += [self._decode_base(run), f'<extra_id_{self.vocab_size - 1 - i}>']
        run = []
      else:
        run.append(i)
    return ''.join(parts) + self._decode_base(run)


class T5SentencePieceTokenizer(_Sentinels):
  """A SentencePiece model trained with T5's pad 0, EOS 1, unknown 2 and no BOS, with
  `extra_ids` sentinels on top."""

  def __init__(self, model_proto: bytes, extra_ids: int):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.special_tokens = {'<pad>': 0, '</s>': 1}
    self._add_sentinels(self._sp.get_piece_size(), extra_ids)

  def _encode_base(self, text: str) -> list[int]:
    return self._sp.encode(text) if text else []

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Texts without sentinels in one call to SentencePiece's threads."""
    plain = [i for i, t in enumerate(texts) if '<extra_id_' not in t]
    out = [None] * len(texts)
    for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain],
                                             num_threads=os.cpu_count() or 1), strict=True):
      out[i] = ids
    return [self.encode(t) if ids is None else ids for t, ids in zip(texts, out, strict=True)]

  def _decode_base(self, ids: list[int]) -> str:
    return self._sp.decode([i for i in ids if 0 <= i < self.base_size]) if ids else ''


class T5ByteTokenizer(_Sentinels):
  """ByT5's ids: pad 0, EOS 1, unknown 2, UTF-8 byte b as b + 3, then `extra_ids`
  sentinels on top."""

  def __init__(self, extra_ids: int):
    self.special_tokens = {'<pad>': 0, '</s>': 1}
    self._add_sentinels(3 + 256, extra_ids)

  def _encode_base(self, text: str) -> list[int]:
    return [b + 3 for b in text.encode('utf-8')]

  def _decode_base(self, ids: list[int]) -> str:
    return bytes(i - 3 for i in ids if 3 <= i < 259).decode('utf-8', errors='replace')


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; BOS is 256 (written `<s>` in chat templates); no EOS."""

  vocab_size = 257
  bos_id = 256
  eos_id = -1
  special_tokens = {'<s>': 256}

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    # Sampled ids need not form valid UTF-8; show the damage instead of raising.
    return bytes(int(i) for i in ids if 0 <= i < 256).decode('utf-8', errors='replace')


class CharTokenizer:
  """nanoGPT's character vocabulary: the sorted characters of the training text, no BOS.

  Characters outside the vocabulary (e.g. ones only in validation) are dropped
  by `encode`, and counted in `unknown_chars`.
  """

  bos_id = -1
  eos_id = -1
  special_tokens = {}

  def __init__(self, chars: Sequence[str]):
    self.chars = list(chars)
    self.vocab_size = len(self.chars)
    self._ids = {c: i for i, c in enumerate(self.chars)}
    self.unknown_chars = 0

  def encode(self, text: str) -> list[int]:
    ids = [self._ids.get(c, -1) for c in text]
    known = [i for i in ids if i >= 0]
    self.unknown_chars += len(ids) - len(known)
    return known

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    return ''.join(self.chars[i] for i in ids if 0 <= i < self.vocab_size)


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer (`tokenizer.json`), as an imported run keeps it.

  BOS and EOS are the `bos_token` and `eos_token` of `tokenizer_config.json` beside it
  (-1 when absent or not in the vocabulary). `encode` adds no special tokens (no
  post-processor BOS) but, as Hugging Face does, reads special tokens written in the text as
  their ids, which is how a rendered chat template becomes ids (data/chat.py).
  """

  def __init__(self, tokenizer_json: str, tokenizer_config: dict | None = None):
    from tokenizers import Tokenizer as _HF

    self._tok = _HF.from_str(tokenizer_json)
    self.config = dict(tokenizer_config or {})
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.special_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()
                           if t.special}
    self.bos_id = self.token_id(self.config.get('bos_token'))
    self.eos_id = self.token_id(self.config.get('eos_token'))

  @classmethod
  def from_dir(cls, directory: str | os.PathLike) -> 'HFTokenizer':
    """The tokenizer in `directory` (tokenizer.json, and tokenizer_config.json if present)."""
    directory = epath.Path(directory)
    config_path = directory / HF_CONFIG_FILE
    try:
      config = json.loads(config_path.read_text()) if config_path.exists() else {}
      return cls((directory / HF_FILE).read_text(), config)
    except Exception as e:  # OSError, bad JSON, or the tokenizers library's own Exception
      raise DataError(f'Cannot read the Hugging Face tokenizer in {directory}: {e}') from None

  def token_id(self, token) -> int:
    """The id of `token` (its text, or tokenizer_config.json's {"content": ...} form); -1 if
    it is None or not in the vocabulary."""
    if isinstance(token, dict):
      token = token.get('content')
    if not token:
      return -1
    i = self._tok.token_to_id(token)
    return -1 if i is None else i

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each token's (start, end) character span in `text`."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def tokenizer_spec(tok_cfg: ml_collections.ConfigDict) -> dict:
  """The config keys that determine the tokenizer of `tok_cfg.kind` (and nothing else)."""
  # T5's layout (see the module docstring) only where the config has the key, so that the
  # specs cached by runs without it stay what they were.
  t5 = {'extra_ids': int(tok_cfg.extra_ids)} if 'extra_ids' in tok_cfg else {}
  if tok_cfg.kind == 'sentencepiece':
    return {'kind': tok_cfg.kind, 'vocab_size': int(tok_cfg.vocab_size),
            'model_type': tok_cfg.model_type, 'train_chars': int(tok_cfg.train_chars), **t5}
  if tok_cfg.kind == 'byte':
    return {'kind': tok_cfg.kind, **t5}
  if tok_cfg.kind == 'char':
    return {'kind': tok_cfg.kind}
  raise DataError(f'data.tokenizer.kind={tok_cfg.kind!r} is not a tokenizer; choose one of '
                  'sentencepiece, byte, char.')


def load_or_train_tokenizer(tok_cfg: ml_collections.ConfigDict,
                            train_texts: Callable[[], Iterable[str]],
                            workdir: str | os.PathLike) -> Tokenizer:
  """The tokenizer cached in `workdir`, or a new one trained on `train_texts()`.

  Args:
    tok_cfg: `config.data.tokenizer`.
    train_texts: returns a fresh iterable over the training documents each call
      (SentencePiece reads them twice).
    workdir: the run's directory (a path or URL); the cache is `{workdir}/tokenizer/`.

  Raises:
    DataError: the cache was made with a different tokenizer config.
  """
  spec = tokenizer_spec(tok_cfg)
  directory = epath.Path(workdir) / 'tokenizer'
  if (directory / META_FILE).exists():
    meta = _read_meta(directory)
    if meta['config'] != spec:
      raise DataError(
          f'The tokenizer cached in {directory} was made with {meta["config"]}, but '
          f'data.tokenizer now asks for {spec}. Use a new --workdir, or delete {directory} '
          f'and {epath.Path(workdir) / "data"} to retrain.')
    return _from_meta(directory, meta)
  meta = {'config': spec}
  if spec['kind'] == 'sentencepiece':
    proto = train_sentencepiece(tok_cfg, train_texts, t5_ids='extra_ids' in spec)
    write_atomic(directory / SPM_FILE, proto)
  elif spec['kind'] == 'char':
    meta['chars'] = sorted(set().union(*(set(t) for t in train_texts())))
  write_atomic(directory / META_FILE, json.dumps(meta, indent=1).encode())
  return _from_meta(directory, meta)


def load_tokenizer(workdir: str | os.PathLike) -> Tokenizer:
  """The tokenizer a run cached in `workdir` (for sampling from its checkpoints), or the HF
  tokenizer an import kept when it has no Kiln one."""
  directory = epath.Path(workdir) / 'tokenizer'
  if not (directory / META_FILE).exists() and (directory / HF_DIR / HF_FILE).exists():
    return HFTokenizer.from_dir(directory / HF_DIR)
  if not (directory / META_FILE).exists():
    raise DataError(f'No tokenizer in {directory}; train in --workdir={workdir} first, or '
                    'point --workdir at the directory of a run.')
  return _from_meta(directory, _read_meta(directory))


def train_sentencepiece(tok_cfg: ml_collections.ConfigDict,
                        train_texts: Callable[[], Iterable[str]], t5_ids: bool = False) -> bytes:
  """Trains a SentencePiece model deterministically; returns the serialized model. With
  `t5_ids`, T5's special ids: pad 0, EOS 1, unknown 2, no BOS (SentencePiece's defaults
  are unknown 0, BOS 1, EOS 2, no pad)."""
  logging.info('Training a %s SentencePiece tokenizer, vocabulary %d.', tok_cfg.model_type,
               tok_cfg.vocab_size)
  writer = io.BytesIO()
  try:
    _train_sentencepiece(tok_cfg, train_texts, writer, t5_ids)
  except RuntimeError as e:  # SentencePiece's own checks, as an INTERNAL error
    raise DataError(_sentencepiece_error(tok_cfg, str(e))) from None
  return writer.getvalue()


def _sentencepiece_error(tok_cfg: ml_collections.ConfigDict, message: str) -> str:
  """SentencePiece's complaint, as a sentence naming the key and a value that works."""
  size = tok_cfg.vocab_size
  if m := re.search(r'Please set it to a value <= (\d+)', message):
    return (f'data.tokenizer.vocab_size={size} is more than SentencePiece can build from this '
            f'text; set it to {m[1]} or less, or train on more text.')
  if m := re.search(r'smaller than required_chars\. \d+ vs (\d+)', message):
    return (f'data.tokenizer.vocab_size={size} is less than the {m[1]} pieces this text needs '
            f'(256 byte fallbacks, its characters, the special tokens); set it to {m[1]} or more.')
  if 'sentences_.empty()' in message:
    return 'SentencePiece got no training text; the training split is empty.'
  detail = message.strip().splitlines()[-1] if message.strip() else 'no detail'
  return f'SentencePiece cannot train data.tokenizer={tokenizer_spec(tok_cfg)}: {detail}'


def _train_sentencepiece(tok_cfg: ml_collections.ConfigDict,
                         train_texts: Callable[[], Iterable[str]], writer: io.BytesIO,
                         t5_ids: bool) -> None:
  ids = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1) if t5_ids else {}
  spm.SentencePieceTrainer.train(
      sentence_iterator=_training_lines(train_texts, tok_cfg.train_chars),
      model_writer=writer,
      vocab_size=tok_cfg.vocab_size,
      model_type=tok_cfg.model_type,
      byte_fallback=True,
      character_coverage=0.9995,
      # We chose the text already; SentencePiece's own sampling would be random.
      input_sentence_size=0,
      shuffle_input_sentence=False,
      num_threads=os.cpu_count() or 1,
      max_sentence_length=_MAX_SENTENCE_BYTES,
      # Keep text exactly (code indentation included), so decode(encode(s)) == s.
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      minloglevel=2,
      **ids,
  )


def _training_lines(train_texts: Callable[[], Iterable[str]], max_chars: int) -> Iterator[str]:
  """Lines of an evenly spread, deterministic subset of at most `max_chars` characters.

  A line is kept while the kept share stays at or under the allowed share of
  what has been seen, so the subset spans the whole corpus rather than its
  first files. (Whole lines, because SentencePiece skips over-long sentences.)
  """
  total = sum(len(t) for t in train_texts())
  share = min(1.0, max_chars / max(total, 1))
  kept = seen = 0
  for text in train_texts():
    for line in text.splitlines(keepends=True):
      seen += len(line)
      if kept + len(line) <= share * seen:
        kept += len(line)
        yield line


def _read_meta(directory: epath.Path) -> dict:
  path = directory / META_FILE
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f'Cannot read the cached tokenizer {path} ({e}); delete {directory} to '
                    'retrain.') from None


def _from_meta(directory: epath.Path, meta: dict) -> Tokenizer:
  kind, extra_ids = meta['config']['kind'], meta['config'].get('extra_ids')
  if extra_ids is not None:
    if kind == 'sentencepiece':
      return T5SentencePieceTokenizer((directory / SPM_FILE).read_bytes(), extra_ids)
    return T5ByteTokenizer(extra_ids)
  if kind == 'sentencepiece':
    return SentencePieceTokenizer((directory / SPM_FILE).read_bytes())
  if kind == 'char':
    return CharTokenizer(meta['chars'])
  return ByteTokenizer()

