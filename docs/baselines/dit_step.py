"""Forward + backward time per step: the diffusion transformer (model/dit.py) against the U-Net
of configs/diffusion.py:digits at about matched parameter counts, on 8x8x1 and 28x28x1 inputs,
one CPU device, the models interleaved so that load changes hit both alike.

  PYTHONPATH=. python docs/baselines/dit_step.py
"""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from configs import diffusion
from model import dit, unet

BATCH, STEPS, ROUNDS = 64, 5, 3


def unet_model(size: int) -> unet.UNet:
  m = diffusion.get_config('digits').model
  m.attention_resolutions = (size // 2,)  # digits' (4,) is its 8x8 image's lower level
  cfg = unet.UNetConfig.from_config(m, image_size=size, channels=1, num_classes=10)
  return unet.UNet(cfg, rngs=nnx.Rngs(0))


def dit_model(size: int, width: int, depth: int, patch: int) -> dit.DiT:
  m = diffusion.get_config('digits').model
  m.dit = ml_collections.ConfigDict(dict(patch_size=patch, width=width, depth=depth,
                                         num_heads=4, mlp_ratio=4.0))
  cfg = dit.DiTConfig.from_config(m, image_size=size, channels=1, num_classes=10,
                                  context_dim=0)
  return dit.DiT(cfg, rngs=nnx.Rngs(0))


def count(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def step_fn(model):
  graphdef, params = nnx.split(model)

  @jax.jit
  def step(params, x, t, labels, target):
    def loss(p):
      return jnp.mean((nnx.merge(graphdef, p)(x, t, labels) - target) ** 2)
    return jax.value_and_grad(loss)(params)
  return step, params


def bench(size: int, models: dict) -> None:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, size, size, 1)), jnp.float32)
  target = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, BATCH))
  labels = jnp.asarray(rng.integers(0, 11, BATCH))
  compiled, best = {}, {}
  for name, model in models.items():
    step, params = step_fn(model)
    start = time.perf_counter()
    jax.block_until_ready(step(params, x, t, labels, target))
    compiled[name] = (step, params, time.perf_counter() - start)
    best[name] = []
  for _ in range(ROUNDS):
    for name, (step, params, _) in compiled.items():
      start = time.perf_counter()
      for _ in range(STEPS):
        out = step(params, x, t, labels, target)
      jax.block_until_ready(out)
      best[name].append((time.perf_counter() - start) / STEPS)
  base = min(best['unet'])
  for name, model in models.items():
    print(f'{size}x{size}x1  {name:16s} params {count(model):>9,d}  compile '
          f'{compiled[name][2]:6.1f} s  fwd+bwd {1e3 * min(best[name]):8.1f} ms/step  '
          f'against the U-Net {min(best[name]) / base:5.2f}')


if __name__ == '__main__':
  nnx.use_eager_sharding(False)  # one device: the axis names stay metadata
  for size in (8, 28):
    other = 4 if size == 28 else 1  # the second DiT's patch: fewer or more tokens
    bench(size, {'unet': unet_model(size), 'dit p2 w96 d4': dit_model(size, 96, 4, 2),
                 f'dit p{other} w96 d4': dit_model(size, 96, 4, other)})
  print(jax.devices()[0].device_kind, jax.__version__)
