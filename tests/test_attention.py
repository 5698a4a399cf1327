"""Tests for model/attention.py's implementations inside the model and the trainer.

Oracles: the jnp reference (kernels/attention_reference.py) and equivalent
paths: the Pallas kernel (interpreted on CPU, per device under a 2x2x2 mesh)
against XLA, down to a few steps of LM training.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import lm
from data.errors import ConfigError
from kernels.attention_reference import attention_reference
from model import attention as attention_lib
from model import transformer
from train import mesh as mesh_lib
from train import trainer

RNG = np.random.default_rng(7)


def _normal(*shape):
  return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def _mesh():
  return jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_xla_matches_the_reference_with_every_mask():
  q, k, v = _normal(2, 20, 4, 8), _normal(2, 20, 2, 8), _normal(2, 20, 2, 8)
  seg = jnp.asarray(np.sort(RNG.integers(0, 3, size=(2, 20)), axis=1))
  for kw in (dict(causal=True, segment_ids_BxL=seg), dict(causal=False, sliding_window=(3, 5)),
             dict(causal=True, sliding_window=4, logit_softcap=2.0)):
    got = attention_lib.attention(q, k, v, implementation='xla', **kw)
    want = attention_reference(q, k, v, **kw)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_xla_gives_zeros_where_a_query_sees_no_key():
  q, k, v = _normal(1, 6, 2, 8), _normal(1, 3, 2, 8), _normal(1, 3, 2, 8)
  got = attention_lib.attention(q, k, v, causal=True, implementation='xla')
  np.testing.assert_array_equal(got[:, :3], 0.0)  # queries 0-2 sit before every key
  np.testing.assert_allclose(got, attention_reference(q, k, v, causal=True)[0], atol=1e-6)


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake) devices')
def test_pallas_under_a_mesh_runs_per_device_and_matches_xla():
  q, k, v, do = _normal(4, 40, 4, 16), _normal(4, 40, 2, 16), _normal(4, 40, 2, 16), None
  do = _normal(4, 40, 4, 16)
  seg = jnp.asarray(np.sort(RNG.integers(0, 3, size=(4, 40)), axis=1))

  def run(implementation):
    def loss(q, k, v):
      out = attention_lib.attention(q, k, v, segment_ids_BxL=seg, causal=True,
                                    implementation=implementation)
      return jnp.sum(out * do), out
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

  with jax.set_mesh(_mesh()):
    jaxpr = str(jax.make_jaxpr(run('pallas'))(q, k, v))
    (dq, dk, dv), out = run('pallas')(q, k, v)
    (dq_x, dk_x, dv_x), out_x = run('xla')(q, k, v)
  assert 'shard_map' in jaxpr and 'pallas_call' in jaxpr
  for got, want in ((out, out_x), (dq, dq_x), (dk, dk_x), (dv, dv_x)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shards_fall_back_to_whole_axes_that_do_not_divide():
  mesh = _mesh()
  assert attention_lib.kernel_shards(mesh, 4, 8, 2) == (('data', 'fsdp'), 'tensor')
  assert attention_lib.kernel_shards(mesh, 1, 8, 2) == (None, 'tensor')  # sampling, batch 1
  assert attention_lib.kernel_shards(mesh, 4, 8, 1) == (('data', 'fsdp'), None)


def test_auto_is_xla_on_cpu_and_cudnn_needs_a_gpu():
  assert attention_lib.resolve('auto', 8192) == 'xla'  # this machine is a CPU
  assert attention_lib.resolve('pallas', 16) == 'pallas'
  cfg = lm.base().model
  cfg.attention = 'cudnn'
  with pytest.raises(ValueError, match="model.attention='cudnn'.*needs an NVIDIA GPU.*runs on cpu"):
    transformer.TransformerConfig.from_config(cfg, vocab_size=100)


# ---------------------------------------------------------------------------
# Training equivalence.
# ---------------------------------------------------------------------------


def _train_config(data_path: str, attention: str):
  c = lm.get_config('tiny')
  c.update(steps=4, batch_size=8, log_every=1, eval_every=0)
  c.checkpoint.update(every=1000, async_save=False)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  # remat: the kernel's custom VJP also runs inside jax.checkpoint, inside the layer scan.
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, dtype='float32', remat='full',
                 attention=attention)
  c.data.update(source='jsonl', path=data_path, seq_len=40, val_fraction=0.2)
  c.data.tokenizer.update(kind='byte')
  c.optimizer.update(warmup_steps=1)
  return c


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake) devices')
def test_training_with_pallas_matches_xla(tmp_path):
  # Short documents, so that every packed row holds several segments.
  path = tmp_path / 'docs.jsonl'
  with open(path, 'w') as f:
    for i in range(400):
      f.write(json.dumps({'text': f'doc {i}: ' + 'ab' * int(RNG.integers(3, 15))}) + '\n')
  losses = {}
  for attention in ('xla', 'pallas'):
    result = trainer.train_and_evaluate(_train_config(str(path), attention),
                                        str(tmp_path / attention))
    losses[attention] = [result.losses[s] for s in sorted(result.losses)]
  assert len(losses['xla']) == 4
  assert losses['xla'][0] > losses['xla'][-1]  # it trains: the comparison is not of constants
  np.testing.assert_allclose(losses['pallas'], losses['xla'], rtol=2e-5)


def test_unknown_attention_is_a_config_error(tmp_path):
  config = _train_config(str(tmp_path / 'none.jsonl'), 'flash')
  with pytest.raises(ConfigError, match="model.attention='flash'.*xla, cudnn, pallas, auto"):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))


def test_batch_specs_name_real_mesh_axes():
  # The kernel's shard_map splits activations as the transformer's rules shard them.
  rules = dict(transformer.LOGICAL_AXIS_RULES)
  assert tuple(rules['batch']) == attention_lib.BATCH_AXES
  assert rules['heads'] == rules['kv_heads'] == attention_lib.HEAD_AXIS
  # ... and as the trainer's mesh and batch sharding do: on the mesh the trainer builds, the
  # kernel splits the batch over the axes the trainer shards batches over, heads over tensor.
  mesh_cfg = lm.base().mesh
  mesh_cfg.update(data=2, fsdp=2, tensor=2)
  mesh = mesh_lib.make_mesh(mesh_cfg)
  assert mesh_lib.batch_sharding(mesh).spec == P(attention_lib.BATCH_AXES)
  assert attention_lib.kernel_shards(mesh, 4, 8, 2) == (attention_lib.BATCH_AXES,
                                                         attention_lib.HEAD_AXIS)
