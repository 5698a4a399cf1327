"""Captions for labelled images, from the class and from attributes measured on the image.

The embedded demo of text-to-image diffusion has labels, not text; a caption is rendered from
the label and from attributes computed from the pixels, each split into thirds on the training
set (quantile thresholds), so that every attribute word names a third of the images:

  thickness  ink mass (mean intensity): 'thin' below the 1/3 quantile, 'thick' above 2/3.
  slant      |shear| of the ink, |sum w dx dy / sum w dy^2| (w the intensity, dx, dy from the
             ink's centroid; the second moments): 'upright' below 1/3, 'slanted' above 2/3.
  shade      the same ink mass, named for clothes: 'light' below 1/3, 'dark' above 2/3.

Digits get thickness and slant ("a thick, slanted 4", "a handwritten seven": the class as a
word or a numeral); Fashion-MNIST gets shade and its class names ("a dark coat"); any other
source gets "class <i>". The middle third of an attribute is not named.

Held-out combinations (`HELDOUT`): (class, attribute word) pairs that no training caption
holds. A training image with such a combination keeps its other words and loses that one
("a thick 7" becomes "a 7"): every image stays in training, so the class distribution and the
FD against real images are untouched, and only the text never pairs the two words; evaluation
then asks for "a thick seven" and checks both the class and the attribute of what comes out.

Tokens: `WordTokenizer` over the captions' closed vocabulary (the joint text encoder's), or
any Kiln tokenizer (a frozen LM's). `tokenize` gives fixed-length ids and a mask; every
caption starts with the tokenizer's BOS where it has one, so the empty caption (the "no
caption" of classifier-free guidance) is that BOS alone.
"""

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
FASHION_WORDS = ('t-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt',
                 'sneaker', 'bag', 'ankle boot')
# attribute -> (low word, high word)
ATTRIBUTE_WORDS = {'thickness': ('thin', 'thick'), 'slant': ('upright', 'slanted'),
                   'shade': ('light', 'dark')}
DATASET_ATTRIBUTES = {'digits': ('thickness', 'slant'), 'fashion_mnist': ('shade',)}
HELDOUT = {
    'digits': ((7, 'thick'), (3, 'slanted'), (0, 'thin'), (4, 'upright')),
    'fashion_mnist': ((4, 'dark'), (7, 'light')),
}
_TEMPLATE_SEED = 1_902


def measure(images_NxHxWxC: np.ndarray) -> dict[str, np.ndarray]:
  """Raw attribute measures, float64 [N] each, of uint8 images (or floats in [-1, 1])."""
  raw = np.asarray(images_NxHxWxC)
  x = raw.astype(np.float64)
  if np.issubdtype(raw.dtype, np.floating):
    x = (np.clip(x, -1.0, 1.0) + 1.0) * 127.5
  w_NxHxW = x.mean(axis=-1) / 255.0  # ink: bright strokes on a dark background
  n, h, wd = w_NxHxW.shape
  mass = w_NxHxW.sum(axis=(1, 2)) + 1e-9
  ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(wd, dtype=np.float64),
                       indexing='ij')
  cy = (w_NxHxW * ys).sum(axis=(1, 2)) / mass
  cx = (w_NxHxW * xs).sum(axis=(1, 2)) / mass
  dy = ys[None] - cy[:, None, None]
  dx = xs[None] - cx[:, None, None]
  shear = (w_NxHxW * dx * dy).sum(axis=(1, 2)) / ((w_NxHxW * dy * dy).sum(axis=(1, 2)) + 1e-9)
  ink = mass / (h * wd)
  return {'thickness': ink, 'shade': ink, 'slant': np.abs(shear)}


@dataclasses.dataclass(frozen=True)
class Captioner:
  """Attribute thresholds from one training set, and the captions they give."""

  source: str
  num_classes: int
  attributes: tuple[str, ...]
  thresholds: dict  # attribute -> (low, high): its 1/3 and 2/3 quantiles on the training set
  heldout: tuple[tuple[int, str], ...]

  @classmethod
  def fit(cls, source: str, train_images: np.ndarray, num_classes: int) -> 'Captioner':
    attributes = DATASET_ATTRIBUTES.get(source, ())
    values = measure(train_images)
    thresholds = {a: tuple(float(q) for q in np.quantile(values[a], [1 / 3, 2 / 3]))
                  for a in attributes}
    heldout = tuple(p for p in HELDOUT.get(source, ()) if p[0] < num_classes)
    return cls(source, num_classes, attributes, thresholds, heldout)

  def class_word(self, label: int, numeral: bool = False) -> str:
    return class_word(self.source, label, numeral)

  def attribute_values(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """attribute -> int8 [N]: -1 the low third (its low word), +1 the high third, 0 neither."""
    values = measure(images)
    return {a: np.where(values[a] < lo, -1, np.where(values[a] > hi, 1, 0)).astype(np.int8)
            for a, (lo, hi) in self.thresholds.items()}

  def attribute_words(self, images: np.ndarray) -> list[dict[str, str]]:
    """Per image: attribute -> its word, for the attributes in a named third."""
    values = self.attribute_values(images)
    out = [{} for _ in range(len(images))]
    for a, v in values.items():
      low, high = ATTRIBUTE_WORDS[a]
      for i in np.flatnonzero(v):
        out[i][a] = high if v[i] > 0 else low
    return out

  def render(self, label: int, words: Sequence[str], variant: int = 0) -> str:
    """The caption of class `label` with attribute `words`; `variant` picks the template."""
    numeral = self.source == 'digits' and variant % 2 == 1
    noun = self.class_word(label, numeral)
    if words:
      phrase = ', '.join(words) + ' ' + noun
    elif self.source == 'digits' and variant // 2 % 2 == 0:
      phrase = 'handwritten ' + noun
    else:
      phrase = noun
    article = 'an' if phrase[0] in 'aeiou8' else 'a'
    return f'{article} {phrase}'

  def captions(self, images: np.ndarray, labels: np.ndarray) -> list[str]:
    """One caption per image, held-out combinations left out (module docstring). The template
    of image i is fixed (a seeded draw), so a split's captions never change."""
    variants = np.random.default_rng(_TEMPLATE_SEED).integers(0, 4, len(images))
    held = set(self.heldout)
    out = []
    for i, words in enumerate(self.attribute_words(images)):
      label = int(labels[i])
      kept = [words[a] for a in self.attributes if a in words and (label, words[a]) not in held]
      out.append(self.render(label, kept, int(variants[i])))
    return out

  def heldout_prompts(self) -> list[tuple[str, int, str, str]]:
    """(caption, class, attribute, word) of every held-out combination."""
    by_word = {w: a for a, pair in ATTRIBUTE_WORDS.items() for w in pair}
    return [(self.render(c, [w]), c, by_word[w], w) for c, w in self.heldout]



def class_word(source: str, label: int, numeral: bool = False) -> str:
  """The noun of class `label`: a digit's word or numeral, a Fashion-MNIST class name."""
  if source == 'digits':
    return str(label) if numeral else DIGIT_WORDS[label]
  if source == 'fashion_mnist':
    return FASHION_WORDS[label]
  return f'class {label}'


def vocabulary(source: str, num_classes: int) -> list[str]:
  """Every word a caption of `source` can hold (the joint encoder's vocabulary)."""
  words = {'a', 'an', 'handwritten', ','}
  for c in range(num_classes):
    for numeral in (False, True):
      words.update(_split(class_word(source, c, numeral)))
  for a in DATASET_ATTRIBUTES.get(source, ()):
    words.update(ATTRIBUTE_WORDS[a])
  return sorted(words)


def _split(text: str) -> list[str]:
  return re.findall(r"[\w'-]+|,", text.lower())


class WordTokenizer:
  """Whole words of a closed vocabulary; id 0 pads, id 1 is BOS; an unknown word is an error
  naming it (a prompt outside the captions' grammar would only read as noise)."""

  def __init__(self, words: Sequence[str]):
    self.words = ['<pad>', '<s>', *words]
    self.ids = {w: i for i, w in enumerate(self.words)}
    self.vocab_size = len(self.words)
    self.bos_id = 1

  def encode(self, text: str) -> list[int]:
    out = []
    for word in _split(text):
      if word not in self.ids:
        raise ValueError(f'The word {word!r} is not in the captions\' vocabulary '
                         f'({" ".join(self.words[2:])}).')
      out.append(self.ids[word])
    return out


def tokenize(tokenizer, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [N, max_len], mask bool [N, max_len]): BOS (where the tokenizer has one), the
  caption's tokens, cut at max_len, then padding (id 0, mask False)."""
  bos = [tokenizer.bos_id] if getattr(tokenizer, 'bos_id', -1) >= 0 else []
  ids = np.zeros((len(captions), max_len), np.int32)
  mask = np.zeros((len(captions), max_len), bool)
  for i, caption in enumerate(captions):
    row = (bos + list(tokenizer.encode(caption)))[:max_len]
    ids[i, :len(row)] = row
    mask[i, :len(row)] = True
  return ids, mask
