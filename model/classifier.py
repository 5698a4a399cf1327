"""A small CNN image classifier whose penultimate layer is the feature space of FD and KID.

Shape letters: B batch, H, W, C image, F features, K classes.

Each level halves the resolution: a 3x3 convolution, then a 3x3 stride-2
convolution, both ReLU, `width * 2**level` channels, until the side is at most
4 (8x8 digits: one level; 28x28 and 32x32: three). A dense layer with ReLU
gives the F features; a linear head gives the logits.

It is trained once per dataset (train/image_eval.py) and only ever runs on one
local device, replicated on every process: its parameters carry no logical
axis names, because no mesh ever shards them.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  image_size: int
  channels: int
  num_classes: int
  width: int = 16
  features: int = 64

  @property
  def levels(self) -> int:
    levels, side = 1, -(-self.image_size // 2)
    while side > 4:
      levels, side = levels + 1, -(-side // 2)
    return levels


class Classifier(nnx.Module):

  def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    convs, c_in, side = [], cfg.channels, cfg.image_size
    for level in range(cfg.levels):
      c_out = cfg.width * 2**level
      convs.append(nnx.Conv(c_in, c_out, (3, 3), rngs=rngs))
      convs.append(nnx.Conv(c_out, c_out, (3, 3), strides=(2, 2), rngs=rngs))
      c_in, side = c_out, -(-side // 2)
    self.convs = nnx.List(convs)
    self.dense = nnx.Linear(side * side * c_in, cfg.features, rngs=rngs)
    self.head = nnx.Linear(cfg.features, cfg.num_classes, rngs=rngs)

  def activations(self, x_BxHxWxC: jax.Array) -> list[jax.Array]:
    """Every layer's ReLU output in order, each convolution's [B, h, w, F_l] and then the
    features [B, F] (the VAE's perceptual distance compares them all)."""
    h = x_BxHxWxC.astype(jnp.float32)
    out = []
    for conv in self.convs:
      h = jax.nn.relu(conv(h))
      out.append(h)
    out.append(jax.nn.relu(self.dense(h.reshape(h.shape[0], -1))))
    return out

  def features(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Penultimate activations, float32 [B, F]."""
    return self.activations(x_BxHxWxC)[-1]

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Logits, float32 [B, K]."""
    return self.head(self.features(x_BxHxWxC))
