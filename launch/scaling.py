"""Scaling laws: the compute-optimal model size and tokens for a FLOP budget, and a law of
loss against compute fitted to a user's own runs.

Compute-optimal laws (Hoffmann et al. 2022, "Training Compute-Optimal Large Language
Models", arXiv:2203.15556), all with training compute C = 6 N D (N parameters, D tokens):

- `chinchilla` (the default): their approach 3, the parametric loss
  L(N, D) = E + A / N^alpha + B / D^beta with the constants printed in the paper
  (E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28). Minimising L under C = 6 N D gives
  N_opt = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)), D = C/(6N).
  These printed (rounded) constants put Gopher's budget (5.76e23 FLOPs) at 32 B parameters
  and 3.0 T tokens, 93 tokens a parameter; `epoch` below explains and corrects the bias.
- `epoch`: the same form refitted by Besiroglu et al. 2024 ("Chinchilla Scaling: A
  replication attempt", arXiv:2404.10102), who found the printed constants rounded and the
  original fit stopped early: E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658.
  It agrees with the paper's approaches 1 and 2 (about 20 tokens per parameter).
- `approach1`: the paper's approaches 1 and 2, N_opt proportional to C^a with a = 0.50
  (approach 2: 0.49; set `exponent`), anchored at their Table 3's 1 B parameters for
  1.21e20 FLOPs. Its predicted loss is the `chinchilla` L(N, D) at that N and D.

The fit (`fit_loss_vs_compute`) is L(C) = E + A C^-alpha over runs of one recipe at several
sizes, the form of Hoffmann et al.'s figure 1 and of most lab scaling studies.
"""

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np

from data.errors import DataError


@dataclasses.dataclass(frozen=True)
class ParametricLaw:
  """L(N, D) = E + A / N^alpha + B / D^beta, trained compute-optimally under C = 6 N D."""
  name: str
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  source: str

  def loss(self, n: float, d: float) -> float:
    return self.E + self.A / n**self.alpha + self.B / d**self.beta

  @property
  def _g(self) -> float:
    return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

  @property
  def exponent(self) -> float:
    """a in N_opt proportional to C^a."""
    return self.beta / (self.alpha + self.beta)

  def optimal(self, flops: float) -> tuple[float, float]:
    """(N, D) that minimise L(N, D) with 6 N D = `flops` (setting dL/dN = 0 along D = C/6N)."""
    n = self._g * (flops / 6) ** self.exponent
    return n, flops / (6 * n)

  def flops_for_params(self, n: float) -> float:
    """The budget whose compute-optimal model has `n` parameters (inverse of `optimal`)."""
    return 6 * (n / self._g) ** (1 / self.exponent)


CHINCHILLA = ParametricLaw(
    'chinchilla', E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
    source='Hoffmann et al. 2022, approach 3 (eq. 10 constants)')
EPOCH = ParametricLaw(
    'epoch', E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
    source='Besiroglu et al. 2024, refit of Hoffmann et al. approach 3')


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """N_opt = anchor_params (C / anchor_flops)^exponent, D = C / (6 N); losses from `loss_law`."""
  name: str
  exponent: float
  anchor_params: float
  anchor_flops: float
  source: str
  loss_law: ParametricLaw = CHINCHILLA

  def loss(self, n: float, d: float) -> float:
    return self.loss_law.loss(n, d)

  def optimal(self, flops: float) -> tuple[float, float]:
    n = self.anchor_params * (flops / self.anchor_flops) ** self.exponent
    return n, flops / (6 * n)

  def flops_for_params(self, n: float) -> float:
    return self.anchor_flops * (n / self.anchor_params) ** (1 / self.exponent)


def approach1(exponent: float = 0.50) -> PowerLaw:
  return PowerLaw('approach1', exponent, anchor_params=1e9, anchor_flops=1.21e20,
                  source=f'Hoffmann et al. 2022, approaches 1/2: N_opt ~ C^{exponent:g}, '
                         'anchored at Table 3 (1 B params, 1.21e20 FLOPs)')


LAW_NAMES = ('chinchilla', 'epoch', 'approach1')


def get_law(name: str, exponent: float = 0.0) -> ParametricLaw | PowerLaw:
  """The law called `name` (LAW_NAMES); `exponent` > 0 sets approach1's a."""
  if name == 'chinchilla':
    return CHINCHILLA
  if name == 'epoch':
    return EPOCH
  if name == 'approach1':
    return approach1(exponent or 0.50)
  raise ValueError(f'Unknown law {name!r}; choose one of {", ".join(LAW_NAMES)}.')


# ---------------------------------------------------------------------------
# Loss against compute, fitted to runs.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ComputeFit:
  """L(C) = E + A C^-alpha, with one-sigma errors of the three parameters (nan when the fit
  has no spare degrees of freedom)."""
  E: float
  A: float
  alpha: float
  E_err: float
  alpha_err: float
  rms_residual: float  # of the loss, over the runs

  def loss(self, flops):
    return self.E + self.A * np.asarray(flops, dtype=np.float64) ** -self.alpha


def fit_loss_vs_compute(flops: Sequence[float], losses: Sequence[float]) -> ComputeFit:
  """Least squares in log loss of L(C) = E + A C^-alpha (scipy's curve_fit, trust-region
  with bounds 0 <= E < min loss and 0 < alpha < 3), from a few starting points.

  C is scaled by the runs' geometric mean so that A stays near the losses' size; log loss
  weighs every run by its relative error, as the losses span a small range anyway.
  """
  from scipy import optimize  # scipy comes with scikit-learn, a core dependency

  c = np.asarray(flops, dtype=np.float64)
  y = np.asarray(losses, dtype=np.float64)
  if len(c) < 3:
    raise DataError(f'Fitting L(C) = E + A C^-alpha needs at least 3 runs; got {len(c)}.')
  if np.any(c <= 0) or np.any(y <= 0):
    raise DataError('Every run needs positive training FLOPs and a positive eval loss.')
  if len(np.unique(c)) < 3:
    raise DataError('The runs need at least 3 different compute budgets to fit a law.')
  c_ref = math.exp(np.mean(np.log(c)))
  x = np.log(c / c_ref)

  def model(x, e, log_a, alpha):
    return np.log(e + np.exp(log_a - alpha * x))

  lower, upper = [0.0, -30.0, 1e-4], [float(y.min()) * (1 - 1e-9), 30.0, 3.0]
  best = None
  for e_frac in (0.0, 0.5, 0.9):
    for alpha0 in (0.05, 0.3, 1.0):
      e0 = e_frac * y.min()
      p0 = [e0, math.log(max(float(np.exp(np.mean(np.log(y)))) - e0, 1e-6)), alpha0]
      try:
        with warnings.catch_warnings():  # with 3 runs there is no covariance: errors are nan
          warnings.simplefilter('ignore', optimize.OptimizeWarning)
          p, cov = optimize.curve_fit(model, x, np.log(y), p0=p0, bounds=(lower, upper),
                                      maxfev=20_000)
      except RuntimeError:  # no convergence from this start
        continue
      sse = float(np.sum((model(x, *p) - np.log(y)) ** 2))
      if best is None or sse < best[0]:
        best = (sse, p, cov)
  if best is None:
    raise DataError('L(C) = E + A C^-alpha did not converge on these runs.')
  _, (e, log_a, alpha), cov = best
  err = np.sqrt(np.diag(cov)) if len(c) > 3 and np.all(np.isfinite(cov)) else [math.nan] * 3
  a = math.exp(log_a) * c_ref**alpha
  fit = ComputeFit(E=float(e), A=float(a), alpha=float(alpha), E_err=float(err[0]),
                   alpha_err=float(err[2]), rms_residual=0.0)
  rms = float(np.sqrt(np.mean((fit.loss(c) - y) ** 2)))
  return dataclasses.replace(fit, rms_residual=rms)


def plot_fit(path: str, flops: Sequence[float], losses: Sequence[float], labels: Sequence[str],
             fit: ComputeFit, predict_flops: float | None = None) -> None:
  """A PNG of the runs (points), the fitted law (line) and the prediction (a star)."""
  import matplotlib
  matplotlib.use('Agg')  # no display; must precede pyplot
  from matplotlib import pyplot as plt

  c = np.asarray(flops, dtype=np.float64)
  hi = max(c.max(), predict_flops or 0.0)
  grid = np.geomspace(c.min() / 2, hi * 2, 200)
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  ax.plot(grid, fit.loss(grid), '-', color='tab:blue',
          label=f'L = {fit.E:.3g} + {fit.A:.3g} C^-{fit.alpha:.3g}')
  ax.scatter(c, losses, color='black', zorder=3, label='runs')
  for ci, li, name in zip(c, losses, labels, strict=True):
    ax.annotate(name, (ci, li), textcoords='offset points', xytext=(4, 4), fontsize=7)
  if predict_flops:
    ax.scatter([predict_flops], [fit.loss(predict_flops)], marker='*', s=160,
               color='tab:red', zorder=4, label=f'predicted at {predict_flops:.3g} FLOPs')
  if fit.E > 1e-6 * min(losses):  # a floor the runs constrain
    ax.axhline(fit.E, color='gray', lw=0.8, ls=':', label=f'E = {fit.E:.3g}')
  ax.set_xscale('log')
  ax.set_xlabel('training compute C (FLOPs)')
  ax.set_ylabel('final eval loss')
  ax.legend(fontsize=8)
  ax.grid(True, which='both', alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, format='png')
  plt.close(fig)
