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

import json
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_run import assert_trees_equal, flat, restore, scalars

from configs import diffusion as diffusion_config
from configs import latent_diffusion as ldm_config
from configs import lm as lm_config
from configs import vae as vae_config
from data import captions, images, tokenizers
from data.errors import ConfigError
from model import diffusion, dit, run_params, text_encoder, transformer, unet, vae
from train import checkpoint, runs, trainer
from train import mesh as mesh_lib
from train import sample as sample_cli
from train.tasks import kit
from train.tasks.diffusion import DiffusionTask

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


# --- the task on the trainer: latent text-to-image with a frozen VAE --------------------------


def write_vae_run(workdir, **data) -> dict:
  """A VAE run dir in the trainer's layout (config.json, checkpoints/1/state with
  `params`) holding random, perturbed parameters: the frozen input of the runs below.
  Returns the parameters written."""
  c = vae_config.get_config('digits')
  c.model.update(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=2,
                 norm_groups=4, mid_attention=False, head_dim=8)
  c.data.update(data)
  c.checkpoint.update(async_save=False)
  cfg = vae.VAEConfig.from_config(c.model, image_size=c.data.image_size,
                                  channels=c.data.channels)
  with nnx.use_eager_sharding(False):
    model = perturbed(vae.VAE(cfg, rngs=nnx.Rngs(params=0)), 0.02)
  params = kit.pure_state(model, nnx.Param)
  ckpt = checkpoint.Checkpointer(str(workdir), c.checkpoint)
  ckpt.save(1, {'params': params}, None)
  ckpt.wait()
  ckpt.close()
  trainer.write_config(c, str(workdir))
  return jax.tree.map(np.asarray, params)


@pytest.fixture(scope='module')
def vae_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('vae')
  return workdir, write_vae_run(workdir)


def small_config(vae_dir, **overrides) -> ml_collections.ConfigDict:
  """configs/latent_diffusion.py:digits on 4x4x2 latents, a one-level U-Net and a one-layer
  encoder; fp32 so meshes agree tightly; no sample-based evaluation."""
  c = ldm_config.get_config('digits')
  c.unlock()
  c.update(steps=3, batch_size=8, log_every=1, eval_every=0, eval_steps=0)
  c.checkpoint.update(every=1000, async_save=False)
  c.autoencoder.workdir = str(vae_dir)
  c.model.update(base_channels=16, channel_mult=(1,), num_res_blocks=1,
                 attention_resolutions=(4,), head_dim=4, norm_groups=8, dropout=0.1)
  c.text.update(width=16, depth=1, num_heads=2)
  c.sample.update(steps=2, batch_size=4, grid_rows=2)
  c.optimizer.update(warmup_steps=1, decay_steps=20, eps=1e-4)  # see test_diffusion
  c.update_from_flattened_dict(overrides)
  c.lock()
  return c


MESH = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}


@pytest.fixture(scope='module')
def straight(vae_run, tmp_path_factory):
  """4 steps on a 2x2x2 mesh, checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp('ldm_straight')
  config = small_config(vae_run[0], steps=4, **MESH, **{'checkpoint.every': 2})
  return workdir, trainer.train_and_evaluate(config, str(workdir)).losses


def test_resume_is_exact(vae_run, straight, tmp_path):
  """The straight run's directory as it was after step 2 (its checkpoint 2, config and
  data state), resumed to step 4: the same losses and state, bitwise."""
  straight_dir, straight_losses = straight
  shutil.copytree(straight_dir, tmp_path, dirs_exist_ok=True)
  shutil.rmtree(tmp_path / 'checkpoints' / '4')
  config = small_config(vae_run[0], steps=4, **MESH, **{'checkpoint.every': 2})
  resumed = trainer.train_and_evaluate(config, str(tmp_path))
  assert sorted(resumed.losses) == [3, 4]
  assert resumed.losses == {k: straight_losses[k] for k in (3, 4)}  # bitwise
  assert_trees_equal(restore(straight_dir, 4), restore(tmp_path, 4))


def test_frozen_vae_scale_and_meshes_match_one_device(vae_run, straight):
  vae_dir, vae_params = vae_run
  straight_dir, straight_losses = straight
  config = small_config(vae_dir, steps=4)
  saved = restore(straight_dir, 4)
  # The VAE is a frozen input: not in the checkpoint (only the U-Net, the joint encoder, their
  # EMA and the scale), and its run dir still holds exactly what was written.
  assert set(saved['params']) == {'backbone', 'text_encoder'}
  assert set(saved['extras']) == {'ema', 'latent_scale'}
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), vae_params)
  after, _ = run_params.restore_params(str(vae_dir), run_params.on_one_device(abstract))
  jax.tree.map(np.testing.assert_array_equal, after, vae_params)
  # The scale: 1 / std of the posterior means of the first 1024 training images, encoded
  # here through the VAE's own API.
  cfg = vae.VAEConfig.from_config(ml_collections.ConfigDict(
      json.loads((vae_dir / 'config.json').read_text())['model']), image_size=8, channels=1)
  with nnx.use_eager_sharding(False):
    model = vae.VAE(cfg, rngs=nnx.Rngs(params=0))
  nnx.update(model, vae_params)
  train_x, _ = images.load_split(config.data, 'train')
  mean, _ = jax.jit(model.encode)(images.to_float(train_x[:1024]))
  np.testing.assert_allclose(saved['extras']['latent_scale'], 1.0 / np.std(np.asarray(mean)),
                             rtol=1e-4)

  # One device, without the trainer: the same seed's init, the same batches and frozen VAE.
  task = DiffusionTask(config)
  task._setup_captions()
  data = images.build_image_data(config.data, seed=config.seed, global_batch_size=8,
                                 eval_steps=0, process_index=0, process_count=1,
                                 annotate=task._caption_tokens)
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape((1,) * 6), mesh_lib.AXES)
  frozen = task.load_frozen(one)
  state = task.warm_start(jax.jit(task.init_state)(jax.random.key(config.seed)))
  step_fn = jax.jit(lambda s, b, f: task.train_step(s, b, f))
  single, grad_norms = {}, {}
  for step in range(1, 5):
    state, metrics = step_fn(state, next(data.train), frozen)
    single[step], grad_norms[step] = float(metrics['loss']), float(metrics['grad_norm'])
  for step in single:
    np.testing.assert_allclose(straight_losses[step], single[step], rtol=1e-4, err_msg=str(step))
  logged = scalars(straight_dir, 'train/grad_norm')
  for step, want in grad_norms.items():
    np.testing.assert_allclose(logged[step], want, rtol=1e-5, err_msg=str(step))
  # As in test_diffusion: Adam divides a gradient that nearly cancels (summed in another
  # order on each mesh) by its own size; largest difference measured 1.03e-4 after 4 steps at
  # lr 1e-3 (2026-12-01), tolerance 3x that, a third of one step.
  got, want = flat(saved['params']), flat(state.params)
  assert sorted(got) == sorted(want)
  for name, x in want.items():
    np.testing.assert_allclose(got[name], x, rtol=0, atol=3e-4, err_msg=name)


def test_prompt_sampling_decodes_pixels(vae_run, straight, tmp_path):
  straight_dir, _ = straight
  (thick,), step = sample_cli.sample(str(straight_dir), prompt='a thick seven')
  assert step == 4
  grid = thick['samples/grid']
  # 2 x 2 decoded 8x8 images (not 4x4x2 latents) on a 1-pixel lattice.
  assert grid.dtype == np.uint8 and grid.shape == (2 * 9 + 1, 2 * 9 + 1, 1)
  assert thick['samples/captions'].splitlines() == ['row 0: a thick seven', 'row 1: a thick seven']
  path = sample_cli.write_image_samples(thick, str(tmp_path / 'seven.png'))
  assert path == [str(tmp_path / 'seven.png')] and (tmp_path / 'seven.png').stat().st_size > 0
  with pytest.raises(ConfigError, match="'purple' is not in the captions' vocabulary"):
    sample_cli.sample(str(straight_dir), prompt='a purple seven')
  # The caption reaches the images: with the same noise (seed, batch position), another
  # caption in row 0 changes row 0 only.
  config = small_config(vae_run[0], **MESH)
  task = DiffusionTask(config)
  task.setup_inference(str(straight_dir))
  state, _ = runs.restore_latest(task, config, str(straight_dir))
  params = task.inference_params(state)
  both = task.generate(params, task.tokenize(['a thick seven', 'a thin one']), seed=5,
                       state=state)
  thin = task.generate(params, task.tokenize(['a thin one', 'a thin one']), seed=5, state=state)
  assert both.shape == (2, 8, 8, 1)
  assert np.abs(both[0] - thin[0]).max() > 1e-6
  np.testing.assert_array_equal(both[1], thin[1])


def test_attribute_accuracy_is_one_on_the_captioned_images_themselves(vae_run):
  task = DiffusionTask(small_config(vae_run[0]))
  task._setup_captions()
  test_x, _ = images.load_split(task.config.data, 'test')
  x = images.to_float(test_x)
  assert task._attribute_accuracy(x, task.eval_captions) == 1.0
  shuffled = np.random.default_rng(0).permutation(len(x))
  assert task._attribute_accuracy(x[shuffled], task.eval_captions) < 0.7


@pytest.mark.parametrize('change, message', [
    ({'autoencoder.workdir': None}, r'autoencoder.workdir is not set: this preset diffuses'),
    ({'vae_image_size': 16},
     r'was trained on images with data.image_size=16, but this run has data.image_size=8'),
    ({'vae_task': 'lm'}, r"is a run of task 'lm'; give the --workdir of a configs/vae.py run"),
    ({'text.encoder': 'frozen_lm', 'text.lm_workdir': 'LM'},
     r'text.lm_workdir=.* has no tokenizer'),
    ({'text.encoder': 'frozen_lm'}, r"text.encoder='frozen_lm' needs text.lm_workdir"),
    ({'data.random_flip': True}, r'data.random_flip=True would mirror images'),
])
def test_bad_configs_name_the_key(vae_run, tmp_path, change, message):
  vae_dir = vae_run[0]
  change = dict(change)
  if 'vae_image_size' in change or 'vae_task' in change:
    vae_dir = tmp_path / 'other_vae'
    vae_dir.mkdir()
    saved = json.loads((vae_run[0] / 'config.json').read_text())
    saved['data']['image_size'] = change.pop('vae_image_size', 8)
    saved['task'] = change.pop('vae_task', 'vae')
    (vae_dir / 'config.json').write_text(json.dumps(saved))
  if change.get('text.lm_workdir') == 'LM':  # a run dir with a config but no tokenizer
    lm_dir = tmp_path / 'lm'
    lm_dir.mkdir()
    (lm_dir / 'config.json').write_text(lm_config.get_config('tiny').to_json())
    change['text.lm_workdir'] = str(lm_dir)
  config = small_config(vae_dir, **change)
  with pytest.raises(ConfigError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()


# --- a frozen Kiln LM as the text encoder ----------------------------------------------------


def write_lm_run(workdir):
  """A byte-level LM run dir in the trainer's layout (config.json, tokenizer/, checkpoint 1
  with random parameters): the frozen text encoder below."""
  c = lm_config.get_config('tiny')
  c.data.tokenizer.update(kind='byte')
  c.checkpoint.update(async_save=False)
  c.model.update(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, dtype='float32')
  tokenizers.load_or_train_tokenizer(c.data.tokenizer, lambda: [], str(workdir))
  cfg = transformer.TransformerConfig.from_config(c.model, 257)
  with nnx.use_eager_sharding(False):
    params = kit.pure_state(transformer.Transformer(cfg, rngs=nnx.Rngs(params=0)), nnx.Param)
  ckpt = checkpoint.Checkpointer(str(workdir), c.checkpoint)
  ckpt.save(1, {'params': params}, None)
  ckpt.wait()
  ckpt.close()
  trainer.write_config(c, str(workdir))
  return cfg, params


def test_frozen_lm_encoder_with_a_dit(tmp_path):
  """Pixel text-to-image with the DiT backbone reading a frozen LM's hidden states: the context
  is the LM's own features (called directly), the trained state holds the DiT's parameters
  alone, and a step trains."""
  lm_cfg, lm_params = write_lm_run(tmp_path / 'lm')
  config = small_config('', **{'text.encoder': 'frozen_lm', 'text.lm_workdir':
                               str(tmp_path / 'lm'), 'text.max_len': 24,
                               'model.backbone': 'dit', 'model.dit.width': 16,
                               'model.dit.depth': 1, 'model.dit.num_heads': 2})
  task = DiffusionTask(config)
  task._setup_captions()
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape((1,) * 6), mesh_lib.AXES)
  frozen = task.load_frozen(one)
  tokens, mask = task.tokenize(['a thick seven', ''])
  assert tokens[0, 0] == 256 and mask[1].sum() == 1  # byte BOS; the empty caption is BOS alone
  context = task._text_context(None, frozen, tokens, mask)
  with nnx.use_eager_sharding(False):
    lm = transformer.Transformer(lm_cfg, rngs=nnx.Rngs(params=1))
  nnx.update(lm, lm_params)
  np.testing.assert_allclose(context, lm(jnp.asarray(tokens), features=True), rtol=1e-5,
                             atol=1e-5)
  state = task.warm_start(jax.jit(task.init_state)(jax.random.key(0)))
  with nnx.use_eager_sharding(False):
    alone = kit.pure_state(dit.DiT(task.model_cfg, rngs=nnx.Rngs(params=0)), nnx.Param)
  assert jax.tree.structure(state.params) == jax.tree.structure(alone)  # no LM inside
  data = images.build_image_data(config.data, seed=0, global_batch_size=8, eval_steps=0,
                                 process_index=0, process_count=1, annotate=task._caption_tokens)
  new, metrics = jax.jit(task.train_step)(state, next(data.train), frozen)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['grad_norm']) > 0
  assert set(new.extras) == {'ema'}
