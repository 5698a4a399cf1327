"""Text-to-image diffusion: cross-attention, the text encoders, captions, and the diffusion task
with text conditioning (in a frozen VAE's latent space) on the trainer.

Oracles: a numpy cross-attention (GroupNorm'd queries, masked softmax) against the layer;
bitwise-equal outputs when masked context positions change (padding is never read); the
classifier-free guidance formula recomputed from two unguided calls; attribute measures
against an independent loop-by-loop numpy reference on hand-made images (a thick upright bar,
a thin sheared one); the held-out combinations searched for in every training caption; a run
cut and resumed against one straight through; every mesh against one device; the frozen
inputs read back from their own run dirs and found unchanged and outside the checkpoint; the
latent scale against 1 / std of latents encoded here with the VAE's own API; the frozen LM's
context against the LM called directly.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import diffusion as diffusion_config
from configs import latent_diffusion as ldm_config
from data import captions, images
from model import diffusion, text_encoder, unet

# --- cross-attention and the text encoder ----------------------------------------------------


def small_unet_config(context_dim: int, **overrides) -> unet.UNetConfig:
  m = diffusion_config.base().model
  m.update(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
           head_dim=4, dropout=0.0, norm_groups=8)
  m.update(overrides)
  return unet.UNetConfig.from_config(m, image_size=8, channels=1, num_classes=0,
                                     context_dim=context_dim)


def perturbed(module: nnx.Module, scale: float = 0.05) -> nnx.Module:
  """The module with every parameter moved off its init (zero-initialised outputs included)."""
  graphdef, params = nnx.split(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def numpy_cross_attention(layer: unet.CrossAttention, x, context, mask, groups: int, heads: int):
  """GroupNorm (scale 1, bias 0 as initialised, float64), q / kv / out einsums, a softmax over
  the real context positions only."""
  b, h, w, f = x.shape
  xg = x.reshape(b, h * w, groups, f // groups).astype(np.float64)
  mu = xg.mean(axis=(1, 3), keepdims=True)
  var = ((xg - mu) ** 2).mean(axis=(1, 3), keepdims=True)
  xn = ((xg - mu) / np.sqrt(var + 1e-5)).reshape(b, h * w, f)
  xn = xn * np.asarray(layer.norm.scale[...]) + np.asarray(layer.norm.bias[...])
  q = np.einsum('blf,fnd->blnd', xn, np.asarray(layer.q.kernel[...], np.float64))
  kv = np.einsum('bse,tend->tbsnd', context, np.asarray(layer.kv.kernel[...], np.float64))
  d = q.shape[-1]
  scores = np.einsum('blnd,bsnd->bnls', q, kv[0]) / np.sqrt(d)
  scores = np.where(mask[:, None, None, :], scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum('bnls,bsnd->blnd', p, kv[1])
  out = np.einsum('blnd,ndf->blf', out, np.asarray(layer.out.kernel[...], np.float64))
  out = out + np.asarray(layer.out.bias[...], np.float64)
  return x + out.reshape(b, h, w, f)


def test_cross_attention_matches_numpy_and_never_reads_padding():
  cfg = small_unet_config(context_dim=6)
  with nnx.use_eager_sharding(False):
    layer = perturbed(unet.CrossAttention(16, cfg, rngs=nnx.Rngs(0)), 0.3)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 4, 4, 16)).astype(np.float32)
  context = rng.normal(size=(2, 5, 6)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  fwd = jax.jit(lambda c, m: layer(jnp.asarray(x), c, m))
  out = np.asarray(fwd(context, mask))
  want = numpy_cross_attention(layer, x, context.astype(np.float64), mask, 8, 4)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  # Other values at the masked positions of row 0: bitwise the same output.
  other = context.copy()
  other[0, 3:] = rng.normal(size=(2, 6)) * 10
  np.testing.assert_array_equal(np.asarray(fwd(other, mask)), out)
  # A real position's value changes the output (row 0 only: rows never mix).
  moved = context.copy()
  moved[0, 1] += 1.0
  got = np.asarray(fwd(moved, mask))
  assert not np.allclose(got[0], out[0], atol=1e-4)
  np.testing.assert_array_equal(got[1], out[1])


def text_unet():
  cfg = small_unet_config(context_dim=6, channel_mult=(1,), attention_resolutions=(8,))
  with nnx.use_eager_sharding(False):
    model = perturbed(unet.UNet(cfg, rngs=nnx.Rngs(0)))
  return cfg, model


def test_unet_follows_the_text_not_the_padding_and_guidance_formula_holds():
  cfg, model = text_unet()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 8, 8, 1)), jnp.float32)
  t = jnp.array([5, 300, 900])
  context = rng.normal(size=(3, 4, 6)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], bool)
  fwd = jax.jit(lambda x, t, c, m: model(x, t, context=c, context_mask=m))
  out = np.asarray(fwd(x, t, context, mask))
  padded = context.copy()
  padded[~mask] = 7.0
  np.testing.assert_array_equal(np.asarray(fwd(x, t, padded, mask)), out)
  other = context.copy()
  other[mask] += 0.5
  changed = np.asarray(fwd(x, t, other, mask))
  assert all(not np.allclose(changed[i], out[i], atol=1e-4) for i in range(3))
  with pytest.raises(ValueError, match=r'cross-attends to a context \[B, S, 6\]'):
    model(x, t)

  # Guidance: the one-pass doubled batch is uncond + s (cond - uncond) of two plain calls.
  null_context = np.broadcast_to(rng.normal(size=(1, 4, 6)), (3, 4, 6)).astype(np.float32)
  null_mask = np.broadcast_to(np.array([[1, 0, 0, 0]], bool), (3, 4))
  model_fn = lambda x, t, cond: model(x, t, context=cond[0], context_mask=cond[1])  # noqa: E731
  scale = 3.0
  guided = jax.jit(lambda x, t: diffusion.guided(model_fn, (context, mask),
                                                 (null_context, null_mask), scale)(x, t))
  uncond = np.asarray(fwd(x, t, null_context, null_mask), np.float64)
  want = uncond + scale * (out.astype(np.float64) - uncond)
  np.testing.assert_allclose(np.asarray(guided(x, t)), want, rtol=1e-5, atol=1e-5)


def test_text_encoder_is_bidirectional_and_never_reads_padding():
  cfg = text_encoder.TextEncoderConfig(vocab_size=20, max_len=6, width=16, depth=2, num_heads=2)
  with nnx.use_eager_sharding(False):
    enc = text_encoder.TextEncoder(cfg, rngs=nnx.Rngs(0))
  tokens = np.array([[1, 5, 6, 7, 0, 0], [1, 9, 9, 9, 9, 9]], np.int32)
  mask = tokens > 0
  fwd = jax.jit(enc)
  out = np.asarray(fwd(tokens, mask))
  assert out.shape == (2, 6, 16) and out.dtype == np.float32
  other = tokens.copy()
  other[0, 4:] = 13  # padding holds other ids: the real positions do not move
  np.testing.assert_array_equal(np.asarray(fwd(other, mask))[0, :4], out[0, :4])
  later = tokens.copy()
  later[0, 3] = 12  # a later real token changes the first position (not causal)
  assert not np.allclose(np.asarray(fwd(later, mask))[0, 0], out[0, 0], atol=1e-5)


# --- captions ------------------------------------------------------------------------------


def bar(width: int, shear: float, size: int = 12) -> np.ndarray:
  """A vertical bar `width` pixels wide, its column shifted by shear * (row - centre)."""
  img = np.zeros((size, size, 1), np.uint8)
  for y in range(2, size - 2):
    x0 = int(round(size / 2 - width / 2 + shear * (y - (size - 1) / 2)))
    img[y, x0:x0 + width] = 255
  return img


def reference_measures(img: np.ndarray) -> tuple[float, float]:
  """(ink, |shear|) by explicit loops: the ink's centroid, then its second moments."""
  h, w = img.shape[:2]
  v = [[img[y, x, 0] / 255.0 for x in range(w)] for y in range(h)]
  m = sum(sum(row) for row in v)
  cy = sum(y * v[y][x] for y in range(h) for x in range(w)) / m
  cx = sum(x * v[y][x] for y in range(h) for x in range(w)) / m
  sxy = sum(v[y][x] * (x - cx) * (y - cy) for y in range(h) for x in range(w))
  syy = sum(v[y][x] * (y - cy) ** 2 for y in range(h) for x in range(w))
  return m / (h * w), abs(sxy / syy)


def test_attributes_match_a_numpy_reference_on_hand_made_images():
  shapes = [(w, s) for w in (1, 2, 3) for s in (0.0, 0.4, 0.8)]
  imgs = np.stack([bar(w, s) for w, s in shapes])
  got = captions.measure(imgs)
  for i, img in enumerate(imgs):
    ink, shear = reference_measures(img)
    np.testing.assert_allclose(got['thickness'][i], ink, rtol=1e-9)
    np.testing.assert_allclose(got['slant'][i], shear, rtol=1e-6, atol=1e-9)
  # Floats in [-1, 1] measure as their uint8 images.
  np.testing.assert_allclose(captions.measure(images.to_float(imgs))['slant'], got['slant'])
  cap = captions.Captioner.fit('digits', imgs, 10)
  words = cap.attribute_words(imgs)
  assert words[shapes.index((3, 0.0))] == {'thickness': 'thick', 'slant': 'upright'}
  assert words[shapes.index((1, 0.8))] == {'thickness': 'thin', 'slant': 'slanted'}
  assert words[shapes.index((2, 0.4))] == {}  # the middle thirds are not named
  caption = cap.captions(imgs[[shapes.index((3, 0.0))]], np.array([5]))[0]
  assert caption in ('a thick, upright five', 'a thick, upright 5')
  # (4, 'upright') is held out: a 4's caption keeps only its other word.
  caption = cap.captions(imgs[[shapes.index((3, 0.0))]], np.array([4]))[0]
  assert caption in ('a thick four', 'a thick 4')


def test_heldout_combinations_never_appear_in_training_captions():
  cfg = ldm_config.get_config('digits_pixel').data
  train_x, train_y = images.load_split(cfg, 'train')
  cap = captions.Captioner.fit('digits', train_x, 10)
  texts = cap.captions(train_x, train_y)
  words = cap.attribute_words(train_x)
  assert len(cap.heldout) == 4
  for label, word in cap.heldout:
    nouns = {captions.DIGIT_WORDS[label], str(label)}
    has = [i for i, y in enumerate(train_y) if y == label and word in words[i].values()]
    assert len(has) >= 10  # images with the combination exist; their captions drop the word
    for text in texts:
      tokens = set(re.findall(r"[\w'-]+", text))
      assert not (word in tokens and tokens & nouns), text
  # Every other (class, word) pair does appear, so the rule removes only what it names.
  seen = {(int(y), w) for y, t in zip(train_y, texts, strict=True)
          for w in re.findall(r'\w+', t)}
  for label in range(10):
    for word in ('thick', 'thin', 'slanted', 'upright'):
      assert ((label, word) in seen) == ((label, word) not in set(cap.heldout)), (label, word)
  tok = captions.WordTokenizer(captions.vocabulary('digits', 10))
  ids, mask = captions.tokenize(tok, ['a thick, slanted 4', ''], 8)
  assert [tok.words[i] for i in ids[0][mask[0]]] == ['<s>', 'a', 'thick', ',', 'slanted', '4']
  assert mask[1].tolist() == [True] + [False] * 7  # the empty caption is BOS alone
  with pytest.raises(ValueError, match="'purple' is not in the captions' vocabulary"):
    tok.encode('a purple seven')
