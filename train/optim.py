"""Optimizers, schedules and gradient accumulation, shared by every task."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax


def lr_schedule(opt_cfg: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `end_lr`."""
  decay_steps = steps if opt_cfg.decay_steps == -1 else opt_cfg.decay_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=opt_cfg.warmup_steps,
      decay_steps=max(decay_steps, opt_cfg.warmup_steps + 1), end_value=opt_cfg.end_lr)


def decay_mask(params, no_decay: tuple[str, ...]):
  """True for parameters that get weight decay: those whose path names none of `no_decay`."""
  def wants_decay(path, _):
    names = [str(getattr(k, 'key', getattr(k, 'name', k))).lower() for k in path]
    return not any(word in name for word in no_decay for name in names)
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(opt_cfg: ml_collections.ConfigDict, steps: int,
                   max_nonfinite_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; a step with non-finite gradients is not applied.

  `optax.apply_if_finite` leaves parameters and moments untouched on such a
  step and counts it; the trainer stops the run after `max_nonfinite_steps` in
  a row, so its own give-up threshold (after which it would apply the update
  anyway) is set beyond that.
  """
  no_decay = tuple(opt_cfg.no_decay)
  chain = []
  if opt_cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt_cfg.clip_norm))
  chain.append(optax.adamw(
      lr_schedule(opt_cfg, steps), b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
      weight_decay=opt_cfg.weight_decay, mask=lambda p: decay_mask(p, no_decay)))
  return optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=max_nonfinite_steps + 8)


def skipped(opt_state: optax.ApplyIfFiniteState) -> jax.Array:
  """1.0 if the step that produced `opt_state` was not applied, else 0.0."""
  return 1.0 - opt_state.last_finite.astype(jnp.float32)


def split_microbatches(batch, num: int):
  """[B, ...] -> [num, B/num, ...], taking rows with stride `num`.

  Strided rows keep every microbatch spread over all data-parallel shards, so
  no data moves between devices.
  """
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def value_and_grad_accumulated(loss_fn: Callable, params, batch, num_micro: int):
  """`jax.value_and_grad(loss_fn, has_aux=True)` averaged over `num_micro` microbatches.

  loss_fn(params, batch) -> (scalar loss, aux dict of scalars). With one
  microbatch this is the plain call; otherwise a `lax.scan` keeps only one
  microbatch's activations alive at a time.
  """
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


def opt_state_specs(tx: optax.GradientTransformation, abstract_opt_state, param_specs):
  """The optimizer state's logical PartitionSpecs: each moment like its parameter, every
  other leaf (counts, schedules' state) replicated."""
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
  return optax.tree_map_params(
      tx, lambda _, spec: spec, abstract_opt_state, param_specs,
      transform_non_params=lambda _: jax.sharding.PartitionSpec(), is_leaf=is_spec)
