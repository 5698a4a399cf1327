"""Pipeline parallelism (model/pipeline.py) on 8 fake CPU devices.

Oracles: the same model trained unpipelined (mesh.data=8, which tests/test_train.py holds
to one device within 1e-4): a pipelined run (the circular schedule at 2 stages, with FSDP,
tensor parallelism, gradient accumulation and remat inside the stages) must give its losses,
gradient norms and final state step for step. Its checkpoint loads unpipelined
(serve.engine.load_model), and its model gives the logits and gradients of one device
through GPipe at 2 and 4 stages and the circular schedule at 4. The bubble's closed form
against a count of the schedule's idle iterations.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_run import restore, scalars
from test_train import assert_trees_close, small_config, write_corpus

from data.errors import ConfigError
from model import pipeline, transformer
from serve import engine
from train import mesh as mesh_lib
from train import trainer
from train.state import setup_state
from train.tasks.lm import LMTask

STEPS = 3
# name -> overrides; 8 layers of d_model 32. Trainer runs cost ~15 s each on 2 cores, so one
# pipelined run combines everything; the schedules at 2 and 4 stages are checked on the
# gradients of one device (test_pipelined_checkpoint_serves_unpipelined).
RUNS = {
    'unpipelined': {},
    # 2 stages of 2 repeats (the circular schedule); inside each, FSDP and tensor parallelism
    # over 2 devices each, 2 gradient accumulation microbatches of 8 rows, each split into 4
    # pipeline microbatches, and remat.
    'pipelined': {
        'mesh.stage': 2, 'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.tensor': 2, 'grad_accum': 2,
        'model.remat': 'full', 'model.pipeline.schedule': 'circular',
        'model.pipeline.repeats': 2, 'model.pipeline.microbatches': 4},
}


def pipe_config(corpus, **overrides) -> ml_collections.ConfigDict:
  return small_config(corpus, **{
      'steps': STEPS, 'batch_size': 16, 'model.d_model': 32, 'model.n_layers': 8,
      'model.n_heads': 4, 'model.n_kv_heads': 4, 'model.scan_unroll': 1, **overrides})


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory)


@pytest.fixture(scope='module')
def runs(corpus, tmp_path_factory):
  """name -> (workdir, config) of every run in RUNS, trained STEPS steps."""
  out = {}
  for name, overrides in RUNS.items():
    workdir = tmp_path_factory.mktemp(name)
    config = pipe_config(corpus, **overrides)
    trainer.train_and_evaluate(config, str(workdir))
    out[name] = (workdir, config)
  return out


def test_pipelines_train_as_unpipelined(runs):
  ref_dir, _ = runs['unpipelined']
  ref_loss, ref_norm = scalars(ref_dir, 'train/loss'), scalars(ref_dir, 'train/grad_norm')
  ref_state = restore(ref_dir, STEPS)
  assert sorted(ref_loss) == list(range(1, STEPS + 1))
  assert ref_loss[STEPS] < ref_loss[1]  # it trains
  for name, (workdir, _) in runs.items():
    loss, norm = scalars(workdir, 'train/loss'), scalars(workdir, 'train/grad_norm')
    assert sorted(loss) == sorted(ref_loss), name
    for step in ref_loss:
      np.testing.assert_allclose(loss[step], ref_loss[step], rtol=1e-4, err_msg=f'{name} {step}')
      # A gradient summed instead of averaged over stages or microbatches would pass the
      # losses (AdamW normalises it away) but not the norm.
      np.testing.assert_allclose(norm[step], ref_norm[step], rtol=1e-5, err_msg=f'{name} {step}')
    # The same parameter tree and values, whichever mesh saved it.
    assert_trees_close(restore(workdir, STEPS), ref_state, atol=1e-5, msg=name)


def test_stacked_layers_are_sharded_over_stages(runs):
  _, config = runs['pipelined']
  task = LMTask(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, abstract, shardings, _ = setup_state(task, config, mesh)
  blocks = jax.tree_util.tree_flatten_with_path(shardings.params['blocks'])[0]
  shapes = jax.tree.leaves(abstract.params['blocks'])
  assert blocks
  for (path, sharding), shape in zip(blocks, shapes, strict=True):
    assert sharding.spec[0] == 'stage', (jax.tree_util.keystr(path), sharding.spec)
    # Each device holds 8 / 2 = 4 layers (and half or a quarter of each matrix).
    assert sharding.shard_shape(shape.shape)[0] == 4, jax.tree_util.keystr(path)
  wq = shardings.params['blocks']['attn']['wq']
  assert wq.spec == jax.sharding.PartitionSpec('stage', 'fsdp', 'tensor', None)


def test_pipelined_checkpoint_serves_unpipelined(runs):
  """The pipelined run's checkpoint loads on a mesh without stages; its model gives the
  logits and gradients of one device through GPipe and the circular schedule at 4 stages
  (2 stages are the pipelined runs')."""
  workdir, config = runs['pipelined']
  loaded = engine.load_model(str(workdir))
  for x in jax.tree.leaves(loaded.params):  # loaded on the mesh without stages
    assert x.sharding.mesh.shape['stage'] == 1, x.sharding
  tokens_BxL = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 17)), jnp.int32)
  params = jax.device_get(loaded.params)
  cfg = loaded.model_cfg

  def loss_and_grads(graphdef):
    def loss(params):
      logits_BxLxV = nnx.merge(graphdef, params)(tokens_BxL[:, :-1])
      target_BxL = jnp.take_along_axis(logits_BxLxV, tokens_BxL[:, 1:, None], -1)[..., 0]
      return jnp.mean(jax.nn.logsumexp(logits_BxLxV, -1) - target_BxL), logits_BxLxV
    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return fn(params), fn

  (one_loss, one_logits), one_grads = loss_and_grads(loaded.graphdef)[0]  # no mesh: one device
  gpipe = dataclasses.replace(cfg, pipeline_schedule='gpipe', pipeline_repeats=1)
  schedules = {'gpipe_s4': (4, gpipe), 'circular_s4': (4, cfg)}
  for name, (stages, schedule_cfg) in schedules.items():
    mesh_cfg = ml_collections.ConfigDict({**config.mesh.to_dict(), 'stage': stages, 'data': -1,
                                          'fsdp': 1, 'tensor': 1})
    graphdef = transformer.graphdef(schedule_cfg)  # built outside a mesh: logical names
    with jax.set_mesh(mesh_lib.make_mesh(mesh_cfg)):
      ((loss, logits), grads), fn = loss_and_grads(graphdef)
      # The pipeline really ran: stages hand activations on with collective permutes.
      assert 'collective_permute' in fn.lower(params).as_text(), name
    np.testing.assert_allclose(logits, one_logits, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(loss, one_loss, rtol=1e-5, err_msg=name)
    for (path, g), one in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                              jax.tree.leaves(one_grads), strict=True):
      np.testing.assert_allclose(g, one, rtol=1e-4, atol=1e-6,
                                 err_msg=f'{name} {jax.tree_util.keystr(path)}')


def test_bubble_fraction_counts_idle_stage_iterations():
  """The closed form against a count of the schedule's idle (stage, iteration) pairs:
  stage s works on item t - s at iteration t, for R * M items."""
  for s_count, m_count, r_count in [(2, 4, 1), (4, 8, 1), (4, 4, 2), (8, 8, 4)]:
    iterations = r_count * m_count + s_count - 1
    idle = sum(not 0 <= t - s < r_count * m_count
               for s in range(s_count) for t in range(iterations))
    assert pipeline.bubble_fraction(s_count, m_count, r_count) == pytest.approx(
        idle / (s_count * iterations))


@pytest.mark.parametrize('mesh, expected', [
    ({'data': -1, 'stage': 4}, {'data': -1, 'stage': 1}),
    ({'data': 2, 'stage': 4, 'tensor': 1}, {'data': 8, 'stage': 1, 'tensor': 1}),
    ({'data': 2, 'stage': -1}, {'data': -1, 'stage': 1}),
    ({'data': -1, 'fsdp': 2}, {'data': -1, 'fsdp': 2}),  # a run saved without the stage key
])
def test_tools_load_runs_with_stages_turned_into_data_parallelism(mesh, expected):
  assert mesh_lib.unpipelined(ml_collections.ConfigDict(mesh)).to_dict() == expected


@pytest.mark.parametrize('overrides, message', [
    ({'mesh.stage': 4, 'model.n_layers': 6}, r'model.n_layers=6 does not split into mesh.stage=4'),
    ({'mesh.stage': 4, 'model.pipeline.schedule': 'circular', 'model.pipeline.repeats': 4},
     r'multiple of 16'),
    ({'mesh.stage': 4, 'model.pipeline.schedule': 'circular', 'model.pipeline.repeats': 2,
      'model.pipeline.microbatches': 2}, r'microbatches=2 is below mesh.stage=4'),
    ({'mesh.stage': 2, 'model.pipeline.repeats': 2}, r'gpipe needs 1'),
    ({'mesh.stage': 2, 'model.pipeline.schedule': '1f1b'}, r"schedule='1f1b'"),
    ({'mesh.stage': 2, 'model.pipeline.microbatches': 8}, r'split into .*microbatches=8'),
    ({'mesh.stage': 2, 'mesh.context': 2}, r'mesh.context=2'),
    ({'mesh.stage': 2, 'model.moe.n_experts': 4}, r'mesh.stage=2 with model.moe.n_experts=4'),
])
def test_bad_pipelines_fail_before_any_compile(corpus, overrides, message):
  config = pipe_config(corpus, **{'mesh.data': -1, **overrides})
  with pytest.raises(ConfigError, match=message):
    trainer.validate(config, 8, 1)
