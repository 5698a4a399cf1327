"""Image datasets for the image families: sources -> uint8 arrays -> grain batches.

Sources (`data.source`), each split into 'train' and 'test':

  digits         scikit-learn's 1,797 8x8 digits (shipped inside the package); values
                 0..16 become uint8 round(v * 255 / 16). A fixed eval_fraction is held out.
  fashion_mnist  the IDX .gz files of Debian's dataset-fashion-mnist (data.path = their
                 directory; any directory with the four MNIST-style IDX files works).
  tfds           a prepared TFDS image dataset by data.name (mnist, fashion_mnist, cifar10).
  folder         a directory of images; class = subfolder name (sorted), or class 0 when the
                 images lie directly in it. Subfolders `train/` and `test/` give the splits;
                 otherwise a fixed eval_fraction is held out.
  npz            a .npz with `images` [N, H, W(, C)] uint8 and `labels` [N]; optional
                 `test_images` and `test_labels`, otherwise a fixed eval_fraction is held out.

data.path may be a local path or a URL (gs://...), read through etils.epath.

Whole splits are loaded once per process and kept in memory as uint8. The
data must match data.image_size, data.channels and data.num_classes (the model
is built from them before any data is read); otherwise DataError names the
file and the keys.

The training stream is the LM pipeline's (data/lm_pipeline.py): one global
shuffle per epoch, process p of P takes global elements p, p+P, ..., and the
grain iterator's state goes into every checkpoint. Batches hold 'images'
float32 [b, H, W, C] in [-1, 1] and 'labels' int32 [b], b = batch / P.
"""

import dataclasses
import functools
import gzip
import io
import os
from collections.abc import Callable, Iterator

import grain
import ml_collections
import numpy as np
from etils import epath

from data import lm_pipeline, sources, storage
from data.errors import DataError, check_choice, check_positive, require

SOURCES = ('digits', 'fashion_mnist', 'tfds', 'folder', 'npz')
SPLITS = ('train', 'test')
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_IDX_FILES = {  # split -> (images, labels), without .gz
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}
_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
# The held-out permutation is fixed, not the run's seed: every run of a dataset evaluates on
# the same images, and the cached classifier is trained on the same split.
_HOLDOUT_SEED = 20_240_817
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  name: str  # the dataset's identity, e.g. 'digits', 'tfds:cifar10' (names the classifier cache)
  shape: tuple[int, int, int]  # H, W, C
  num_classes: int


@dataclasses.dataclass
class ImageData:
  train: grain.DatasetIterator  # checkpointable: get_state() / set_state()
  # Each call: a fresh pass over this process's share of the first eval_steps batches.
  eval_batches: Callable[[], Iterator[Batch]]
  info: ImageInfo


def check_image_data_config(cfg_data: ml_collections.ConfigDict) -> None:
  """ConfigError for bad `data.*` values, before anything compiles or reads data."""
  config = ml_collections.ConfigDict({'data': cfg_data})
  check_choice(config, 'data.source', SOURCES)
  check_positive(config, 'data.image_size', 'data.num_classes')
  require(cfg_data.channels in (1, 3),
          f'data.channels={cfg_data.channels!r} is not allowed; choose 1 (grey) or 3 (RGB).')
  require(0.0 < cfg_data.eval_fraction < 1.0,
          f'data.eval_fraction={cfg_data.eval_fraction!r} must be in (0, 1).')
  if cfg_data.source in ('folder', 'npz'):
    example = '/path/to/images' if cfg_data.source == 'folder' else '/path/to/data.npz'
    require(bool(cfg_data.path), f'data.source={cfg_data.source!r} needs data.path, e.g. '
            f'--config.data.path={example}.')
  if cfg_data.source == 'tfds':
    require(bool(cfg_data.name), "data.source='tfds' needs data.name: mnist, fashion_mnist, "
            'cifar10 or another TFDS image dataset.')


def dataset_info(cfg_data: ml_collections.ConfigDict) -> ImageInfo:
  """What the config promises (load_split checks the data against it)."""
  name = {'tfds': f'tfds:{cfg_data.name}', 'folder': 'folder', 'npz': 'npz'}.get(
      cfg_data.source, cfg_data.source)
  return ImageInfo(name, (cfg_data.image_size, cfg_data.image_size, cfg_data.channels),
                   cfg_data.num_classes)


def build_image_data(cfg_data: ml_collections.ConfigDict, *, seed: int, global_batch_size: int,
                     eval_steps: int, process_index: int, process_count: int,
                     annotate: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]
                     | None = None) -> ImageData:
  """This process's train iterator and eval batches.

  annotate: (uint8 images [N, H, W, C], labels [N]) of a split -> more per-image arrays
  {name: [N, ...]} that every example carries beside 'images' and 'labels' (e.g. caption
  tokens); a mirrored image (random_flip) carries its original's.

  Raises:
    DataError: bad data (see `load_split`), or fewer images than one global batch.
  """
  if global_batch_size % process_count:
    raise DataError(f'batch_size={global_batch_size} must divide evenly over '
                    f'{process_count} processes.')
  info = dataset_info(cfg_data)
  images, labels = load_split(cfg_data, 'train')
  if len(images) < global_batch_size:
    raise DataError(f'The training split of data.source={cfg_data.source!r} has {len(images)} '
                    f'images, fewer than one global batch (batch_size={global_batch_size}).')
  shard = dict(global_batch_size=global_batch_size, process_index=process_index,
               process_count=process_count)
  extras = annotate(images, labels) if annotate else None
  train = lm_pipeline.train_dataset(
      ImageExamples(images, labels, cfg_data.random_flip, extras), seed=seed, **shard)
  eval_ds = None
  if eval_steps > 0:
    test_images, test_labels = load_split(cfg_data, 'test')
    if len(test_images) < global_batch_size:
      raise DataError(
          f'The held-out split of data.source={cfg_data.source!r} has {len(test_images)} '
          f'images, fewer than one global batch (batch_size={global_batch_size}); raise '
          'data.eval_fraction, lower batch_size, or set eval_steps=0.')
    test_extras = annotate(test_images, test_labels) if annotate else None
    eval_ds = lm_pipeline.eval_dataset(
        ImageExamples(test_images, test_labels, False, test_extras), eval_steps=eval_steps,
        **shard)
  return ImageData(
      train=iter(train.to_iter_dataset(_READ_OPTIONS)),
      eval_batches=lambda: iter(eval_ds.to_iter_dataset(_READ_OPTIONS)) if eval_ds else iter(()),
      info=info,
  )


class ImageExamples:
  """Example i: image i as float32 [H, W, C] in [-1, 1] and its int32 label.

  With flips there are 2N examples, i >= N being image i - N mirrored, so that
  the shuffled stream draws each (image, mirrored?) pair once per 2N examples.
  The mirror is then a function of the global stream position, like the order,
  and the batches stay the same whatever the process count.
  """

  def __init__(self, images_NxHxWxC: np.ndarray, labels_N: np.ndarray, flips: bool,
               extras: dict[str, np.ndarray] | None = None):
    self.images, self.labels, self.flips = images_NxHxWxC, labels_N, flips
    self.extras = extras or {}

  def __len__(self) -> int:
    return len(self.images) * (2 if self.flips else 1)

  def __getitem__(self, i: int) -> Batch:
    n = len(self.images)
    image_HxWxC = self.images[int(i) % n]
    if i >= n:
      image_HxWxC = image_HxWxC[:, ::-1]
    return {'images': to_float(image_HxWxC), 'labels': np.int32(self.labels[int(i) % n]),
            **{k: v[int(i) % n] for k, v in self.extras.items()}}


def to_float(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 0..255 -> float32 in [-1, 1]."""
  return images_uint8.astype(np.float32) / 127.5 - 1.0


# --- splits --------------------------------------------------------------------


def load_split(cfg_data: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, H, W, C], labels int32 [N]) of 'train' or 'test', read-only.

  Loaded once per process (a cache keyed by the source keys). Raises DataError
  for a missing file, unreadable data, or data that does not match
  data.image_size, data.channels or data.num_classes.
  """
  if split not in SPLITS:
    raise ValueError(f'split={split!r} is not one of {SPLITS}.')
  check_image_data_config(cfg_data)
  images, labels, where = _load_cached(cfg_data.source, cfg_data.path, cfg_data.name,
                                       cfg_data.data_dir, cfg_data.eval_fraction, split,
                                       _stamp(cfg_data.path))
  _check_matches(cfg_data, images, labels, where)
  return images, labels


def _stamp(path: str) -> tuple[int, int] | None:
  """(size, mtime) of data.path: a rewritten file is read again, not served from the cache."""
  try:
    return storage.stamp(os.path.expanduser(path)) if path else None
  except OSError:
    return None


@functools.lru_cache(maxsize=8)
def _load_cached(source: str, path: str, name: str, data_dir: str, eval_fraction: float,
                 split: str, stamp) -> tuple[np.ndarray, np.ndarray, str]:
  del stamp  # only part of the cache key
  if source == 'digits':
    images, labels = _holdout(*_digits(), eval_fraction, split)
    where = "data.source='digits'"
  elif source == 'fashion_mnist':
    directory = path or FASHION_MNIST_DIR
    images, labels = _idx_split(directory, split)
    where = f'the IDX files in {directory}'
  elif source == 'tfds':
    images, labels = _tfds_split(name, data_dir, split)
    where = f'TFDS dataset data.name={name!r}'
  elif source == 'folder':
    images, labels = _folder_split(path, eval_fraction, split)
    where = f'data.path={path!r}'
  else:
    images, labels = _npz_split(path, eval_fraction, split)
    where = path
  if images.ndim == 3:
    images = images[..., None]
  labels = labels.astype(np.int32)
  images.flags.writeable = labels.flags.writeable = False  # shared by every caller
  return images, labels, where


def _check_matches(cfg_data, images: np.ndarray, labels: np.ndarray, where: str) -> None:
  want = (cfg_data.image_size, cfg_data.image_size, cfg_data.channels)
  if images.ndim != 4 or images.shape[1:] != want:
    got = 'x'.join(map(str, images.shape[1:]))
    raise DataError(
        f'The images of {where} are {got} (H x W x C), but data.image_size='
        f'{cfg_data.image_size} and data.channels={cfg_data.channels} ask for '
        f'{"x".join(map(str, want))}; set those keys to match the data.')
  if len(labels) != len(images):
    raise DataError(f'{where}: {len(images)} images but {len(labels)} labels.')
  if len(labels) and (labels.min() < 0 or labels.max() >= cfg_data.num_classes):
    raise DataError(f'The labels of {where} span [{labels.min()}, {labels.max()}], outside '
                    f'[0, data.num_classes={cfg_data.num_classes}); set data.num_classes to '
                    'the number of classes.')


def _holdout(images: np.ndarray, labels: np.ndarray, eval_fraction: float,
             split: str) -> tuple[np.ndarray, np.ndarray]:
  """A fixed held-out share of one set of examples (both splits keep the original order)."""
  n = len(images)
  held = np.zeros(n, bool)
  held[np.random.default_rng(_HOLDOUT_SEED).permutation(n)[:round(n * eval_fraction)]] = True
  keep = held if split == 'test' else ~held
  return images[keep], labels[keep]


def _digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # only this source needs scikit-learn

  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
  return images, digits.target


# --- IDX (MNIST-style) files -----------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """The array in an IDX file (gzipped when the name ends in .gz)."""
  gzipped = os.fspath(path).endswith('.gz')
  try:
    data = epath.Path(path).read_bytes()
    if gzipped:
      data = gzip.decompress(data)
  except FileNotFoundError:
    raise DataError(f'{path} does not exist.') from None
  except (OSError, EOFError) as e:
    raise DataError(f'{path} is not readable as {"gzip" if gzipped else "a file"}: '
                    f'{e}.') from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise DataError(f'{path} is not an IDX file (bad magic number {data[:4].hex()}).')
  dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(data[4:header], '>u4'))
  if len(data) != header + dtype.itemsize * int(np.prod(shape)):
    raise DataError(f'{path} is truncated or padded: its header promises shape {shape} of '
                    f'{dtype}, which does not match its {len(data)} bytes.')
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder('='))


def _idx_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  arrays = []
  for base in _IDX_FILES[split]:
    candidates = [epath.Path(directory) / (base + '.gz'), epath.Path(directory) / base]
    found = [p for p in candidates if p.exists()]
    if not found:
      raise DataError(
          f'{candidates[0]} does not exist. Install Fashion-MNIST with `sudo apt-get install '
          'dataset-fashion-mnist` (Debian/Ubuntu), or set data.path to a directory with '
          f'the files {", ".join(b + ".gz" for b in _IDX_FILES[split])}.')
    arrays.append(read_idx(found[0]))
  images, labels = arrays
  if images.dtype != np.uint8 or images.ndim not in (3, 4) or labels.ndim != 1:
    raise DataError(f'The IDX files in {directory} hold {images.dtype} images of shape '
                    f'{images.shape} and labels of shape {labels.shape}; expected uint8 '
                    '[N, H, W] images and [N] labels.')
  return images, labels


# --- TFDS --------------------------------------------------------------------------


def _tfds_split(name: str, data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow_datasets as tfds  # slow to import; only this source needs it

  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f'There is no TFDS dataset data.name={name!r}; try mnist, fashion_mnist '
                    'or cifar10.') from None
  if not builder.is_prepared():
    raise DataError(
        f'TFDS dataset {name!r} is not prepared under data.data_dir={data_dir!r} '
        f'({builder.data_dir}). Prepare it on a machine with internet: '
        f'`tfds build {name} --data_dir=DIR --file_format=array_record`, then set '
        'data.data_dir=DIR.')
  tfds_split = next((s for s in ((split,) if split == 'train' else ('test', 'validation'))
                     if s in builder.info.splits), None)
  if tfds_split is None:
    raise DataError(f'TFDS dataset {name!r} has no {split!r} split (it has '
                    f'{sorted(builder.info.splits)}).')
  images, labels = [], []
  for example in sources._tfds_examples(builder, tfds_split):
    if 'image' not in example or 'label' not in example:
      raise DataError(f'TFDS dataset {name!r} has no image and label features (it has '
                      f'{sorted(example)}); choose an image classification dataset.')
    images.append(np.asarray(example['image']))
    labels.append(int(example['label']))
  return np.stack(images).astype(np.uint8), np.asarray(labels)


# --- folders and .npz files ----------------------------------------------------------


def _folder_split(path: str, eval_fraction: float, split: str) -> tuple[np.ndarray, np.ndarray]:
  root = epath.Path(os.path.expanduser(path))
  if not root.is_dir():
    raise DataError(f'data.path={path!r} is not a directory; give a folder of images '
                    '(one subfolder per class).')
  if (root / 'train').is_dir() and (root / 'test').is_dir():
    return _read_folder(root / split)
  return _holdout(*_read_folder(root), eval_fraction, split)


def _read_folder(root: epath.Path) -> tuple[np.ndarray, np.ndarray]:
  """Images of `root`: class i = the i-th subfolder (sorted); or class 0 if there are none."""
  from PIL import Image  # only this source needs Pillow

  classes = sorted(d.name for d in root.iterdir() if d.is_dir())
  groups = [(i, root / d) for i, d in enumerate(classes)] or [(0, root)]
  images, labels = [], []
  for label, directory in groups:
    for name in sorted(p.name for p in directory.iterdir()):
      if not name.lower().endswith(_IMAGE_SUFFIXES):
        continue
      file = directory / name
      try:
        with Image.open(io.BytesIO(file.read_bytes())) as image:
          mode = {'1': 'L', 'P': 'RGB', 'LA': 'L', 'RGBA': 'RGB', 'I;16': 'L'}.get(image.mode,
                                                                                 image.mode)
          array = np.asarray(image.convert(mode))
      except OSError as e:
        raise DataError(f'{file} is not a readable image: {e}.') from None
      if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise DataError(f'{file} is a {image.mode} image; give 8-bit grey or RGB images.')
      if images and array.shape != images[0][1].shape:
        raise DataError(f'{file} has shape {array.shape} but {images[0][0]} has '
                        f'{images[0][1].shape}; every image must have the same size and '
                        'channels (data.image_size, data.channels).')
      images.append((file, array))
      labels.append(label)
  if not images:
    raise DataError(f'{root} holds no images ({", ".join(_IMAGE_SUFFIXES)}).')
  return np.stack([a for _, a in images]), np.asarray(labels)


def _npz_split(path: str, eval_fraction: float, split: str) -> tuple[np.ndarray, np.ndarray]:
  file = epath.Path(os.path.expanduser(path))
  if not file.is_file():
    raise DataError(f'data.path={path!r} does not exist; give an .npz file with `images` and '
                    '`labels`.')
  try:
    with file.open('rb') as f, np.load(f, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (OSError, ValueError) as e:
    raise DataError(f'{path} is not a readable .npz file: {e}.') from None
  for key in ('images', 'labels'):
    if key not in arrays:
      raise DataError(f'{path} has no array {key!r} (it has {sorted(arrays)}).')
  has_test = 'test_images' in arrays and 'test_labels' in arrays
  prefix = 'test_' if has_test and split == 'test' else ''
  images, labels = arrays[prefix + 'images'], arrays[prefix + 'labels']
  if images.dtype != np.uint8:
    raise DataError(f'{path}: {prefix}images is {images.dtype}; give uint8 pixels in 0..255.')
  if images.ndim not in (3, 4) or labels.ndim != 1 or len(labels) != len(images):
    raise DataError(f'{path}: {prefix}images has shape {images.shape} and {prefix}labels '
                    f'{labels.shape}; expected [N, H, W] or [N, H, W, C] and [N].')
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{path}: {prefix}labels is {labels.dtype}; give integer class ids.')
  if has_test:
    return images, labels
  return _holdout(images, labels, eval_fraction, split)
