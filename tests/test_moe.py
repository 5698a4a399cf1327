"""Mixture of experts (model/moe.py) on 8 fake CPU devices.

Oracles: numpy references of the routing, the balance loss, the z-loss and the capacity
order; the dense computation of the same routing (every expert applied to every token,
weighted by its routing weight, 0 where a token did not pick it); the 46.7B / 12.9B
parameters of Mixtral-8x7B; and one device against an expert-parallel mesh that also
splits fsdp and tensor (the same trainer step, the same batches).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_train import small_config, write_corpus

from configs import lm
from data.errors import ConfigError
from model import decode, moe
from model import transformer as tfm
from train import mesh as mesh_lib
from train import trainer
from train.state import setup_state
from train.tasks.lm import LMTask

# --- numpy references ------------------------------------------------------------------


def np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_route(logits, k, router):
  """(weights, experts) by the definitions: Mixtral's softmax over the top k logits, or
  Qwen2-MoE's top k of the full softmax, unrenormalised."""
  experts = np.argsort(-logits, axis=-1, kind='stable')[:, :k]
  if router == 'topk_softmax':
    return np_softmax(np.take_along_axis(logits, experts, -1)), experts
  return np.take_along_axis(np_softmax(logits), experts, -1), experts


def np_balance(logits, experts):
  t, e = logits.shape
  f = np.array([(experts == i).sum() / t for i in range(e)])
  return e * np.sum(f * np_softmax(logits).mean(0))


def np_keep(experts, e, limit):
  """Assignments in the order of all first choices, then all second choices..., each
  within an expert's first `limit`."""
  t, k = experts.shape
  keep = np.zeros((t, k), bool)
  taken = np.zeros(e, int)
  for j in range(k):
    for i in range(t):
      if taken[experts[i, j]] < limit:
        keep[i, j] = True
        taken[experts[i, j]] += 1
  return keep


def np_swiglu(x, wg, wu, wd):
  g = x @ wg
  return (g / (1 + np.exp(-g)) * (x @ wu)) @ wd


def np_dense_moe(x_TxD, weights, experts, wg, wu, wd, keep=None):
  """Every expert on every token, weighted by the token's routing weight for it."""
  t, k = experts.shape
  out = np.zeros_like(x_TxD)
  keep = np.ones((t, k), bool) if keep is None else keep
  for i in range(wg.shape[0]):
    gate = ((experts == i) & keep) * weights  # [T, k]
    out += gate.sum(1, keepdims=True) * np_swiglu(x_TxD, wg[i], wu[i], wd[i])
  return out


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory)


@pytest.fixture(scope='module')
def logits():
  rng = np.random.default_rng(0)
  return rng.normal(size=(40, 8)).astype(np.float32) * 2.0


@pytest.mark.parametrize('router', moe.ROUTERS)
def test_routing_matches_numpy(logits, router):
  weights, experts = moe.route(jnp.asarray(logits), 3, router)
  want_w, want_e = np_route(logits.astype(np.float64), 3, router)
  np.testing.assert_array_equal(np.asarray(experts), want_e)
  np.testing.assert_allclose(np.asarray(weights), want_w, rtol=1e-6)
  if router == 'topk_softmax':  # renormalised over the k, not for softmax_topk
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
  else:
    assert np.all(np.asarray(weights).sum(-1) < 1.0)


def test_balance_and_z_loss_match_numpy(logits):
  _, experts = moe.route(jnp.asarray(logits), 2, 'topk_softmax')
  experts = np.asarray(experts)
  l64 = logits.astype(np.float64)
  np.testing.assert_allclose(float(moe.balance_loss(jnp.asarray(logits), jnp.asarray(experts))),
                             np_balance(l64, experts), rtol=1e-6)
  lse = np.log(np.exp(l64).sum(-1))
  np.testing.assert_allclose(float(moe.z_loss(jnp.asarray(logits))), np.mean(lse**2), rtol=1e-6)
  # Perfect balance (uniform probabilities, every expert picked equally) gives top_k.
  flat = np.zeros((8, 8), np.float32)
  cyclic = np.stack([np.arange(8), (np.arange(8) + 1) % 8], -1)
  assert float(moe.balance_loss(jnp.asarray(flat), jnp.asarray(cyclic))) == pytest.approx(2.0)


def test_capacity_drops_what_numpy_drops(logits):
  _, experts = moe.route(jnp.asarray(logits), 2, 'softmax_topk')
  limit = moe.capacity(40, 2, 8, 0.75)
  assert limit == math.ceil(0.75 * 40 * 2 / 8) == 8
  keep = np.asarray(moe.capacity_keep(experts, 8, limit))
  want = np_keep(np.asarray(experts), 8, limit)
  np.testing.assert_array_equal(keep, want)
  assert 0 < (~want).sum() < want.size  # some dropped, not all


# --- the layer against the dense computation ----------------------------------------------


def _layer_cfg(**moe_overrides):
  c = lm.get_config('tiny')
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, dtype='float32', scan_unroll=1)
  c.model.moe.update({'n_experts': 4, 'top_k': 2, 'expert_mlp_dim': 24, **moe_overrides})
  return tfm.TransformerConfig.from_config(c.model, 256)


@pytest.mark.parametrize('overrides', [
    dict(router='topk_softmax'),
    dict(router='softmax_topk', shared_mlp_dim=16, shared_gate=True, capacity_factor=0.5),
], ids=['dropless', 'shared_gate_capacity'])
def test_moe_layer_equals_dense_computation(overrides):
  cfg = _layer_cfg(**overrides)
  with nnx.use_eager_sharding(False):
    layer = moe.MoeMlp(cfg, rngs=nnx.Rngs(1))
  x = np.random.default_rng(2).normal(size=(3, 5, 32)).astype(np.float32)
  out, aux = jax.jit(lambda m, x: m(x))(layer, jnp.asarray(x))

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(layer)))
  x_TxD = x.reshape(15, 32).astype(np.float64)
  logits = x_TxD @ p['router']
  weights, experts = np_route(logits, 2, cfg.router)
  keep = None
  limit = moe.capacity(15, 2, 4, cfg.capacity_factor)
  if limit:
    keep = np_keep(experts, 4, limit)
    assert (~keep).any()
  want = np_dense_moe(x_TxD, weights, experts, p['w_gate'], p['w_up'], p['w_down'], keep)
  if cfg.shared_mlp_dim:
    s = p['shared']
    gate = 1 / (1 + np.exp(-(x_TxD @ p['shared_gate'])))
    want += gate * np_swiglu(x_TxD, s['w_gate'], s['w_up'], s['w_down'])
  np.testing.assert_allclose(np.asarray(out).reshape(15, 32), want, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(float(aux[0]), np_balance(logits, experts), rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(float(aux[1]), np.mean(lse**2), rtol=1e-5)
  np.testing.assert_allclose(float(aux[2]), 0.0 if keep is None else (~keep).mean(), atol=1e-7)


def test_cached_decoding_matches_the_forward_pass():
  """The KV-cache path (serving, sampling) runs the experts too: a prompt, then one token at a
  time, gives the logits of one forward pass over the whole row."""
  cfg = _layer_cfg(shared_mlp_dim=16)
  with nnx.use_eager_sharding(False):
    model = tfm.Transformer(cfg, rngs=nnx.Rngs(6))
  tokens = jnp.asarray(np.random.default_rng(7).integers(0, 256, (2, 8)), jnp.int32)
  want = nnx.jit(lambda m, t: m(t))(model, tokens)
  cache = decode.contiguous_cache(cfg, batch=2, positions=8, page_size=8)
  step = nnx.jit(lambda m, t, p, c: m.decode(t, p, c))
  positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
  got, cache = step(model, tokens[:, :5], positions[:, :5], cache)
  outs = [got]
  for i in range(5, 8):
    got, cache = step(model, tokens[:, i:i + 1], positions[:, i:i + 1], cache)
    outs.append(got)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), want, rtol=2e-4, atol=2e-5)


# --- config, counts ----------------------------------------------------------------------


def test_mixtral_preset_has_mixtral_parameter_counts():
  c = lm.get_config('mixtral_8x7b')
  cfg = tfm.TransformerConfig.from_config(c.model, vocab_size=32000)
  # Mixtral-8x7B: 46.7B parameters, 12.9B active per token (Mistral AI's announcement).
  assert tfm.count_params(cfg) == 46_702_792_704
  assert tfm.count_params(cfg, active=True) == 12_879_925_248
  # FLOPs count the active weights only: 6 * active matmul weights + attention.
  matmul_active = tfm.count_params(cfg, active=True) - 32000 * 4096 - 65 * 4096
  assert tfm.train_flops_per_token(cfg, 4096) == 6 * matmul_active + 12 * 32 * 32 * 128 * 4096
  moe_cpu = tfm.TransformerConfig.from_config(lm.get_config('moe_cpu').model, 2048)
  tiny = tfm.TransformerConfig.from_config(lm.get_config('tiny').model, 2048)
  # The same active parameters as tiny, but the router's.
  assert tfm.count_params(moe_cpu, active=True) - tfm.count_params(tiny) == 4 * 128 * 8


@pytest.mark.parametrize('overrides, message', [
    (dict(top_k=5), 'model.moe.top_k=5 must be in [1, model.moe.n_experts=4]'),
    (dict(router='nope'), "model.moe.router='nope' is not allowed"),
    (dict(shared_gate=True), 'model.moe.shared_gate=True needs model.moe.shared_mlp_dim > 0'),
    (dict(capacity_factor=-1.0), 'model.moe.capacity_factor=-1.0 must be >= 0'),
])
def test_bad_moe_config_names_the_key(overrides, message):
  with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')):
    _layer_cfg(**overrides)


def test_moe_refuses_gelu_and_lora():
  c = lm.get_config('moe_cpu')
  c.model.mlp = 'gelu_tanh'
  with pytest.raises(ValueError, match="needs model.mlp='swiglu'"):
    tfm.TransformerConfig.from_config(c.model, 256)
  c = lm.get_config('moe_cpu')
  c.model.lora.rank = 4
  with pytest.raises(ValueError, match='model.lora is not supported with model.moe'):
    tfm.TransformerConfig.from_config(c.model, 256)


# --- expert parallelism: one device against expert=2, fsdp=2, tensor=2 ----------------------


def _run(config, task, mesh, batches):
  """Losses and MoE metrics of the trainer's step on `mesh`, and the final state."""
  _, _, shardings, init = setup_state(task, config, mesh)
  train_step, _ = trainer.compile_step(task, shardings, mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  out = []
  with jax.set_mesh(mesh):
    state = init(jax.random.key(config.seed))
    for b in batches:
      state, metrics = train_step(state, trainer.global_batch(b, batch_sharding), {})
      out.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return out, state


@pytest.mark.parametrize('shape, batch', [
    (dict(data=1, expert=2, fsdp=2, tensor=2), 4),  # tokens dispatched by all_to_all
    (dict(data=1, expert=4, tensor=2), 1),  # one row: tokens replicated, psum over experts
], ids=['all_to_all', 'replicated_tokens'])
def test_expert_parallel_layer_matches_one_device(shape, batch):
  """The layer with capacity dropping and a shared expert, its aux terms and its gradients,
  on an expert-parallel mesh against no mesh."""
  cfg = _layer_cfg(router='softmax_topk', capacity_factor=0.75, shared_mlp_dim=16)
  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(moe.MoeMlp(cfg, rngs=nnx.Rngs(3)))
    specs = nnx.get_partition_spec(params)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(batch, 24 // batch, 32)), jnp.float32)
  probe = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)

  def f(params, x):
    out, aux = nnx.merge(graphdef, params)(x)
    return jnp.sum(out * probe) + jnp.sum(aux), (out, aux)
  grad_fn = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
  (_, (out, aux)), grads = jax.jit(grad_fn)(params, x)
  assert float(aux[2]) > 0  # some assignments dropped

  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(shape))
  shardings = mesh_lib.shardings(params, specs, mesh, tfm.LOGICAL_AXIS_RULES)
  assert shardings['w_gate'].spec == P('expert', 'fsdp', 'tensor')
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, shardings)
    (_, (out_ep, aux_ep)), grads_ep = jax.jit(grad_fn)(sharded, x)
  np.testing.assert_allclose(np.asarray(out_ep), np.asarray(out), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(aux_ep), np.asarray(aux), rtol=1e-5)
  for (path, g_ep), g in zip(jax.tree_util.tree_flatten_with_path(grads_ep)[0],
                             jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(np.asarray(g_ep), np.asarray(g), rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_expert_parallel_training_matches_one_device(corpus, tmp_path):
  """Three trainer steps of a dropless MoE LM on one device and on data=1, expert=2,
  context=2, tensor=2 (two new axes with an existing one, which splits the heads inside the
  context-parallel attention and the experts' MLP; the layer tests above hold expert=2 with
  fsdp=2): the same losses, MoE losses and gradient norms."""
  config = small_config(corpus, **{
      'model.d_model': 32, 'model.n_heads': 4, 'model.n_kv_heads': 2, 'data.seq_len': 16,
      'model.scan_unroll': 1,  # the layer scan compiles one block, not two
      'model.moe.n_experts': 4, 'model.moe.top_k': 2, 'model.moe.expert_mlp_dim': 32,
      'model.moe.shared_mlp_dim': 16, 'model.moe.balance_weight': 0.1,
      'model.moe.z_weight': 0.01})
  task = LMTask(config)
  it = task.setup_data(str(tmp_path), 0, 1)
  batches = [next(it) for _ in range(3)]
  one = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
  config.unlock()
  config.mesh.update(data=1, expert=2, context=2, fsdp=1, tensor=2)
  ep = mesh_lib.make_mesh(config.mesh)
  single, _ = _run(config, task, one, batches)
  sharded, state = _run(config, task, ep, batches)

  mlp = state.params['blocks']['mlp']
  assert mlp['w_gate'].sharding.spec == P('stage', 'expert', 'fsdp', 'tensor')
  assert mlp['w_down'].sharding.spec == P('stage', 'expert', 'tensor', 'fsdp')
  assert mlp['router'].sharding.spec == P('stage', 'fsdp', None)
  assert 'moe_dropped_fraction' not in single[0]  # dropless
  for step, (a, b) in enumerate(zip(single, sharded, strict=True)):
    for k in ('loss', 'moe_balance_loss', 'moe_z_loss', 'grad_norm'):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, err_msg=f'{k} step {step}')
  assert single[-1]['loss'] < single[0]['loss']
  # Near-uniform routing at init: the balance loss is about top_k.
  assert 1.9 < single[0]['moe_balance_loss'] < 2.5 and single[0]['moe_z_loss'] > 0


def test_expert_weights_that_do_not_split_are_a_config_error(corpus):
  config = small_config(corpus, **{'model.moe.n_experts': 3, 'model.moe.top_k': 1,
                                   'mesh.data': 4, 'mesh.expert': 2})
  task = LMTask(config)
  with pytest.raises(ConfigError, match="cannot be split over mesh axis 'expert'"):
    setup_state(task, config, mesh_lib.make_mesh(config.mesh))


def test_init_from_adopts_the_experts(tmp_path):
  """Fine-tuning an MoE run (or an imported Mixtral) takes its experts with its architecture;
  a run saved before model.moe existed is dense."""
  import json

  from train.tasks.lm import adopt_init_run
  moe_run = lm.get_config('moe_cpu')
  moe_run.model.moe.update(shared_mlp_dim=64, router='softmax_topk')
  (tmp_path / 'config.json').write_text(moe_run.to_json())
  config = lm.get_config('tiny')
  config.init_from = str(tmp_path)
  adopt_init_run(config)
  for key in ('n_experts', 'top_k', 'expert_mlp_dim', 'shared_mlp_dim', 'router'):
    assert config.model.moe[key] == moe_run.model.moe[key], key
  old = json.loads(lm.get_config('tiny').to_json())
  del old['model']['moe']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  adopt_init_run(config)
  assert config.model.moe.n_experts == 0
