"""A transformer with a scalar head: a reward model, or a value model (PPO's critic).

The trunk is the language model itself (`Transformer`, the LM's `TransformerConfig`, the LM's
parameter tree under `trunk`), so the parameters of an LM or SFT run warm-start it as they
are. The head reads the trunk's final-normed hidden states (`features=True`) and maps each
position to one number:

  values_BxL = x_BxLxD . head_D + head_bias

A reward model's score of a sequence is its value at the last real token
(`sequence_values`, what TRL's RewardTrainer and HF's sequence-classification models read);
a critic uses the value at every position. The head starts at zero, so a fresh model scores
every sequence 0: a neutral start that the first updates move.

Parameter tree: `trunk` (the Transformer's; its unused `lm_head` too when the embeddings are
untied, so an LM checkpoint loads whole), `head` [D] ('embed'), `head_bias` [] (replicated).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model import transformer


class RewardModel(nnx.Module):
  """A `Transformer` trunk and a linear scalar head at every position (module docstring)."""

  def __init__(self, cfg: transformer.TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.trunk = transformer.Transformer(cfg, rngs=rngs)
    self.head = nnx.Param(jnp.zeros((cfg.d_model,), cfg.param_dtype), out_sharding=('embed',))
    self.head_bias = nnx.Param(jnp.zeros((), cfg.param_dtype), out_sharding=())

  def __call__(
      self,
      tokens_BxL: jax.Array,
      *,
      positions_BxL: jax.Array | None = None,
      segment_ids_BxL: jax.Array | None = None,
      deterministic: bool = True,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """float32 values_BxL: the head's scalar at every position (arguments as the trunk's)."""
    x_BxLxD = self.trunk(tokens_BxL, positions_BxL=positions_BxL,
                         segment_ids_BxL=segment_ids_BxL, deterministic=deterministic,
                         rngs=rngs, features=True)
    head_D = self.head[...].astype(jnp.float32)
    values_BxL = jnp.einsum('bld,d->bl', x_BxLxD.astype(jnp.float32), head_D,
                            preferred_element_type=jnp.float32)
    return values_BxL + self.head_bias[...].astype(jnp.float32)


def sequence_values(values_BxL: jax.Array, lengths_B: jax.Array) -> jax.Array:
  """values_B: each row's value at its last real token (index length - 1; a length of 0
  reads index 0). Rows are left-aligned: tokens [0, length) are real, the rest padding."""
  index_B = jnp.maximum(lengths_B.astype(jnp.int32) - 1, 0)
  return jnp.take_along_axis(values_BxL, index_B[:, None], axis=1)[:, 0]


def graphdef(cfg: transformer.TransformerConfig) -> nnx.GraphDef:
  """The model's graph, built without its parameters: `nnx.merge(graphdef(cfg), params)`."""
  with nnx.use_eager_sharding(False):
    return nnx.graphdef(nnx.eval_shape(lambda: RewardModel(cfg, rngs=nnx.Rngs(0))))
