"""Kiln's SentencePiece tokenizers as Hugging Face `tokenizer.json` files.

Kiln trains SentencePiece with identity normalisation, no dummy prefix and byte
fallback (data/tokenizers.py). The `tokenizers` library expresses that
exactly: spaces become '▁', then a BPE (merges ranked by the score of the piece
they make, as SentencePiece's BPE merges) or a Unigram model over the same
pieces and scores, with byte fallback. `transformers.AutoTokenizer` loads the
result as a fast tokenizer; encoding the same text gives the same ids (the
export checks this on sample strings before writing), and the tokenizer adds
BOS in front as Kiln's training data has it.
"""

import json
import os

import sentencepiece as spm

from data.errors import DataError

SPACE = '\u2581'  # SentencePiece's whitespace symbol
# Strings whose ids the export compares, Kiln against the HF tokenizer.
PROBES = (
    'def f(x):\n    return x + 12345\n',
    '  two leading spaces and   runs\t\ttabs\n\n\n',
    'Unicode: h\u00e9llo w\u00f6rld \u6f22\u5b57 \U0001f642 and bytes \x00\x7f',
    'import os, sys  # comment\nclass A(object):\n\tpass\n',
    ' x', 'x ', '', '0.5e-10 1,000,000',
)


def build(proto: bytes, model_type: str, bos_id: int):
  """A `tokenizers.Tokenizer` equal to the SentencePiece model `proto`."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

  sp = spm.SentencePieceProcessor(model_proto=proto)
  n = sp.get_piece_size()
  pieces = [sp.id_to_piece(i) for i in range(n)]
  scores = [sp.get_score(i) for i in range(n)]
  normal = [not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
            for i in range(n)]
  unk = sp.unk_id()
  if model_type == 'unigram':
    model = models.Unigram(list(zip(pieces, scores, strict=True)), unk_id=unk, byte_fallback=True)
  elif model_type == 'bpe':
    vocab = {p: i for i, p in enumerate(pieces)}
    model = models.BPE(vocab, _merges(pieces, scores, normal), unk_token=pieces[unk],
                       fuse_unk=True, byte_fallback=True)
  else:
    raise DataError(f'SentencePiece model_type {model_type!r} has no HF form; bpe or unigram.')
  tok = Tokenizer(model)
  tok.normalizer = normalizers.Replace(Regex(' '), SPACE)
  tok.decoder = decoders.Sequence([decoders.Replace(SPACE, ' '), decoders.ByteFallback(),
                                   decoders.Fuse()])
  tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                          for i in range(n) if sp.is_control(i) or sp.is_unknown(i)])
  if bos_id >= 0:
    bos = pieces[bos_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, bos_id)])
  return tok


def _merges(pieces: list[str], scores: list[float], normal: list[bool]) -> list[tuple[str, str]]:
  """BPE merges in SentencePiece's order: a merge ranks by the score of the piece it makes."""
  ids = {p: i for i, p in enumerate(pieces) if normal[i]}
  merges = []
  for piece, score, ok in zip(pieces, scores, normal, strict=True):
    if not ok:
      continue
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in ids and right in ids:
        merges.append((-score, ids[left], ids[right], left, right))
  merges.sort()
  return [(left, right) for *_, left, right in merges]


def write(proto: bytes, model_type: str, encode, bos_id: int, eos_id: int, directory: str,
          max_length: int, tokenizer_config: bool = True) -> None:
  """Writes tokenizer.json (and tokenizer_config.json) for `proto` into `directory`.

  Raises:
    DataError: the HF tokenizer would encode a probe string differently from `encode`.
  """
  tok = build(proto, model_type, bos_id)
  for text in PROBES:
    want, got = list(encode(text)), tok.encode(text, add_special_tokens=False).ids
    if want != got:
      raise DataError(f'The HF form of the SentencePiece tokenizer encodes {text!r} as {got}, '
                      f'Kiln as {want}; the tokenizer is not exported.')
  tok.save(os.path.join(directory, 'tokenizer.json'))
  if not tokenizer_config:
    return
  sp = spm.SentencePieceProcessor(model_proto=proto)
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': max_length,
            'clean_up_tokenization_spaces': False,
            'unk_token': sp.id_to_piece(sp.unk_id())}
  for key, i in (('bos_token', bos_id), ('eos_token', eos_id)):
    if i >= 0:
      config[key] = sp.id_to_piece(i)
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2)
