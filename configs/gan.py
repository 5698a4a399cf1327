"""DCGAN-style GAN (model/gan.py, train/tasks/gan.py).

Run (default preset `digits`: scikit-learn's 8x8 digits, class-conditional; 3.4 minutes on
2 shared CPU cores, docs/benchmarks.md):

  python -m train --config=configs/gan.py:digits --workdir=/tmp/kiln_gan_digits

Fashion-MNIST (28x28, Debian's files: `sudo apt-get install dataset-fashion-mnist`):

  python -m train --config=configs/gan.py:fashion_mnist --workdir=/tmp/kiln_gan_fashion

A PNG grid of EMA-generator samples from the latest checkpoint:

  python -m train.sample --workdir=/tmp/kiln_gan_digits --out=grid.png

`optimizer.*` is the generator's optimizer and `d_optimizer.*` the
discriminator's (same keys; TTUR = a different `lr`). Any key can be
overridden with `--config.a.b=value`.
"""

import ml_collections

from configs import common


def base() -> ml_collections.ConfigDict:
  """The GAN schema: every key a GAN run can have, with its default."""
  c = common.trainer_defaults()
  c.task = 'gan'
  c.data = common.image_data_defaults()
  c.eval = common.eval_defaults()

  c.model = ml_collections.ConfigDict(dict(
      conditional=True,  # class-conditional G (label embedding) and projection D
      latent_dim=64,
      # Generator channels from the base resolution up: len - 1 stride-2 transposed convs,
      # so the base resolution is image_size / 2 ** (len - 1).
      g_channels=(128, 64),
      d_channels=(64, 128),  # one 4x4 stride-2 conv each, from the image down
      g_norm='pixel',  # pixel | none
      spectral_norm=True,  # on every discriminator weight
      power_iterations=1,  # per discriminator step
      dtype='float32',  # compute dtype
      param_dtype='float32',
  ))

  c.gan = ml_collections.ConfigDict(dict(
      loss='hinge',  # hinge | non_saturating
      d_steps=1,  # discriminator updates per generator update; each uses batch_size/d_steps
      r1_gamma=0.0,  # weight of gamma/2 * E||grad_x D(x)||^2 at real x; 0 disables it
  ))

  # Generator (optimizer) and discriminator (d_optimizer): Adam with b1 = 0 as in
  # SNGAN/BigGAN, constant learning rates, no weight decay and no clipping by default.
  c.optimizer.update(lr=2e-4, warmup_steps=0, end_lr=2e-4, b1=0.0, b2=0.99, weight_decay=0.0,
                     clip_norm=0.0)
  c.d_optimizer = ml_collections.ConfigDict(c.optimizer.to_dict())
  c.d_optimizer.update(lr=4e-4, end_lr=4e-4)

  # EMA of the generator's weights, used for samples and evaluation. The decay ramps up as
  # min(decay, (1 + step) / (10 + step)) so that early evaluations are not of the init.
  c.ema = ml_collections.ConfigDict(dict(decay=0.999))
  c.sample = ml_collections.ConfigDict(dict(grid_rows=10))
  return c


def get_config(preset: str = 'digits') -> ml_collections.ConfigDict:
  c = base()
  preset = preset or 'digits'
  if preset == 'digits':
    # G 206k parameters, D 36k; 3000 steps reach eval/fd 1.06x its floor (docs/benchmarks.md).
    c.steps = 3000
    c.batch_size = 64
    c.log_every = 100
    c.eval_every = 500
    c.eval_steps = 5
    c.checkpoint.every = 1000
    c.data.update(source='digits', image_size=8, channels=1, num_classes=10)
    c.model.update(g_channels=(64, 32), d_channels=(32, 64))
  elif preset == 'fashion_mnist':
    # Sized for 2 CPU cores (about 3 epochs); an accelerator affords wider channels and more
    # steps.
    c.steps = 3000
    c.batch_size = 64
    c.log_every = 100
    c.eval_every = 1000
    c.eval_steps = 20
    c.checkpoint.every = 1000
    c.data.update(source='fashion_mnist', image_size=28, channels=1, num_classes=10)
    c.model.update(g_channels=(64, 32, 16), d_channels=(32, 64))
    c.eval.update(num_samples=2000)
  else:
    raise ValueError(f'Unknown preset {preset!r} for configs/gan.py; choose one of '
                     'digits, fashion_mnist.')
  return c
