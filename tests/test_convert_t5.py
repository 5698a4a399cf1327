"""HF T5 in and out of Kiln's seq2seq family (train/convert_t5.py, through train/convert.py):
small random T5ForConditionalGeneration models built offline, in T5 v1.0's shape (ReLU MLP,
head tied to the embedding and scaled) and v1.1's (gated GELU, untied unscaled head, a
deeper decoder than encoder).

Oracles: transformers' forward pass and greedy `generate` (import parity, with padded
inputs), the HF checkpoint's own tensors (export round trip), and SentencePiece (the
tokenizer carried through).
"""

import functools
import io
import json
import pathlib

import jax
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file
from test_convert import randomized

from data import tokenizers
from data.errors import ConfigError, DataError
from model import seq2seq
from train import convert, convert_t5

EXTRA_IDS = 28  # 100 pieces + 28 sentinels = 128 rows (the v1.0 model's vocabulary)
VARIANTS = {
    'v1_0': dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                 feed_forward_proj='relu', tie_word_embeddings=True,
                 relative_attention_num_buckets=8, relative_attention_max_distance=12),
    'v1_1': dict(vocab_size=256, d_model=48, d_kv=8, d_ff=64, num_layers=2,
                 num_decoder_layers=3, num_heads=6, feed_forward_proj='gated-gelu',
                 tie_word_embeddings=False),
}
B, S, T = 2, 20, 10  # S > 16: the inputs reach T5's logarithmic buckets
TEXT = pathlib.Path(json.__file__).read_text()


def _hf_model(variant: str):
  torch.manual_seed(0)
  config = transformers.T5Config(**VARIANTS[variant], decoder_start_token_id=0, eos_token_id=1,
                                 pad_token_id=0, dropout_rate=0.0)
  model = randomized(transformers.T5ForConditionalGeneration(config))
  if variant == 'v1_1':  # transformers 5 ties the head at init; v1.1's has its own weights
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.3)
  return model


def _spiece() -> bytes:
  """A SentencePiece model with T5's ids (pad 0, EOS 1, unknown 2, no BOS)."""
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXT.splitlines()), model_writer=writer, vocab_size=128 - EXTRA_IDS,
      model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  return writer.getvalue()


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """variant -> (HF model, HF dir, Kiln workdir). v1.1 is loaded into a 2 x 2 (fsdp x tensor)
  mesh, so its parity checks sharded loading; v1.0 carries a SentencePiece tokenizer."""
  out = {}
  for variant in VARIANTS:
    root = tmp_path_factory.mktemp(variant)
    model = _hf_model(variant)
    model.save_pretrained(root / 'hf')
    if variant == 'v1_0':
      (root / 'hf' / 'spiece.model').write_bytes(_spiece())
      (root / 'hf' / 'tokenizer_config.json').write_text(json.dumps(
          {'tokenizer_class': 'T5Tokenizer', 'extra_ids': EXTRA_IDS, 'eos_token': '</s>'}))
    sharded = variant == 'v1_1'
    convert.import_hf(str(root / 'hf'), str(root / 'kiln'), dtype='float32',
                      fsdp=2 if sharded else 1, tensor=2 if sharded else 1)
    out[variant] = (model, root / 'hf', root / 'kiln')
  return out


@functools.partial(jax.jit, static_argnums=0)
def _kiln_logits(graphdef, params, inputs, mask, decoder_inputs):
  return nnx.merge(graphdef, params)(inputs, mask, decoder_inputs)


def _inputs(vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, vocab, (B, S)).astype(np.int32)
  mask = np.arange(S)[None] < np.array([[S], [13]])  # row 1 padded after 13 tokens
  inputs = np.where(mask, inputs, 0).astype(np.int32)
  return inputs, mask, rng.integers(2, vocab, (B, T)).astype(np.int32)


@pytest.mark.parametrize('variant', VARIANTS)
def test_import_logits_match_transformers(imported, variant):
  """The logits of padded inputs, both variants (v1.1's import is sharded 2 x 2)."""
  model, _, workdir = imported[variant]
  cfg, params, step = convert_t5.load_run(str(workdir))
  assert step == 0 and cfg.tie_embeddings == (variant == 'v1_0')
  assert cfg.decoder_layers == VARIANTS[variant].get('num_decoder_layers', 2)
  inputs, mask, dec = _inputs(cfg.vocab_size)
  ours = np.asarray(_kiln_logits(seq2seq.graphdef(cfg), params, inputs, mask, dec))
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(mask.astype(int)),
                   decoder_input_ids=torch.tensor(dec)).logits.numpy()
  scale = float(np.abs(theirs).max())
  assert scale > 1.0  # not a vacuous comparison of near-zero logits
  np.testing.assert_array_less(np.abs(ours - theirs).max(), 1e-4 * scale)


def test_cached_greedy_generation_matches_transformers(imported):
  """Kiln's cached greedy decoding of the imported v1.1 model (its decoder deeper than its
  encoder) gives transformers' greedy `generate` tokens, padded inputs included."""
  model, _, workdir = imported['v1_1']
  cfg, params, _ = convert_t5.load_run(str(workdir))
  inputs, mask, _ = _inputs(cfg.vocab_size)
  steps = 8
  # Without HF's cache: its DynamicCache is sized by the encoder's layer count (num_layers),
  # which breaks a deeper decoder (transformers 5.24).
  with torch.no_grad():
    want = model.generate(input_ids=torch.tensor(inputs),
                          attention_mask=torch.tensor(mask.astype(int)), max_new_tokens=steps,
                          do_sample=False, num_beams=1, use_cache=False)[:, 1:].numpy()
  got = np.asarray(seq2seq.generate((seq2seq.graphdef(cfg), params), inputs, mask,
                                    max_new_tokens=steps, eos_id=1))
  n = want.shape[1]  # HF stops when every row has its eos
  np.testing.assert_array_equal(got[:, :n], want)
  assert (got[:, n:] == 0).all() and (n == steps or (want == 1).any(axis=1).all())


def _export(workdir, out) -> dict:
  """Exports the run in ~20 KB shards; returns the written tensors."""
  convert.export_hf(str(workdir), str(out), max_shard_gb=20e3 / 2**30)
  assert (out / 'model.safetensors.index.json').exists()
  written = {}
  for file in out.glob('*.safetensors'):
    written.update(load_file(file))
  return written


@pytest.mark.parametrize('variant', VARIANTS)
def test_export_is_the_hf_checkpoint_and_loads_in_transformers(imported, variant, tmp_path):
  """HF -> Kiln -> HF gives the original tensors bitwise (the tied copies aside), which
  transformers loads with no missing or unexpected keys and the original's logits."""
  model, hf_dir, workdir = imported[variant]
  out = tmp_path / 'hf_out'
  written = _export(workdir, out)
  original = load_file(hf_dir / 'model.safetensors')
  assert ('lm_head.weight' in written) == (variant == 'v1_1')  # v1.0's head is the embedding
  assert set(written) == set(original) - set(convert_t5.IGNORED)
  for name, value in written.items():
    np.testing.assert_array_equal(value, original[name], err_msg=name)

  reloaded, info = transformers.T5ForConditionalGeneration.from_pretrained(
      out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  inputs, mask, dec = _inputs(model.config.vocab_size, seed=1)
  args = dict(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(mask.astype(int)),
              decoder_input_ids=torch.tensor(dec))
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded.eval()(**args).logits.numpy(),
                                  model(**args).logits.numpy())


def test_kiln_to_hf_to_kiln_is_bitwise_with_the_tokenizer(imported, tmp_path):
  """Kiln -> HF -> Kiln gives the same parameters; the SentencePiece model and its sentinel
  count travel both ways."""
  _, hf_dir, workdir = imported['v1_0']
  out = tmp_path / 'hf_out'
  _export(workdir, out)
  again = tmp_path / 'kiln_again'
  convert.import_hf(str(out), str(again), dtype='float32')
  _, first, _ = convert_t5.load_run(str(workdir))
  _, second, _ = convert_t5.load_run(str(again))
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
    np.testing.assert_array_equal(a, b)
  assert (out / 'spiece.model').read_bytes() == (hf_dir / 'spiece.model').read_bytes()
  assert json.loads((out / 'tokenizer_config.json').read_text())['extra_ids'] == EXTRA_IDS
  assert (again / 'tokenizer' / tokenizers.META_FILE).read_bytes() == (
      workdir / 'tokenizer' / tokenizers.META_FILE).read_bytes()


def test_imported_tokenizer_is_the_sentencepiece_with_t5_sentinels(imported):
  _, hf_dir, workdir = imported['v1_0']
  meta = json.loads((workdir / 'tokenizer' / tokenizers.META_FILE).read_text())['config']
  assert (meta['kind'], meta['vocab_size'], meta['extra_ids']) == (
      'sentencepiece', 128 - EXTRA_IDS, EXTRA_IDS)
  config = json.loads((workdir / 'config.json').read_text())
  assert config['task'] == 'seq2seq' and config['model']['mlp'] == 'relu'
  sp = spm.SentencePieceProcessor(model_proto=(hf_dir / 'spiece.model').read_bytes())
  text = TEXT[:300]
  assert tokenizers.load_tokenizer(str(workdir)).encode(text) == sp.encode(text)


def test_unsupported_or_inconsistent_checkpoints_are_clear_errors(imported, tmp_path):
  with pytest.raises(ConfigError, match='feed_forward_proj'):
    convert_t5.model_keys_from_hf(dict(VARIANTS['v1_0'], feed_forward_proj='gated-swish'))
  _, hf_dir, _ = imported['v1_1']
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'config.json').write_text((hf_dir / 'config.json').read_text())
  tensors = load_file(hf_dir / 'model.safetensors')
  del tensors['decoder.block.2.layer.1.EncDecAttention.k.weight']
  from safetensors.numpy import save_file
  save_file(tensors, broken / 'model.safetensors')
  with pytest.raises(DataError, match=r'lacks 1 tensor.*decoder\.block\.2\.layer\.1'):
    convert.import_hf(str(broken), str(tmp_path / 'kiln'), dtype='float32')
  rope = seq2seq.Seq2SeqConfig(vocab_size=128, d_model=32, num_heads=4, head_dim=8,
                               mlp_dim=48, encoder_layers=1, decoder_layers=1, position='rope')
  with pytest.raises(ConfigError, match="position='relative'"):
    convert_t5.hf_config(rope, 'float32', None)
