"""Text-to-image diffusion, in a frozen VAE's latent space (Stable Diffusion's shape) or in pixels.

The diffusion task (train/tasks/diffusion.py) with `diffusion.conditioning='text'`: captions
rendered from the labels and from attributes measured on the images (data/captions.py: "a thick,
slanted 4", "a handwritten seven", "a dark coat"), encoded by a small transformer trained with
the U-Net (or a frozen Kiln LM), read by the U-Net's cross-attention layers, with classifier-free
guidance on the caption. Some (class, attribute) combinations never appear in a training caption;
evaluation asks for them (`eval/heldout_cond_acc`, `eval/heldout_attr_acc`).

The default preset `digits` (scikit-learn's 8x8 digits, embedded, 2 CPU cores) needs a VAE run
on the same data first:

  python -m train --config=configs/vae.py:digits --workdir=/tmp/kiln_vae
  python -m train --config=configs/latent_diffusion.py:digits \\
      --config.autoencoder.workdir=/tmp/kiln_vae --workdir=/tmp/kiln_ldm

then a PNG grid of one prompt from the newest checkpoint:

  python -m train.sample --workdir=/tmp/kiln_ldm --prompt='a thick seven' --out=/tmp/seven.png

Other presets:
  digits_pixel   the same text-to-image model in pixel space (no VAE): the baseline.
  digits_lm      `digits` with a frozen Kiln LM as the text encoder:
                 python -m train --config=configs/lm.py --workdir=/tmp/kiln_lm (any LM run)
                 then --config.text.lm_workdir=/tmp/kiln_lm --config.autoencoder.workdir=...
  fashion_mnist  Fashion-MNIST's class names and shades ("a dark coat"), on a
                 configs/vae.py:fashion_mnist run (`sudo apt-get install dataset-fashion-mnist`).
  sd_like        accelerator shapes: a 32x32x4 latent (a factor-8 VAE of 256x256 images from
                 data.source='folder'), an SD-1-sized U-Net and a 77-token encoder.
"""

import ml_collections

from configs import diffusion

PRESETS = ('digits', 'digits_pixel', 'digits_lm', 'fashion_mnist', 'sd_like')


def _digits(c: ml_collections.ConfigDict, *, latent: bool) -> None:
  c.steps = 1000
  c.batch_size = 64
  c.log_every = 100
  c.eval_every = 1000
  c.eval_steps = 4
  c.checkpoint.every = 500
  c.data.update(source='digits', image_size=8, channels=1, num_classes=10)
  # A latent of 4x4 (configs/vae.py:digits halves the 8x8 images) or the 8x8 pixels: the same
  # U-Net, with attention (and so cross-attention) at its two resolutions.
  c.model.update(base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(4, 2) if latent else (8, 4), head_dim=32, dropout=0.0,
                 norm_groups=8)
  c.text.update(max_len=8, width=64, depth=2, num_heads=4)
  c.optimizer.update(lr=1e-3, warmup_steps=100, end_lr=1e-4)
  c.ema.decay = 0.995
  c.sample.update(guidance_scale=2.0)


def get_config(preset: str = 'digits') -> ml_collections.ConfigDict:
  c = diffusion.base()
  preset = preset or 'digits'
  c.diffusion.conditioning = 'text'
  c.diffusion.label_dropout = 0.1
  c.sample.grid_rows = 8
  if preset == 'digits':
    _digits(c, latent=True)
  elif preset == 'digits_pixel':
    _digits(c, latent=False)
  elif preset == 'digits_lm':
    _digits(c, latent=True)
    # A byte or sentencepiece tokenizer's captions: up to ~25 tokens and BOS.
    c.text.update(encoder='frozen_lm', max_len=32)
  elif preset == 'fashion_mnist':
    c.steps = 1500
    c.batch_size = 64
    c.log_every = 100
    c.eval_every = 1500
    c.eval_steps = 4
    c.checkpoint.every = 500
    c.data.update(source='fashion_mnist', image_size=28, channels=1, num_classes=10)
    c.eval.update(num_samples=1000)
    # configs/vae.py:fashion_mnist's 7x7 latent (factor 4): odd, so one level, two blocks.
    c.model.update(base_channels=64, channel_mult=(1,), num_res_blocks=2,
                   attention_resolutions=(7,), head_dim=32, dropout=0.0, norm_groups=8)
    c.text.update(max_len=8, width=64, depth=2, num_heads=4)
    c.optimizer.update(lr=1e-3, warmup_steps=200, end_lr=1e-4)
    c.ema.decay = 0.995
  elif preset == 'sd_like':
    # Needs a factor-8 configs/vae.py run on the same images (autoencoder.workdir).
    # Stable Diffusion 1's denoiser on 32x32x4 latents of 256x256 images; a 6-layer encoder.
    c.steps = 400_000
    c.batch_size = 256
    c.log_every = 100
    c.eval_every = 10_000
    c.eval_steps = 20
    c.checkpoint.every = 5000
    c.data.update(source='folder', image_size=256, channels=3, num_classes=1000)
    c.eval.update(num_samples=10_000)
    c.model.update(base_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   attention_resolutions=(32, 16, 8), head_dim=64, dropout=0.0, norm_groups=32,
                   dtype='bfloat16', attention='auto')
    c.text.update(max_len=77, width=768, depth=6, num_heads=12)
    c.diffusion.update(schedule='linear')
    c.ema.decay = 0.9999
    c.optimizer.update(lr=1e-4, warmup_steps=10_000, end_lr=1e-5)
    c.sample.update(steps=50, batch_size=256, guidance_scale=7.5)
  else:
    raise ValueError(f'Unknown preset {preset!r} for configs/latent_diffusion.py; choose one of '
                     f'{", ".join(PRESETS)}.')
  if preset != 'digits_pixel':
    # No default: the run stops, naming the key, until a VAE run is given.
    c.autoencoder.workdir = ml_collections.config_dict.placeholder(str)
  return c
