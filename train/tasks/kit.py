"""The pieces every task's setup and sampling share, written once.

- `abstract_split`: a model's graph and the logical specs of its parameters (and of any
  other state collection), without allocating it.
- `pure_state`: the parameters of a freshly built model as nested dicts.
- `to_host` / `in_chunks`: outputs of a jitted sampler gathered from every process to
  host memory, a fixed-size chunk at a time (one compiled program for any count).
- `load_run_params`: parameters of a Kiln run directory placed with given shardings, for
  `Task.load_frozen` and `Task.warm_start`.

The finite-guarded optimizer update and the EMA are `Optimizer.apply` and `ema_update`
in train/optim.py.
"""

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from data.errors import ConfigError
from model import run_params


def abstract_split(make_model: Callable[[], nnx.Module], *filters, what: str = 'The model'):
  """(graphdef, [logical PartitionSpecs of each filter's state as nested dicts]).

  The model must hold nothing outside `filters` (a task keeps only what it names).
  """
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(make_model)
  graphdef, *states, rest = nnx.split(abstract, *filters, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f'{what} holds state outside {filters}, which its task does not keep.')
  return graphdef, [nnx.to_pure_dict(nnx.get_partition_spec(s)) for s in states]


def pure_state(model: nnx.Module, *filters):
  """Each filter's state of `model` as nested dicts (one dict for one filter)."""
  out = [nnx.to_pure_dict(nnx.state(model, f)) for f in filters]
  return out[0] if len(out) == 1 else out


def build(make_model: Callable[[], nnx.Module]) -> nnx.Module:
  """Builds a model for `init_state` (placed by the jitted init's out_shardings)."""
  with nnx.use_eager_sharding(False):
    return make_model()


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as one host array on every process (gathered when it spans processes)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def in_chunks(n: int, chunk: int, run: Callable[[int, int], jax.Array]) -> np.ndarray:
  """The first `n` rows of run(i, start) for the chunks start = 0, chunk, 2 * chunk, ...,
  gathered to host. `run` returns `chunk` rows (padded), so one program serves every n."""
  return np.concatenate([to_host(run(i, start))
                         for i, start in enumerate(range(0, n, chunk))])[:n]


def load_run_params(run_dir: str, abstract_with_shardings, key: str = 'params'):
  """`state.<key>` of the newest checkpoint in `run_dir` (a training run or an import),
  read straight into the shardings carried by `abstract_with_shardings`."""
  try:
    params, step = run_params.restore_params(run_dir, abstract_with_shardings, key=key)
  except ValueError as e:  # orbax: a tree or shape mismatch
    raise ConfigError(f'{run_dir!r}: its parameters do not fit this model ({e}).') from None
  if params is None:
    raise ConfigError(f'{run_dir!r} has no checkpoint in {run_dir}/checkpoints.')
  return params, step
