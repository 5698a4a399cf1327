"""Chat templates: a conversation (a list of {"role", "content"} messages) as text and ids.

An imported Hugging Face run keeps its `chat_template` (`tokenizer/hf/chat_template.jinja`,
else the `chat_template` of `tokenizer/hf/tokenizer_config.json`). Kiln renders it as
transformers does: a sandboxed jinja2 environment with `trim_blocks` and `lstrip_blocks`,
the `raise_exception` and `strftime_now` functions, a `tojson` that does not escape HTML,
and `bos_token`, `eos_token` and the other named special tokens of tokenizer_config.json in
the context. The rendered text, tokenized without adding special tokens (special tokens
written in it become their ids), gives the ids of transformers' `apply_chat_template(...,
tokenize=True)`.

Kiln's own tokenizers get this default template (`DEFAULT_TEMPLATE`):

    {bos}<|user|>
    How do I sort a list?{eot}<|assistant|>
    Use sorted(xs).{eot}

that is BOS once, then each message as `<|ROLE|>` and a newline, its content and the
end-of-turn token; with `add_generation_prompt`, `<|assistant|>` and a newline at the end.
`{bos}` is the tokenizer's BOS (`<s>`), `{eot}` its EOS (`</s>` for SentencePiece); byte
tokenizers have no EOS and end turns with BOS (which starts every document in pretraining,
so it reads as "end of text"); character tokenizers have no special tokens, so they have no
BOS and end turns with a blank line. The markers `<|user|>` and so on are plain text, not
special tokens, so a pretrained Kiln model needs no new embeddings.

For supervised fine-tuning, `ChatTemplate.segments` cuts the rendered text into pieces,
each flagged whether it is an assistant turn (content and end-of-turn token), and
`encode_chat` turns that into ids and a per-token assistant mask.
"""

import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox
from etils import epath

from data import tokenizers
from data.errors import DataError

DEFAULT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
TEMPLATE_FILE = 'chat_template.jinja'
# The named special tokens transformers puts in a template's context.
SPECIAL_TOKEN_KEYS = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token',
                      'cls_token', 'mask_token')

Message = Mapping[str, str]


@functools.cache
def _compile(source: str) -> jinja2.Template:
  """`source` compiled in an environment that renders as transformers' chat templates do."""

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.now().strftime(fmt)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters['tojson'] = tojson
  env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise DataError(f'The chat template does not parse (line {e.lineno}): {e.message}') from None


class ChatTemplate:
  """A chat template and the tokenizer whose ids it renders to.

  Args:
    source: the jinja2 template.
    tokenizer: encodes the rendered text; special tokens written in the text become their ids.
    context: what the template sees besides `messages` and `add_generation_prompt`
      (bos_token, eos_token, ...).
  """

  def __init__(self, source: str, tokenizer: tokenizers.Tokenizer, context: Mapping[str, str]):
    self.source = source
    self.tokenizer = tokenizer
    self.context = dict(context)
    self._template = _compile(source)
    specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
    self._special_re = re.compile('|'.join(map(re.escape, specials))) if specials else None

  @property
  def end_of_turn(self) -> str:
    """The text that ends a turn in the default template (the EOS token's, for HF)."""
    return self.context.get('eos_token') or ''

  def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text; with `add_generation_prompt`, followed by what starts the
    assistant's reply (for sampling).

    Raises:
      DataError: the template refused the conversation (its `raise_exception`), naming why.
    """
    try:
      return self._template.render(messages=[dict(m) for m in messages],
                                   add_generation_prompt=add_generation_prompt, **self.context)
    except jinja2.TemplateError as e:
      raise DataError(f'The chat template cannot render this conversation: {e}') from None

  def segments(self, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """`render(messages)` cut into (text, is_assistant) pieces, in order.

    An assistant piece is what rendering the conversation up to and including that
    assistant message adds to rendering it up to the message before with the generation
    prompt: the reply and its end-of-turn marker, exactly what a model must produce.

    Raises:
      DataError: the template renders a conversation's start differently from the whole
        (some templates rewrite earlier turns), so assistant turns cannot be located.
    """
    full = self.render(messages)
    pieces, pos = [], 0
    for i, message in enumerate(messages):
      if message.get('role') != 'assistant':
        continue
      prefix = self.render(messages[:i], add_generation_prompt=True)
      upto = self.render(messages[:i + 1])
      if not (upto.startswith(prefix) and full.startswith(upto) and len(prefix) >= pos):
        raise DataError(f'The chat template does not render the conversation up to message {i} '
                        'as a prefix of the whole, so its assistant turns cannot be masked.')
      if len(prefix) > pos:
        pieces.append((full[pos:len(prefix)], False))
      if len(upto) > len(prefix):
        pieces.append((full[len(prefix):len(upto)], True))
      pos = len(upto)
    if len(full) > pos:
      pieces.append((full[pos:], False))
    return pieces

  def encode(self, text: str) -> list[int]:
    """Ids of rendered text: special tokens written in it become their ids, nothing is added."""
    if isinstance(self.tokenizer, tokenizers.HFTokenizer) or self._special_re is None:
      return list(self.tokenizer.encode(text))
    ids, pos = [], 0
    for m in self._special_re.finditer(text):
      ids += self.tokenizer.encode(text[pos:m.start()]) if m.start() > pos else []
      ids.append(self.tokenizer.special_tokens[m.group()])
      pos = m.end()
    return ids + (self.tokenizer.encode(text[pos:]) if pos < len(text) else [])

  def encode_chat(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """(ids, is_assistant per id) of the rendered conversation.

    An HF tokenizer encodes the whole text at once (so the ids are transformers'), and a
    token is an assistant token when any of its characters is in an assistant piece. Kiln's
    tokenizers encode piece by piece.
    """
    pieces = self.segments(messages)
    if isinstance(self.tokenizer, tokenizers.HFTokenizer):
      text = ''.join(t for t, _ in pieces)
      ids, offsets = self.tokenizer.encode_with_offsets(text)
      inside = bytearray(len(text) + 1)
      pos = 0
      for piece, assistant in pieces:
        if assistant:
          inside[pos:pos + len(piece)] = b'\1' * len(piece)
        pos += len(piece)
      mask = [any(inside[s:max(e, s + 1)]) for s, e in offsets]
      return ids, mask
    ids, mask = [], []
    for piece, assistant in pieces:
      piece_ids = self.encode(piece)
      ids += piece_ids
      mask += [assistant] * len(piece_ids)
    return ids, mask


def default_context(tokenizer: tokenizers.Tokenizer) -> dict[str, str]:
  """bos_token and eos_token (the end of a turn) of the default template for `tokenizer`."""
  names = {i: text for text, i in tokenizer.special_tokens.items()}
  bos = names.get(tokenizer.bos_id, '')
  eos = names.get(tokenizer.eos_id) or bos or '\n\n'
  return {'bos_token': bos, 'eos_token': eos}


def load_chat_template(workdir: str | os.PathLike,
                       tokenizer: tokenizers.Tokenizer | None = None) -> ChatTemplate:
  """The chat template of the run (or import) in `workdir`.

  An HF import's template comes with its HF tokenizer (so the ids are transformers'); any
  other run gets `DEFAULT_TEMPLATE` over `tokenizer` (default: the run's, `load_tokenizer`).

  Raises:
    DataError: the run has no tokenizer, or its template files cannot be read.
  """
  hf_dir = epath.Path(workdir) / 'tokenizer' / tokenizers.HF_DIR
  source, config = _hf_template(hf_dir)
  if source is not None and (hf_dir / tokenizers.HF_FILE).exists():
    hf = tokenizers.HFTokenizer.from_dir(hf_dir)
    context = {}
    for key in SPECIAL_TOKEN_KEYS:
      value = config.get(key)
      value = value.get('content') if isinstance(value, dict) else value
      if value is not None:
        context[key] = str(value)
    return ChatTemplate(source, hf, context)
  tokenizer = tokenizer or tokenizers.load_tokenizer(workdir)
  return ChatTemplate(DEFAULT_TEMPLATE, tokenizer, default_context(tokenizer))


def _hf_template(hf_dir: epath.Path) -> tuple[str | None, dict]:
  """(the chat template, tokenizer_config.json) kept at import; (None, {}) if none."""
  config = {}
  path = hf_dir / tokenizers.HF_CONFIG_FILE
  try:
    if path.exists():
      config = json.loads(path.read_text())
    if (hf_dir / TEMPLATE_FILE).exists():
      return (hf_dir / TEMPLATE_FILE).read_text(), config
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f'Cannot read the chat template in {hf_dir}: {e}') from None
  source = config.get('chat_template')
  if isinstance(source, list):  # several named templates: transformers uses 'default'
    named = {t.get('name'): t.get('template') for t in source if isinstance(t, dict)}
    source = named.get('default')
  return (source if isinstance(source, str) and source else None), config
