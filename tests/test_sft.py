"""Supervised fine-tuning: chat templates against transformers, the SFT data pipeline
(masking, packing, bad rows, the stdlib demo data) and the `sft` task."""

import json

import pytest

from data import chat, tokenizers

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] "
    "| trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role ' + message['role']) }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = [
    [{'role': 'user', 'content': 'How do I sort a list in Python?'},
     {'role': 'assistant', 'content': 'Use sorted(xs), or xs.sort() in place.'}],
    [{'role': 'system', 'content': 'Answer briefly.'},
     {'role': 'user', 'content': 'What is 2 + 2?'},
     {'role': 'assistant', 'content': '4'},
     {'role': 'user', 'content': 'And times 3?  \u00e9\u6f22 \U0001f642'},
     {'role': 'assistant', 'content': ' 12\n\nThat is all.'}],
]
SPECIALS = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
            '<|eot_id|>', '<|im_start|>', '<|im_end|>']


def _hf_dir(path, template: str, in_config: bool):
  """A byte-level BPE trained here on a few sentences, saved as an HF tokenizer directory
  with `template` in tokenizer_config.json or in chat_template.jinja."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = [m['content'] for c in CONVERSATIONS for m in c] * 20 + ['def f(x):\n  return x']
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / 'tokenizer.json'))
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|begin_of_text|>',
            'eos_token': {'__type': 'AddedToken', 'content': '<|eot_id|>', 'special': True},
            'pad_token': None}
  if in_config:
    config['chat_template'] = template
  else:
    (path / 'chat_template.jinja').write_text(template)
  (path / 'tokenizer_config.json').write_text(json.dumps(config))
  return path


@pytest.mark.parametrize('template,in_config', [(LLAMA3_TEMPLATE, True),
                                                (CHATML_TEMPLATE, False)])
def test_chat_template_ids_equal_transformers(tmp_path, template, in_config):
  from transformers import AutoTokenizer

  hf_dir = _hf_dir(tmp_path / 'run' / 'tokenizer' / 'hf', template, in_config)
  reference = AutoTokenizer.from_pretrained(str(hf_dir))
  ours = chat.load_chat_template(tmp_path / 'run')
  assert isinstance(ours.tokenizer, tokenizers.HFTokenizer)
  # No Kiln tokenizer cache: load_tokenizer returns the HF one.
  assert isinstance(tokenizers.load_tokenizer(tmp_path / 'run'), tokenizers.HFTokenizer)
  assert ours.tokenizer.bos_id == reference.bos_token_id
  assert ours.tokenizer.eos_id == reference.eos_token_id
  for messages in CONVERSATIONS:
    for gen in (False, True):
      want = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen,
                                           return_dict=False)
      text = ours.render(messages, add_generation_prompt=gen)
      assert text == reference.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=gen)
      assert ours.encode(text) == list(want)
    ids, mask = ours.encode_chat(messages)
    assert ids == list(reference.apply_chat_template(messages, tokenize=True, return_dict=False))
    # The masked tokens decode to exactly the assistant replies and their end-of-turn token.
    replies = [m['content'] for m in messages if m['role'] == 'assistant']
    got = ours.tokenizer._tok.decode([i for i, m in zip(ids, mask, strict=True) if m],
                                     skip_special_tokens=False)
    end = '<|eot_id|>' if template == LLAMA3_TEMPLATE else '<|im_end|>\n'
    assert got == ''.join(r.strip() + end if template == LLAMA3_TEMPLATE else r + end
                          for r in replies)


def test_chat_template_errors_are_one_line(tmp_path):
  hf_dir = _hf_dir(tmp_path / 'run' / 'tokenizer' / 'hf', CHATML_TEMPLATE, True)
  del hf_dir
  template = chat.load_chat_template(tmp_path / 'run')
  with pytest.raises(chat.DataError, match='Unknown role tool'):
    template.render([{'role': 'tool', 'content': 'x'}])


@pytest.mark.parametrize('tokenizer', [tokenizers.ByteTokenizer(),
                                       tokenizers.CharTokenizer(sorted(set('<|>\nabcdeusrt')))])
def test_default_template_for_kiln_tokenizers(tokenizer):
  template = chat.ChatTemplate(chat.DEFAULT_TEMPLATE, tokenizer, chat.default_context(tokenizer))
  messages = [{'role': 'user', 'content': 'a b'}, {'role': 'assistant', 'content': 'cd'}]
  text = template.render(messages)
  ids, mask = template.encode_chat(messages)
  if tokenizer.bos_id >= 0:  # bytes: BOS starts the text and ends every turn
    assert text == '<s><|user|>\na b<s><|assistant|>\ncd<s>'
    assert ids[0] == ids[-1] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 3
  else:  # characters: no special tokens, turns end with a blank line
    assert text == '<|user|>\na b\n\n<|assistant|>\ncd\n\n'
  assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]) == 'cd' + (
      '' if tokenizer.bos_id >= 0 else '\n\n')
  assert template.render(messages[:1], add_generation_prompt=True) + 'cd' + \
      template.end_of_turn == text
