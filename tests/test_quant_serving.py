"""Quantized and LoRA serving: `serve.engine.load_engine(workdir, quant=...)` and
`LMTask.set_inference_quant` (the conversion behind `python -m serve --quant` and
`python -m train.sample --quant`).

Oracles: the checkpoint read with orbax directly and converted here by model/quant.py and
model/lora.py (the engine's parameters, bitwise); `model.decode.generate` on those
parameters (the engine's greedy tokens); the float model's log-probs (the quantized
model's stay close, int4 further than int8); the stored bytes in closed form from the
float shapes.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_run import restore
from test_train import small_config, write_corpus

from data.errors import ConfigError
from model import decode, lora, quant, sampling, transformer
from serve import engine as engine_lib
from train import runs, trainer
from train.tasks import get_task

PROMPT_LEN, NEW = 11, 8
ENGINE = dict(max_slots=2, page_size=8, max_seq_len=32, prefill_chunk=16)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory)


def _config(corpus, **overrides):
  return small_config(corpus, **{'steps': 2, 'model.mlp_dim': 128,
                                 'model.tie_embeddings': False, **overrides})


@pytest.fixture(scope='module')
def base_run(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('base') / 'run'
  trainer.train_and_evaluate(_config(corpus), str(workdir))
  return workdir


@pytest.fixture(scope='module')
def lora_run(corpus, base_run, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('lora') / 'run'
  trainer.train_and_evaluate(_config(corpus, **{
      'init_from': str(base_run), 'model.lora.rank': 4, 'optimizer.lr': 3e-2}), str(workdir))
  return workdir


def _task(workdir):
  task = get_task(runs.load_run_config(str(workdir)))
  task.setup_inference(str(workdir))
  return task


def _prompt(vocab: int) -> list[int]:
  return [int(t) for t in np.random.default_rng(0).integers(1, vocab, PROMPT_LEN)]


def _engine_tokens(engine, prompt) -> list[int]:
  stream = engine.submit(engine_lib.Request(tuple(prompt), max_tokens=NEW, temperature=0.0))
  with jax.transfer_guard('disallow'):
    while not engine.idle:
      engine.step()
  return [e.token_id for e in stream.poll()]


def _generate_tokens(graphdef, params, prompt, vocab: int) -> list[int]:
  out = jax.jit(lambda p, x, n: decode.generate(
      graphdef, p, x, n, max_new_tokens=NEW, sampling_params=sampling.SamplingParams.make(
          1, temperature=0.0), seeds_B=jnp.zeros((1,), jnp.int32), vocab_limit=vocab))(
      params, np.asarray([prompt], np.int32), np.asarray([len(prompt)], np.int32))
  return [int(t) for t in np.asarray(out.tokens[0])]


def _logprobs(graphdef, params, prompt, vocab: int) -> np.ndarray:
  tokens = np.asarray([prompt], np.int32)
  lp, _, _ = jax.jit(lambda p: decode.score(graphdef, p, tokens, np.asarray([len(prompt)]),
                                            vocab_limit=vocab))(params)
  return np.asarray(lp[0, 1:])


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _stored_bytes(params: dict, mode: str, block: int = 128) -> int:
  """The closed form: a projection of n float32 weights stores n bytes and a float32 scale
  per output channel (int8), or n / 2 bytes and a float32 scale per group of
  min(block, contraction length) weights (int4); every other leaf stays as it is."""
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name, n = path[-1].key, x.size
    if name not in quant.CONTRACTION_AXES:
      total += x.nbytes
    elif mode == 'int8':
      total += n + 4 * n // math.prod(x.shape[a] for a in quant.CONTRACTION_AXES[name])
    else:
      total += n // 2 + 4 * n // min(block, x.shape[quant.CONTRACTION_AXES[name][-1]])
  return total


@pytest.fixture(scope='module')
def float_reference(base_run):
  task = _task(base_run)
  params = restore(base_run, 2)['params']
  prompt = _prompt(task.tokenizer.vocab_size)
  return task, params, prompt, _logprobs(task.graphdef, params, prompt,
                                         task.tokenizer.vocab_size)


@pytest.mark.parametrize('mode, logprob_atol', [('int8', 0.02), ('int4', 0.1)])
def test_engine_serves_the_model_quantized_at_load(base_run, float_reference, mode,
                                                   logprob_atol):
  task, float_params, prompt, float_lp = float_reference
  vocab = task.tokenizer.vocab_size
  engine, _ = engine_lib.load_engine(str(base_run), quant=mode, **ENGINE)
  want = jax.jit(quant.quantize_params, static_argnums=1)(float_params, quant.Scheme(mode))
  _assert_trees_equal(engine._params, want)

  graphdef = transformer.graphdef(dataclasses.replace(task.model_cfg, quant=mode))
  assert _engine_tokens(engine, prompt) == _generate_tokens(graphdef, want, prompt, vocab)
  # Weight memory in closed form: int8 ~ 1/4 of float32's projections, int4 ~ 1/8.
  assert quant.weight_bytes(engine._params) == _stored_bytes(float_params, mode)
  # The quantized model stays near the float one (int8's error well below int4's).
  err = np.max(np.abs(_logprobs(graphdef, want, prompt, vocab) - float_lp))
  assert 0 < err < logprob_atol, err


def test_engine_without_quant_serves_the_checkpoint_as_it_is(base_run, float_reference):
  engine, _ = engine_lib.load_engine(str(base_run), **ENGINE)
  _assert_trees_equal(engine._params, float_reference[1])


def test_lora_run_serves_its_merged_model(lora_run, float_reference):
  task = _task(lora_run)
  cfg, vocab = task.model_cfg, task.tokenizer.vocab_size
  params = restore(lora_run, 2)['params']
  merged = jax.jit(lora.merge_params, static_argnums=(1, 2, 3))(
      params, cfg.lora_scale, cfg.quant_scheme, cfg.param_dtype)
  base_graphdef = transformer.graphdef(cfg.base())
  _, _, prompt, base_lp = float_reference
  # The adapters matter: the merged model is not the base model.
  assert np.max(np.abs(_logprobs(base_graphdef, merged, prompt, vocab) - base_lp)) > 1e-2

  engine, _ = engine_lib.load_engine(str(lora_run), **ENGINE)
  _assert_trees_equal(engine._params, merged)
  assert _engine_tokens(engine, prompt) == _generate_tokens(base_graphdef, merged, prompt, vocab)
  # Quantized at load, a LoRA run stores its merged weights quantized.
  engine, _ = engine_lib.load_engine(str(lora_run), quant='int8', **ENGINE)
  _assert_trees_equal(engine._params, jax.jit(quant.quantize_params, static_argnums=1)(
      merged, quant.Scheme('int8')))


def test_quantization_that_does_not_fit_is_one_line(base_run):
  task = _task(base_run)
  with pytest.raises(ConfigError, match=r"Cannot quantize this model to 'int4': .*contraction "
                     r'axis of length 64 does not split into blocks of 48'):
    task.set_inference_quant('int4', group=48)
  with pytest.raises(ConfigError, match=r"Cannot quantize this model to 'int3'"):
    task.set_inference_quant('int3')
  assert task.inference_model_cfg == task.model_cfg  # unchanged by a refused request
