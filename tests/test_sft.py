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
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = [m['content'] for c in CONVERSATIONS for m in c] * 20 + ['def f(x):\n  return x']
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  # As Llama 3's tokenizer.json: plain encoding adds BOS, so a template that writes
  # bos_token itself must be encoded without special tokens added.
  bos = '<|begin_of_text|>'
  tok.post_processor = processors.TemplateProcessing(
      single=f'{bos} $A', special_tokens=[(bos, tok.token_to_id(bos))])
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
                                                (CHATML_TEMPLATE, False)],
                         ids=['llama3_in_tokenizer_config', 'chatml_in_jinja_file'])
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
  text = 'How do I sort?'
  assert reference(text)['input_ids'][0] == ours.tokenizer.bos_id
  assert ours.tokenizer.encode(text) == reference(text, add_special_tokens=False)['input_ids']
  assert ours.tokenizer.decode(ours.tokenizer.encode(text)) == text
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


# --- the SFT pipeline and task ------------------------------------------------------------

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import sft as sft_config  # noqa: E402
from data import sft_examples, sft_pipeline, sources, stdlib_functions  # noqa: E402
from train import trainer  # noqa: E402
from train.state import TrainState  # noqa: E402
from train.tasks.sft import SFTTask  # noqa: E402


def tiny_config(**data) -> ml_collections.ConfigDict:
  c = sft_config.get_config()
  c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2)
  c.data.tokenizer.kind = 'byte'
  c.data.update({'seq_len': 32, **data})
  return c


class Jitted:
  """A task's logits and loss, jitted (eager dispatch is slow on a busy CPU)."""

  def __init__(self, task):
    self.task = task
    self._logits = jax.jit(task._logits)
    self._loss = jax.jit(task._loss)
    self.eval_step = jax.jit(task.eval_step)


@pytest.fixture(scope='module')
def task_and_params():
  """A fresh tiny SFT model over bytes (no data read)."""
  task = SFTTask(tiny_config())
  task._set_tokenizer(tokenizers.ByteTokenizer())
  return Jitted(task), jax.jit(task.init_state)(jax.random.key(0)).params


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_masked_loss_equals_numpy_masked_nll(task_and_params):
  task, params = task_and_params
  rng = np.random.default_rng(0)
  b, length = 2, 32
  batch = {'inputs': rng.integers(0, 257, (b, length), dtype=np.int32),
           'targets': rng.integers(0, 257, (b, length), dtype=np.int32),
           'segment_ids': np.ones((b, length), np.int32),
           'positions': np.tile(np.arange(length, dtype=np.int32), (b, 1)),
           'weights': (rng.random((b, length)) < 0.3).astype(np.float32)}
  loss, aux = task._loss(params, batch, None)
  logp = _log_softmax(np.asarray(task._logits(params, batch), np.float64))
  nll = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  want = (nll * batch['weights']).sum() / batch['weights'].sum()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  one_hot = dict(batch, weights=np.zeros((b, length), np.float32))
  one_hot['weights'][1, 7] = 1.0  # the loss is that one token's NLL, not a mean over all
  np.testing.assert_allclose(float(task._loss(params, one_hot, None)[0]), nll[1, 7], rtol=1e-5)
  assert abs(nll[1, 7] - nll.mean()) > 1e-2
  state = TrainState(step=np.int32(0), params=params, opt_state={}, rng=np.uint32(0), extras={})
  sums = task.eval_step(state, batch, {})
  np.testing.assert_allclose(float(sums['nll_sum']) / float(sums['tokens']), want, rtol=1e-5)


def test_packed_with_segments_equals_unpacked(task_and_params):
  task, params = task_and_params
  examples = [(list(range(10, 19)), [0, 0, 0, 1, 1, 1, 1, 1, 1]),
              (list(range(40, 46)), [0, 0, 1, 1, 1, 1]),
              (list(range(70, 81)), [0] * 4 + [1] * 7)]
  packed = sft_pipeline.pack(examples, 32)
  assert packed['inputs'].shape == (1, 32)
  np.testing.assert_array_equal(packed['segment_ids'][0, :26], [1] * 8 + [2] * 5 + [3] * 10
                                + [0] * 3)
  np.testing.assert_array_equal(packed['positions'][0, 8:13], np.arange(5))
  logits_packed = np.asarray(task._logits(params, packed))[0]
  nll_sum, count, start = 0.0, 0.0, 0
  for example in examples:
    alone = sft_pipeline.pack([example], 32, packed=False)
    n = len(example[0]) - 1
    logits = np.asarray(task._logits(params, alone))[0, :n]
    np.testing.assert_allclose(logits_packed[start:start + n], logits, atol=2e-5)
    loss, _ = task._loss(params, alone, None)
    nll_sum += float(loss) * alone['weights'].sum()
    count += alone['weights'].sum()
    start += n
  loss, _ = task._loss(params, packed, None)
  np.testing.assert_allclose(float(loss), nll_sum / count, rtol=1e-5)
  unpacked = sft_pipeline.pack(examples, 32, packed=False)
  assert unpacked['inputs'].shape == (3, 32)


def test_bad_rows_are_counted_and_skipped(tmp_path):
  rows = [
      {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]},
      {'prompt': 'p', 'completion': 'c'},
      {'prompt': [{'role': 'user', 'content': 'q'}],
       'completion': [{'role': 'assistant', 'content': 'a'}]},
      '{"messages": [',  # malformed
      {'messages': [{'content': 'no role'}, {'role': 'assistant', 'content': 'x'}]},
      {'messages': [{'role': 'user', 'content': 'alone'}]},
      {'prompt': 'p', 'completion': ''},
      {'text': 'neither'},
      [1, 2],
      {'prompt': 'x' * 100, 'completion': 'c'},  # over-long prompt for seq_len 32
      {'prompt': 'p', 'completion': 'y' * 100},  # truncated
  ]
  path = tmp_path / 'rows.jsonl'
  path.write_text('\n'.join(r if isinstance(r, str) else json.dumps(r) for r in rows) + '\n\n')
  cfg = tiny_config(source='jsonl', path=str(path), val_path=str(path)).data
  counts = sft_examples.RowCounts()
  examples = list(sft_examples.read_examples(cfg, 'train', counts))
  assert counts['read'] == len(rows) and len(examples) == 5
  assert counts['malformed JSON lines'] == 1
  assert counts['messages without a role'] == 1
  assert counts['chats without an assistant turn'] == 1
  assert counts['empty completions'] == 1
  assert counts['rows that are not JSON objects'] == 1
  assert counts["rows with neither 'messages' nor 'prompt' and 'completion'"] == 1
  tok = tokenizers.ByteTokenizer()
  template = chat.ChatTemplate(chat.DEFAULT_TEMPLATE, tok, chat.default_context(tok))
  results = [sft_pipeline.encode_example(e, template, 32, 'completion') for e in examples]
  assert [p for _, p in results].count(
      'prompts too long for data.seq_len (no completion token fits)') == 1
  (ids, weights, truncated), _ = results[1]  # prompt 'p', completion 'c'
  assert ids == [256, ord('p'), ord('c'), 256] and weights == [0, 0, 1, 1] and not truncated
  (ids, weights, truncated), _ = results[-1]
  assert truncated and len(ids) == 33 and sum(weights) == 31
  all_tokens = sft_pipeline.encode_example(examples[1], template, 32, 'all')[0]
  assert all_tokens[1] == [1, 1, 1, 1]
  counts['kept'], counts['truncated'] = 4, 1
  summary = counts.summary('train')
  assert summary.startswith('SFT data, train split: 4 of 11 rows kept; skipped: 1 ')
  assert '1 examples truncated' in summary


def test_stdlib_demo_is_split_by_module():
  source = ('class A:\n    def f(self, x):\n        """Twice x."""\n        y = 2 * x\n'
            '        return y\n\n    def g(self):\n        """Only a docstring."""\n\n'
            'def h():\n    "doc"; return 1\n')
  (example,) = stdlib_functions.function_examples(source)
  assert example == {'prompt': 'def f(self, x):\n    """Twice x."""\n',
                     'completion': '    y = 2 * x\n    return y\n', 'name': 'f'}
  modules = sources.stdlib_modules()[:60]
  split = {s: {e['module'] for e in stdlib_functions.stdlib_examples(s, 0.2, modules)}
           for s in ('train', 'validation')}
  assert split['train'] and split['validation'] and not split['train'] & split['validation']
  assert all(sources.held_out(m, 0.2) for m in split['validation'])
  assert not any(sources.held_out(m, 0.2) for m in split['train'])


def _write_sft_data(path):
  """Rules a tiny model learns in a few dozen steps: reply with the prompt's letters in
  upper case, as chats and as prompt/completion rows."""
  rng = np.random.default_rng(0)
  lines = []
  for i in range(400):
    word = ''.join(rng.choice(list('abcdef'), 4))
    if i % 2:
      lines.append({'messages': [{'role': 'user', 'content': word},
                                 {'role': 'assistant', 'content': word.upper()}]})
    else:
      lines.append({'prompt': word + '=', 'completion': word.upper()})
  path.write_text(''.join(json.dumps(r) + '\n' for r in lines))


def test_sft_run_lowers_held_out_completion_loss(tmp_path):
  _write_sft_data(tmp_path / 'data.jsonl')
  config = tiny_config(source='jsonl', path=str(tmp_path / 'data.jsonl'), seq_len=64)
  config.update(steps=1, batch_size=8, eval_every=1, eval_steps=2, log_every=1)
  config.checkpoint.update(every=1000, async_save=False)
  config.optimizer.update(lr=1e-2, warmup_steps=1, end_lr=1e-3)
  config.sample.max_new_tokens = 4
  workdir = str(tmp_path / 'run')
  before = trainer.train_and_evaluate(config, workdir).eval['eval/loss']
  config.steps = 40
  result = trainer.train_and_evaluate(config, workdir)  # resumes at step 1
  assert min(result.losses) == 2
  assert result.eval['eval/loss'] < 0.6 * before, (before, result.eval)  # 5.89 -> 1.55
  assert 'samples/text' in result.samples


def test_init_from_an_hf_import_uses_its_tokenizer_and_chat_template(tmp_path):
  """An import without a Kiln tokenizer (as GPT-2's or Llama 3's): the SFT run copies its
  HF tokenizer and trains on transformers' chat-template ids, masked to the replies."""
  from transformers import AutoTokenizer

  init = tmp_path / 'import'
  hf_dir = _hf_dir(init / 'tokenizer' / 'hf', LLAMA3_TEMPLATE, True)
  model = dict(tiny_config().model.to_dict(), vocab_size=512)
  (init / 'config.json').write_text(json.dumps({'task': 'lm', 'model': model}))
  rows = [[{'role': 'user', 'content': f'What is {i} + 2?'},
           {'role': 'assistant', 'content': f'{i + 2}'}] for i in range(16)]
  (tmp_path / 'chats.jsonl').write_text(''.join(json.dumps({'messages': m}) + '\n' for m in rows))
  config = tiny_config(source='jsonl', path=str(tmp_path / 'chats.jsonl'),
                       val_path=str(tmp_path / 'chats.jsonl'))
  config.update(init_from=str(init), batch_size=8, eval_steps=1)
  task = SFTTask(config)
  task.setup_data(str(tmp_path / 'run'), 0, 1)
  assert isinstance(task.tokenizer, tokenizers.HFTokenizer)
  assert task.model_cfg.vocab_size == 512
  assert (tmp_path / 'run' / 'tokenizer' / 'hf' / 'tokenizer.json').exists()
  batch = next(task.eval_batches())
  want = list(AutoTokenizer.from_pretrained(str(hf_dir)).apply_chat_template(
      rows[0], tokenize=True, return_dict=False))
  n = len(want) - 1
  assert list(batch['inputs'][0, :n]) == want[:-1] and list(batch['targets'][0, :n]) == want[1:]
  assert list(batch['segment_ids'][0, :n]) == [1] * n and batch['positions'][0, n - 1] == n - 1
  reply = [t for t, w in zip(batch['targets'][0, :n], batch['weights'][0, :n], strict=True) if w]
  assert task.tokenizer._tok.decode(reply, skip_special_tokens=False) == '2<|eot_id|>'
