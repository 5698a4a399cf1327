"""Whether a workdir's run may resume under a new config.

A rerun resumes from the workdir's checkpoints, so its config must describe the
same state (shapes, tree, dtypes) and the same data stream as the saved run's
`config.json`. A changed model would otherwise fail deep inside orbax, once per
array, after the data is read.
"""

import fnmatch
import json

import ml_collections
from etils import epath

from data.errors import ConfigError

# The keys that may change when a run resumes; every other key must keep its saved value
# (why an allow-list: check_config_unchanged).
# - length and cadence: the schedule follows the new `steps` (decay_steps=-1 decays over
#   them), and logging, evals, checkpoints and profiling hold no state;
# - optimizer scalars (also a GAN's `d_optimizer`): values in the update, not state shapes.
#   Not `clip_norm` (0 drops clipping from the optax chain, a different tree) nor `name`
#   or `no_decay`;
# - `max_nonfinite_steps` (a bound on a counter the state keeps either way) and `grad_accum`
#   (microbatches of the same global batch: the data position is unchanged);
# - `mesh.*`: orbax restores into the new shardings;
# - how the model computes, not what it holds: compute `dtype`, `attention` kernel, `remat`,
#   `scan_unroll` (the layers stay stacked), `dropout`, `pipeline.*` (a pipeline keeps the
#   unpipelined parameter tree); and `ema.decay`;
# - where the same data lies (`data.path`, `data.data_dir`), evaluation and sampling
#   settings, and `init_from` (read only on a fresh start).
# Not `batch_size` or `seed`: the saved data position counts batches of the old size in the
# old order, so either would skip or repeat data silently. Not `param_dtype`: it is the
# state's dtype.
RESUMABLE_KEYS = (
    'steps', 'log_every', 'eval_every', 'eval_steps', 'checkpoint.*', 'profile.*',
    '*optimizer.lr', '*optimizer.end_lr', '*optimizer.warmup_steps', '*optimizer.decay_steps',
    '*optimizer.b1', '*optimizer.b2', '*optimizer.eps', '*optimizer.weight_decay',
    'max_nonfinite_steps', 'grad_accum', 'mesh.*', '*optimizer.offload',
    '*optimizer.loss_scale_init', '*optimizer.loss_scale_growth_interval',
    'model.dtype', 'model.attention', 'model.remat', 'model.scan_unroll', 'model.dropout',
    'model.pipeline.*',
    'ema.decay', 'data.path', 'data.data_dir', 'eval.*', 'sample.*', 'init_from',
)


def fixed_key_changes(saved: dict, new: dict) -> list[str]:
  """`key: saved -> new` for each key outside RESUMABLE_KEYS whose value differs.

  `saved` and `new` are configs as JSON objects. A key that only one of them has is
  left out: it was added to or removed from the schema since the run started, and a
  default is chosen to keep the old behaviour.
  """
  saved, new = _flatten(saved), _flatten(new)
  return [f'{key}: {saved[key]!r} -> {new[key]!r}' for key in sorted(saved.keys() & new.keys())
          if saved[key] != new[key]
          and not any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)]


def check_config_unchanged(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises a ConfigError naming the keys that `config` changes from the run saved in
  `workdir`, when there is a checkpoint to resume, unless RESUMABLE_KEYS allows them.

  The rule is an allow-list rather than a list of the keys that fix the state's shapes:
  such a list is easy to leave short for a new family (a key outside `model.*` that
  sizes the model, such as an image size, or one that changes the data stream), and a
  missing entry would let a resume fail in orbax or silently train on other data. A
  missing allow-list entry only refuses a harmless change, with the key named.
  Run before config.json is rewritten and before the data is read or anything compiles.
  """
  workdir = epath.Path(workdir)
  path, checkpoints = workdir / 'config.json', workdir / 'checkpoints'
  if not path.exists() or not checkpoints.exists() or not any(
      p.name.isdigit() for p in checkpoints.iterdir()):
    return
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f'{path} is not valid JSON ({e}); restore it from a copy, or use a new '
                      '--workdir.') from None
  changes = fixed_key_changes(saved, json.loads(config.to_json_best_effort()))
  if not changes:
    return
  shown = ', '.join(changes[:6]) + (f' and {len(changes) - 6} more' if len(changes) > 6 else '')
  init_from = (f', or start one from its weights with --config.init_from={workdir}'
               if 'init_from' in config else '')
  raise ConfigError(f'{workdir} holds a run whose checkpoints this config cannot resume; it '
                    f'changes {shown} (saved -> now). Use a new --workdir{init_from}.')


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat
