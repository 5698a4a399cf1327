"""Convolutional VAE with a KL-regularised latent (model/vae.py, train/tasks/vae.py): the
autoencoder of latent diffusion.

Run (default preset `digits`: scikit-learn's 8x8 digits, 4x4x4 latents; 2 CPU cores):

  python -m train --config=configs/vae.py:digits --workdir=/tmp/kiln_vae

then a PNG of held-out images beside their reconstructions, and one decoded from the prior:

  python -m train.sample --workdir=/tmp/kiln_vae --out=/tmp/vae.png

Presets: `digits`; `digits_gan` (digits plus the perceptual and adversarial terms);
`fashion_mnist` (Debian's 28x28 Fashion-MNIST, factor 4 -> 7x7x4 latents:
`sudo apt-get install dataset-fashion-mnist`); `sd_f8` (Stable Diffusion's f=8, 4-channel
autoencoder shapes on 256x256 RGB, for accelerators). Any key can be overridden with
`--config.a.b=value`. A latent diffusion run reads a VAE run directory as a frozen input.
"""

import ml_collections

from configs import common


def base() -> ml_collections.ConfigDict:
  """The VAE schema: every key a VAE run can have, with its default."""
  c = common.trainer_defaults()
  c.task = 'vae'
  c.data = common.image_data_defaults()
  c.eval = common.eval_defaults()

  c.model = ml_collections.ConfigDict(dict(
      base_channels=128,  # width of the first level
      # Width multiplier per level; each level after the first halves H and W, so the
      # downsampling factor is 2 ** (len - 1).
      channel_mult=(1, 2, 4, 4),
      num_res_blocks=2,  # per encoder level (the decoder has one more, as LDM's)
      latent_channels=4,  # Z: the latent is [H / factor, W / factor, Z]
      norm_groups=32,  # GroupNorm groups (capped at the width)
      mid_attention=True,  # self-attention in the middle blocks, as Stable Diffusion's VAE
      head_dim=64,
      dtype='float32',  # compute
      param_dtype='float32',
      attention='xla',  # xla | cudnn | pallas | auto (model/attention.py)
  ))

  c.vae = ml_collections.ConfigDict(dict(
      recon_loss='l1',  # l1 | l2: mean over pixels and channels
      # Weight of KL / (H * W * C) beside the per-pixel reconstruction: LDM's convention
      # (its sums over pixels and latents, divided by the pixel count), so LDM's 1e-6 means
      # the same here. With l2, kl_weight = 2 sigma^2 is the ELBO of a Gaussian decoder of
      # variance sigma^2 (beta-VAE: larger is smoother latents, blurrier reconstructions).
      kl_weight=1e-6,
      # Distance between the eval feature classifier's activations of x and of the
      # reconstruction (LPIPS's shape, with the classifier of train/image_eval.py); 0 = off.
      perceptual_weight=0.0,
      # The GAN family's discriminator on real images against reconstructions; 0 = off.
      adversarial_weight=0.0,
      adversarial_start=0,  # the first step with the adversarial term (LDM's disc_start)
      d_loss='hinge',  # hinge | non_saturating (model/gan.py)
      d_channels=(64, 128),  # the discriminator's stride-2 convolutions
      spectral_norm=True,
      power_iterations=1,
  ))

  # The autoencoder's optimizer, and the discriminator's (used only with
  # vae.adversarial_weight > 0): Adam with LDM's betas (0.5, 0.9), constant rates, no decay.
  c.optimizer.update(lr=1e-4, warmup_steps=0, end_lr=1e-4, b1=0.5, b2=0.9, weight_decay=0.0,
                     clip_norm=0.0)
  c.d_optimizer = ml_collections.ConfigDict(c.optimizer.to_dict())
  c.sample = ml_collections.ConfigDict(dict(grid_rows=10))
  return c


def get_config(preset: str = 'digits') -> ml_collections.ConfigDict:
  c = base()
  preset = preset or 'digits'
  if preset in ('digits', 'digits_gan'):
    # 2000 steps: held-out PSNR 30.0 dB, recon FD 0.196 against the real-data floor 0.209,
    # 23.5 min on 2 heavily shared CPU cores (docs/benchmarks.md).
    c.steps = 2000
    c.batch_size = 64
    c.log_every = 100
    c.eval_every = 1000
    c.eval_steps = 4
    c.checkpoint.every = 1000
    c.data.update(source='digits', image_size=8, channels=1, num_classes=10)
    # Factor 2: 8x8 images, 4x4x4 latents (a quarter of the pixels' numbers).
    c.model.update(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4,
                   norm_groups=8, mid_attention=True, head_dim=32)
    c.optimizer.update(lr=1e-3, warmup_steps=100, end_lr=1e-4, b1=0.9, b2=0.99)
    c.d_optimizer.update(lr=2e-4, end_lr=2e-4, warmup_steps=0, b1=0.5, b2=0.9)
    # A KL weight 1000x LDM's: the latent stays near N(0, I) in scale (so prior samples are
    # digit-like and latent diffusion needs little rescaling) at a small cost in PSNR.
    c.vae.update(kl_weight=1e-3, d_channels=(32, 64))
    if preset == 'digits_gan':
      c.vae.update(perceptual_weight=0.1, adversarial_weight=0.05, adversarial_start=1000)
  elif preset == 'fashion_mnist':
    c.steps = 2000
    c.batch_size = 64
    c.log_every = 100
    c.eval_every = 2000
    c.eval_steps = 4
    c.checkpoint.every = 1000
    c.data.update(source='fashion_mnist', image_size=28, channels=1, num_classes=10)
    c.eval.update(num_samples=1000)
    # Factor 4: 28x28 images, 7x7x4 latents.
    c.model.update(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                   latent_channels=4, norm_groups=8, mid_attention=True, head_dim=32)
    c.optimizer.update(lr=1e-3, warmup_steps=100, end_lr=1e-4, b1=0.9, b2=0.99)
    c.d_optimizer.update(lr=2e-4, end_lr=2e-4, warmup_steps=0, b1=0.5, b2=0.9)
  elif preset == 'sd_f8':
    # Stable Diffusion's autoencoder (kl-f8: 83.7M parameters): factor 8, 4 latent channels,
    # LDM's loss (l1 + perceptual + a discriminator from step 50k, KL weight 1e-6).
    c.steps = 200_000
    c.batch_size = 32
    c.log_every = 100
    c.eval_every = 10_000
    c.eval_steps = 20
    c.checkpoint.every = 5000
    c.data.update(source='folder', image_size=256, channels=3, num_classes=1,
                  random_flip=True)
    c.eval.update(num_samples=2000)
    c.model.update(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   latent_channels=4, norm_groups=32, mid_attention=True, head_dim=512,
                   dtype='bfloat16')
    c.vae.update(perceptual_weight=1.0, adversarial_weight=0.5, adversarial_start=50_001,
                 d_channels=(64, 128, 256, 512))
  else:
    raise ValueError(f'Unknown preset {preset!r} for configs/vae.py; choose one of '
                     'digits, digits_gan, fashion_mnist, sd_f8.')
  return c
