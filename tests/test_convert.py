"""train/convert.py against transformers: small random HF models built offline.

Oracles: HF's own forward pass and greedy generation (import parity), the
imported parameters themselves (round trip, sharded vs one-device import), the
Kiln model's logits (trained export), Kiln's tokenizer (exported tokenizer) and
a run's own evaluation (init_from).
"""

import functools
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

# The hf extra, part of the test extra: a broken install fails here instead of skipping.
import safetensors.torch as safetensors_torch
import torch
import transformers

from configs import lm
from data import tokenizers
from data.errors import ConfigError, DataError
from model import decode, sampling
from train import convert, trainer

VOCAB = 96
SP_VOCAB = 384
REPO = pathlib.Path(__file__).resolve().parents[1]


def _corpus() -> str:
  return ''.join(pathlib.Path(m.__file__).read_text() for m in (textwrap, json.decoder))[:40_000]


def _sentencepiece(vocab_size: int) -> bytes:
  spec = ml_collections.ConfigDict(dict(vocab_size=vocab_size, model_type='bpe',
                                        train_chars=100_000))
  return tokenizers.train_sentencepiece(spec, lambda: [_corpus()])


def _hf_model(kind: str):
  torch.manual_seed(0)
  common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64)
  if kind == 'llama_gqa_untied':
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **common, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500_000.0))
  elif kind == 'llama_tied_bias':  # with a SentencePiece tokenizer of SP_VOCAB pieces
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **dict(common, vocab_size=SP_VOCAB), num_key_value_heads=4, tie_word_embeddings=True,
        attention_bias=True, rope_theta=20_000.0, bos_token_id=1, eos_token_id=2))
  elif kind == 'mistral':  # Llama's layout under another name; no sliding window
    model = transformers.MistralForCausalLM(transformers.MistralConfig(
        **common, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None,
        rope_theta=1_000_000.0))
  elif kind == 'qwen2':
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **common, num_key_value_heads=2, tie_word_embeddings=False))
  else:
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=1))
  return randomized(model)


def randomized(model):
  """`model` in eval mode with weights ~ N(0, 0.3) and norm scales ~ N(1, 0.3): larger than
  HF's init, so that logits, argmaxes and MoE routes are distinct."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      is_norm_scale = param.ndim == 1 and ('norm' in name or 'ln_' in name) and 'bias' not in name
      param.normal_(1.0 if is_norm_scale else 0.0, 0.3)
  return model.eval()


def assert_greedy_matches_generate(model, task, params, new_tokens: int = 20) -> None:
  """Greedy decoding with the KV cache (model/decode.py) equals transformers' generate."""
  prompt = _tokens((1, 5), seed=2)
  with torch.no_grad():
    want = model.generate(torch.tensor(prompt), max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)[0, 5:].numpy()
  out = _greedy(task.graphdef, params, prompt, np.array([5], np.int32))
  assert list(np.asarray(out.tokens[0])) == list(want)


KINDS = ('llama_gqa_untied', 'llama_tied_bias', 'qwen2', 'gpt2')  # imported and exported
IMPORTED = (*KINDS, 'mistral')  # exported as Llama, the family that expresses it


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """kind -> (HF model, HF dir, Kiln workdir). The untied Llama is saved in shards and
  loaded into an FSDP x tensor-parallel mesh, so its parity test checks sharded loading."""
  out = {}
  for kind in IMPORTED:
    root = tmp_path_factory.mktemp(kind)
    model = _hf_model(kind)
    sharded = kind == 'llama_gqa_untied'
    model.save_pretrained(root / 'hf', max_shard_size='20KB' if sharded else '5GB')
    if kind == 'llama_tied_bias':
      (root / 'hf' / 'tokenizer.model').write_bytes(_sentencepiece(SP_VOCAB))
    convert.import_hf(str(root / 'hf'), str(root / 'kiln'), dtype='float32',
                      fsdp=2 if sharded else 1, tensor=2 if sharded else 1,
                      seq_len=32 if kind == 'llama_tied_bias' else 0)
    out[kind] = (model, root / 'hf', root / 'kiln')
  assert (out['llama_gqa_untied'][1] / 'model.safetensors.index.json').exists()
  return out


_JITTED = {}


def _kiln_logits(task, params, tokens_BxL):
  b, length = tokens_BxL.shape
  batch = {'inputs': tokens_BxL, 'positions': np.broadcast_to(np.arange(length), (b, length)),
           'segment_ids': np.ones((b, length), np.int32)}
  if id(task) not in _JITTED:
    _JITTED[id(task)] = (task, jax.jit(task._logits))
  return np.asarray(_JITTED[id(task)][1](params, batch))


def _hf_logits(model, tokens_BxL):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens_BxL))).logits.numpy()


def _tokens(shape, seed=0, vocab=VOCAB):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _assert_logits_close(ours, theirs):
  scale = float(np.abs(theirs).max())
  assert scale > 1.0  # not a vacuous comparison of near-zero logits
  assert ours.shape == theirs.shape
  np.testing.assert_array_less(np.abs(ours - theirs).max(), 1e-4 * scale)


@pytest.mark.parametrize('kind', IMPORTED)
def test_import_logits_and_greedy_match_hf(imported, kind):
  model, _, workdir = imported[kind]
  task, state, step = convert.load_run(str(workdir))
  assert step == 0
  if kind == 'llama_gqa_untied':  # loaded and restored into 2 x 2 x 2 shards
    assert (task.config.mesh.fsdp, task.config.mesh.tensor) == (2, 2)
    wq = state.params['blocks']['attn']['wq']  # [N, D, H, Dh]: D over fsdp, H over tensor
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)
  tokens = _tokens((2, 24), seed=1)
  _assert_logits_close(_kiln_logits(task, state.params, tokens), _hf_logits(model, tokens))

  assert_greedy_matches_generate(model, task, state.params)


@functools.partial(jax.jit, static_argnums=0)
def _greedy(graphdef, params, prompt, length):
  return decode.generate(graphdef, params, prompt, length, max_new_tokens=20,
                         sampling_params=sampling.SamplingParams.make(1, temperature=0.0),
                         seeds_B=np.zeros(1, np.int32), page_size=8)


@pytest.mark.parametrize('kind', KINDS)
def test_import_export_import_is_bitwise(imported, kind, tmp_path):
  model, _, workdir = imported[kind]
  hf_out = tmp_path / 'hf_out'
  convert.export_hf(str(workdir), str(hf_out), max_shard_gb=20e3 / 2**30)  # ~20 KB shards
  assert (hf_out / 'model.safetensors.index.json').exists()
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      hf_out, output_loading_info=True)
  assert type(reloaded) is type(model)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  if kind == 'llama_tied_bias':  # the imported tokenizer and max length come back out
    original = json.loads((imported[kind][1] / 'config.json').read_text())
    written = json.loads((hf_out / 'config.json').read_text())
    assert written['max_position_embeddings'] == original['max_position_embeddings'] == 64
    task, _, _ = convert.load_run(str(workdir))
    assert task.config.data.seq_len == 32 and task.tokenizer.vocab_size == SP_VOCAB
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_out)
    text = _corpus()[:500]
    assert hf_tok(text)['input_ids'] == [1] + task.tokenizer.encode(text)
  again = tmp_path / 'kiln_again'
  convert.import_hf(str(hf_out), str(again), dtype='float32')
  _, first, _ = convert.load_run(str(workdir))
  _, second, _ = convert.load_run(str(again))
  for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- a Kiln-trained model out to transformers ------------------------------------------


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A small Llama-style Kiln run with a SentencePiece tokenizer, trained until its logits
  and loss are far from those at init."""
  root = tmp_path_factory.mktemp('trained')
  corpus = root / 'input.txt'
  corpus.write_text(_corpus())
  config = _small_config(corpus)
  result = trainer.train_and_evaluate(config, str(root / 'run'))
  return config, root / 'run', result


def _small_config(corpus, **overrides) -> ml_collections.ConfigDict:
  c = lm.get_config('tiny')
  c.update(steps=12, batch_size=8, log_every=1, eval_every=12, eval_steps=2)
  c.sample.update(max_new_tokens=2)
  c.checkpoint.update(every=1000, async_save=False)
  c.data.update(source='text', path=str(corpus), seq_len=32)
  c.data.tokenizer.update(vocab_size=512, train_chars=100_000)
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, dtype='float32',
                 tie_embeddings=False)
  # decay_steps fixed: a one-step run from the same config compiles the same step.
  c.optimizer.update(lr=3e-2, warmup_steps=1, decay_steps=12)
  c.update_from_flattened_dict(overrides)
  return c


def test_trained_export_matches_in_transformers(trained, tmp_path, caplog):
  _, run, _ = trained
  out = tmp_path / 'hf'
  convert.export_hf(str(run), str(out))
  task, state, _ = convert.load_run(str(run))
  transformers.logging.enable_propagation()
  try:
    with caplog.at_level(logging.WARNING):
      model, info = transformers.AutoModelForCausalLM.from_pretrained(
          out, output_loading_info=True)
  finally:
    transformers.logging.disable_propagation()
  assert isinstance(model, transformers.LlamaForCausalLM)
  assert not any(info.values()), info
  assert not [r for r in caplog.records if 'missing' in r.getMessage().lower()
              or 'unexpected' in r.getMessage().lower()]
  tokens = _tokens((2, 32), seed=3, vocab=task.tokenizer.vocab_size)
  _assert_logits_close(_kiln_logits(task, state.params, tokens),
                       _hf_logits(model.eval(), tokens))

  # The tokenizer: same ids as Kiln's, BOS first by default, as in Kiln's training data.
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  texts = ('def f(x):\n    return x  # 42\n', '  spaces\tand tabs\n\n', 'h\u00e9llo \U0001f642')
  for text in texts:
    ids = task.tokenizer.encode(text)
    assert hf_tok(text, add_special_tokens=False)['input_ids'] == ids
    assert hf_tok(text)['input_ids'] == [task.tokenizer.bos_id] + ids
    assert hf_tok.decode(ids) == task.tokenizer.decode(ids)


def test_init_from_starts_from_the_run_params(trained, tmp_path):
  config, run, result = trained
  trained_loss = result.eval['eval/loss']
  assert trained_loss < np.log(512) - 0.5  # the run learnt something a fresh start lacks
  # This config's other model size and tokenizer are replaced by the run's. The first
  # step's learning rate is 0 (warmup), so after it the parameters are still the run's
  # and the same evaluation gives the run's loss (same eval batches: the tokenizer is
  # the run's, copied).
  c = _small_config(config.data.path, **{
      'init_from': str(run), 'steps': 1, 'eval_every': 1, 'model.d_model': 64,
      'data.tokenizer.vocab_size': 700})
  started = trainer.train_and_evaluate(c, str(tmp_path / 'new'))
  assert started.train['train/lr'] == 0.0
  np.testing.assert_allclose(started.eval['eval/loss'], trained_loss, rtol=1e-6)
  written = json.loads((tmp_path / 'new' / 'config.json').read_text())
  assert written['model']['d_model'] == 32 and written['data']['tokenizer']['vocab_size'] == 512
  assert written['init_from'] == str(run)


# --- errors and interruptions ------------------------------------------------------------


def _save(model, directory, drop=None, config_edit=None, to_int=None):
  model.save_pretrained(directory)
  if drop or to_int:
    path = directory / 'model.safetensors'
    tensors = safetensors_torch.load_file(path)
    if drop:
      del tensors[drop]
    if to_int:
      tensors[to_int] = tensors[to_int].to(torch.int32)
    safetensors_torch.save_file(tensors, path, metadata={'format': 'pt'})
  if config_edit:
    cfg = json.loads((directory / 'config.json').read_text())
    config_edit(cfg)
    (directory / 'config.json').write_text(json.dumps(cfg))


@pytest.mark.parametrize('case, error, message', [
    ('missing', DataError, r'lacks 1 tensor.*model\.layers\.1\.self_attn\.k_proj\.weight'),
    ('shape', DataError, r'model\.layers\.0\.mlp\.gate_proj\.weight has shape \(48, 32\); '
     r'config.json implies \(64, 32\)'),
    ('unexpected', DataError, r'does not explain: .*model\.layers\.0\.self_attn\.q_proj\.bias'),
    ('dtype', DataError, r'model\.norm\.weight has dtype I32; expected one of F32, F16, BF16'),
    ('model_type', ConfigError, r"model_type='falcon'.*llama, mistral, qwen2, gpt2"),
    ('rope', ConfigError, r"rope type 'dynamic'"),
    ('window', ConfigError, r'sliding-window attention on 1 of 2 layers'),
])
def test_bad_checkpoints_name_the_problem(tmp_path, case, error, message):
  model = _hf_model('llama_gqa_untied')
  edits = {
      'shape': lambda c: c.update(intermediate_size=64),
      'unexpected': lambda c: c.update(attention_bias=False),
      'model_type': lambda c: c.update(model_type='falcon'),
      'rope': lambda c: c.update(rope_parameters={'rope_type': 'dynamic', 'factor': 2.0}),
      'window': lambda c: c.update(model_type='qwen2', use_sliding_window=True,
                                   sliding_window=16, max_window_layers=1),
  }
  if case == 'unexpected':
    model = _hf_model('llama_tied_bias')
  _save(model, tmp_path / 'hf', drop='model.layers.1.self_attn.k_proj.weight'
        if case == 'missing' else None, config_edit=edits.get(case),
        to_int='model.norm.weight' if case == 'dtype' else None)
  with pytest.raises(error, match=message):
    convert.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'kiln'))
  assert not (tmp_path / 'kiln').exists()


def test_interrupted_import_leaves_no_checkpoint(imported, tmp_path, monkeypatch):
  _, hf_dir, _ = imported['gpt2']
  target = tmp_path / 'kiln'
  seen = []
  from train import checkpoint

  original = checkpoint.Checkpointer.save

  def save_then_die(self, step, state, data_iter):
    original(self, step, state, data_iter)
    self.wait()
    seen.append(sorted(os.listdir(self.directory)))
    assert not target.exists()  # while writing, nothing is at the target path
    raise KeyboardInterrupt  # killed after orbax committed its step

  monkeypatch.setattr(checkpoint.Checkpointer, 'save', save_then_die)
  with pytest.raises(KeyboardInterrupt):
    convert.import_hf(str(hf_dir), str(target), dtype='float32')
  assert seen == [['0']]  # orbax had finished its checkpoint...
  assert not target.exists()  # ...but the run directory never appeared
  assert os.listdir(tmp_path) == []  # and the staging directory is gone


# --- the command line ---------------------------------------------------------------------


def test_command_line_import_then_bfloat16_export(imported, tmp_path):
  """`python -m train.convert import` and `export --dtype=bfloat16` as a user runs them: the
  exported tensors are HF's own float32 weights rounded to bfloat16, and transformers loads
  them with no missing or unexpected keys."""
  from safetensors import safe_open

  model, hf_dir, _ = imported['qwen2']
  workdir, out = tmp_path / 'kiln', tmp_path / 'hf_bf16'
  env = {**os.environ, 'JAX_NUM_CPU_DEVICES': '1'}
  base = [sys.executable, '-m', 'train.convert']
  for args in (['import', f'--hf_dir={hf_dir}', f'--workdir={workdir}', '--dtype=float32'],
               ['export', f'--workdir={workdir}', f'--hf_dir={out}', '--dtype=bfloat16']):
    proc = subprocess.run(base + args, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
  want = {n: p.detach().to(torch.bfloat16) for n, p in model.state_dict().items()}
  with safe_open(str(out / 'model.safetensors'), framework='pt') as f:
    names = set(f.keys())
    assert names == set(want), names ^ set(want)
    for name in names:
      got = f.get_tensor(name)
      assert got.dtype == torch.bfloat16, name
      assert torch.equal(got, want[name]), name
  written = json.loads((out / 'config.json').read_text())
  assert written['torch_dtype' if 'torch_dtype' in written else 'dtype'] == 'bfloat16'
  _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  # The run is not overwritten by a second import without --overwrite.
  again = subprocess.run(base + ['import', f'--hf_dir={hf_dir}', f'--workdir={workdir}'],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 2 and '--overwrite' in again.stderr
