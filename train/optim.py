"""Optimizers, schedules, trainable subsets and parameter groups, shared by every task.

`make_optimizer(opt_cfg, steps, max_nonfinite_steps, abstract_params)` returns an
`Optimizer`: AdamW with global-norm clipping over the *trainable* parameters only.

- `optimizer.freeze`: a regex; parameters whose path (keys joined by '/', e.g.
  'blocks/attn/wq') it fully matches do not train. They get no gradient and no
  optimizer state at all, so freezing shows in checkpoint bytes and compiled memory.
- `optimizer.lr_mults` / `optimizer.wd_mults`: (regex, multiplier) pairs, the first
  full match wins (1.0 when none does), as big_vision's optimizer config does. A
  group's update is scaled by its lr multiplier after everything else, so a
  multiplier of 0 leaves the group exactly where it is; the weight decay of a leaf
  is `weight_decay * wd multiplier`. The defaults exempt norms, biases and
  embeddings from weight decay.

One Adam state covers every group (per-leaf multipliers are constants in the update),
instead of optax.multi_transform's one optimizer per group with masked placeholders.

Memory levers (docs/benchmarks.md has their compiled memory):
- `optimizer.offload`: the optimizer state lives in host memory (`pinned_host`) between
  steps (train/state.py places it there). `Optimizer.apply` brings whatever state it is
  given to the device for the update and returns the new state where the old one was.
- `optimizer.loss_scale` ('none' | 'dynamic' | 'static'), for float16 compute: the loss is
  multiplied by a scale before differentiation and the gradients divided by it, so small
  gradients do not flush to zero in float16. 'dynamic' halves the scale on a step whose
  gradients overflow (the step is skipped) and doubles it after
  `loss_scale_growth_interval` finite steps in a row, from `loss_scale_init`, as jmp's
  DynamicLossScale and Megatron do. The scale is optimizer state, so checkpoints keep it.
"""

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from data.errors import ConfigError


def lr_schedule(opt_cfg: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `end_lr`."""
  decay_steps = steps if opt_cfg.decay_steps == -1 else opt_cfg.decay_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=opt_cfg.warmup_steps,
      decay_steps=max(decay_steps, opt_cfg.warmup_steps + 1), end_value=opt_cfg.end_lr)


def path_name(path) -> str:
  """'a/b/0/c' for a pytree key path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _compile(pattern: str, key: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(f'{key} has an invalid regular expression {pattern!r}: {e}.') from None


def _rules(pairs: Sequence, key: str) -> list[tuple[re.Pattern, float]]:
  out = []
  for pair in pairs:
    if len(pair) != 2 or not isinstance(pair[0], str):
      raise ConfigError(f'{key} must be a sequence of (regex, multiplier) pairs; got {pair!r}.')
    mult = float(pair[1])
    if mult < 0:
      raise ConfigError(f'{key}: the multiplier of {pair[0]!r} is {mult}; it must be >= 0.')
    out.append((_compile(pair[0], key), mult))
  return out


def _first_match(rules, name: str) -> float:
  return next((mult for pattern, mult in rules if pattern.fullmatch(name)), 1.0)


def _scale_per_leaf(mults) -> optax.GradientTransformation:
  """Multiplies each update by its leaf's constant."""
  return optax.stateless(lambda updates, params: jax.tree.map(lambda u, m: u * m, updates, mults))


def _add_decayed_weights_per_leaf(wds) -> optax.GradientTransformation:
  """u + wd * p with a constant wd per leaf (leaves with wd 0 are left as they are)."""
  def fn(updates, params):
    return jax.tree.map(lambda u, p, wd: u if wd == 0.0 else u + wd * p, updates, params, wds)
  return optax.stateless(fn)


def _space(x) -> jax.memory.Space:
  """The memory an array or tracer lives in (device, or host with optimizer.offload)."""
  return jax.typeof(x).memory_space


def skipped(opt_state: optax.ApplyIfFiniteState) -> jax.Array:
  """1.0 if the step that produced `opt_state` was not applied, else 0.0."""
  return 1.0 - opt_state.last_finite.astype(jnp.float32)


LOSS_SCALES = ('none', 'dynamic', 'static')
MIN_LOSS_SCALE = 1.0  # a dynamic scale never halves below this
# Nor grows past this: float32 gradients times 2**24 stay far from overflow, and a scale that
# kept doubling in a run that never overflows (float32 compute) would reach infinity.
MAX_LOSS_SCALE = 2.0 ** 24


class LossScaleState(NamedTuple):
  """The loss scale and the finite steps in a row since it last changed."""
  scale: jax.Array  # float32 scalar
  good_steps: jax.Array  # int32 scalar


def loss_scaling(init: float, growth_interval: int, dynamic: bool) -> optax.GradientTransformation:
  """Keeps the loss scale and, when `dynamic`, adjusts it from the finiteness of the (already
  unscaled) gradients it sees: halved (down to MIN_LOSS_SCALE) after a non-finite step,
  doubled (up to MAX_LOSS_SCALE) after `growth_interval` finite steps in a row. The updates
  pass through unchanged.

  Written here because optax has no loss scaler and jmp, which has one, is archived; this is
  its DynamicLossScale as an optax state, placed before `apply_if_finite` in the chain so
  that a skipped step still halves the scale.
  """
  def init_fn(params):
    del params
    return LossScaleState(jnp.asarray(init, jnp.float32), jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    if not dynamic:
      return updates, state
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)]))
    grow = finite & (state.good_steps + 1 >= growth_interval)
    scale = jnp.where(finite, jnp.where(grow, jnp.minimum(state.scale * 2, MAX_LOSS_SCALE),
                                        state.scale),
                      jnp.maximum(state.scale / 2, MIN_LOSS_SCALE))
    good_steps = jnp.where(finite & ~grow, state.good_steps + 1, 0)
    return updates, LossScaleState(scale, good_steps.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


@dataclasses.dataclass(frozen=True, eq=False)
class Optimizer:
  """An optax transformation over the trainable leaves of one parameter tree.

  Parameters are nested dicts (`nnx.to_pure_dict`); `select` keeps the trainable
  leaves in the same nesting, `merge` puts them back.
  """
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  trainable: Any  # bool per parameter leaf (a Python bool, fixed at setup)
  # tx is chain(loss_scaling(...), apply_if_finite(...)): opt_state[0] is a LossScaleState.
  loss_scaled: bool = False

  @property
  def all_trainable(self) -> bool:
    return all(jax.tree.leaves(self.trainable))

  def select(self, tree):
    """The trainable leaves of a params-shaped tree, nested as in `tree`."""
    if self.all_trainable:
      return tree
    out: dict = {}
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, leaf), keep in zip(flat, jax.tree.leaves(self.trainable), strict=True):
      if keep:
        node = out
        for k in path[:-1]:
          node = node.setdefault(k.key, {})
        node[path[-1].key] = leaf
    return out

  def merge(self, tree, trainable_part):
    """`tree` with its trainable leaves replaced by those of `trainable_part`."""
    if self.all_trainable:
      return trainable_part
    new = iter(jax.tree.leaves(trainable_part))
    leaves, treedef = jax.tree.flatten(tree)
    merged = [next(new) if keep else leaf
              for leaf, keep in zip(leaves, jax.tree.leaves(self.trainable), strict=True)]
    return jax.tree.unflatten(treedef, merged)

  def init(self, params):
    return self.tx.init(self.select(params))

  def state_specs(self, abstract_opt_state, param_specs):
    """The optimizer state's logical PartitionSpecs: each moment like its parameter, every
    other leaf (counts, schedules' state) replicated."""
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    return optax.tree_map_params(
        self.tx, lambda _, spec: spec, abstract_opt_state, self.select(param_specs),
        transform_non_params=lambda _: jax.sharding.PartitionSpec(), is_leaf=is_spec)

  def loss_scale(self, opt_state) -> jax.Array | None:
    """The current loss scale (float32 scalar), or None without loss scaling."""
    return self._on_device(opt_state[0].scale) if self.loss_scaled else None

  @staticmethod
  def _on_device(tree):
    """`tree` with its leaves in host memory (optimizer.offload) brought to the device, inside
    the jitted step."""
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device)
                        if _space(x) == jax.memory.Space.Host else x, tree)

  def value_and_grad(self, loss_fn: Callable, params, batch, num_micro: int = 1, *,
                     opt_state=None):
    """((loss, aux), grads of the trainable leaves), averaged over `num_micro` microbatches.

    loss_fn(params, batch) -> (scalar loss, aux pytree). Frozen leaves enter the loss as
    constants, so no gradient is computed for them. With loss scaling, `opt_state` (which
    holds the scale) is required: the loss is differentiated times the scale and the
    gradients divided by it, so what comes back is unscaled (non-finite on an overflow).
    """
    scale = None
    if self.loss_scaled:
      if opt_state is None:
        raise ConfigError('optimizer.loss_scale is not supported by this task: its step does '
                          "not pass the optimizer state; use optimizer.loss_scale='none'.")
      scale = self.loss_scale(opt_state)
    if self.all_trainable:
      return value_and_grad_accumulated(loss_fn, params, batch, num_micro, scale)
    fn = lambda part, b: loss_fn(self.merge(params, part), b)  # noqa: E731
    return value_and_grad_accumulated(fn, self.select(params), batch, num_micro, scale)

  def apply(self, params, opt_state, grads, loss):
    """The finite-guarded update: (params, opt_state, {'grad_norm', 'skipped'}), plus
    'loss_scale' (the scale this step's loss was multiplied by) and 'overflow' with loss
    scaling.

    A non-finite loss marks the gradients non-finite too, so that optax.apply_if_finite
    leaves parameters and moments untouched even if the gradients came out finite.
    'overflow' is 1.0 on a skipped step that is a dynamic scale's normal back-off (finite
    loss, non-finite gradients, the scale still above its floor): the trainer does not count
    those towards `max_nonfinite_steps` (see train/trainer.py).
    """
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
    part = self.select(params)
    spaces = jax.tree.map(_space, opt_state)
    opt_state = self._on_device(opt_state)
    updates, new_state = self.tx.update(grads, opt_state, part)
    params = self.merge(params, optax.apply_updates(part, updates))
    metrics = {'grad_norm': optax.tree.norm(grads)}
    if self.loss_scaled:
      metrics['skipped'] = skipped(new_state[1])
      scale = opt_state[0].scale
      backoff = jnp.isfinite(loss) & (new_state[0].scale < scale)
      metrics['overflow'] = (metrics['skipped'] * backoff).astype(jnp.float32)
      metrics['loss_scale'] = scale
    else:
      metrics['skipped'] = skipped(new_state)
    new_state = jax.tree.map(lambda x, space: x if _space(x) == space else
                             jax.device_put(x, space), new_state, spaces)
    return params, new_state, metrics


def make_optimizer(opt_cfg: ml_collections.ConfigDict, steps: int, max_nonfinite_steps: int,
                   abstract_params, key: str = 'optimizer') -> Optimizer:
  """AdamW with global-norm clipping over the trainable leaves; a step with non-finite
  gradients is not applied.

  `optax.apply_if_finite` leaves parameters and moments untouched on such a step and
  counts it; the trainer stops the run after `max_nonfinite_steps` in a row, so its own
  give-up threshold (after which it would apply the update anyway) is set beyond that.
  `key` names the config node in errors (the GAN's discriminator has `d_optimizer`).
  """
  freeze = _compile(opt_cfg.freeze, f'{key}.freeze') if opt_cfg.freeze else None
  lr_rules = _rules(opt_cfg.lr_mults, f'{key}.lr_mults')
  wd_rules = _rules(opt_cfg.wd_mults, f'{key}.wd_mults')
  named = jax.tree_util.tree_map_with_path(lambda p, _: path_name(p), abstract_params)
  trainable = jax.tree.map(lambda n: not (freeze and freeze.fullmatch(n)), named)
  if not any(jax.tree.leaves(trainable)):
    raise ConfigError(f'{key}.freeze={opt_cfg.freeze!r} freezes every parameter; nothing '
                      'would train.')
  part = lambda tree: Optimizer(None, None, trainable).select(tree)  # noqa: E731
  lr_mults = jax.tree.map(lambda n: _first_match(lr_rules, n), part(named))
  wds = jax.tree.map(lambda n: opt_cfg.weight_decay * _first_match(wd_rules, n), part(named))
  schedule = lr_schedule(opt_cfg, steps)
  loss_scale = opt_cfg.get('loss_scale', 'none')
  if loss_scale not in LOSS_SCALES:
    raise ConfigError(f'{key}.loss_scale={loss_scale!r} is not allowed; choose one of '
                      f'{", ".join(LOSS_SCALES)}.')
  chain = []
  if opt_cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt_cfg.clip_norm))
  # optax.adamw's own chain, with a weight decay per leaf.
  chain.append(optax.chain(optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps),
                           _add_decayed_weights_per_leaf(wds),
                           optax.scale_by_learning_rate(schedule)))
  if any(m != 1.0 for m in jax.tree.leaves(lr_mults)):
    chain.append(_scale_per_leaf(lr_mults))
  tx = optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=max_nonfinite_steps + 8)
  if loss_scale != 'none':
    init, interval = float(opt_cfg.loss_scale_init), int(opt_cfg.loss_scale_growth_interval)
    if not init > 0:
      raise ConfigError(f'{key}.loss_scale_init={init!r} must be > 0.')
    if interval < 1:
      raise ConfigError(f'{key}.loss_scale_growth_interval={interval!r} must be >= 1.')
    tx = optax.chain(loss_scaling(init, interval, dynamic=loss_scale == 'dynamic'), tx)
  return Optimizer(tx, schedule, trainable, loss_scaled=loss_scale != 'none')


def split_microbatches(batch, num: int):
  """[B, ...] -> [num, B/num, ...], taking rows with stride `num`.

  Strided rows keep every microbatch spread over all data-parallel shards, so
  no data moves between devices.
  """
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def value_and_grad_accumulated(loss_fn: Callable, params, batch, num_micro: int,
                               loss_scale: jax.Array | None = None):
  """`jax.value_and_grad(loss_fn, has_aux=True)` averaged over `num_micro` microbatches.

  loss_fn(params, batch) -> (scalar loss, aux pytree). With one microbatch this is the
  plain call; otherwise a `lax.scan` keeps only one microbatch's activations alive at a
  time. With `loss_scale`, the loss is differentiated times the scale and the gradients are
  divided by it at the end (the returned loss is unscaled).
  """
  if loss_scale is not None:
    def scaled(p, b):
      loss, aux = loss_fn(p, b)
      return loss * loss_scale, (loss, aux)
    (_, (loss, aux)), grads = value_and_grad_accumulated(scaled, params, batch, num_micro)
    return (loss, aux), jax.tree.map(lambda g: g / loss_scale.astype(g.dtype), grads)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    return grad_fn(params, batch)

  def body(carry, micro):
    (loss, aux), grads = grad_fn(params, micro)
    carry = jax.tree.map(jnp.add, carry, (loss, aux, grads))
    return carry, None

  micro = split_microbatches(batch, num_micro)
  first = jax.tree.map(lambda x: x[0], micro)
  (loss0, aux0), grads0 = jax.eval_shape(grad_fn, params, first)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, aux0, grads0))
  (loss, aux, grads), _ = jax.lax.scan(body, zeros, micro)
  scale = 1.0 / num_micro
  loss, aux, grads = jax.tree.map(lambda x: x * scale, (loss, aux, grads))
  return (loss, aux), grads


def ema_update(ema, params, *, decay: float, step: jax.Array, skipped: jax.Array):
  """The exponential moving average of `params` after step `step` (0-based).

  The decay warms up as (1 + t) / (10 + t) to `decay`; a skipped step (non-finite) leaves
  the average as it was, as it leaves the parameters.
  """
  t = step.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  new = optax.incremental_update(params, ema, 1.0 - d)
  return jax.tree.map(lambda n, o: jnp.where(skipped > 0, o, n), new, ema)
