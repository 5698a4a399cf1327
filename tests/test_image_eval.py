"""Image evaluation: FD, KID, precision/recall, memorisation, the feature classifier,
cond_acc, grids and PNGs.

Oracles: FD's closed form for Gaussians (diagonal: per-axis sqrt; general:
scipy's sqrtm), KID against a direct double loop and against its expectation
(0 for one distribution), precision/recall against a hand-worked example and
scipy's cdist, memorisation against copies of training images, the classifier
against the held-out labels, a second evaluator against the first (cache reuse),
and grids against a hand-built arrangement.
"""

import os

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance

from configs import common
from data import images
from data.errors import ConfigError
from train import image_eval, image_neighbours


def test_frechet_distance_matches_the_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
  # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert image_eval.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want)
  # General (non-commuting) covariances, one of them singular: the textbook sqrtm formula.
  m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 3))
  s1, s2 = m1 @ m1.T, m2 @ m2.T
  want = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
          - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
  assert image_eval.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)
  assert image_eval.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_samples():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
  assert image_eval.frechet_distance(*image_eval.gaussian_fit(x),
                                     *image_eval.gaussian_fit(x)) == pytest.approx(0.0, abs=1e-8)
  # Large samples of N(0, I) and N(m, 4I) in 3-d: |m|^2 + 3 (2 - 1)^2.
  m = np.array([1.0, -0.5, 0.25])
  p, q = rng.normal(size=(40_000, 3)), m + 2.0 * rng.normal(size=(40_000, 3))
  fd = image_eval.frechet_distance(*image_eval.gaussian_fit(p), *image_eval.gaussian_fit(q))
  assert fd == pytest.approx(m @ m + 3.0, abs=0.1)


def kid_reference(x, y):
  """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, one pair at a time."""
  d, m = x.shape[1], len(x)
  k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return xx + yy - 2 * xy


def test_kid_matches_the_direct_sum_and_is_unbiased():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(15, 4)), rng.normal(0.3, 1.0, size=(15, 4))
  # One subset of all rows: the subset is a permutation, which MMD does not see.
  kid = image_eval.kernel_inception_distance(x, y, rng, subset_size=15, subsets=1)
  assert kid == pytest.approx(kid_reference(x, y), rel=1e-9)
  same, shifted = [], []
  for _ in range(40):
    a, b = rng.normal(size=(100, 8)), rng.normal(size=(100, 8))
    same.append(image_eval.kernel_inception_distance(a, b, rng, 50, 4))
    shifted.append(image_eval.kernel_inception_distance(a, b + 0.5, rng, 50, 4))
  stderr = np.std(same) / np.sqrt(len(same))
  assert abs(np.mean(same)) < 3 * stderr  # unbiased: 0 in expectation, negative at times
  assert min(same) < 0
  assert np.mean(shifted) > 10 * stderr and min(shifted) > 0


def test_precision_recall_by_hand_and_closed_forms():
  # k = 1 on a line. Real radii: 1, 1, 1, 8 (0, 1, 2, 10); fake radii: 4.5, 4.5, 15.
  real, fake = np.array([[0.], [1.], [2.], [10.]]), np.array([[0.5], [5.], [20.]])
  # 0.5 is in 0's ball, 5 in 10's (|5 - 10| <= 8), 20 in none; every real point is in a fake
  # ball (10 in 20's: |10 - 20| <= 15).
  assert image_neighbours.precision_recall(real, fake, k=1) == pytest.approx((2 / 3, 1.0))
  x = np.random.default_rng(0).normal(size=(40, 5))
  assert image_neighbours.precision_recall(x, x.copy()) == (1.0, 1.0)
  assert image_neighbours.precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_neighbour_distances_match_cdist():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(23, 4)), rng.normal(size=(31, 4))
  d = scipy.spatial.distance.cdist(x, y)
  np.testing.assert_allclose(image_neighbours.nearest_distances(x, y, k=3, chunk=7),
                             np.sort(d, axis=1)[:, :3], atol=1e-9)
  radii = np.sort(scipy.spatial.distance.cdist(y, y), axis=1)[:, 3]
  np.testing.assert_allclose(image_neighbours.manifold_radii(y, k=3, chunk=5), radii, atol=1e-9)
  want = np.mean(np.any(d <= radii[None, :], axis=1))
  assert image_neighbours.coverage(x, y, radii, chunk=4) == pytest.approx(want)


def test_memorisation_statistics():
  heldout = np.linspace(1.0, 2.0, 101)  # 1st percentile 1.01, median 1.5
  assert image_neighbours.memorisation(heldout, heldout) == pytest.approx(
      {'ratio': 1.0, 'share': 2 / 101})  # 1.0 and 1.01 are at or below the threshold
  copies = np.concatenate([np.zeros(30), np.full(70, 3.0)])
  assert image_neighbours.memorisation(copies, heldout) == pytest.approx(
      {'ratio': 2.0, 'share': 0.3})


@pytest.fixture(scope='module')
def digits_eval(tmp_path_factory):
  cfg_eval = common.eval_defaults()
  cfg_eval.classifier_dir = str(tmp_path_factory.mktemp('classifiers'))
  cfg_eval.classifier_steps = 300  # 98.6% held out; the default 1000 gives 99.2%
  return common.image_data_defaults(), cfg_eval, image_eval.ImageEvaluator(
      common.image_data_defaults(), cfg_eval)


def test_classifier_is_accurate_and_reused_from_its_cache(digits_eval, monkeypatch):
  cfg_data, cfg_eval, first = digits_eval
  test_x, test_y = images.load_split(cfg_data, 'test')
  _, logits = first.features_and_logits(images.to_float(test_x))
  accuracy = np.mean(np.argmax(logits, -1) == test_y)
  assert accuracy >= 0.95
  assert first.meta['test_accuracy'] == pytest.approx(accuracy)

  def no_training(*args, **kwargs):
    raise AssertionError('the cached classifier should have been loaded')

  monkeypatch.setattr(image_eval, 'train_classifier', no_training)
  second = image_eval.ImageEvaluator(cfg_data, cfg_eval)
  assert second.directory == first.directory and second.meta == first.meta
  np.testing.assert_array_equal(second.features(images.to_float(test_x)),
                                first.features(images.to_float(test_x)))
  assert second.floor == first.floor
  cfg_eval = cfg_eval.copy_and_resolve_references()
  cfg_eval.classifier_steps += 1  # another classifier: another cache entry
  with pytest.raises(AssertionError, match='should have been loaded'):
    image_eval.ImageEvaluator(cfg_data, cfg_eval)


def test_other_processes_receive_process_0s_classifier(digits_eval, monkeypatch, tmp_path):
  """Process 1 of 2, simulated: it neither trains nor reads a cache (its own is empty); it
  sends placeholders shaped like process 0's classifier and scores with what it receives."""
  import jax
  from jax.experimental import multihost_utils

  cfg_data, cfg_eval, first = digits_eval
  sent = (jax.device_get(first.params), first.train_features * first.feature_scale)

  def broadcast_one_to_all(tree):
    assert jax.tree.structure(tree) == jax.tree.structure(sent)
    for mine, theirs in zip(jax.tree.leaves(tree), jax.tree.leaves(sent), strict=True):
      assert mine.shape == theirs.shape
    return sent

  def no_training(*args, **kwargs):
    raise AssertionError('only process 0 trains')

  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'broadcast_one_to_all', broadcast_one_to_all)
  monkeypatch.setattr(image_eval, 'train_classifier', no_training)
  cfg_eval = cfg_eval.copy_and_resolve_references()
  cfg_eval.classifier_dir = str(tmp_path)
  other = image_eval.ImageEvaluator(cfg_data, cfg_eval)
  assert os.listdir(tmp_path) == []  # only process 0 saves
  assert other.floor == first.floor
  real = images.to_float(images.load_split(cfg_data, 'test')[0][:cfg_eval.num_samples])
  assert other.score(real) == first.score(real)


def test_scores_of_real_shuffled_and_noise_images(digits_eval):
  import jax

  cfg_data, cfg_eval, evaluator = digits_eval
  test_x, test_y = images.load_split(cfg_data, 'test')
  n = cfg_eval.num_samples
  real, labels = images.to_float(test_x[:n]), test_y[:n]
  mesh = jax.make_mesh((8,), ('data',))
  with jax.set_mesh(mesh):  # as the trainer calls it, inside eval_summary
    scores = evaluator.score(real, labels)
  assert scores['eval/cond_acc'] >= 0.95
  shuffled = evaluator.score(real, np.random.default_rng(0).permutation(labels))
  assert 0.03 <= shuffled['eval/cond_acc'] <= 0.2  # chance is 0.1
  assert scores['eval/fd_floor'] > 0 and set(scores) == {
      'eval/fd', 'eval/kid', 'eval/fd_floor', 'eval/kid_floor', 'eval/cond_acc',
      'eval/precision', 'eval/recall', 'eval/precision_floor', 'eval/recall_floor',
      'eval/memorisation_ratio', 'eval/memorisation_share'}
  # Other held-out images score like the floor (most of them are the floor's images) and are
  # no closer to the training images than held-out images are; noise is far away.
  assert scores['eval/fd'] < 2 * scores['eval/fd_floor']
  assert scores['eval/precision_floor'] > 0.6 and scores['eval/recall_floor'] > 0.6
  for key in ('eval/precision', 'eval/recall'):
    assert scores[key] == pytest.approx(scores[f'{key}_floor'], abs=0.05)
  assert scores['eval/memorisation_ratio'] == pytest.approx(1.0, abs=0.05)
  assert scores['eval/memorisation_share'] <= 0.03
  noise = evaluator.score(np.random.default_rng(1).uniform(-1, 1, real.shape), None)
  assert 'eval/cond_acc' not in noise
  assert noise['eval/fd'] > 20 * scores['eval/fd_floor']
  assert noise['eval/kid'] > 20 * abs(scores['eval/kid_floor'])
  assert noise['eval/precision'] < 0.05 and noise['eval/memorisation_share'] == 0.0
  assert noise['eval/memorisation_ratio'] > 2.0
  nan = evaluator.score(np.full(real.shape, np.nan, np.float32), labels)
  assert all(np.isnan(nan[key]) for key in ('eval/fd', 'eval/kid', 'eval/precision',
                                            'eval/recall', 'eval/memorisation_ratio'))


def test_copies_of_training_images_are_flagged(digits_eval):
  """Samples that copy training images sit at distance 0 from them: all flagged, ratio 0. Half
  copies and half held-out images: half flagged. (The FD of copies can beat the floor.)"""
  cfg_data, cfg_eval, evaluator = digits_eval
  n = cfg_eval.num_samples
  train_x = images.load_split(cfg_data, 'train')[0]
  copies = images.to_float(train_x[np.random.default_rng(2).choice(len(train_x), n,
                                                                   replace=False)])
  scores = evaluator.score(copies)
  assert scores['eval/memorisation_share'] == 1.0
  assert scores['eval/memorisation_ratio'] == pytest.approx(0.0, abs=1e-6)
  assert scores['eval/precision'] > 0.9
  heldout = images.to_float(images.load_split(cfg_data, 'test')[0][:n])
  half = np.concatenate([copies[:n // 2], heldout[n // 2:]])
  share = evaluator.score(half)['eval/memorisation_share']
  assert 0.5 <= share <= 0.52


def test_eval_config_errors(digits_eval):
  cfg_data, cfg_eval, _ = digits_eval
  too_many = cfg_eval.copy_and_resolve_references()
  too_many.num_samples = 360  # digits hold out 359
  with pytest.raises(ConfigError, match=r'eval.num_samples=360 .* 359 held-out'):
    image_eval.ImageEvaluator(cfg_data, too_many)
  tiny = cfg_eval.copy_and_resolve_references()
  tiny.kid_subset_size = 1
  with pytest.raises(ConfigError, match='eval.kid_subset_size'):
    image_eval.check_eval_config(tiny)


@pytest.mark.parametrize('channels', [1, 3])
def test_image_grid_layout(channels):
  rng = np.random.default_rng(3)
  x = rng.uniform(-1, 1, (5, 2, 3, channels)).astype(np.float32)
  grid = image_eval.image_grid(x, rows=2)
  # By hand: 2 rows x 3 columns of 2x3 cells on a white 1-pixel lattice, row by row.
  want = np.full((2 * 3 + 1, 3 * 4 + 1, channels), 255, np.uint8)
  for i in range(5):
    r, c = divmod(i, 3)
    want[1 + 3 * r:3 + 3 * r, 1 + 4 * c:4 + 4 * c] = np.round((x[i] + 1) * 127.5)
  np.testing.assert_array_equal(grid, want)
  assert grid.dtype == np.uint8
  two = np.array([-1.5, 1.5]).reshape(2, 1, 1, 1)  # two 1x1 images in one row
  np.testing.assert_array_equal(image_eval.image_grid(two, 1, pad=0), [[[0], [255]]])  # clipped


def test_save_png_round_trips(tmp_path):
  from PIL import Image

  grid = image_eval.image_grid(np.random.default_rng(4).uniform(-1, 1, (4, 3, 3, 3)), rows=2)
  path = str(tmp_path / 'out' / 'grid.png')
  image_eval.save_png(grid, path, scale=2)
  with Image.open(path) as png:
    np.testing.assert_array_equal(np.asarray(png), grid.repeat(2, 0).repeat(2, 1))
  grey = image_eval.image_grid(np.zeros((2, 3, 3, 1)), rows=1)
  image_eval.save_png(grey, path)
  with Image.open(path) as png:
    assert png.mode == 'L'
    np.testing.assert_array_equal(np.asarray(png), grey[..., 0])


def test_sample_cli_writes_each_grid(tmp_path):
  from PIL import Image

  from train import sample

  a, b = np.zeros((3, 4, 1), np.uint8), np.full((5, 2, 3), 7, np.uint8)
  out = str(tmp_path / 'grid.png')
  assert sample.write_image_samples({'samples/grid': a, 'note': 'text'}, out) == [out]
  paths = sample.write_image_samples({'samples/grid': a, 'samples/ema grid': b}, out, scale=3)
  assert paths == [str(tmp_path / 'grid_samples_grid.png'),
                   str(tmp_path / 'grid_samples_ema_grid.png')]
  for path, grid in zip(paths, (a, b), strict=True):
    with Image.open(path) as png:
      assert np.asarray(png).shape[:2] == (grid.shape[0] * 3, grid.shape[1] * 3)
  with pytest.raises(ConfigError, match='no image samples'):
    sample.write_image_samples({'note': 'text'}, out)
