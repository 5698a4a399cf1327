"""The one train state of every task, and its placement on the mesh.

`TrainState` has fixed places for what every task has, so the trainer, the
checkpoints and the tools (train.sample, train.convert, the coming server and
evaluator) find them without knowing the task:

- `step`: int32 scalar, the number of updates applied.
- `params`: the trained model's parameters, a nested dict (`nnx.to_pure_dict`);
  leaves frozen by `optimizer.freeze` stay here too, unchanged by updates.
- `opt_state`: the optimizer state of `params`' trainable leaves only.
- `rng`: raw key data (`jax.random.key_data`); a step folds in `step`, so a resumed
  run draws what the straight run drew.
- `extras`: a dict the task owns for everything else (an EMA copy, a GAN's
  discriminator and its optimizer, a value head); `{}` when there is nothing.

The parameters to sample from or export are `task.inference_params(state)` (the
EMA for the image families, `params` for the LM): tools use that accessor, never
state keys. Frozen inputs (a reference model, a teacher) are not in the state:
the trainer passes them to the step beside it and never checkpoints them.
"""

from typing import Any

import flax.struct
import jax

from train import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  extras: Any


# Where `optimizer.offload` keeps the optimizer state between steps: host memory the device
# can copy from directly (a JAX memory kind every backend here has, CPU and TPU alike).
OFFLOAD_MEMORY_KIND = 'pinned_host'


def setup_state(task, config, mesh):
  """(rng, abstract state, its shardings, a jitted init that places it shard by shard).

  With `optimizer.offload`, `opt_state`'s shardings are in host memory; the step brings the
  state to the device for the update (train/optim.py) and these shardings, its outputs'
  shardings, put it back.
  """
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(task.init_state, rng)
  specs = task.state_logical_specs(abstract)
  shardings = mesh_lib.shardings(abstract, specs, mesh, task.logical_rules)
  if config.optimizer.get('offload', False):
    shardings = shardings.replace(opt_state=jax.tree.map(
        lambda s: s.with_memory_kind(OFFLOAD_MEMORY_KIND), shardings.opt_state))
  init = jax.jit(task.init_state, out_shardings=shardings)
  return rng, abstract, shardings, init
