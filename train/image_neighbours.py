"""Nearest-neighbour statistics of image features: precision, recall and memorisation.

They complement FD and KID (train/image_eval.py), which compare two feature distributions as
wholes and so cannot say *how* they differ, and they are computed in the same classifier
features.

  precision  the share of samples that lie on the real data's manifold, estimated as the union
             of balls around real points, each as wide as its k-th nearest real neighbour
             (Kynkaenniemi et al., 2019, k = 3): low when samples are unrealistic.
  recall     the same with the roles swapped (real points on the samples' manifold): low when
             the samples miss modes of the data.
  memorisation  each sample's distance to its nearest training image, against the same
             distance for held-out real images (the test of Meehan et al., 2020, reduced to two
             numbers): `ratio` is the median of the former over the median of the latter (about 1
             for a model that generalises, towards 0 for one that copies); `share` is the
             fraction of samples closer to a training image than the 1st percentile of held-out
             images (about 0.01 for a model that generalises, 1 for one that only copies).
             This is the check an FD below the held-out floor calls for: copying the training
             set also scores such an FD.

Distances are Euclidean, in float64, computed in row chunks so that memory stays at
`chunk` x M. Written here rather than taken from a package (prdc and the like hold the whole
N x M matrix and bring torch) because each statistic is a few lines of numpy.
"""

import numpy as np

K = 3  # the neighbour of the manifold radii, as in Kynkaenniemi et al.
_CHUNK = 1024


def _squared_distances(x_CxF: np.ndarray, y_MxF: np.ndarray, y_sq_M: np.ndarray) -> np.ndarray:
  d = np.sum(x_CxF * x_CxF, axis=1)[:, None] + y_sq_M[None, :] - 2.0 * (x_CxF @ y_MxF.T)
  return np.maximum(d, 0.0)  # rounding can push |x - y|^2 of a copy below 0


def nearest_distances(x_NxF: np.ndarray, y_MxF: np.ndarray, k: int = 1,
                      chunk: int = _CHUNK) -> np.ndarray:
  """[N, k] distances from each row of x to its k nearest rows of y, ascending."""
  x, y = np.asarray(x_NxF, np.float64), np.asarray(y_MxF, np.float64)
  if not 1 <= k <= len(y):
    raise ValueError(f'k={k} nearest neighbours among {len(y)} points.')
  y_sq = np.sum(y * y, axis=1)
  out = np.empty((len(x), k))
  for start in range(0, len(x), chunk):
    d = _squared_distances(x[start:start + chunk], y, y_sq)
    nearest = np.partition(d, k - 1, axis=1)[:, :k] if k < len(y) else d
    out[start:start + chunk] = np.sqrt(np.sort(nearest, axis=1)[:, :k])
  return out


def manifold_radii(x_NxF: np.ndarray, k: int = K, chunk: int = _CHUNK) -> np.ndarray:
  """[N] distance from each point to its k-th nearest other point of the same set."""
  return nearest_distances(x_NxF, x_NxF, k + 1, chunk)[:, k]  # column 0: the point itself


def coverage(x_NxF: np.ndarray, centres_MxF: np.ndarray, radii_M: np.ndarray,
             chunk: int = _CHUNK) -> float:
  """The share of rows of x inside at least one ball (centre, radius), borders included."""
  x, centres = np.asarray(x_NxF, np.float64), np.asarray(centres_MxF, np.float64)
  c_sq, r_sq = np.sum(centres * centres, axis=1), np.asarray(radii_M, np.float64) ** 2
  inside = 0
  for start in range(0, len(x), chunk):
    d = _squared_distances(x[start:start + chunk], centres, c_sq)
    inside += int(np.sum(np.any(d <= r_sq[None, :], axis=1)))
  return inside / len(x)


def precision_recall(real_NxF: np.ndarray, fake_MxF: np.ndarray, k: int = K,
                     real_radii_N: np.ndarray | None = None) -> tuple[float, float]:
  """(precision, recall) of samples `fake` against `real` (see the module docstring);
  `real_radii_N`, when the caller has them already, are `manifold_radii(real, k)`."""
  if real_radii_N is None:
    real_radii_N = manifold_radii(real_NxF, k)
  precision = coverage(fake_MxF, real_NxF, real_radii_N)
  recall = coverage(real_NxF, fake_MxF, manifold_radii(fake_MxF, k))
  return precision, recall


def memorisation(sample_to_train_N: np.ndarray, heldout_to_train_M: np.ndarray
                 ) -> dict[str, float]:
  """{'ratio', 'share'} (see the module docstring) from each sample's and each held-out
  image's distance to its nearest training image."""
  samples, heldout = np.asarray(sample_to_train_N), np.asarray(heldout_to_train_M)
  threshold = np.percentile(heldout, 1.0)
  return {
      'ratio': float(np.median(samples) / np.median(heldout)),
      # <=: a copy (distance 0) counts even when some held-out images repeat training ones
      'share': float(np.mean(samples <= threshold)),
  }
