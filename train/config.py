"""Checks on a resolved config, run before anything compiles.

Unknown keys are already rejected by ml_collections when a `--config.a.b=...`
flag names a key the schema does not have. This module checks values and
combinations, and says which key is wrong and what it may be.
"""

import ml_collections

from data.errors import check_choice, check_positive, get, require
from train import mesh as mesh_lib


def check_common(config: ml_collections.ConfigDict) -> None:
  """The keys every family shares (configs/common.py)."""
  check_positive(config, 'steps', 'batch_size', 'grad_accum', 'log_every', 'max_nonfinite_steps',
                 'checkpoint.every', 'checkpoint.keep')
  check_positive(config, 'eval_every', 'eval_steps', 'optimizer.warmup_steps',
                 'optimizer.weight_decay', 'optimizer.clip_norm', allow_zero=True)
  check_positive(config, 'optimizer.lr', 'optimizer.eps')
  check_choice(config, 'optimizer.name', ('adamw',))
  check_choice(config, 'optimizer.loss_scale', ('none', 'dynamic', 'static'))
  check_positive(config, 'optimizer.loss_scale_init', 'optimizer.loss_scale_growth_interval')
  for key in ('optimizer.b1', 'optimizer.b2'):
    value = get(config, key)
    require(0.0 <= value < 1.0, f'{key}={value!r} must be in [0, 1).')
  require(config.batch_size % config.grad_accum == 0,
          f'batch_size={config.batch_size} must be divisible by grad_accum={config.grad_accum}.')
  for axis in mesh_lib.AXES:
    value = config.mesh.get(axis, 1)
    require(value == -1 or value >= 1, f'mesh.{axis}={value!r} must be -1 (fill) or >= 1.')
  fills = [a for a in mesh_lib.AXES if config.mesh.get(a, 1) == -1]
  require(len(fills) <= 1, f'Only one mesh axis may be -1 (fill); got {", ".join(fills)}.')
