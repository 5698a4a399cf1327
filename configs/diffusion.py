"""Class-conditional image diffusion: an ADM-style U-Net on the shared training loop.

Run (default preset `digits`: scikit-learn's 8x8 digits, embedded, 2 CPU cores):

  python -m train --config=configs/diffusion.py:digits --workdir=/tmp/kiln_diffusion

then a PNG grid of guided samples (one class per column) from the newest checkpoint:

  python -m train.sample --workdir=/tmp/kiln_diffusion --out=/tmp/digits.png

Text-to-image (captions through cross-attention) and latent diffusion on a frozen VAE are
this task too: configs/latent_diffusion.py.

Other presets: `configs/diffusion.py:fashion_mnist` (Debian's 28x28 Fashion-MNIST:
`sudo apt-get install dataset-fashion-mnist`; 42 min on a loaded 2-core CPU and still far
from the real-data FD floor, see docs/benchmarks.md) and
`configs/diffusion.py:cifar10` (TFDS cifar10, for accelerators). Any key can be overridden
with `--config.a.b=value`, e.g. `--config.sample.sampler=ddim --config.sample.eta=1.0`.
"""

import ml_collections

from configs import common


def base() -> ml_collections.ConfigDict:
  """The diffusion schema: every key a diffusion run can have, with its default."""
  c = common.trainer_defaults()
  c.task = 'diffusion'
  c.data = common.image_data_defaults()
  c.eval = common.eval_defaults()

  c.model = ml_collections.ConfigDict(dict(
      base_channels=64,  # width of the first level
      channel_mult=(1, 2, 2),  # width multiplier per level; each level after the first halves H, W
      num_res_blocks=2,  # per level (the decoder has one more, for the extra skip)
      attention_resolutions=(16,),  # self-attention at these feature-map sizes
      head_dim=32,
      dropout=0.1,
      norm_groups=32,  # GroupNorm groups (capped at the width)
      backbone='unet',  # the denoiser: unet (model/unet.py) | dit (model/dit.py, model.dit.*)
      # A diffusion transformer's shape (model.backbone='dit', model/dit.py).
      dit=ml_collections.ConfigDict(dict(patch_size=2, width=128, depth=4, num_heads=4,
                                         mlp_ratio=4.0)),
      dtype='float32',  # compute
      param_dtype='float32',
      attention='xla',  # xla | cudnn | pallas | auto (model/attention.py)
  ))

  c.diffusion = ml_collections.ConfigDict(dict(
      timesteps=1000,
      schedule='cosine',  # linear | cosine
      parameterization='eps',  # eps | v | x0: what the network predicts
      loss_weighting='uniform',  # uniform (MSE of the prediction) | min_snr
      min_snr_gamma=5.0,  # min_snr: the x0 error is weighted by min(SNR, gamma)
      # class: a label embedding | text: captions through cross-attention | none
      conditioning='class',
      # share of training labels (or captions) replaced by "no label" (the empty caption);
      # guidance needs > 0
      label_dropout=0.1,
  ))

  # Text conditioning (diffusion.conditioning='text'): captions from data/captions.py.
  c.text = ml_collections.ConfigDict(dict(
      encoder='joint',  # joint: a small transformer trained with the U-Net | frozen_lm
      lm_workdir='',  # frozen_lm: a configs/lm.py run (its final-normed hidden states)
      max_len=8,  # tokens per caption, BOS included (padded, or cut)
      width=64,  # joint encoder: width, layers, heads, MLP ratio
      depth=2,
      num_heads=4,
      mlp_ratio=4.0,
  ))

  # Latent diffusion: a frozen VAE (a configs/vae.py run); '' diffuses pixels.
  c.autoencoder = ml_collections.ConfigDict(dict(
      workdir='',
      scale_factor=0.0,  # latents are multiplied by it; 0: 1 / their std, measured at start
  ))

  # Exponential moving average of the parameters; sampling and evaluation use it. Its decay
  # starts low and rises to `decay` as min(decay, (1 + step) / (10 + step)), so short runs are
  # not dominated by the initialisation.
  c.ema = ml_collections.ConfigDict(dict(decay=0.999))

  c.sample = ml_collections.ConfigDict(dict(
      sampler='dpm2m',  # ddpm | ddim | dpm2m (DPM-Solver++(2M))
      steps=25,  # network evaluations per sample (twice that with guidance)
      eta=0.0,  # ddim only: 0 deterministic, 1 the DDPM posterior variance
      guidance_scale=2.0,  # classifier-free guidance; 1 = none
      clip_denoised=True,  # clip each x0 prediction to the data range [-1, 1]
      batch_size=500,  # images per compiled sampling call (evaluation and grids)
      grid_rows=10,  # the logged grid is grid_rows x grid_rows
      prompt='',  # text conditioning: a caption for every image of the grid ('' : one per row)
  ))

  c.optimizer.update(lr=2e-4, warmup_steps=500, end_lr=2e-5, b2=0.999, weight_decay=0.0)
  return c


def get_config(preset: str = 'digits') -> ml_collections.ConfigDict:
  c = base()
  preset = preset or 'digits'
  if preset == 'digits':
    # 8x8 grey digits, 10 classes; timings and scores in docs/benchmarks.md ("Diffusion").
    c.steps = 1000
    c.batch_size = 64
    c.log_every = 100
    c.eval_every = 1000
    c.eval_steps = 4
    c.checkpoint.every = 500
    c.data.update(source='digits', image_size=8, channels=1, num_classes=10)
    c.model.update(base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), head_dim=32, dropout=0.0, norm_groups=8)
    c.optimizer.update(lr=1e-3, warmup_steps=100, end_lr=1e-4)
    c.ema.decay = 0.995
    c.sample.update(guidance_scale=1.5)
  elif preset == 'fashion_mnist':
    # About 4x the FLOPs per image of digits; undertrained at 1500 steps (docs/benchmarks.md).
    c.steps = 1500
    c.batch_size = 64
    c.log_every = 100
    c.eval_every = 1500
    c.eval_steps = 4
    c.checkpoint.every = 500
    c.data.update(source='fashion_mnist', image_size=28, channels=1, num_classes=10)
    c.eval.update(num_samples=1000)
    c.model.update(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                   attention_resolutions=(7,), head_dim=16, dropout=0.0, norm_groups=8)
    c.optimizer.update(lr=1e-3, warmup_steps=200, end_lr=1e-4)
    c.ema.decay = 0.995
  elif preset == 'cifar10':
    # DDPM's CIFAR-10 U-Net (35.7M parameters), with ADM's class conditioning and guidance.
    c.steps = 400_000
    c.batch_size = 128
    c.log_every = 100
    c.eval_every = 10_000
    c.eval_steps = 20
    c.checkpoint.every = 5000
    c.data.update(source='tfds', name='cifar10', image_size=32, channels=3, num_classes=10,
                  random_flip=True)
    c.eval.update(num_samples=10_000)
    c.model.update(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                   attention_resolutions=(16,), head_dim=64, dropout=0.1, norm_groups=32,
                   dtype='bfloat16')
    c.diffusion.update(schedule='linear')
    c.ema.decay = 0.9999
    c.sample.update(steps=50, batch_size=1000)
  else:
    raise ValueError(f'Unknown preset {preset!r} for configs/diffusion.py; choose one of '
                     'digits, fashion_mnist, cifar10.')
  return c
