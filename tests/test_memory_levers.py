"""Memory levers (train/optim.py, train/state.py, model/transformer.py): optimizer state in
host memory, remat policies that offload activations, and loss scaling for float16.

Oracles: the same run without the lever (a loss scale that is a power of two changes no
float32 rounding, and where the optimizer state waits changes no arithmetic), the closed
form of a dynamic scale's growth across a resume, the state before an overflowing step, and
compiled memory (the remat policies against no remat). Each remat policy's loss and
gradients against no remat are in tests/test_model.py::test_remat_policies_match_none.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_run import restore, scalars
from test_train import small_config, write_corpus

from data.errors import ConfigError
from model import transformer as tfm
from train import mesh as mesh_lib
from train import trainer
from train.state import OFFLOAD_MEMORY_KIND, setup_state
from train.tasks.lm import LMTask

INIT_SCALE = 2.0 ** 10
INTERVAL = 2  # finite steps before a dynamic scale doubles


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory)


@pytest.fixture(scope='module')
def runs(corpus, tmp_path_factory):
  """Five float32 steps straight, and the same five with the optimizer state offloaded and a
  dynamic loss scale, stopped after step 3 and resumed (the learning rate decays over 5
  steps in both, so the schedule does not change with `steps`)."""
  base = tmp_path_factory.mktemp('base')
  plain = trainer.train_and_evaluate(
      small_config(corpus, **{'steps': 5, 'optimizer.decay_steps': 5}), str(base))
  levers = tmp_path_factory.mktemp('levers')
  keys = {'optimizer.offload': True, 'optimizer.loss_scale': 'dynamic',
          'optimizer.loss_scale_init': INIT_SCALE,
          'optimizer.loss_scale_growth_interval': INTERVAL, 'optimizer.decay_steps': 5}
  first = trainer.train_and_evaluate(small_config(corpus, steps=3, **keys), str(levers))
  second = trainer.train_and_evaluate(small_config(corpus, steps=5, **keys), str(levers))
  return dict(plain=plain.losses, levers={**first.losses, **second.losses},
              levers_dir=levers, keys=keys)


def test_offloaded_state_lives_on_host(corpus, runs):
  config = small_config(corpus, **runs['keys'])
  task = LMTask(config)
  _, _, shardings, _ = setup_state(task, config, mesh_lib.make_mesh(config.mesh))
  kinds = {s.memory_kind for s in jax.tree.leaves(shardings.opt_state)}
  assert kinds == {OFFLOAD_MEMORY_KIND}
  assert {s.memory_kind for s in jax.tree.leaves(shardings.params)} == {'device'}


def test_offload_and_loss_scale_keep_the_losses(runs):
  """Both levers on (and a resume between steps 3 and 4) give the losses of neither."""
  assert sorted(runs['levers']) == [1, 2, 3, 4, 5]
  for step, loss in runs['plain'].items():
    np.testing.assert_allclose(runs['levers'][step], loss, rtol=1e-6, err_msg=f'step {step}')


def test_dynamic_scale_grows_and_resumes_exactly(runs):
  """The scale doubles after every INTERVAL finite steps, its count carried across the resume
  after step 3: step 5 uses INIT * 4 only if the checkpoint kept both the scale (INIT * 2)
  and the one finite step counted since it last doubled."""
  logged = scalars(runs['levers_dir'], 'train/loss_scale')
  assert logged == {k: INIT_SCALE * 2 ** ((k - 1) // INTERVAL) for k in range(1, 6)}
  scale_state = restore(runs['levers_dir'], 3)['opt_state'][0]  # the chain's first link
  assert float(scale_state['scale']) == INIT_SCALE * 2 and int(scale_state['good_steps']) == 1


def test_float16_overflow_skips_and_backs_off_without_stopping(corpus, tmp_path):
  """From 2**20 this float16 model's scaled gradients overflow on the first steps (checked
  below; from about 2**17 they fit): each such step leaves parameters and moments as they
  were and halves the scale. With max_nonfinite_steps=1 any counted skip would stop the run;
  these do not count, so it trains on once the scale fits."""
  config = small_config(corpus, **{
      'model.dtype': 'float16', 'optimizer.loss_scale': 'dynamic', 'steps': 6,
      'optimizer.loss_scale_init': 2.0 ** 20, 'max_nonfinite_steps': 1,
      'checkpoint.every': 1, 'checkpoint.keep': 10})
  result = trainer.train_and_evaluate(config, str(tmp_path))
  scale = scalars(tmp_path, 'train/loss_scale')
  skipped = scalars(tmp_path, 'train/skipped')
  overflow = scalars(tmp_path, 'train/overflow')
  assert skipped[1] == skipped[2] == 1.0 and 0.0 in skipped.values(), skipped
  assert overflow == skipped
  assert all(np.isfinite(v) for v in result.losses.values())
  assert scale[1] == 2.0 ** 20
  for k in range(2, 7):
    assert scale[k] == scale[k - 1] / (2 if skipped[k - 1] else 1), scale
  one, two = restore(tmp_path, 1), restore(tmp_path, 2)
  jax.tree.map(np.testing.assert_array_equal, one['params'], two['params'])
  jax.tree.map(np.testing.assert_array_equal, one['opt_state'][1]['inner_state'],
               two['opt_state'][1]['inner_state'])
  assert float(two['opt_state'][0]['scale']) == 2.0 ** 18


def test_remat_lowers_compiled_memory():
  """The activations the backward pass keeps: remat keeps fewer on the device than none,
  offloading too. Compiled, never run (docs/baselines/memory_levers.py has every policy on a
  TPU topology)."""
  cfg = tfm.TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              head_dim=16, mlp_dim=256, dtype=jnp.dtype('float32'))
  tokens = jax.ShapeDtypeStruct((8, 129), jnp.int32)

  def temp_bytes(remat):
    with nnx.use_eager_sharding(False):
      model = nnx.eval_shape(lambda: tfm.Transformer(dataclasses.replace(cfg, remat=remat),
                                                     rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)

    def loss(params, tokens_BxL):
      logits = nnx.merge(graphdef, params)(tokens_BxL[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxL[:, 1:]).mean()
    compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  temp = {remat: temp_bytes(remat) for remat in ('none', 'full', 'offload_dots')}
  assert temp['full'] < temp['none'] and temp['offload_dots'] < temp['none'], temp


def test_loss_scale_needs_the_optimizer_state(corpus):
  """A step that does not pass the optimizer state (which holds the scale) is told so."""
  opt = LMTask(small_config(corpus, **{'optimizer.loss_scale': 'dynamic'})).opt
  with pytest.raises(ConfigError, match='loss_scale is not supported'):
    opt.value_and_grad(lambda p, b: (jnp.sum(p['x']), {}), {'x': jnp.ones(2)}, None)
