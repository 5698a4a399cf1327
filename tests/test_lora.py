"""LoRA and QLoRA (model/lora.py, model/quant.py, train/tasks/lm.py).

Oracles: the base model itself (a fresh adapter, B = 0, leaves its logits bitwise as they
were; zeroed adapters likewise), the merged weights in the model without adapters
(equivalent paths), the einsum specs written out by hand, the init run's checkpoint (frozen
parameters bitwise unchanged), orbax's own view of the checkpoint (optimizer state only
for adapters), and transformers running the exported merged checkpoint.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_run import restore
from test_train import small_config, write_corpus

from data.errors import ConfigError
from model import lora, quant, transformer
from train import convert, trainer
from train.tasks.lm import LMTask

CFG = transformer.TransformerConfig(
    vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128,
    tie_embeddings=False, dtype=jnp.dtype('float32'))
LORA = dict(lora_rank=4, lora_alpha=8.0)


def _build(cfg):
  with nnx.use_eager_sharding(False):
    model = transformer.Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def _logits(graphdef, params, tokens):
  return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens))


def _fill(params, base):
  """`params` with every leaf that `base` has taken from it."""
  return {k: _fill(v, base[k]) if isinstance(v, dict) else base.get(k, v)
          for k, v in params.items()}


@pytest.fixture(scope='module')
def base():
  graphdef, params = jax.eval_shape(lambda: _build(CFG))
  params = jax.jit(lambda: _build(CFG)[1])()
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16))
  return graphdef, params, tokens, _logits(graphdef, params, tokens)


def _adapted(cfg, base_params, random_b: bool):
  """(graphdef, params) of `cfg`'s model with `base_params` (stored as `cfg` stores them) and
  its fresh adapters; with `random_b` the Bs are drawn too, so the adapters matter."""
  graphdef, _ = jax.eval_shape(lambda: _build(cfg))
  params = jax.jit(lambda b: _fill(_build(cfg)[1], quant.quantize_params(b, cfg.quant_scheme)))(
      base_params)
  if random_b:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = iter(jax.random.split(jax.random.key(1), len(leaves)))
    params = jax.tree.unflatten(treedef, [
        jax.random.normal(next(keys), x.shape) * 0.05 if p[-1].key.endswith(lora.B) else x
        for p, x in leaves])
  return graphdef, params


def test_adapter_specs_are_written_from_the_projection_spec():
  assert lora.adapter_specs('bld,dhk->blhk') == ('bld,dr->blr', 'blr,rhk->blhk')
  assert lora.adapter_specs('blhk,hkd->bld') == ('blhk,hkr->blr', 'blr,rd->bld')
  assert lora.adapter_specs('blf,fd->bld') == ('blf,fr->blr', 'blr,rd->bld')


@pytest.mark.parametrize('base_quant', ['none', 'nf4'])
def test_fresh_adapters_leave_the_base_logits_bitwise(base, base_quant):
  graphdef, params, tokens, logits = base
  cfg = dataclasses.replace(CFG, quant=base_quant, **LORA)
  lora_graphdef, lora_params = _adapted(cfg, params, random_b=False)
  names = {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(lora_params)[0]}
  assert {t + s for t in lora.TARGETS for s in (lora.A, lora.B)} <= names
  np.testing.assert_array_equal(_logits(lora_graphdef, lora_params, tokens),
                                _base_logits(base, base_quant))


def _base_logits(base, base_quant: str):
  """The logits of the base that LoRA adapts: the float model, or the same model quantized."""
  graphdef, params, tokens, logits = base
  if base_quant == 'none':
    return logits
  cfg = dataclasses.replace(CFG, quant=base_quant)
  q_graphdef, _ = jax.eval_shape(lambda: _build(cfg))
  stored = jax.jit(quant.quantize_params, static_argnums=1)(params, cfg.quant_scheme)
  return _logits(q_graphdef, stored, tokens)


@pytest.mark.parametrize('base_quant', ['none', 'nf4'])
def test_merged_weights_compute_what_the_adapters_compute(base, base_quant):
  graphdef, params, tokens, _ = base
  cfg = dataclasses.replace(CFG, quant=base_quant, lora_targets='wq|wv|w_down', **LORA)
  lora_graphdef, lora_params = _adapted(cfg, params, random_b=True)
  adapted = _logits(lora_graphdef, lora_params, tokens)
  merged = jax.jit(lora.merge_params, static_argnums=(1, 2, 3))(
      lora_params, cfg.lora_scale, cfg.quant_scheme, jnp.float32)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  np.testing.assert_allclose(_logits(graphdef, merged, tokens), adapted, rtol=0, atol=2e-5)
  assert np.max(np.abs(adapted - _logits(graphdef, params, tokens))) > 1e-2  # B matters
  # Zeroed adapters give the base model back.
  np.testing.assert_array_equal(_logits(lora_graphdef, lora.disabled(lora_params), tokens),
                                _base_logits(base, base_quant))


def _model_cfg(**lora_keys):
  from configs import lm
  model = lm.get_config('tiny').model
  model.lora.update(lora_keys)
  return model


@pytest.mark.parametrize('keys, message', [
    (dict(rank=-1), r'model.lora.rank=-1 must be >= 0'),
    (dict(rank=4, alpha=0.0), r'model.lora.alpha=0.0 must be > 0'),
    (dict(rank=4, dropout=1.0), r'model.lora.dropout=1.0 must be in \[0, 1\)'),
    (dict(rank=4, targets='q_proj'), r"model.lora.targets='q_proj' matches no projection"),
    (dict(rank=4, targets='(wq'), r"model.lora.targets='\(wq' is not a valid regular"),
    (dict(rank=4, base_quant='int8'), r"model.lora.base_quant='int8' is not allowed"),
    (dict(base_quant='nf4'), r"model.lora.base_quant='nf4' needs model.lora.rank > 0"),
])
def test_bad_lora_keys_name_the_key(keys, message):
  with pytest.raises(ValueError, match=message):
    transformer.TransformerConfig.from_config(_model_cfg(**keys), 256)


# --- through the trainer ------------------------------------------------------------------


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory)


def _config(corpus, **overrides) -> ml_collections.ConfigDict:
  return small_config(corpus, **{
      'steps': 2, 'model.d_model': 128, 'model.n_kv_heads': 4, 'model.tie_embeddings': False,
      **overrides})


@pytest.fixture(scope='module')
def base_run(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('base') / 'run'
  trainer.train_and_evaluate(_config(corpus), str(workdir))
  return workdir, restore(workdir, 2)['params']


def _flat(tree) -> dict[str, np.ndarray]:
  return {'/'.join(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _moment_names(opt_state) -> set[str]:
  """The parameter names that Adam's state covers (scalars such as counts left out)."""
  return {p[-1].key for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0] if x.ndim}


def test_lora_run_trains_only_the_adapters_and_exports_merged(corpus, base_run, tmp_path):
  base_dir, base_params = base_run
  workdir = tmp_path / 'lora'
  config = _config(corpus, **{'init_from': str(base_dir), 'model.lora.rank': 4,
                              'model.lora.targets': 'wq|wv|w_up', 'optimizer.lr': 3e-2})
  result = trainer.train_and_evaluate(config, str(workdir))
  assert all(np.isfinite(v) for v in result.losses.values())
  state = restore(workdir, 2)
  params, base_flat = _flat(state['params']), _flat(base_params)
  adapters = {n for n in params if n.endswith((lora.A, lora.B))}
  assert adapters == {f'blocks/{m}/{w}{s}' for m, w in (('attn', 'wq'), ('attn', 'wv'),
                                                         ('mlp', 'w_up')) for s in (lora.A, lora.B)}
  for name, x in base_flat.items():  # frozen: bitwise the init run's
    np.testing.assert_array_equal(params[name], x, err_msg=name)
  assert all(np.any(params[n] != 0) for n in adapters if n.endswith(lora.B))  # B trained
  # The checkpoint holds optimizer state for the adapters alone.
  assert _moment_names(state['opt_state']) == {n.split('/')[-1] for n in adapters}

  # Export merges the adapters: transformers computes the LoRA model's logits.
  import transformers
  out = tmp_path / 'hf'
  convert.export_hf(str(workdir), str(out))
  task, restored, _ = convert.load_run(str(workdir))
  tokens = np.random.default_rng(3).integers(0, task.tokenizer.vocab_size, (2, 32))
  batch = {'inputs': tokens, 'positions': np.broadcast_to(np.arange(32), (2, 32)),
           'segment_ids': np.ones_like(tokens)}
  ours = np.asarray(task._logits(restored.params, batch))
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  import torch
  with torch.no_grad():
    theirs = model(torch.tensor(tokens)).logits.numpy()
  vocab = task.tokenizer.vocab_size
  np.testing.assert_allclose(ours[..., :vocab], theirs[..., :vocab], rtol=0, atol=1e-4)
  without = np.asarray(task._logits(lora.disabled(restored.params), batch))
  assert np.max(np.abs(ours - without)) > 1e-2  # the adapters matter well above that tolerance
  # Sampling reads the merged parameters too: greedy picks the LoRA model's argmax.
  prompt = task.tokenizer.decode(list(tokens[0, :8]))
  text = task.generate(task.inference_params(restored), prompt, max_new_tokens=1,
                       temperature=0.0, top_k=0, top_p=1.0, seed=0)
  ids = task.tokenizer.encode(prompt)
  window = {k: v[:1, :len(ids)] for k, v in batch.items()}
  window['inputs'] = np.asarray([ids])
  assert task.tokenizer.encode(text)[-1] == int(np.argmax(
      np.asarray(task._logits(restored.params, window))[0, -1, :vocab]))


def test_qlora_run_keeps_an_nf4_base_through_training_and_resume(corpus, base_run, tmp_path):
  base_dir, base_params = base_run
  workdir = tmp_path / 'qlora'
  overrides = {'init_from': str(base_dir), 'model.lora.rank': 4, 'model.lora.base_quant': 'nf4',
               'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
  trainer.train_and_evaluate(_config(corpus, **overrides), str(workdir))
  state2 = restore(workdir, 2)
  params = _flat(state2['params'])
  for name in ('blocks/attn/wq', 'blocks/mlp/w_down', 'lm_head'):
    assert params[name].dtype == np.uint8, name
    assert params[name + '_scale'].dtype == np.int8, name  # double quantization
  assert params['embedding'].dtype == np.float32
  # The stored base is the init run's weights in NF4: within the NF4 bound of them.
  dequantized = _flat(quant.dequantize_params(state2['params'], quant.Scheme('nf4'), np.float32))
  for name, w in _flat(base_params).items():
    bound = 0.16 * np.max(np.abs(w)) if name.split('/')[-1] in quant.CONTRACTION_AXES else 0
    np.testing.assert_allclose(dequantized[name], w, rtol=0, atol=bound, err_msg=name)
  assert _moment_names(state2['opt_state']) == {
      n.split('/')[-1] for n in params if n.endswith((lora.A, lora.B))}

  # A rerun resumes: the adapters come back from the checkpoint and train on, the base
  # stays bitwise as stored.
  result = trainer.train_and_evaluate(_config(corpus, steps=3, **overrides), str(workdir))
  assert sorted(result.losses) == [3]
  params3 = _flat(restore(workdir, 3)['params'])
  for name, x in params.items():
    if name.endswith(lora.B):
      assert np.any(params3[name] != x), name
    elif not name.endswith(lora.A):
      np.testing.assert_array_equal(params3[name], x, err_msg=name)


def test_lora_with_a_user_freeze_freezes_adapters_too(corpus):
  task = LMTask(_config(corpus, **{'model.lora.rank': 2, 'optimizer.freeze': '.*attn.*'}))
  trainable = {'/'.join(k.key for k in p) for p, keep in
               jax.tree_util.tree_flatten_with_path(task.opt.trainable)[0] if keep}
  assert trainable == {f'blocks/mlp/{w}{s}' for w in ('w_gate', 'w_up', 'w_down')
                       for s in (lora.A, lora.B)}
  with pytest.raises(ConfigError, match='freezes every parameter'):
    LMTask(_config(corpus, **{'model.lora.rank': 2, 'optimizer.freeze': '.*'}))
