"""Rotary position embedding (RoPE) and its long-context scalings: linear, llama3 and YaRN.

Shape letters: B batch, L length, H heads, D head dim, F = D / 2 rotated pairs.

A scaling changes only the F inverse frequencies (and, for YaRN, the size of the rotated
vectors), so it is computed once in numpy from the static config and the rotation itself
stays one fused elementwise op. The formulas are those of transformers'
`modeling_rope_utils.py` (the `rope_scaling` / `rope_parameters` dict of an HF config.json),
so an imported Llama 3.1 or YaRN model gives HF's logits:
  linear  every frequency / factor (position interpolation).
  llama3  wavelengths longer than original_max_positions / low_freq_factor are divided by
          factor, shorter than original_max_positions / high_freq_factor are kept, and the
          band between is interpolated smoothly.
  yarn    per frequency, a ramp between interpolation (/ factor) and extrapolation (kept) over
          the dimensions whose rotation count in original_max_positions lies between
          beta_slow and beta_fast; cos and sin are multiplied by attention_factor (0: derived
          from factor, and from mscale / mscale_all_dim when both are set), which scales the
          attention logits by its square, as HF does.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

TYPES = ('none', 'linear', 'llama3', 'yarn')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """The `model.rope_scaling` config (field meanings as HF's rope_scaling keys)."""
  type: str = 'none'
  factor: float = 1.0
  original_max_positions: int = 0  # HF original_max_position_embeddings (llama3, yarn)
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  beta_fast: float = 32.0  # yarn
  beta_slow: float = 1.0  # yarn
  attention_factor: float = 0.0  # yarn; 0: derived from factor (and mscale)
  mscale: float = 0.0  # yarn (DeepSeek-style attention_factor); 0: unused
  mscale_all_dim: float = 0.0  # yarn
  truncate: bool = True  # yarn: round the ramp's ends to whole dimensions

  @classmethod
  def from_config(cls, cfg) -> 'RopeScaling':
    """Validated from the `model.rope_scaling` ConfigDict (None: no scaling).

    Raises:
      ValueError: naming the offending `model.rope_scaling.*` key.
    """
    if cfg is None:
      return cls()
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg.keys()) - set(fields))
    if unknown:
      raise ValueError(f'model.rope_scaling has unknown key(s) {", ".join(unknown)}; the keys '
                       f'are {", ".join(fields)}.')
    out = cls(**{k: fields[k](cfg[k]) for k in cfg.keys()})
    out.check()
    return out

  def check(self) -> None:
    name = 'model.rope_scaling'
    if self.type not in TYPES:
      raise ValueError(f'{name}.type={self.type!r} is not allowed; choose one of '
                       f'{", ".join(TYPES)}.')
    if self.type == 'none':
      return
    if not self.factor > 0:
      raise ValueError(f'{name}.factor={self.factor} must be > 0 (with type={self.type!r}).')
    if self.type in ('llama3', 'yarn') and self.original_max_positions <= 0:
      raise ValueError(f'{name}.original_max_positions={self.original_max_positions}: '
                       f'type={self.type!r} needs the context length the model was pretrained '
                       'at (HF original_max_position_embeddings), > 0.')
    if self.type == 'llama3' and not self.high_freq_factor > self.low_freq_factor > 0:
      raise ValueError(f'{name}: llama3 needs high_freq_factor > low_freq_factor > 0, got '
                       f'{self.high_freq_factor} and {self.low_freq_factor}.')
    if self.type == 'yarn' and not self.beta_fast > self.beta_slow > 0:
      raise ValueError(f'{name}: yarn needs beta_fast > beta_slow > 0, got {self.beta_fast} '
                       f'and {self.beta_slow}.')
    if self.type == 'yarn' and self.attention_factor < 0:
      raise ValueError(f'{name}.attention_factor={self.attention_factor} must be >= 0 '
                       '(0: derived from factor).')


def frequencies(head_dim: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[np.ndarray, float]:
  """(inverse frequencies [head_dim / 2] float32, the factor cos and sin are multiplied by)."""
  dim = head_dim
  inv_freq_F = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  scaling = scaling or RopeScaling()
  if scaling.type == 'none':
    return inv_freq_F.astype(np.float32), 1.0
  if scaling.type == 'linear':
    return (inv_freq_F / scaling.factor).astype(np.float32), 1.0
  if scaling.type == 'llama3':
    return _llama3(inv_freq_F, scaling).astype(np.float32), 1.0
  return _yarn(inv_freq_F, dim, theta, scaling)


def _llama3(inv_freq_F: np.ndarray, s: RopeScaling) -> np.ndarray:
  low_freq_wavelen = s.original_max_positions / s.low_freq_factor
  high_freq_wavelen = s.original_max_positions / s.high_freq_factor
  wavelen_F = 2 * math.pi / inv_freq_F
  scaled_F = np.where(wavelen_F > low_freq_wavelen, inv_freq_F / s.factor, inv_freq_F)
  smooth_F = (s.original_max_positions / wavelen_F - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  smoothed_F = (1 - smooth_F) * scaled_F / s.factor + smooth_F * scaled_F
  medium_F = (wavelen_F >= high_freq_wavelen) & (wavelen_F <= low_freq_wavelen)
  return np.where(medium_F, smoothed_F, scaled_F)


def _yarn(inv_freq_F: np.ndarray, dim: int, theta: float,
          s: RopeScaling) -> tuple[np.ndarray, float]:
  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = s.attention_factor
  if not attention_factor:
    if s.mscale and s.mscale_all_dim:
      attention_factor = mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
    else:
      attention_factor = mscale(s.factor)

  def correction_dim(rotations):
    """The dimension whose frequency turns `rotations` times in the original context."""
    return dim * math.log(s.original_max_positions / (rotations * 2 * math.pi)) / (
        2 * math.log(theta))

  low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # as HF: no division by zero
  ramp_F = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  extrapolate_F = 1 - ramp_F  # 1: keep the frequency, 0: interpolate it
  inv_freq_F = inv_freq_F / s.factor * (1 - extrapolate_F) + inv_freq_F * extrapolate_F
  return inv_freq_F.astype(np.float32), float(attention_factor)


def apply_rope(x_BxLxHxD: jax.Array, positions_BxL: jax.Array, theta: float,
               scaling: RopeScaling | None = None) -> jax.Array:
  """Rotary embedding, half-split layout (HF's `rotate_half`): feature i pairs with feature
  i + D/2, rotated by position * inv_freq[i]; with a scaling, its frequencies and factor."""
  inv_freq_F, factor = frequencies(x_BxLxHxD.shape[-1], theta, scaling)
  # Angles in float32: bf16 positions * frequencies lose whole positions past 256.
  angles_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_F)
  sin_BxLx1xF = jnp.sin(angles_BxLxF)[:, :, None, :]
  cos_BxLx1xF = jnp.cos(angles_BxLxF)[:, :, None, :]
  if factor != 1.0:
    sin_BxLx1xF, cos_BxLx1xF = sin_BxLx1xF * factor, cos_BxLx1xF * factor
  x1, x2 = jnp.split(x_BxLxHxD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate(
      [x1 * cos_BxLx1xF - x2 * sin_BxLx1xF, x2 * cos_BxLx1xF + x1 * sin_BxLx1xF], axis=-1)
  return out.astype(x_BxLxHxD.dtype)
