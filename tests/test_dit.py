"""The diffusion transformer (model/dit.py) on tiny shapes.

Oracles: numpy references for the patch layout and the 2-D sin-cos table; adaLN-Zero's exact
zero at init; bitwise equality when only masked context tokens change; one device against a
data x fsdp x tensor mesh (outputs and gradients); config errors that name their key.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import diffusion as diffusion_config
from model import dit
from train import mesh as mesh_lib

B, S, E = 4, 5, 16  # batch, context tokens, context width


def model_config(**dit_overrides) -> ml_collections.ConfigDict:
  """The diffusion family's model keys with a DiT block of widths that split 2 ways."""
  m = diffusion_config.base().model
  m.dropout = 0.0
  m.dit = ml_collections.ConfigDict(dict(patch_size=2, width=32, depth=2, num_heads=4,
                                         mlp_ratio=2.0))
  m.dit.update(dit_overrides)
  return m


@pytest.fixture(scope='module')
def cfg() -> dit.DiTConfig:
  return dit.DiTConfig.from_config(model_config(), image_size=8, channels=2, num_classes=10,
                                   context_dim=E)


@pytest.fixture(scope='module')
def models(cfg):
  """(graphdef, fresh params, params with every leaf perturbed so no branch starts at zero)."""
  with nnx.use_eager_sharding(False):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0))))

    @jax.jit  # one compiled init rather than hundreds of eager ops
    def init():
      fresh = nnx.state(dit.DiT(cfg, rngs=nnx.Rngs(0)))
      leaves, treedef = jax.tree.flatten(fresh)
      keys = jax.random.split(jax.random.key(1), len(leaves))
      perturbed = [x + 0.05 * jax.random.normal(k, x.shape)
                   for x, k in zip(leaves, keys, strict=True)]
      return fresh, jax.tree.unflatten(treedef, perturbed)
    fresh, perturbed = init()
  return graphdef, fresh, perturbed


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, 8, 8, 2)), jnp.float32)
  t = jnp.array([0, 10, 500, 999])
  labels = jnp.array([0, 3, 7, 10])  # 10: "no label"
  context = jnp.asarray(rng.normal(size=(B, S, E)), jnp.float32)
  # Example 0 sees 2 tokens, 1 sees 4, 2 and 3 all 5.
  mask = jnp.arange(S)[None, :] < jnp.array([2, 4, 5, 5])[:, None]
  return x, t, labels, context, mask


def test_patchify_layout_and_round_trip():
  x = np.random.default_rng(0).normal(size=(2, 6, 4, 3)).astype(np.float32)  # not square
  tokens = np.asarray(dit.patchify(jnp.asarray(x), 2))
  assert tokens.shape == (2, 3 * 2, 2 * 2 * 3)
  for i in range(3):
    for j in range(2):  # row-major patches, each flattened (row, col, channel)
      np.testing.assert_array_equal(tokens[:, i * 2 + j],
                                    x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, -1))
  np.testing.assert_array_equal(dit.unpatchify(jnp.asarray(tokens), 2, 6, 4), x)


def test_sincos_2d_matches_reference():
  grid, dim = 3, 8
  table = dit.sincos_2d(grid, dim)
  want = np.zeros((grid * grid, dim))
  for i in range(grid):
    for j in range(grid):
      for k in range(dim // 4):
        w = 10_000.0 ** (-k / (dim // 4))
        want[i * grid + j, k] = np.sin(i * w)
        want[i * grid + j, dim // 4 + k] = np.cos(i * w)
        want[i * grid + j, dim // 2 + k] = np.sin(j * w)
        want[i * grid + j, 3 * dim // 4 + k] = np.cos(j * w)
  assert table.dtype == np.float32
  np.testing.assert_allclose(table, want, rtol=1e-6, atol=1e-7)


def test_zero_at_init_and_every_input_counts(models):
  graphdef, fresh, params = models
  fwd = jax.jit(lambda params, x, t, labels, context, mask: nnx.merge(graphdef, params)(
      x, t, labels, context=context, context_mask=mask))
  x, t, labels, context, mask = inputs()
  # adaLN-Zero: the modulations, the cross-attention output and the final layer start at zero.
  fresh_out = fwd(fresh, x, t, labels, context, mask)
  assert fresh_out.shape == x.shape and fresh_out.dtype == jnp.float32
  np.testing.assert_array_equal(fresh_out, 0.0)

  out = fwd(params, x, t, labels, context, mask)
  assert not np.allclose(fwd(params, x, t + 1, labels, context, mask), out, atol=1e-4)
  other_labels = fwd(params, x, t, (labels + 1) % 11, context, mask)
  assert all(not np.allclose(other_labels[i], out[i], atol=1e-4) for i in range(B))
  # Changing the context at masked positions (example 0 from token 2, example 1 token 4)
  # changes nothing, bit for bit; an unmasked token changes its own example only.
  noise = jnp.asarray(np.random.default_rng(1).normal(size=context.shape), jnp.float32)
  masked = fwd(params, x, t, labels, jnp.where(mask[:, :, None], context, noise), mask)
  np.testing.assert_array_equal(masked, out)
  seen = context.at[1, 3].add(1.0)
  moved = fwd(params, x, t, labels, seen, mask)
  assert not np.allclose(moved[1], out[1], atol=1e-4)
  np.testing.assert_array_equal(np.delete(moved, 1, 0), np.delete(out, 1, 0))


def test_sharded_forward_and_gradients_match_one_device(cfg, models):
  """Outputs and gradients of the perturbed model on data=2 x fsdp=2 x tensor=2 against one
  device; every parameter gets a gradient."""
  graphdef, _, params = models
  x, t, labels, context, mask = inputs()
  probe = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)

  def loss(params, x, context):
    out = nnx.merge(graphdef, params)(x, t, labels, context=context, context_mask=mask)
    return jnp.sum(out * probe), out
  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, out), grads = grad_fn(params, x, context)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.any(np.asarray(g) != 0), jax.tree_util.keystr(path)

  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  specs = nnx.get_partition_spec(params)
  shardings = mesh_lib.shardings(params, specs, mesh, dit.LOGICAL_AXIS_RULES)
  qkv = shardings['blocks'][0]['attn']['qkv']['kernel'].spec
  assert qkv == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  with jax.set_mesh(mesh):
    batch = mesh_lib.batch_sharding(mesh)
    (_, out_mesh), grads_mesh = grad_fn(jax.device_put(params, shardings),
                                        jax.device_put(x, batch), jax.device_put(context, batch))
  np.testing.assert_allclose(np.asarray(out_mesh), np.asarray(out), rtol=1e-5, atol=1e-5)
  for (path, g_mesh), g in zip(jax.tree_util.tree_flatten_with_path(grads_mesh)[0],
                               jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(np.asarray(g_mesh), np.asarray(g), rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_every_parameter_has_logical_axes(cfg):
  with nnx.use_eager_sharding(False):
    params = nnx.state(nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  specs = jax.tree_util.tree_leaves_with_path(
      nnx.to_pure_dict(nnx.get_partition_spec(params)),
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = jax.tree.leaves(nnx.to_pure_dict(params))
  rules = dict(dit.LOGICAL_AXIS_RULES)
  assert len(specs) == len(shapes) > 30
  for (path, spec), x in zip(specs, shapes, strict=True):
    assert len(spec) == x.ndim, jax.tree_util.keystr(path)
    assert all(name is None or name in rules for name in spec), (jax.tree_util.keystr(path), spec)
    assert any(name is not None for name in spec), jax.tree_util.keystr(path)
  used = {name for _, spec in specs for name in spec if name is not None} | {'batch'}
  assert used == set(rules)  # the table has no stale names


@pytest.mark.parametrize('overrides, image_size, message', [
    (dict(patch_size=3), 8, r'model\.dit\.patch_size=3 must divide the image size 8'),
    (dict(num_heads=3), 8, r'model\.dit\.num_heads=3 must divide model\.dit\.width=32'),
    (dict(width=6, num_heads=1), 8, r'model\.dit\.width=6 must be a multiple of 4'),
    (dict(depth=0), 8, r'model\.dit\.depth=0 must be a positive integer'),
    (dict(mlp_ratio=0.0), 8, r'model\.dit\.mlp_ratio=0\.0 must be positive'),
    (dict(patch_size=None), 8, r'model\.dit\.patch_size=None must be a positive integer'),
])
def test_config_errors_name_the_key(overrides, image_size, message):
  with pytest.raises(ValueError, match=message):
    dit.DiTConfig.from_config(model_config(**overrides), image_size=image_size, channels=1,
                              num_classes=0, context_dim=0)


def test_config_errors_for_shared_keys_and_context():
  m = model_config()
  del m['dit']
  with pytest.raises(ValueError, match=r'model\.dit is missing'):
    dit.DiTConfig.from_config(m, image_size=8, channels=1, num_classes=0, context_dim=0)
  m = model_config()
  m.dtype = 'float64'
  with pytest.raises(ValueError, match=r'model\.dtype=.float64. is not allowed'):
    dit.DiTConfig.from_config(m, image_size=8, channels=1, num_classes=0, context_dim=0)
  cfg = dit.DiTConfig.from_config(model_config(), image_size=8, channels=1, num_classes=0,
                                  context_dim=0)
  assert (cfg.grid, cfg.head_dim, cfg.mlp_dim, cfg.patch_pixels) == (4, 8, 64, 4)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match='context_dim=0'):
    model(jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)), context=jnp.zeros((1, 2, 4)))
