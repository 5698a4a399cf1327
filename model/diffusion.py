"""Gaussian diffusion: noise schedules, parameterisations, losses and samplers.

Discrete-time variance-preserving process (DDPM, Ho et al. 2020; ADM, Dhariwal & Nichol 2021)
with T steps t = 0 .. T-1:

  x_t = alpha_t * x_0 + sigma_t * eps,   alpha_t = sqrt(alpha_bar_t),
  sigma_t = sqrt(1 - alpha_bar_t),        SNR_t = alpha_bar_t / (1 - alpha_bar_t).

Schedules: `linear` (betas evenly spaced from 1e-4 to 0.02 at T=1000, scaled for other T as in
iDDPM) and `cosine` (alpha_bar_t = f(t + 1) / f(0), f(u) = cos((u / T + s) / (1 + s) * pi / 2)^2,
s = 0.008, each beta clipped at 0.999; Nichol & Dhariwal 2021).

Parameterisations of the network output: `eps` (the noise), `x0` (the clean image) and `v`
(v = alpha * eps - sigma * x0; Salimans & Ho 2022). Every sampler works on (x0_hat, eps_hat),
which any of the three determines given x_t.

Samplers run over a subsequence of `steps` timesteps from T-1 down to 0, evenly spaced, and take
the last step to the clean image (alpha_bar = 1), so each ends with the model's x0 prediction:
  ddpm     ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020,
           strided as in iDDPM);
  ddim     DDIM with `eta` (Song et al. 2021): eta = 0 deterministic, eta = 1 the DDPM variance;
  dpm2m    DPM-Solver++(2M), a second-order deterministic multistep solver in x0 space
           (Lu et al. 2022), first order on its first and last steps.
Classifier-free guidance (Ho & Salimans 2022) mixes the conditional and unconditional outputs as
uncond + scale * (cond - uncond), in one forward pass over the doubled batch; scale 1 is the
plain conditional model.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ('linear', 'cosine')
PARAMETERIZATIONS = ('eps', 'v', 'x0')
LOSS_WEIGHTINGS = ('uniform', 'min_snr')
SAMPLERS = ('ddpm', 'ddim', 'dpm2m')

# model_fn(x_t [B, ...], t int32 [B], cond) -> output [B, ...] in the process's
# parameterisation; cond is the condition: class labels int32 [B], a pytree whose leaves are
# batch-first (a text context and its mask), or None.
ModelFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


def alpha_bar_schedule(name: str, timesteps: int) -> np.ndarray:
  """alpha_bar_t for t = 0 .. T-1, float64 [T]."""
  if name == 'linear':
    scale = 1000.0 / timesteps  # iDDPM: the same total noise for any T
    betas = np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)
  if name == 'cosine':
    s = 0.008
    f = np.cos((np.arange(timesteps + 1, dtype=np.float64) / timesteps + s) / (1 + s)
               * math.pi / 2) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1.0 - betas)
  raise ValueError(f'Unknown noise schedule {name!r}; choose one of {", ".join(SCHEDULES)}.')


@dataclasses.dataclass(frozen=True)
class Process:
  """A variance-preserving diffusion with T discrete steps and a parameterisation."""
  schedule: str = 'cosine'
  timesteps: int = 1000
  parameterization: str = 'eps'
  loss_weighting: str = 'uniform'
  min_snr_gamma: float = 5.0

  def __post_init__(self):
    for value, allowed, what in ((self.schedule, SCHEDULES, 'schedule'),
                                 (self.parameterization, PARAMETERIZATIONS, 'parameterization'),
                                 (self.loss_weighting, LOSS_WEIGHTINGS, 'loss_weighting')):
      if value not in allowed:
        raise ValueError(f'Unknown {what} {value!r}; choose one of {", ".join(allowed)}.')

  # --- schedule quantities, float32 arrays indexed by t; t = -1 is the clean image ----------

  @property
  def alpha_bar(self) -> np.ndarray:
    """[T + 1] with a trailing 1.0, so that index -1 is the clean image (alpha_bar = 1)."""
    return np.append(alpha_bar_schedule(self.schedule, self.timesteps), 1.0)

  def coefficients(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha_t, sigma_t) for integer t in [-1, T), float32; t = -1 gives (1, 0).

    Tabulated in float64: 1 - alpha_bar in float32 keeps only ~3 digits near t = 0.
    """
    ab = self.alpha_bar
    return (jnp.asarray(np.sqrt(ab), jnp.float32)[t],
            jnp.asarray(np.sqrt(1.0 - ab), jnp.float32)[t])

  def snr(self, t: jax.Array) -> jax.Array:
    """alpha_bar / (1 - alpha_bar) for t in [0, T), float32."""
    ab = self.alpha_bar[:-1]
    return jnp.asarray(ab / (1.0 - ab), jnp.float32)[t]

  def add_noise(self, x0: jax.Array, eps: jax.Array, t_B: jax.Array) -> jax.Array:
    a, s = (_bcast(c, x0) for c in self.coefficients(t_B))
    return a * x0 + s * eps

  # --- parameterisations ----------------------------------------------------------------

  def target(self, x0: jax.Array, eps: jax.Array, t_B: jax.Array) -> jax.Array:
    """What the network is trained to output."""
    if self.parameterization == 'eps':
      return eps
    if self.parameterization == 'x0':
      return x0
    a, s = (_bcast(c, x0) for c in self.coefficients(t_B))
    return a * eps - s * x0

  def to_x0_eps(self, out: jax.Array, x_t: jax.Array,
                t_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x0_hat, eps_hat) from a network output, given x_t.

    Division by sigma (x0 -> eps) or alpha (eps -> x0) is where the prediction is least
    determined; with alpha_bar < 1 everywhere on the grid neither is zero.
    """
    a, s = (_bcast(c, x_t) for c in self.coefficients(t_B))
    if self.parameterization == 'eps':
      return (x_t - s * out) / a, out
    if self.parameterization == 'x0':
      return out, (x_t - a * out) / s
    return a * x_t - s * out, s * x_t + a * out

  def from_x0(self, x0: jax.Array, x_t: jax.Array, t_B: jax.Array) -> jax.Array:
    """The network output that predicts `x0` at x_t (inverse of `to_x0_eps`)."""
    a, s = (_bcast(c, x_t) for c in self.coefficients(t_B))
    eps = (x_t - a * x0) / s
    return self.target(x0, eps, t_B)

  # --- loss --------------------------------------------------------------------------

  def loss_weight(self, t_B: jax.Array) -> jax.Array:
    """Per-example weight on the mean squared error of the parameterisation's target.

    `uniform` is the plain MSE of the target. `min_snr` (Hang et al. 2023) weights the x0
    error by min(SNR, gamma); the eps and v errors are the x0 error times SNR and SNR + 1,
    so their weights divide by those.
    """
    if self.loss_weighting == 'uniform':
      return jnp.ones(t_B.shape, jnp.float32)
    snr = self.snr(t_B)
    clipped = jnp.minimum(snr, self.min_snr_gamma)
    native = {'eps': snr, 'v': snr + 1.0, 'x0': jnp.ones_like(snr)}[self.parameterization]
    return clipped / native

  def loss(self, out: jax.Array, x0: jax.Array, eps: jax.Array, t_B: jax.Array) -> jax.Array:
    """Weighted MSE per example, float32 [B]."""
    err = jnp.square(out.astype(jnp.float32) - self.target(x0, eps, t_B))
    per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    return self.loss_weight(t_B) * per_example


def _bcast(c_B: jax.Array, x: jax.Array) -> jax.Array:
  return c_B.reshape(c_B.shape + (1,) * (x.ndim - c_B.ndim))


# --- samplers ------------------------------------------------------------------------------


def timestep_grid(timesteps: int, steps: int) -> np.ndarray:
  """`steps` timesteps from T-1 down to 0, evenly spaced, then -1 (the clean image): [steps+1]."""
  if not 1 <= steps <= timesteps:
    raise ValueError(f'The sampler needs 1 <= steps <= timesteps={timesteps}; got {steps}.')
  grid = np.round(np.linspace(timesteps - 1, 0, steps)).astype(np.int32)
  return np.append(grid, -1).astype(np.int32)


def guided(model_fn: ModelFn, cond, null_cond,
           guidance_scale: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """out(x_t, t) of the (guided) model: uncond + scale * (cond - uncond) in one pass.

  cond: the condition model_fn takes (labels [B], or a pytree of batch-first arrays such as
  a text context and its mask), or None; null_cond: the same structure and shapes for "no
  condition" (the null label, the empty caption's context).
  """
  if cond is None or guidance_scale == 1.0:
    return lambda x, t: model_fn(x, t, cond)

  def out(x, t):
    both = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, null_cond))
    conditional, uncond = jnp.split(both, 2)
    return uncond + guidance_scale * (conditional - uncond)
  return out


def sample(model_fn: ModelFn, process: Process, shape: tuple[int, ...], key: jax.Array, *,
           sampler: str = 'ddim', steps: int = 50, eta: float = 0.0,
           labels_B: jax.Array | None = None, null_label: int = -1,
           guidance_scale: float = 1.0,
           clip_x0: tuple[float, float] | None = None, cond=None, null_cond=None) -> jax.Array:
  """Draws x0 of `shape` (batch first) from pure noise; jittable, `steps` static.

  Args:
    model_fn: the network (see ModelFn).
    process: the schedule and parameterisation the network was trained with.
    shape: [B, ...] of the samples.
    key: randomness for the start noise and (ddpm, ddim with eta > 0) every step.
    sampler: one of SAMPLERS.
    steps: network evaluations (times two with guidance).
    eta: DDIM's noise scale (ddim only): 0 deterministic, 1 the DDPM posterior variance.
    labels_B: class labels for a conditional model, or None.
    null_label: the label the model was trained with for "no class" (label dropout).
    cond, null_cond: any other condition and its "no condition" (see `guided`), e.g. a text
      context; instead of labels_B and null_label.
    guidance_scale: classifier-free guidance scale; 1 is no guidance.
    clip_x0: (low, high) to clip every x0 prediction to (the data range), or None.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'Unknown sampler {sampler!r}; choose one of {", ".join(SAMPLERS)}.')
  grid = timestep_grid(process.timesteps, steps)
  if cond is None and labels_B is not None:
    cond, null_cond = labels_B, jnp.full_like(labels_B, null_label)
  net = guided(model_fn, cond, null_cond, guidance_scale)
  b = shape[0]
  key, start_key = jax.random.split(key)
  x = jax.random.normal(start_key, shape, jnp.float32)

  def denoise(x, t):
    t_B = jnp.full((b,), t, jnp.int32)
    x0, eps = process.to_x0_eps(net(x, t_B).astype(jnp.float32), x, t_B)
    if clip_x0 is None:
      return x0, eps
    # Clipped predictions, as DDPM and ADM sample: at high noise an eps network's x0 is far
    # outside the data range, and the trajectory would carry that into saturated images.
    x0 = jnp.clip(x0, *clip_x0)
    a, s = (_bcast(c, x) for c in process.coefficients(t_B))
    return x0, (x - a * x0) / s

  if sampler == 'dpm2m':
    return _dpm_solver_2m(denoise, process, x, grid)
  # Per-step coefficients in float64 (1 - alpha_bar near t = 0 needs it); x_s = c_x0 * x0_hat
  # + c_x * x_t + c_eps * eps_hat + std * z.
  ab_t, ab_s = process.alpha_bar[grid[:-1]], process.alpha_bar[grid[1:]]
  zero = np.zeros_like(ab_t)
  if sampler == 'ddpm':
    # The posterior q(x_s | x_t, x0) of the strided chain, beta = 1 - ab_t / ab_s.
    beta = 1.0 - ab_t / ab_s
    c_x0 = np.sqrt(ab_s) * beta / (1.0 - ab_t)
    c_x = np.sqrt(1.0 - beta) * (1.0 - ab_s) / (1.0 - ab_t)
    c_eps, std = zero, np.sqrt(beta * (1.0 - ab_s) / (1.0 - ab_t))
  else:
    std = eta * np.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
    c_x0, c_x = np.sqrt(ab_s), zero
    c_eps = np.sqrt(np.maximum(1.0 - ab_s - std ** 2, 0.0))
  coefs = {k: jnp.asarray(v, jnp.float32)
           for k, v in dict(c_x0=c_x0, c_x=c_x, c_eps=c_eps, std=std).items()}
  coefs['t'] = jnp.asarray(grid[:-1])
  coefs['key'] = jax.random.split(key, len(grid) - 1)

  def step(x, c):
    x0, eps = denoise(x, c['t'])
    noise = jax.random.normal(c['key'], x.shape, jnp.float32)
    return c['c_x0'] * x0 + c['c_x'] * x + c['c_eps'] * eps + c['std'] * noise, None

  x, _ = jax.lax.scan(step, x, coefs)
  return x


def _dpm_solver_2m(denoise, process: Process, x: jax.Array, grid: np.ndarray) -> jax.Array:
  """DPM-Solver++(2M) in half-log-SNR lambda = log(alpha / sigma), data prediction.

  x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D,  h = lambda_s - lambda_t, where D is
  x0_hat on the first step and the multistep correction (1 + 1/(2r)) x0_t - 1/(2r) x0_prev,
  r = h_prev / h, after. The last step (to sigma = 0, h infinite) is x0_hat itself.
  """
  ab = process.alpha_bar
  alpha, sigma = np.sqrt(ab[grid]), np.sqrt(1.0 - ab[grid])
  lam = np.log(alpha[:-1] / sigma[:-1])  # lambda at every grid point but the clean one
  n = len(grid) - 1
  if n == 1:
    return denoise(x, grid[0])[0]
  h = np.diff(lam)  # [n - 1]: the steps between noisy grid points
  r = np.concatenate([[1.0], h[:-1] / h[1:]])  # r of each step; the first one is unused
  coefs = dict(
      t=jnp.asarray(grid[:n - 1]),
      ratio=jnp.asarray(sigma[1:n] / sigma[:n - 1], jnp.float32),
      phi=jnp.asarray(-alpha[1:n] * np.expm1(-h), jnp.float32),
      c_now=jnp.asarray(np.where(np.arange(n - 1) == 0, 1.0, 1.0 + 0.5 / r), jnp.float32),
      c_prev=jnp.asarray(np.where(np.arange(n - 1) == 0, 0.0, -0.5 / r), jnp.float32),
  )

  def step(carry, c):
    x, x0_prev = carry
    x0, _ = denoise(x, c['t'])
    d = c['c_now'] * x0 + c['c_prev'] * x0_prev
    return (c['ratio'] * x + c['phi'] * d, x0), None

  (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), coefs)
  return denoise(x, grid[n - 1])[0]
