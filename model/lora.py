"""Low-rank adapters (LoRA, Hu et al. 2021) on the transformer's projections.

A projection `w` chosen by `model.lora.targets` (a regex fully matching its name: wq wk
wv wo w_gate w_up w_down) gets `w_lora_a` [*contraction axes, r] and `w_lora_b`
[r, *output axes] beside it, and computes

    x @ W + (alpha / r) * ((dropout(x) @ A) @ B)

with A ~ N(0, 1 / fan_in) (fan_in = the product of the contraction axes, so x @ A keeps
x's scale) and B = 0, so a fresh adapter leaves the model's output exactly as it was. The
base W may be float or quantized (model/quant.py; NF4 for QLoRA). The adapters live in
`param_dtype` and carry the weight's logical axis names (the rank axis is unsharded).

Which parameters train is the optimizer's business: `FREEZE_BASE` is the
`optimizer.freeze` regex that leaves only the adapters trainable (train/tasks/lm.py sets
it). `merge_params` folds the adapters into float weights for export and inference, and
`disabled` zeroes them for a LoRA-disabled reference model.

Why written here: see model/quant.py (qwix's LoRA fails inside nnx.scan on jax 0.10.2,
and flax's nnx.LoRA wraps nnx.Linear, which Kiln's einsum weights are not).
"""

import math
import re

import jax
import jax.numpy as jnp

from model import quant

# Projections that can carry adapters (lm_head is not one: the head stays as it is).
TARGETS = ('wq', 'wk', 'wv', 'wo', 'w_gate', 'w_up', 'w_down')
A, B = '_lora_a', '_lora_b'
# optimizer.freeze for a LoRA run: every path that is not an adapter.
FREEZE_BASE = r'(?!.*_lora_[ab]$).*'


def is_target(name: str, targets: str, rank: int) -> bool:
  return rank > 0 and name in TARGETS and re.fullmatch(targets, name) is not None


def init_adapters(key: jax.Array, shape: tuple[int, ...], names: tuple, name: str, rank: int,
                  dtype) -> dict[str, tuple[jax.Array, tuple]]:
  """{suffix: (array, logical names)} of one weight's fresh adapters (one layer's)."""
  k = len(quant.CONTRACTION_AXES[name])
  fan_in = math.prod(shape[:k])
  a = jax.random.normal(key, shape[:k] + (rank,), dtype) / math.sqrt(fan_in)
  b = jnp.zeros((rank,) + shape[k:], dtype)
  return {A: (a, tuple(names[:k]) + (None,)), B: (b, (None,) + tuple(names[k:]))}


def adapter_specs(spec: str) -> tuple[str, str]:
  """einsum specs of x @ A and (x @ A) @ B for a projection's spec 'x,w->out'.

  'bld,dhk->blhk' gives ('bld,dr->blr', 'blr,rhk->blhk'); 'blhk,hkd->bld' gives
  ('blhk,hkr->blr', 'blr,rd->bld').
  """
  inputs, out = spec.split('->')
  x, w = inputs.split(',')
  rank = next(c for c in 'rzyxwvutsqponmjigfeca' if c not in spec)
  contracted = ''.join(c for c in w if c not in out)
  kept = ''.join(c for c in x if c not in contracted)
  return (f'{x},{contracted}{rank}->{kept}{rank}',
          f'{kept}{rank},{rank}{"".join(c for c in w if c in out)}->{out}')


def apply(module, name: str, spec: str, x: jax.Array, scale: float, rate: float,
          key: jax.Array | None) -> jax.Array:
  """scale * ((dropout(x) @ A) @ B) in x's dtype."""
  if key is not None and rate > 0.0:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
  spec_a, spec_b = adapter_specs(spec)
  h = jnp.einsum(spec_a, x, getattr(module, name + A)[...].astype(x.dtype))
  return jnp.einsum(spec_b, h, getattr(module, name + B)[...].astype(x.dtype)) * jnp.asarray(
      scale, x.dtype)


def delta(a: jax.Array, b: jax.Array, name: str) -> jax.Array:
  """A @ B over the rank, in the weight's layout (any leading [N] layer axis kept), float32."""
  k = len(quant.CONTRACTION_AXES[name])
  lead = a.ndim - k - 1
  a2 = a.reshape(a.shape[:lead] + (-1, a.shape[-1])).astype(jnp.float32)
  b2 = b.reshape(b.shape[:lead + 1] + (-1,)).astype(jnp.float32)
  out = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(a.shape[:-1] + b.shape[lead + 1:])


def merge_params(params: dict, scale: float, scheme: quant.Scheme, dtype) -> dict:
  """W + scale * A @ B for every adapted weight (a quantized base dequantized first), in
  `dtype`, with the adapters removed: the parameters of the same model without LoRA and
  without quantization. Jittable."""
  params = quant.dequantize_params(params, scheme, jnp.float32)

  def convert(tree):
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        out[key] = convert(value)
      elif key.endswith((A, B)):
        continue
      elif key + A in tree:
        w = value.astype(jnp.float32) + scale * delta(tree[key + A], tree[key + B], key)
        out[key] = w.astype(dtype)
      else:
        out[key] = value.astype(dtype) if key in quant.CONTRACTION_AXES else value
    return out

  return convert(params)


def disabled(params: dict) -> dict:
  """`params` with every B zeroed: the same model computes the base model's output (a
  LoRA-disabled reference, e.g. for DPO), without another graph."""
  def convert(tree):
    return {k: convert(v) if isinstance(v, dict) else (jnp.zeros_like(v) if k.endswith(B) else v)
            for k, v in tree.items()}
  return convert(params)
