"""Image data: sources and the process-sharded, checkpointable grain pipeline.

Oracles: hand-made files (npz, PNG folders, IDX bytes written here) against
what the loader returns, scikit-learn's digits against the batches, one
process against two (sharding), two builds against each other (determinism,
resume), and exact epoch coverage (every image once per epoch; with flips
once plain and once mirrored per two).
"""

import gzip
import os
import struct

import numpy as np
import pytest

from configs import common
from data import images
from data.errors import ConfigError, DataError


def data_config(**overrides):
  cfg = common.image_data_defaults()
  cfg.update(overrides)
  return cfg


def build(cfg, *, seed=0, batch=8, eval_steps=2, process_index=0, process_count=1):
  return images.build_image_data(cfg, seed=seed, global_batch_size=batch, eval_steps=eval_steps,
                                 process_index=process_index, process_count=process_count)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def unique_npz(tmp_path, n=40, size=4, channels=1, **extra):
  """n images, each a different constant-free pattern: pixel (0, 0) holds the image's index."""
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
  imgs[:, 0, 0, 0] = np.arange(n)  # identity
  imgs[:, 0, -1, 0] = 255  # left-right asymmetric, so a mirror is told apart
  imgs[:, 0, 1, 0] = 0
  labels = np.arange(n) % 3
  path = str(tmp_path / 'data.npz')
  np.savez(path, images=imgs, labels=labels, **extra)
  return path, imgs, labels


def ids(batch):
  """The index of each image in a batch of `unique_npz` images."""
  return list(np.round((batch['images'][:, 0, 0, 0] + 1.0) * 127.5).astype(int))


def test_digits_batches_are_sklearn_digits_in_minus_one_to_one():
  from sklearn.datasets import load_digits

  digits = load_digits()
  cfg = data_config()  # the default source: digits, 8x8x1, 10 classes
  data = build(cfg, batch=16)
  batch = next(data.train)
  assert batch['images'].shape == (16, 8, 8, 1) and batch['images'].dtype == np.float32
  assert batch['labels'].shape == (16,) and batch['labels'].dtype == np.int32
  reference = digits.images / 8.0 - 1.0  # 0..16 -> [-1, 1]
  for image, label in zip(batch['images'], batch['labels'], strict=True):
    errors = np.abs(reference - image[..., 0]).max(axis=(1, 2))
    match = np.argmin(errors)
    assert errors[match] <= 0.5 / 127.5 + 1e-6  # uint8 rounding only
    assert digits.target[match] == label
  train, test = images.load_split(cfg, 'train'), images.load_split(cfg, 'test')
  assert len(train[0]) + len(test[0]) == 1797 and len(test[0]) == round(1797 * 0.2)
  assert train[0].min() == 0 and train[0].max() == 255
  assert data.info == images.ImageInfo('digits', (8, 8, 1), 10)
  evals = list(data.eval_batches())
  assert len(evals) == 2
  np.testing.assert_array_equal(evals[0]['images'], images.to_float(test[0][:16]))
  np.testing.assert_array_equal(evals[1]['labels'], test[1][16:32])


def test_each_epoch_shows_every_image_once_and_seeds_decide_the_order(tmp_path):
  path, _, _ = unique_npz(tmp_path, n=40)
  cfg = data_config(source='npz', path=path, image_size=4, eval_fraction=0.2)
  train_ids = set(ids({'images': images.to_float(images.load_split(cfg, 'train')[0])}))
  a, b, other = build(cfg), build(cfg), build(cfg, seed=1)
  epochs = [sum((ids(x) for x in take(a.train, 4)), []) for _ in range(2)]  # 32 train images
  assert sorted(epochs[0]) == sorted(train_ids) == sorted(epochs[1])
  assert epochs[0] != epochs[1]  # reshuffled per epoch
  again = sum((ids(x) for x in take(b.train, 8)), [])
  assert again == epochs[0] + epochs[1]
  assert sum((ids(x) for x in take(other.train, 4)), []) != epochs[0]


@pytest.mark.parametrize('flips', [False, True])
def test_two_processes_split_each_global_batch(tmp_path, flips):
  path, _, _ = unique_npz(tmp_path, n=40)
  cfg = data_config(source='npz', path=path, image_size=4, random_flip=flips)
  one = build(cfg, batch=8)
  shards = [build(cfg, batch=8, process_index=p, process_count=2) for p in range(2)]
  for _ in range(6):
    whole = next(one.train)
    parts = [next(s.train) for s in shards]
    for p, part in enumerate(parts):
      assert part['images'].shape == (4, 4, 4, 1)
      # Process p holds global rows p, p+2, ...: disjoint, and together the global batch.
      np.testing.assert_array_equal(part['images'], whole['images'][p::2])
      np.testing.assert_array_equal(part['labels'], whole['labels'][p::2])
  evals = [list(s.eval_batches()) for s in shards]
  for step, whole in enumerate(one.eval_batches()):
    for p in range(2):
      np.testing.assert_array_equal(evals[p][step]['images'], whole['images'][p::2])


def test_restored_iterator_gives_the_same_next_batches(tmp_path):
  path, _, _ = unique_npz(tmp_path, n=40)
  cfg = data_config(source='npz', path=path, image_size=4, random_flip=True)
  straight = build(cfg)
  take(straight.train, 7)  # into the second epoch
  state = straight.train.get_state()
  expected = take(straight.train, 5)
  resumed = build(cfg)
  resumed.train.set_state(state)
  for want, got in zip(expected, take(resumed.train, 5), strict=True):
    np.testing.assert_array_equal(want['images'], got['images'])
    np.testing.assert_array_equal(want['labels'], got['labels'])


def test_flips_mirror_each_image_once_per_two_epochs(tmp_path):
  path, imgs, _ = unique_npz(tmp_path, n=20)
  cfg = data_config(source='npz', path=path, image_size=4, random_flip=True, eval_fraction=0.2)
  train = images.to_float(images.load_split(cfg, 'train')[0])  # 16 images
  seen = np.concatenate([b['images'] for b in take(build(cfg, eval_steps=0).train, 4)])  # 2 x 16
  plain = {x.tobytes() for x in train}
  mirrored = {x[:, ::-1].tobytes() for x in train}
  got = [x.tobytes() for x in seen]
  assert sorted(got) == sorted(plain | mirrored) and plain.isdisjoint(mirrored)
  no_flips = data_config(source='npz', path=path, image_size=4)
  assert {x.tobytes() for b in take(build(no_flips, eval_steps=0).train, 4)
          for x in b['images']} == plain


def test_npz_test_split_and_errors(tmp_path):
  rng = np.random.default_rng(1)
  test = rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
  path, imgs, labels = unique_npz(tmp_path, n=12, channels=3, test_images=test,
                                  test_labels=np.arange(8) % 2)
  cfg = data_config(source='npz', path=path, image_size=4, channels=3)
  train_x, train_y = images.load_split(cfg, 'train')
  np.testing.assert_array_equal(train_x, imgs)  # with a test split, train is all of `images`
  np.testing.assert_array_equal(images.load_split(cfg, 'test')[0], test)
  assert not train_x.flags.writeable  # the in-memory cache is shared
  with pytest.raises(DataError, match=r'data.image_size=8 and data.channels=3'):
    images.load_split(data_config(source='npz', path=path, channels=3), 'train')
  with pytest.raises(DataError, match=r'labels of .*data.npz span \[0, 2\].*data.num_classes=2'):
    images.load_split(data_config(source='npz', path=path, image_size=4, channels=3,
                                  num_classes=2), 'train')
  bad = str(tmp_path / 'bad.npz')
  np.savez(bad, pictures=imgs, labels=labels)
  with pytest.raises(DataError, match=r"bad.npz has no array 'images'"):
    images.load_split(data_config(source='npz', path=bad, image_size=4), 'train')
  np.savez(bad, images=imgs.astype(np.float32), labels=labels)
  with pytest.raises(DataError, match=r'bad.npz: images is float32'):
    images.load_split(data_config(source='npz', path=bad, image_size=4), 'train')
  with pytest.raises(DataError, match=r"data.path='.*missing.npz' does not exist"):
    images.load_split(data_config(source='npz', path=str(tmp_path / 'missing.npz')), 'train')
  with pytest.raises(DataError, match='fewer than one global batch'):
    build(cfg, batch=16)


def test_a_rewritten_file_is_read_again(tmp_path):
  path = str(tmp_path / 'data.npz')
  cfg = data_config(source='npz', path=path, image_size=2, eval_fraction=0.5)
  np.savez(path, images=np.zeros((4, 2, 2), np.uint8), labels=np.zeros(4, int))
  assert images.load_split(cfg, 'train')[0].max() == 0
  np.savez(path, images=np.full((6, 2, 2), 9, np.uint8), labels=np.zeros(6, int))
  os.utime(path, ns=(1, 10**18))  # a different mtime even on a coarse clock
  assert images.load_split(cfg, 'train')[0].max() == 9


def test_folder_of_class_subfolders(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(2)
  written = {}
  for label, cls in enumerate(['ant', 'bee']):  # sorted class names -> 0, 1
    os.makedirs(tmp_path / 'train' / cls)
    os.makedirs(tmp_path / 'test' / cls)
    for i in range(3):
      for split in ('train', 'test'):
        pixels = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / split / cls / f'{i}.png')
        written.setdefault(split, []).append((pixels, label))
  (tmp_path / 'train' / 'notes.txt').write_text('not an image')
  cfg = data_config(source='folder', path=str(tmp_path), image_size=5, channels=3)
  for split in ('train', 'test'):
    got_x, got_y = images.load_split(cfg, split)
    np.testing.assert_array_equal(got_x, np.stack([p for p, _ in written[split]]))
    np.testing.assert_array_equal(got_y, [label for _, label in written[split]])
  with pytest.raises(DataError, match='data.channels=1'):
    images.load_split(data_config(source='folder', path=str(tmp_path), image_size=5), 'train')
  Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / 'train' / 'bee' / 'z.png')
  with pytest.raises(DataError, match=r'z.png has shape \(6, 6, 3\)'):
    images.load_split(data_config(source='folder', path=str(tmp_path), image_size=5,
                                  channels=3, eval_fraction=0.3), 'train')


def test_flat_folder_holds_out_a_fixed_fraction(tmp_path):
  from PIL import Image

  for i in range(10):
    Image.fromarray(np.full((3, 3), i * 20, np.uint8)).save(tmp_path / f'{i:02d}.png')
  cfg = data_config(source='folder', path=str(tmp_path), image_size=3, eval_fraction=0.3)
  train_x, train_y = images.load_split(cfg, 'train')
  test_x, _ = images.load_split(cfg, 'test')
  assert len(train_x) == 7 and len(test_x) == 3 and set(train_y) == {0}
  values = sorted(int(x[0, 0, 0]) for x in np.concatenate([train_x, test_x]))
  assert values == [i * 20 for i in range(10)]  # disjoint, and together all images
  with pytest.raises(DataError, match='is not a directory'):
    images.load_split(data_config(source='folder', path=str(tmp_path / 'no')), 'train')


def write_idx(path, array, dtype_code=0x08):
  header = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + array.astype(array.dtype.newbyteorder('>')).tobytes())


def test_idx_reader_and_fashion_mnist_source(tmp_path):
  rng = np.random.default_rng(3)
  split_arrays = {}
  for split, n in (('train', 10), ('t10k', 4)):
    x = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.uint8)
    write_idx(str(tmp_path / f'{split}-images-idx3-ubyte.gz'), x)
    write_idx(str(tmp_path / f'{split}-labels-idx1-ubyte'), y)  # uncompressed works too
    split_arrays[split] = x, y
  big_endian = np.arange(6, dtype=np.int32).reshape(2, 3) * 1000
  write_idx(str(tmp_path / 'ints.gz'), big_endian, 0x0C)
  np.testing.assert_array_equal(images.read_idx(str(tmp_path / 'ints.gz')), big_endian)
  cfg = data_config(source='fashion_mnist', path=str(tmp_path), image_size=6)
  for split, name in (('train', 'train'), ('test', 't10k')):
    x, y = images.load_split(cfg, split)
    np.testing.assert_array_equal(x[..., 0], split_arrays[name][0])
    np.testing.assert_array_equal(y, split_arrays[name][1])
  with open(tmp_path / 'short', 'wb') as f:
    f.write(bytes([0, 0, 8, 1]) + struct.pack('>I', 5) + b'abc')
  with pytest.raises(DataError, match='short is truncated'):
    images.read_idx(str(tmp_path / 'short'))
  with pytest.raises(DataError, match='not an IDX file'):
    images.read_idx(__file__)  # a Python file
  with pytest.raises(DataError, match='apt-get install dataset-fashion-mnist'):
    images.load_split(data_config(source='fashion_mnist', path=str(tmp_path / 'none'),
                                  image_size=6), 'train')


@pytest.mark.skipif(not os.path.exists(images.FASHION_MNIST_DIR),
                    reason='dataset-fashion-mnist is not installed (an extra check only)')
def test_debian_fashion_mnist_files():
  cfg = data_config(source='fashion_mnist', image_size=28)
  x, y = images.load_split(cfg, 'train')
  assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8
  assert np.bincount(y).tolist() == [6000] * 10
  assert images.load_split(cfg, 'test')[0].shape == (10000, 28, 28, 1)


def test_config_errors_name_the_key(tmp_path):
  for overrides, key in [(dict(source='mnist'), 'data.source'), (dict(channels=2), 'data.channels'),
                         (dict(image_size=0), 'data.image_size'),
                         (dict(eval_fraction=1.0), 'data.eval_fraction'),
                         (dict(source='folder'), 'data.path'), (dict(source='tfds'), 'data.name')]:
    with pytest.raises(ConfigError, match=key):
      images.check_image_data_config(data_config(**overrides))


def test_unknown_or_unprepared_tfds_dataset_is_a_clear_error(tmp_path):
  import tensorflow_datasets  # noqa: F401  (a dependency: a broken install fails here)
  cfg = data_config(source='tfds', name='no_such_dataset_kiln', data_dir=str(tmp_path))
  with pytest.raises(DataError, match='no TFDS dataset'):
    images.load_split(cfg, 'train')
  cfg = data_config(source='tfds', name='mnist', data_dir=str(tmp_path), image_size=28)
  with pytest.raises(DataError, match='not prepared'):
    images.load_split(cfg, 'train')


def test_tfds_image_dataset_by_name(tmp_path):
  """A tiny TFDS image dataset prepared here as array_record (no download, no tensorflow)."""
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(4)
  pixels = rng.integers(0, 256, (7, 4, 4, 1), dtype=np.uint8)

  class KilnToyImages(tfds.core.GeneratorBasedBuilder):  # registers itself by this name
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),  # Image needs TF
          'label': tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(0, 5), 'test': self._generate_examples(5, 7)}

    def _generate_examples(self, lo, hi):
      for i in range(lo, hi):
        yield i, {'image': pixels[i], 'label': i % 3}

  KilnToyImages(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  cfg = data_config(source='tfds', name='kiln_toy_images', data_dir=str(tmp_path), image_size=4,
                    num_classes=3)
  x, y = images.load_split(cfg, 'train')
  # The data source's order is its own: compare (image, label) pairs as sets.
  assert sorted((a.tobytes(), int(b)) for a, b in zip(x, y, strict=True)) == sorted(
      (pixels[i].tobytes(), i % 3) for i in range(5))
  assert len(images.load_split(cfg, 'test')[0]) == 2
  assert images.dataset_info(cfg).name == 'tfds:kiln_toy_images'
