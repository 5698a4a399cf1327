"""Weight-only quantization of the transformer's projection matrices: int8, int4, NF4.

Formats (each stored as plain arrays beside the weight's name, so a quantized model is
still a tree of nnx.Params that orbax checkpoints and `nnx.merge` takes):

- int8: per output channel. `w` int8 (the weight's shape), `w_scale` float32 (the weight's
  shape with every contraction axis 1): w = codes * scale, scale = absmax / 127.
- int4: group-wise along the contraction axis. Codes -7..7 (+8), two per byte: `w` uint8
  with the block axis halved, `w_scale` float32 with that axis divided by the group:
  w = (code - 8) * scale, scale = group absmax / 7.
- nf4 (QLoRA, Dettmers et al. 2023): block-wise absmax over blocks of 64 along the
  contraction axis, each value the nearest of the 16 NormalFloat levels, packed two per
  byte like int4; `w_scale` float32 holds the block absmax. With double quantization the
  block scales are themselves stored in int8 around their mean, in blocks of up to 256
  along the same axis: `w_scale` int8, `w_scale_scale` and `w_scale_mean` float32.

The block axis is the last contraction axis of each projection (D for wq wk wv w_gate w_up
and lm_head, F for w_down, Dh for wo, whose contraction is over heads and Dh), so a block
never spans two heads and the codes keep the weight's logical axis names (a sharded axis
halves). A block longer than its axis is cut to the axis (wo's blocks are Dh long when Dh
is shorter than the group). Embeddings, norms and biases stay float.

`quantize_params(params, mode)` turns a float parameter tree into this stored form;
`dequantize` is what `model.transformer.project` calls inside the scanned block (through a
custom VJP that keeps only the stored arrays for the backward pass), so only one layer's
dequantized weight exists at a time, in the forward and in the backward pass.

Serving a float model quantized at load time (the server's --quant):

  cfg_q = dataclasses.replace(model_cfg, quant='int8')  # or 'int4' (quant_group=128)
  params_q = jax.jit(quantize_params, static_argnums=1)(params, cfg_q.quant_scheme)
  graphdef_q = transformer.graphdef(cfg_q)  # nnx.merge(graphdef_q, params_q) is the model

Why written here rather than taken from a library: qwix 0.1.8 does not work with Kiln's
transformer on jax 0.10.2. `qwix.quantize_model(model, qwix.PtqProvider([QtRule(
weight_qtype='int8')]), x)` fails in the scanned blocks with `ValueError: Unsupported type
QArray` (flax_util.update_boxed, from `.astype`), and `qwix.apply_lora_to_model` fails
inside `nnx.scan` with `IndexError: tuple index out of range`. flax's nnx.LoRA and
nnx.LoRALinear wrap nnx.Linear modules, which Kiln does not use: its weights are
[D, H, Dh] einsum tensors stacked over layers. Each format here is a few lines of jnp.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

MODES = ('none', 'int8', 'int4', 'nf4')
DEFAULT_GROUP = {'int4': 128, 'nf4': 64}
DOUBLE_QUANT_BLOCK = 256

# The contraction axes of each projection, counted from the end, so they hold for one
# layer's weight inside the scan and for the stacked [N, ...] parameter alike.
CONTRACTION_AXES = {
    'wq': (-3,), 'wk': (-3,), 'wv': (-3,), 'wo': (-3, -2),
    'w_gate': (-2,), 'w_up': (-2,), 'w_down': (-2,), 'lm_head': (-2,),
}

# The 16 NF4 levels, as listed in the QLoRA paper's appendix: quantiles of N(0, 1)
# (8 positive and 7 negative, plus an exact zero) scaled to [-1, 1]. tests/test_quant.py
# rebuilds them from that definition.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


@dataclasses.dataclass(frozen=True)
class Scheme:
  """How the projections of one model are stored (static: part of the model config)."""
  mode: str = 'none'
  group: int = 0  # int4 group / NF4 block along the contraction axis; 0 = the default
  double: bool = True  # NF4 only: quantize the block scales to int8

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'quantization mode {self.mode!r} is not one of {", ".join(MODES)}.')
    if self.group < 0 or self.group % 2:
      raise ValueError(f'quantization group {self.group} must be a positive even number '
                       '(two 4-bit codes share a byte), or 0 for the default.')

  @property
  def block(self) -> int:
    return self.group or DEFAULT_GROUP.get(self.mode, 0)

  def suffixes(self) -> tuple[str, ...]:
    """The names stored for weight `w`: `w` + each suffix."""
    if self.mode == 'none':
      return ('',)
    if self.mode == 'nf4' and self.double:
      return ('', '_scale', '_scale_scale', '_scale_mean')
    return ('', '_scale')


def _axis(x: jax.Array, name: str) -> int:
  return x.ndim + CONTRACTION_AXES[name][-1]


def _block_len(length: int, block: int, name: str) -> int:
  b = min(block, length)
  if length % b or b % 2:
    raise ValueError(f'{name}: its contraction axis of length {length} does not split into '
                     f'blocks of {b} of even length; choose another group size.')
  return b


def _split(x: jax.Array, axis: int, b: int) -> jax.Array:
  """[..., n, ...] -> [..., n / b, b, ...] at `axis`."""
  return x.reshape(x.shape[:axis] + (x.shape[axis] // b, b) + x.shape[axis + 1:])


def _pack(codes: jax.Array, axis: int) -> jax.Array:
  """uint8 codes < 16 -> two per byte: elements 2i (low nibble) and 2i + 1 (high) of `axis`,
  neighbours, so a sharded axis packs without moving data."""
  pairs = _split(codes, axis, 2)
  lo = jax.lax.index_in_dim(pairs, 0, axis + 1, keepdims=False)
  hi = jax.lax.index_in_dim(pairs, 1, axis + 1, keepdims=False)
  return lo | (hi << 4)


def _unpack(packed: jax.Array, axis: int) -> jax.Array:
  both = jnp.stack([packed & 0xF, packed >> 4], axis=axis + 1)
  return both.reshape(packed.shape[:axis] + (2 * packed.shape[axis],) + packed.shape[axis + 1:])


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def quantize(w: jax.Array, name: str, scheme: Scheme) -> dict[str, jax.Array]:
  """One projection's float weight (one layer's, or stacked) -> {suffix: stored array}."""
  w = w.astype(jnp.float32)
  if scheme.mode == 'int8':
    absmax = jnp.max(jnp.abs(w), axis=CONTRACTION_AXES[name], keepdims=True)
    scale = jnp.where(absmax > 0, absmax, 1.0) / 127.0
    codes = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return {'': codes, '_scale': scale}
  axis = _axis(w, name)
  b = _block_len(w.shape[axis], scheme.block, name)
  w_blocks = _split(w, axis, b)
  absmax = jnp.max(jnp.abs(w_blocks), axis=axis + 1, keepdims=True)
  out = {}
  if scheme.mode == 'int4':
    scale = jnp.where(absmax > 0, absmax, 1.0) / 7.0
    codes = (jnp.clip(jnp.round(w_blocks / scale), -7, 7) + 8).astype(jnp.uint8)
  else:  # nf4
    scale = absmax
    if scheme.double:
      out = _double_quantize(jnp.squeeze(absmax, axis + 1), axis)
      scale = jnp.expand_dims(_double_dequantize(out, axis), axis + 1)
    normed = jnp.where(scale > 0, w_blocks / jnp.where(scale > 0, scale, 1.0), 0.0)
    mids = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.searchsorted(mids, normed).astype(jnp.uint8)  # the nearest level
  out[''] = _pack(codes.reshape(w.shape), axis)
  if '_scale' not in out:
    out['_scale'] = jnp.squeeze(scale, axis + 1)
  return out


def _double_quantize(scale: jax.Array, axis: int) -> dict[str, jax.Array]:
  """Block scales (float32, n at `axis`) -> int8 around each block's mean, blocks of up to
  256 along `axis` (the largest divisor of n that fits)."""
  b = _largest_divisor(scale.shape[axis], DOUBLE_QUANT_BLOCK)
  s = _split(scale, axis, b)
  mean = jnp.mean(s, axis=axis + 1, keepdims=True)
  dev = jnp.max(jnp.abs(s - mean), axis=axis + 1, keepdims=True)
  step = jnp.where(dev > 0, dev, 1.0) / 127.0
  codes = jnp.clip(jnp.round((s - mean) / step), -127, 127).astype(jnp.int8)
  return {'_scale': codes.reshape(scale.shape), '_scale_scale': jnp.squeeze(step, axis + 1),
          '_scale_mean': jnp.squeeze(mean, axis + 1)}


def _double_dequantize(stored: dict[str, jax.Array], axis: int) -> jax.Array:
  codes, step, mean = stored['_scale'], stored['_scale_scale'], stored['_scale_mean']
  b = codes.shape[axis] // step.shape[axis]
  s = _split(codes.astype(jnp.float32), axis, b)
  s = s * jnp.expand_dims(step, axis + 1) + jnp.expand_dims(mean, axis + 1)
  return s.reshape(codes.shape)


def dequantize(stored: dict[str, jax.Array], name: str, scheme: Scheme) -> jax.Array:
  """{suffix: stored array} -> the float32 weight."""
  codes = stored['']
  if scheme.mode == 'int8':
    return codes.astype(jnp.float32) * stored['_scale']
  axis = codes.ndim + CONTRACTION_AXES[name][-1]
  values = _unpack(codes, axis)
  if scheme.mode == 'int4':
    values = values.astype(jnp.float32) - 8.0
  else:
    values = jnp.asarray(NF4_LEVELS)[values]
  scale = _double_dequantize(stored, axis) if scheme.double and scheme.mode == 'nf4' else (
      stored['_scale'])
  b = values.shape[axis] // scale.shape[axis]
  w = _split(values, axis, b) * jnp.expand_dims(scale, axis + 1)
  return w.reshape(values.shape)


def stored_names(names: tuple, name: str, scheme: Scheme) -> dict[str, tuple]:
  """Logical axis names of each stored array of a weight whose axes are named `names`.

  The codes keep the weight's names. int8 scales are unsharded along the contraction axes
  (length 1); int4 and NF4 block scales keep the weight's name on the block axis, so they
  shard with their codes; the double-quantization constants are unsharded there.
  """
  out = {'': tuple(names)}
  contraction = {len(names) + a for a in CONTRACTION_AXES[name]}
  block_axis = len(names) + CONTRACTION_AXES[name][-1]
  for suffix in scheme.suffixes()[1:]:
    if scheme.mode == 'int8':
      out[suffix] = tuple(None if i in contraction else n for i, n in enumerate(names))
    elif suffix == '_scale':
      out[suffix] = tuple(names)
    else:
      out[suffix] = tuple(None if i == block_axis else n for i, n in enumerate(names))
  return out


def quantize_params(params: dict, scheme: 'Scheme | str', **kwargs) -> dict:
  """A float parameter tree (nested dicts, as `nnx.to_pure_dict` gives) -> the stored form
  of the model with `TransformerConfig.quant` set to the scheme.

  Every projection named in CONTRACTION_AXES (wq wk wv wo w_gate w_up w_down, and lm_head
  when untied) becomes its stored arrays; every other leaf (embeddings, norms, biases,
  LoRA adapters) is kept as it is. `scheme` is a Scheme or a mode name; `kwargs` are the
  Scheme's other fields (group=..., double=...). Jittable; with jax.jit and out_shardings
  it builds the stored form shard by shard.
  """
  if isinstance(scheme, str):
    scheme = Scheme(scheme, **kwargs)
  if scheme.mode == 'none':
    return params

  def convert(tree):
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        out[key] = convert(value)
      elif key in CONTRACTION_AXES:
        out.update({key + s: a for s, a in quantize(value, key, scheme).items()})
      else:
        out[key] = value
    return out

  return convert(params)


def dequantize_params(params: dict, scheme: Scheme, dtype) -> dict:
  """The inverse of `quantize_params` up to its rounding: float weights in `dtype`."""
  if scheme.mode == 'none':
    return params
  suffixes = scheme.suffixes()[1:]

  def convert(tree):
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        out[key] = convert(value)
      elif key in CONTRACTION_AXES:
        stored = {'': value, **{s: tree[key + s] for s in suffixes}}
        out[key] = dequantize(stored, key, scheme).astype(dtype)
      elif not any(key.endswith(s) and key[:-len(s)] in CONTRACTION_AXES for s in suffixes):
        out[key] = value
    return out

  return convert(params)


def weight_bytes(params) -> int:
  """Bytes of every array in a parameter tree (abstract or concrete)."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
