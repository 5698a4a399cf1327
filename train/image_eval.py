"""Sample quality of image models: FD, KID, their real-data floors, conditional accuracy.

Features come from a small classifier (model/classifier.py) that Kiln trains
once on the dataset's training split and caches under `eval.classifier_dir`,
keyed by a digest of that split and the classifier's settings, so numbers are
comparable across runs. The reference is the whole training split.

  FD     the Frechet distance between Gaussian fits of the two feature sets:
         |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).
  KID    the unbiased estimate of MMD^2 with the kernel k(x, y) = (x.y / F + 1)^3,
         averaged over random subsets (Binkowski et al., 2018); ~0 in expectation
         for samples of the training distribution.
  floor  both, for `eval.num_samples` held-out real images against the training
         split: what a perfect model would score with as many samples (FD's bias
         depends on the sample count, so the floor uses the same count).
  cond_acc  the fraction of samples that the classifier assigns to their
         conditioning label.
  precision, recall  k-NN manifold precision and recall (train/image_neighbours.py)
         against a fixed subset of `eval.num_samples` training images, with their
         floors for the held-out images.
  memorisation_ratio, memorisation_share  the samples' distances to their nearest
         training image against the held-out images' (train/image_neighbours.py).

Classifier work runs on this process's first local device. Process 0 loads or
trains the classifier (and saves it); the others receive it from process 0,
so every process reports identical numbers.
"""

import functools
import hashlib
import io
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from data import images as images_lib
from data import storage
from data.errors import ConfigError, check_positive
from model import classifier as classifier_lib
from train import image_neighbours

# Bump when the classifier or its training changes: old caches are then ignored.
CLASSIFIER_VERSION = 1
_BATCH = 128  # classifier training batch
_FEATURE_BATCH = 500  # images per feature call (one compiled shape)
_FLOOR_SEED = 0


def check_eval_config(cfg_eval: ml_collections.ConfigDict) -> None:
  config = ml_collections.ConfigDict({'eval': cfg_eval})
  check_positive(config, 'eval.num_samples', 'eval.classifier_steps', 'eval.kid_subsets')
  check_positive(config, 'eval.kid_subset_size')
  if cfg_eval.kid_subset_size < 2:
    raise ConfigError(f'eval.kid_subset_size={cfg_eval.kid_subset_size} must be >= 2.')


def classifier_dir(cfg_eval: ml_collections.ConfigDict) -> str:
  if cfg_eval.classifier_dir:
    return os.path.expanduser(cfg_eval.classifier_dir)
  if os.environ.get('KILN_CACHE'):
    return os.path.join(os.environ['KILN_CACHE'], 'classifiers')
  return os.path.expanduser('~/.cache/kiln/classifiers')


class ImageEvaluator:
  """Scores generated images against one dataset; see the module docstring.

  The classifier, the held-out images of the floor and the floor's KID subsets
  are the same for every run of a dataset; `seed` draws the KID subsets of the
  scored samples.
  """

  def __init__(self, cfg_data: ml_collections.ConfigDict, cfg_eval: ml_collections.ConfigDict,
               seed: int = 0):
    check_eval_config(cfg_eval)
    self.cfg_eval, self.seed = cfg_eval, seed
    self.info = images_lib.dataset_info(cfg_data)
    train_x, train_y = images_lib.load_split(cfg_data, 'train')
    test_x, test_y = images_lib.load_split(cfg_data, 'test')
    n = cfg_eval.num_samples
    if n > len(test_x):
      raise ConfigError(
          f'eval.num_samples={n} is more than the {len(test_x)} held-out images of '
          f'data.source={cfg_data.source!r}, which the floor needs as many of; lower it (or '
          'raise data.eval_fraction where the source has no test split).')
    self.model_cfg = classifier_lib.ClassifierConfig(*self.info.shape[1:], self.info.num_classes)
    self.device = jax.local_devices()[0]
    # The classifier's own one-device mesh: the trainer scores inside its mesh context, which
    # would refuse arrays that live on one device.
    self.local_mesh = jax.sharding.Mesh(np.array([self.device]), ('local',))
    self.feature_scale = 1.0
    key = _cache_key(self.model_cfg, cfg_eval.classifier_steps, train_x, train_y)
    self.directory = os.path.join(classifier_dir(cfg_eval),
                                  f'{self.info.name.replace(":", "_")}-{key}')
    if jax.process_index() == 0:
      self.graphdef, params, self.train_features, self.meta = self._load_or_train(
          train_x, train_y, test_x, test_y)
    else:
      self.graphdef, params, self.train_features, self.meta = self._placeholder(len(train_x))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      params, self.train_features = multihost_utils.broadcast_one_to_all(
          (params, self.train_features))
    self.params = jax.device_put(params, self.device)
    # Features in units where the training features have mean |x|^2 / F = 1, the scale at which
    # KID's kernel (x.y / F + 1)^3 was designed (Inception features); FD scales with it too.
    train_features = np.asarray(self.train_features, np.float64)
    self.feature_scale = float(np.sqrt(np.mean(np.sum(train_features**2, axis=1))
                                       / train_features.shape[1]))
    self.train_features = train_features / self.feature_scale
    self.train_mu, self.train_sigma = gaussian_fit(self.train_features)
    # Precision and recall compare equal counts (their bias depends on both): a fixed subset
    # of the training features, as many as the samples, is their real set.
    subset = np.random.default_rng(_FLOOR_SEED + 1).choice(
        len(self.train_features), min(n, len(self.train_features)), replace=False)
    self.pr_real = self.train_features[np.sort(subset)]
    self.pr_real_radii = image_neighbours.manifold_radii(self.pr_real)
    held = np.random.default_rng(_FLOOR_SEED).choice(len(test_x), n, replace=False)
    held_features = self.features(images_lib.to_float(test_x[np.sort(held)]))
    floor = self._scores(held_features, _FLOOR_SEED)
    self.floor = {f'{key}_floor': floor[key] for key in
                  ('eval/fd', 'eval/kid', 'eval/precision', 'eval/recall')}
    self.heldout_to_train = image_neighbours.nearest_distances(held_features,
                                                               self.train_features)[:, 0]

  # --- scoring -------------------------------------------------------------------

  def score(self, images_NxHxWxC: np.ndarray, labels_N: np.ndarray | None = None
            ) -> dict[str, float]:
    """FD, KID, precision, recall, their floors, memorisation, and cond_acc when `labels_N`
    (the conditioning labels) is given.

    Images are float in [-1, 1], [N, H, W, C] of the dataset's shape; N should be
    eval.num_samples, the floor's count.
    """
    images_NxHxWxC = np.asarray(images_NxHxWxC, np.float32)
    if images_NxHxWxC.shape[1:] != self.info.shape:
      raise ValueError(f'images of shape {images_NxHxWxC.shape[1:]} do not match the '
                       f'dataset {self.info.name} {self.info.shape}.')
    if len(images_NxHxWxC) != self.cfg_eval.num_samples:
      logging.warning('Scoring %d images against a floor of eval.num_samples=%d: FD is biased '
                      'by the count, so the two are not comparable.', len(images_NxHxWxC),
                      self.cfg_eval.num_samples)
    features, logits = self.features_and_logits(images_NxHxWxC)
    out = {**self._scores(features, self.seed), **self.floor, **self._memorisation(features)}
    if labels_N is not None:
      out['eval/cond_acc'] = float(np.mean(np.argmax(logits, -1) == np.asarray(labels_N)))
    return out

  def _scores(self, features_NxF: np.ndarray, seed: int) -> dict[str, float]:
    if not np.all(np.isfinite(features_NxF)):  # a diverged model: report, don't crash
      return dict.fromkeys(('eval/fd', 'eval/kid', 'eval/precision', 'eval/recall'),
                           float('nan'))
    mu, sigma = gaussian_fit(features_NxF)
    rng = np.random.default_rng(seed)  # KID's subsets
    precision, recall = image_neighbours.precision_recall(
        self.pr_real, features_NxF, real_radii_N=self.pr_real_radii)
    return {
        'eval/fd': frechet_distance(mu, sigma, self.train_mu, self.train_sigma),
        'eval/kid': kernel_inception_distance(features_NxF, self.train_features, rng,
                                              self.cfg_eval.kid_subset_size,
                                              self.cfg_eval.kid_subsets),
        'eval/precision': precision,
        'eval/recall': recall,
    }

  def _memorisation(self, features_NxF: np.ndarray) -> dict[str, float]:
    keys = ('eval/memorisation_ratio', 'eval/memorisation_share')
    if not np.all(np.isfinite(features_NxF)):
      return dict.fromkeys(keys, float('nan'))
    to_train = image_neighbours.nearest_distances(features_NxF, self.train_features)[:, 0]
    stats = image_neighbours.memorisation(to_train, self.heldout_to_train)
    return {keys[0]: stats['ratio'], keys[1]: stats['share']}

  def features(self, images_NxHxWxC: np.ndarray) -> np.ndarray:
    """Classifier features (scaled, see __init__), float64 [N, F], of images in [-1, 1]."""
    return self.features_and_logits(images_NxHxWxC)[0]

  def features_and_logits(self, images_NxHxWxC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with jax.set_mesh(self.local_mesh):
      features, logits = _batched(
          lambda x: _features_and_logits(self.graphdef, self.params, x), images_NxHxWxC,
          self.device)
    return features / self.feature_scale, logits

  # --- the classifier ----------------------------------------------------------------

  def _load_or_train(self, train_x, train_y, test_x, test_y):
    meta_path = os.path.join(self.directory, 'meta.json')
    graphdef, params = self._abstract_model()
    if os.path.exists(meta_path):  # written last: the cache is whole
      with open(meta_path) as f:
        meta = json.load(f)
      with np.load(os.path.join(self.directory, 'params.npz')) as npz:
        flat = {tuple(_path_key(k)): npz[k] for k in npz.files}
      nnx.replace_by_pure_dict(params, _unflatten(flat, nnx.to_pure_dict(params)))
      train_features = np.load(os.path.join(self.directory, 'train_features.npy'))
      logging.info('Loaded the %s feature classifier from %s (held-out accuracy %.4f).',
                   self.info.name, self.directory, meta['test_accuracy'])
      return graphdef, params, train_features, meta
    logging.info('Training the %s feature classifier (%d steps); it is cached in %s.',
                 self.info.name, self.cfg_eval.classifier_steps, self.directory)
    start = time.perf_counter()
    with jax.set_mesh(self.local_mesh):
      params = train_classifier(self.model_cfg, train_x, train_y,
                                self.cfg_eval.classifier_steps, self.device)
    seconds = time.perf_counter() - start
    self.graphdef, self.params = graphdef, jax.device_put(params, self.device)
    train_features = self.features(images_lib.to_float(train_x)).astype(np.float32)
    _, test_logits = self.features_and_logits(images_lib.to_float(test_x))
    accuracy = float(np.mean(np.argmax(test_logits, -1) == test_y))
    meta = {'dataset': self.info.name, 'shape': list(self.info.shape),
            'num_classes': self.info.num_classes, 'steps': self.cfg_eval.classifier_steps,
            'version': CLASSIFIER_VERSION, 'test_accuracy': accuracy,
            'train_seconds': round(seconds, 2), 'train_images': len(train_x),
            'test_images': len(test_x)}
    logging.info('Feature classifier: held-out accuracy %.4f after %.1f s.', accuracy, seconds)
    self._save(params, train_features, meta)
    return graphdef, params, train_features, meta

  def _abstract_model(self) -> tuple[nnx.GraphDef, nnx.State]:
    new = lambda: classifier_lib.Classifier(self.model_cfg, rngs=nnx.Rngs(0))
    return nnx.split(nnx.eval_shape(new), nnx.Param)

  def _placeholder(self, n_train: int):
    """Zeros shaped like process 0's classifier and features, for the broadcast to fill."""
    graphdef, abstract = self._abstract_model()
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    return graphdef, params, np.zeros((n_train, self.model_cfg.features), np.float32), {}

  def _save(self, params, train_features: np.ndarray, meta: dict) -> None:
    flat = {'/'.join(map(str, k)): np.asarray(v)
            for k, v in _flatten(nnx.to_pure_dict(params)).items()}
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    storage.write_atomic(os.path.join(self.directory, 'params.npz'), buffer.getvalue())
    buffer = io.BytesIO()
    np.save(buffer, train_features)
    storage.write_atomic(os.path.join(self.directory, 'train_features.npy'),
                            buffer.getvalue())
    storage.write_atomic(os.path.join(self.directory, 'meta.json'),
                            json.dumps(meta, indent=2).encode())


def train_classifier(model_cfg: classifier_lib.ClassifierConfig, images_NxHxWxC: np.ndarray,
                     labels_N: np.ndarray, steps: int, device) -> nnx.State:
  """Trains a fresh classifier on uint8 images; returns its parameters (numpy).

  Adam with cosine decay on cross-entropy, batches drawn with a fixed seed. The
  split lives on the device and each step gathers its batch there. (A jitted
  scan over all steps compiles once but ran ~6x slower on CPU, measured.)
  """
  rng = np.random.default_rng(0)
  batch = min(_BATCH, len(images_NxHxWxC))
  tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps, alpha=0.05))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: classifier_lib.Classifier(
      model_cfg, rngs=nnx.Rngs(0))), nnx.Param)

  def loss_fn(params, x_BxHxWxC, y_B):
    logits_BxK = nnx.merge(graphdef, params)(x_BxHxWxC)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxK, y_B).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, images_NxHxWxC, labels_N, idx_B):
    x_BxHxWxC = images_NxHxWxC[idx_B].astype(jnp.float32) / 127.5 - 1.0
    grads = jax.grad(loss_fn)(params, x_BxHxWxC, labels_N[idx_B])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  with jax.default_device(device):
    params = jax.jit(lambda: nnx.state(classifier_lib.Classifier(model_cfg, rngs=nnx.Rngs(0)),
                                       nnx.Param))()
    opt_state = jax.jit(tx.init)(params)
  data = jax.device_put((images_NxHxWxC, labels_N.astype(np.int32)), device)
  for _ in range(steps):
    idx_B = rng.choice(len(images_NxHxWxC), batch, replace=False).astype(np.int32)
    params, opt_state = step(params, opt_state, *data, idx_B)
  return jax.device_get(params)


@functools.partial(jax.jit, static_argnums=0)
def _features_and_logits(graphdef: nnx.GraphDef, params: nnx.State, x_BxHxWxC: jax.Array):
  model = nnx.merge(graphdef, params)
  features_BxF = model.features(x_BxHxWxC)
  return features_BxF, model.head(features_BxF)


def _batched(fn, images_NxHxWxC: np.ndarray, device) -> tuple[np.ndarray, np.ndarray]:
  """fn over fixed-size chunks (one compilation), zero-padded at the end; float64 outputs."""
  outs = []
  for lo in range(0, len(images_NxHxWxC), _FEATURE_BATCH):
    chunk = images_NxHxWxC[lo:lo + _FEATURE_BATCH]
    padded = np.zeros((_FEATURE_BATCH, *chunk.shape[1:]), np.float32)
    padded[:len(chunk)] = chunk
    features, logits = jax.device_get(fn(jax.device_put(padded, device)))
    outs.append((features[:len(chunk)], logits[:len(chunk)]))
  return tuple(np.concatenate([o[i] for o in outs]).astype(np.float64) for i in range(2))


def _cache_key(model_cfg, steps: int, train_x: np.ndarray, train_y: np.ndarray) -> str:
  digest = hashlib.sha256(json.dumps([repr(model_cfg), steps, CLASSIFIER_VERSION]).encode())
  digest.update(np.ascontiguousarray(train_x).data)
  digest.update(np.ascontiguousarray(train_y).data)
  return digest.hexdigest()[:16]


def _flatten(tree: dict, prefix=()) -> dict:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      flat.update(_flatten(v, (*prefix, k)))
    else:
      flat[(*prefix, k)] = v
  return flat


def _path_key(name: str) -> list:
  return [int(p) if p.isdigit() else p for p in name.split('/')]


def _unflatten(flat: dict, like: dict, prefix=()) -> dict:
  return {k: _unflatten(flat, v, (*prefix, k)) if isinstance(v, dict) else flat[(*prefix, k)]
          for k, v in like.items()}


# --- the distances ------------------------------------------------------------------


def gaussian_fit(features_NxF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [F] and unbiased covariance [F, F], float64."""
  x = np.asarray(features_NxF, np.float64)
  return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

  tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of the
  symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which has the same eigenvalues as
  S1 S2; symmetric eigendecompositions stay real and stable where a general
  sqrtm of S1 S2 (singular for ReLU features with dead units) does not.
  """
  eigvals, eigvecs = np.linalg.eigh(sigma1)
  sqrt1 = (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T
  inner = np.linalg.eigvalsh(sqrt1 @ sigma2 @ sqrt1)
  tr_sqrt = np.sqrt(np.clip(inner, 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_sqrt)


def kernel_inception_distance(x_NxF: np.ndarray, y_MxF: np.ndarray, rng: np.random.Generator,
                              subset_size: int, subsets: int) -> float:
  """Unbiased MMD^2 with the kernel (x.y / F + 1)^3, averaged over `subsets` random subsets
  of min(subset_size, N, M) rows of each set (drawn without replacement)."""
  m = min(subset_size, len(x_NxF), len(y_MxF))
  d = x_NxF.shape[1]

  def kernel_sum(a, b, diagonal: bool) -> float:
    k = a @ b.T
    k /= d
    k += 1.0
    k = k * k * k  # 3x faster than k ** 3
    return k.sum() - (np.trace(k) if diagonal else 0.0)

  total = 0.0
  for _ in range(subsets):
    x = x_NxF[rng.choice(len(x_NxF), m, replace=False)]
    y = y_MxF[rng.choice(len(y_MxF), m, replace=False)]
    total += ((kernel_sum(x, x, True) + kernel_sum(y, y, True)) / (m * (m - 1))
              - 2.0 * kernel_sum(x, y, False) / (m * m))
  return float(total / subsets)


# --- grids -----------------------------------------------------------------------------


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] -> uint8 0..255 (clipped, rounded)."""
  return np.round((np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(
      np.uint8)


def image_grid(images_NxHxWxC: np.ndarray, rows: int, pad: int = 1) -> np.ndarray:
  """The images (in [-1, 1]) in `rows` rows, row by row, on a white `pad`-pixel lattice.

  Returns uint8 [rows * (H + pad) + pad, cols * (W + pad) + pad, C], cols =
  ceil(N / rows); cells past the last image stay white.
  """
  n, h, w, c = images_NxHxWxC.shape
  cols = -(-n // rows)
  cells = np.full((rows * cols, h + pad, w + pad, c), 255, np.uint8)
  cells[:n, :h, :w] = to_uint8(images_NxHxWxC)
  grid = cells.reshape(rows, cols, h + pad, w + pad, c).transpose(0, 2, 1, 3, 4)
  grid = grid.reshape(rows * (h + pad), cols * (w + pad), c)
  return np.pad(grid, ((pad, 0), (pad, 0), (0, 0)), constant_values=255)


def save_png(grid_HxWxC: np.ndarray, path: str, scale: int = 1) -> None:
  """Writes a uint8 grid as a PNG, each pixel a `scale` x `scale` block."""
  from PIL import Image

  grid = np.repeat(np.repeat(grid_HxWxC, scale, axis=0), scale, axis=1)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
