"""Hugging Face model directories on disk, for the converters (train/convert.py for decoder
LMs, train/convert_t5.py for T5): safetensors read lazily (one file or a sharded index) and
planned into shards, JSON files, the HF tokenizer files kept in a Kiln run and SentencePiece
models read from them, and staging directories that appear whole or not at all.
"""

import dataclasses
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from data import cli, storage, tokenizers
from data.errors import ConfigError, DataError

FLOAT_DTYPES = {'F32': np.float32, 'F16': np.float16, 'BF16': jnp.bfloat16}
# Tokenizer files copied from an HF directory at import and back at export.
HF_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                      'tokenizer.model', 'spiece.model', 'vocab.json', 'merges.txt',
                      'added_tokens.json')
# Under {workdir}/tokenizer/: the HF files that travel with the tokenizer (tokenizer files,
# generation_config.json and the original config.json, whose maximum length and special
# token ids the export keeps).
HF_TOKENIZER_DIR = tokenizers.HF_DIR


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One Kiln parameter read from one HF tensor.

  `kiln` is the parameter's path; `hf` the HF name (with `{i}` for the layer in
  stacked parameters, whose Kiln shape has a leading [N] axis, and `{e}` for the expert
  of per-expert matrices, a further [E] axis); `hf_shape` its shape in the file (of one
  layer and expert); `to_kiln` maps that HF array to Kiln's layout and `to_hf` back.
  Several parameters that share one HF tensor (GPT-2's fused c_attn: q, k, v; the fused
  experts' gate_up_proj) are its consecutive pieces along `concat_axis`.
  """
  kiln: tuple[str, ...]
  hf: str
  hf_shape: tuple[int, ...]
  to_kiln: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  concat_axis: int = 0


def same(x: np.ndarray) -> np.ndarray:
  return x


def transpose(w: np.ndarray) -> np.ndarray:
  return w.T


class SafetensorsReader:
  """The tensors of an HF directory (one file or a sharded index), opened lazily."""

  def __init__(self, hf_dir: str):
    from safetensors import safe_open
    self._safe_open = safe_open
    index = os.path.join(hf_dir, 'model.safetensors.index.json')
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)['weight_map']
      self.files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    else:
      paths = sorted(glob.glob(os.path.join(hf_dir, '*.safetensors')))
      if not paths:
        raise DataError(f'{hf_dir} has no *.safetensors files (PyTorch .bin checkpoints are not '
                        'read; re-save with safe_serialization=True).')
      self.files = {}
      for path in paths:
        with safe_open(path, framework='numpy') as f:
          self.files.update({name: path for name in f.keys()})
    self._open: dict[str, object] = {}
    self.shapes, self.dtypes = {}, {}
    for path in sorted(set(self.files.values())):
      if not os.path.exists(path):
        raise DataError(f'{path}, named by {index}, does not exist.')
      handle = self._handle(path)
      for name in handle.keys():
        s = handle.get_slice(name)
        self.shapes[name], self.dtypes[name] = tuple(s.get_shape()), s.get_dtype()

  def _handle(self, path: str):
    if path not in self._open:
      self._open[path] = self._safe_open(path, framework='numpy')
    return self._open[path]

  def names(self) -> set[str]:
    return set(self.shapes)

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor (or its slice `index`), read from disk now."""
    s = self._handle(self.files[name]).get_slice(name)
    return s[index] if index else s[:]


def cast(x: np.ndarray, dtype, name: str) -> np.ndarray:
  if x.dtype not in (np.float32, np.float16, jnp.bfloat16):
    raise DataError(f'HF tensor {name} has dtype {x.dtype}; expected a float type.')
  return np.ascontiguousarray(x.astype(dtype))


def plan_shards(names: Sequence[str], nbytes: dict[str, int], limit: int) -> list[list[str]]:
  shards, size = [[]], 0
  for name in names:
    if shards[-1] and size + nbytes[name] > limit:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes[name]
  return shards


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f'Cannot read {path}: {e}') from None


def write_json(path: str, obj: dict) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2)


def check_target(path: str, flag: str, overwrite: bool) -> None:
  cli.check_output_dir(path, flag)
  if os.path.exists(path) and os.listdir(path) and not overwrite:
    raise ConfigError(f'{flag}={path} exists and is not empty; give a new directory, or pass '
                      '--overwrite to replace it.')


class Staging:
  """A temporary sibling of `target`, renamed to it on success and deleted on failure;
  an existing `target` is deleted just before the rename when `replace`, else it must
  be empty."""

  def __init__(self, target: str, replace: bool = False):
    self.target = os.path.abspath(target)
    self.replace = replace

  def __enter__(self) -> str:
    parent = os.path.dirname(self.target)
    os.makedirs(parent, exist_ok=True)
    self.tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(self.target)}.partial-', dir=parent)
    return self.tmp

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      return False
    if os.path.exists(self.target) and self.replace:
      shutil.rmtree(self.target)
    elif os.path.exists(self.target):
      os.rmdir(self.target)  # empty, checked before
    os.rename(self.tmp, self.target)
    return False


def read_spm(hf_dir: str, names: Sequence[str] = ('tokenizer.model',)) -> bytes | None:
  """The first of the SentencePiece files `names` in `hf_dir` (T5 calls it spiece.model),
  when it is a BPE or unigram model Kiln's tokenizer reads; else None."""
  for name in names:
    path = os.path.join(hf_dir, name)
    if os.path.exists(path):
      with open(path, 'rb') as f:
        proto = f.read()
      return proto if spm_model_type(proto) in ('bpe', 'unigram') else None
  return None


def piece_count(proto: bytes) -> int:
  return tokenizers.SentencePieceTokenizer(proto).vocab_size


def spm_model_type(proto: bytes) -> str:
  """SentencePiece's trainer_spec.model_type, read from the protobuf wire format (the
  generated protobuf module of sentencepiece needs a matching protobuf runtime)."""
  trainer_spec = _proto_field(proto, 2)
  value = _proto_field(trainer_spec, 3) if trainer_spec is not None else None
  return {1: 'unigram', 2: 'bpe', 3: 'word', 4: 'char'}.get(
      1 if value is None else value, 'unknown')


def _proto_field(buf: bytes, number: int):
  """The last value of field `number` in a protobuf message: bytes or int (None if absent)."""
  pos, found = 0, None

  def varint():
    nonlocal pos
    shift = result = 0
    while True:
      byte = buf[pos]
      pos += 1
      result |= (byte & 0x7F) << shift
      if not byte & 0x80:
        return result
      shift += 7

  while pos < len(buf):
    key = varint()
    field, wire = key >> 3, key & 7
    if wire == 0:
      value = varint()
    elif wire == 2:
      n = varint()
      value, pos = buf[pos:pos + n], pos + n
    elif wire == 1:
      value, pos = None, pos + 8
    elif wire == 5:
      value, pos = None, pos + 4
    else:
      raise DataError('tokenizer.model is not a SentencePiece model.')
    if field == number:
      found = value
  return found


def copy_tokenizer(hf_dir: str, workdir: str, spm_proto: bytes | None,
                       config: ml_collections.ConfigDict) -> None:
  """Kiln's tokenizer cache (when the HF one is SentencePiece) and the HF files, for export."""
  directory = os.path.join(workdir, 'tokenizer')
  hf_files = [n for n in HF_TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, n))]
  for name in hf_files + ['generation_config.json', 'config.json']:
    if os.path.exists(os.path.join(hf_dir, name)):
      os.makedirs(os.path.join(directory, HF_TOKENIZER_DIR), exist_ok=True)
      shutil.copy(os.path.join(hf_dir, name), os.path.join(directory, HF_TOKENIZER_DIR, name))
  if spm_proto is None:
    if 'tokenizer.json' not in hf_files:  # else data.tokenizers.HFTokenizer reads it
      logging.warning('%s has neither a SentencePiece tokenizer.model nor a tokenizer.json: the '
                      'Kiln run has no tokenizer, so train.sample cannot encode prompts.', hf_dir)
    return
  storage.write_atomic(os.path.join(directory, tokenizers.SPM_FILE), spm_proto)
  meta = {'config': tokenizers.tokenizer_spec(config.data.tokenizer)}
  storage.write_atomic(os.path.join(directory, tokenizers.META_FILE),
                          json.dumps(meta, indent=1).encode())
