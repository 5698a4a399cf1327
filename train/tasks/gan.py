"""GAN: a generator and a discriminator trained against each other (model/gan.py).

One train step = `gan.d_steps` discriminator updates, then one generator
update. The global batch of real images is split into `d_steps` strided
slices (as gradient microbatches are, so no example crosses devices): D step
i sees slice i and as many fresh fakes, so every real image is used once per
epoch whatever d_steps is, and the GAN minibatch is m = batch_size / d_steps
for both networks. Fresh noise comes from the state's key folded with the
step, so a resumed run draws the same noise as a straight one.

State (train/state.py): `params` and `opt_state` are the generator's
(`optimizer.*`); `extras` holds the discriminator's `d_params` and `d_opt`
(`d_optimizer.*`, its own learning rate), `sn` (the discriminator's
spectral-norm power-iteration vectors, advanced by D steps only) and `ema`
(EMA of G, used for evaluation and samples: `inference_params`).

Metrics: `loss` is the generator's loss of this step (non-saturating
softplus(-D(G(z))) or hinge -D(G(z)), against the discriminator just updated),
also logged as `g_loss`; `d_loss` is the discriminator's loss averaged over
its d_steps updates, `r1` E||grad_x D(x)||^2 at real x (before gamma/2),
`d_real`/`d_fake` the mean logits, `grad_norm`/`d_grad_norm` the gradient
norms of G/D, `lr`/`d_lr`, and `skipped` = 1 if any update of the step was
skipped for a non-finite loss or gradient.
"""

import functools
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from data import images
from data.errors import ConfigError, check_choice, check_positive, get, require
from model import gan
from train import image_eval, optim, tasks
from train.state import TrainState
from train.tasks import kit

SAMPLE_CHUNK = 500  # images per call of the jitted sampler


def check_config(config: ml_collections.ConfigDict) -> None:
  """GAN-specific checks; `model.*` is checked by GANConfig.from_config."""
  images.check_image_data_config(config.data)
  check_choice(config, 'gan.loss', gan.LOSSES)
  check_positive(config, 'gan.d_steps')
  check_positive(config, 'gan.r1_gamma', allow_zero=True)
  require(config.batch_size % config.gan.d_steps == 0,
          f'batch_size={config.batch_size} must be divisible by gan.d_steps='
          f'{config.gan.d_steps}: each discriminator step takes an equal slice of the batch.')
  require(config.grad_accum == 1,
          f'grad_accum={config.grad_accum}: the GAN does not accumulate gradients; set it to 1 '
          '(gan.d_steps splits the batch between discriminator steps).')
  # The discriminator's optimizer has the same schema and rules as `optimizer`.
  check_positive(config, 'd_optimizer.lr', 'd_optimizer.eps')
  check_positive(config, 'd_optimizer.warmup_steps', 'd_optimizer.weight_decay',
                 'd_optimizer.clip_norm', allow_zero=True)
  check_choice(config, 'd_optimizer.name', ('adamw',))
  for key in ('d_optimizer.b1', 'd_optimizer.b2', 'ema.decay'):
    value = get(config, key)
    require(0.0 <= value < 1.0, f'{key}={value!r} must be in [0, 1).')
  check_positive(config, 'sample.grid_rows')
  image_eval.check_eval_config(config.eval)


@tasks.register('gan')
class GANTask(tasks.Task):
  items_name = 'examples'
  logical_rules = gan.LOGICAL_AXIS_RULES

  def __init__(self, config: ml_collections.ConfigDict):
    check_config(config)
    self.config = config
    try:
      self.model_cfg = gan.GANConfig.from_config(config.model, config.data)
    except ValueError as e:  # the model names the key; the trainer reports it as a config error
      raise ConfigError(str(e)) from None
    self.data = None
    self.evaluator = None
    c = config
    key = jax.random.key(0)
    self.g_graphdef, (self._g_specs,) = kit.abstract_split(
        lambda: self._new_generator(key), nnx.Param, what='The generator')
    self.d_graphdef, (self._d_specs, self._sn_specs) = kit.abstract_split(
        lambda: self._new_discriminator(key), nnx.Param, gan.SpectralState,
        what='The discriminator')
    self.g_opt = optim.make_optimizer(c.optimizer, c.steps, c.max_nonfinite_steps,
                                      self._g_specs)
    self.d_opt = optim.make_optimizer(c.d_optimizer, c.steps, c.max_nonfinite_steps,
                                      self._d_specs, key='d_optimizer')

  def _new_generator(self, model_key: jax.Array) -> gan.Generator:
    return gan.Generator(self.model_cfg, rngs=nnx.Rngs(params=jax.random.split(model_key)[0]))

  def _new_discriminator(self, model_key: jax.Array) -> gan.Discriminator:
    return gan.Discriminator(self.model_cfg,
                             rngs=nnx.Rngs(params=jax.random.split(model_key)[1]))

  # --- setup -----------------------------------------------------------------

  def setup_data(self, workdir: str, process_index: int, process_count: int):
    del workdir  # nothing to save beside the checkpoints
    c = self.config
    self.data = images.build_image_data(
        c.data, seed=c.seed, global_batch_size=c.batch_size, eval_steps=c.eval_steps,
        process_index=process_index, process_count=process_count)
    if c.eval_every:
      self.evaluator = image_eval.ImageEvaluator(c.data, c.eval, c.seed)
    return self.data.train

  def setup_inference(self, workdir: str) -> None:
    del workdir  # the models are built from the config alone

  # --- state -----------------------------------------------------------------

  def init_state(self, rng: jax.Array):
    model_key, noise_key = jax.random.split(rng)
    g_params = kit.pure_state(kit.build(lambda: self._new_generator(model_key)), nnx.Param)
    d_params, sn = kit.pure_state(kit.build(lambda: self._new_discriminator(model_key)),
                                  nnx.Param, gan.SpectralState)
    extras = {'d_params': d_params, 'd_opt': self.d_opt.init(d_params), 'sn': sn,
              'ema': jax.tree.map(jnp.copy, g_params)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=g_params,
                      opt_state=self.g_opt.init(g_params), rng=jax.random.key_data(noise_key),
                      extras=extras)

  def state_logical_specs(self, abstract_state):
    extras = abstract_state.extras
    return TrainState(
        step=P(), rng=P(), params=self._g_specs,
        opt_state=self.g_opt.state_specs(abstract_state.opt_state, self._g_specs),
        extras={'d_params': self._d_specs, 'sn': self._sn_specs, 'ema': self._g_specs,
                'd_opt': self.d_opt.state_specs(extras['d_opt'], self._d_specs)})

  def inference_params(self, state):
    return state.extras['ema']

  # --- the networks as functions of pure dicts -------------------------------

  def _generate(self, g_params, z_BxZ, labels_B):
    return nnx.merge(self.g_graphdef, g_params)(z_BxZ, labels_B)

  def _discriminate(self, d_params, sn, images_BxHxWxC, labels_B, update: bool = False):
    """Logits [B] and the spectral-norm vectors after the call (advanced if `update`)."""
    d = nnx.merge(self.d_graphdef, d_params, sn)
    logits_B = d(images_BxHxWxC, labels_B, update=update)
    return logits_B, nnx.to_pure_dict(nnx.state(d, gan.SpectralState))

  def _noise(self, key: jax.Array, m: int):
    """m latent vectors and, for a conditional model, m uniformly drawn labels (else None)."""
    z_key, label_key = jax.random.split(key)
    z_MxZ = jax.random.normal(z_key, (m, self.model_cfg.latent_dim), jnp.float32)
    z_MxZ = gan.constrain_batch(z_MxZ)
    if not self.model_cfg.num_classes:
      return z_MxZ, None
    labels_M = jax.random.randint(label_key, (m,), 0, self.model_cfg.num_classes, jnp.int32)
    return z_MxZ, gan.constrain_batch(labels_M)

  def _labels(self, batch):
    return batch['labels'] if self.model_cfg.num_classes else None

  # --- steps -----------------------------------------------------------------

  def _d_loss(self, d_params, sn, real, real_labels, fake, fake_labels):
    m = real.shape[0]
    both_labels = None if real_labels is None else jnp.concatenate([real_labels, fake_labels])
    # One call on [real; fake]: the power iteration advances once per D step.
    logits_2M, new_sn = self._discriminate(
        d_params, sn, jnp.concatenate([real, fake.astype(real.dtype)]), both_labels, update=True)
    real_logits_M, fake_logits_M = logits_2M[:m], logits_2M[m:]
    loss = gan.d_loss(self.config.gan.loss, real_logits_M, fake_logits_M)
    r1 = jnp.zeros((), jnp.float32)
    if self.config.gan.r1_gamma > 0:
      # With the vectors from before the call, update=False gives the same normalised weights.
      r1 = gan.r1_penalty(lambda x: self._discriminate(d_params, sn, x, real_labels)[0], real)
    total = loss + 0.5 * self.config.gan.r1_gamma * r1
    aux = {'d_loss': loss, 'r1': r1, 'd_real': jnp.mean(real_logits_M),
           'd_fake': jnp.mean(fake_logits_M)}
    return total, (aux, new_sn)

  def _d_update(self, g_params, carry, xs):
    d_params, d_opt, sn = carry
    micro, key = xs
    real_labels = self._labels(micro)
    z, fake_labels = self._noise(key, micro['images'].shape[0])
    fake = jax.lax.stop_gradient(self._generate(g_params, z, fake_labels))
    loss_fn = lambda p, _: self._d_loss(p, sn, micro['images'], real_labels, fake,  # noqa: E731
                                        fake_labels)
    (total, (aux, new_sn)), grads = self.d_opt.value_and_grad(loss_fn, d_params, None,
                                                               opt_state=d_opt)
    d_params, d_opt, update = self.d_opt.apply(d_params, d_opt, grads, total)
    # A skipped step leaves the power-iteration vectors as they were, like the weights.
    sn = jax.tree.map(lambda new, old: jnp.where(update['skipped'] > 0, old, new), new_sn, sn)
    metrics = {**aux, 'd_grad_norm': update['grad_norm'], 'd_skipped': update['skipped']}
    return (d_params, d_opt, sn), metrics

  def _g_loss(self, g_params, d_params, sn, z, labels):
    fake = self._generate(g_params, z, labels)
    logits_M, _ = self._discriminate(d_params, sn, fake, labels)
    return gan.g_loss(self.config.gan.loss, logits_M), {}

  def train_step(self, state, batch, frozen):
    del frozen
    c, step, x = self.config, state.step, state.extras
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    d_key, g_key = jax.random.split(key)
    n_d = c.gan.d_steps

    micro = optim.split_microbatches(dict(batch), n_d)
    (d_params, d_opt, sn), d_metrics = jax.lax.scan(
        functools.partial(self._d_update, state.params), (x['d_params'], x['d_opt'], x['sn']),
        (micro, jax.random.split(d_key, n_d)))

    z, labels = self._noise(g_key, c.batch_size // n_d)
    g_loss_fn = lambda p, _: self._g_loss(p, d_params, sn, z, labels)  # noqa: E731
    (g_loss, _), grads = self.g_opt.value_and_grad(g_loss_fn, state.params, None,
                                                     opt_state=state.opt_state)
    g_params, g_opt, update = self.g_opt.apply(state.params, state.opt_state, grads, g_loss)
    ema = optim.ema_update(x['ema'], g_params, decay=c.ema.decay, step=step,
                           skipped=update['skipped'])

    d_means = jax.tree.map(jnp.mean, d_metrics)
    metrics = {
        'loss': g_loss,
        'g_loss': g_loss,
        'd_loss': d_means['d_loss'],
        'r1': d_means['r1'],
        'd_real': d_means['d_real'],
        'd_fake': d_means['d_fake'],
        'grad_norm': update['grad_norm'],
        'd_grad_norm': d_means['d_grad_norm'],
        'lr': self.g_opt.schedule(step),
        'd_lr': self.d_opt.schedule(step),
        'skipped': jnp.maximum(update['skipped'], jnp.max(d_metrics['d_skipped'])),
    }
    extras = {'d_params': d_params, 'd_opt': d_opt, 'sn': sn, 'ema': ema}
    return state.replace(step=step + 1, params=g_params, opt_state=g_opt, extras=extras), metrics

  def eval_batches(self) -> Iterator[Mapping[str, np.ndarray]]:
    return self.data.eval_batches()

  def eval_step(self, state, batch, frozen):
    """The discriminator's loss on held-out real images against as many EMA-G fakes.

    The fakes take the real batch's labels and a fixed noise key, so every
    evaluation scores the same comparison.
    """
    real = batch['images']
    labels = self._labels(batch)
    z = jax.random.normal(jax.random.key(self.config.seed + 1),
                          (real.shape[0], self.model_cfg.latent_dim), jnp.float32)
    del frozen
    x = state.extras
    fake = self._generate(self.inference_params(state), gan.constrain_batch(z), labels)
    real_logits, _ = self._discriminate(x['d_params'], x['sn'], real, labels)
    fake_logits, _ = self._discriminate(x['d_params'], x['sn'], fake, labels)
    per_example = jax.vmap(
        lambda r, f: gan.d_loss(self.config.gan.loss, r[None], f[None]))(real_logits, fake_logits)
    return {
        'd_loss_sum': jnp.sum(per_example),
        'd_real_correct': jnp.sum(real_logits > 0).astype(jnp.float32),
        'd_fake_correct': jnp.sum(fake_logits < 0).astype(jnp.float32),
        'examples': jnp.asarray(real.shape[0], jnp.float32),
    }

  def eval_summary(self, sums: Mapping[str, float], state) -> dict[str, float]:
    out = {}
    if sums:
      n = max(sums['examples'], 1.0)
      out = {'eval/loss': sums['d_loss_sum'] / n, 'eval/d_real_acc': sums['d_real_correct'] / n,
             'eval/d_fake_acc': sums['d_fake_correct'] / n}
    if self.evaluator is not None:
      images_NxHxWxC, labels_N = self.generate(
          self.inference_params(state), self.config.eval.num_samples, seed=self.config.seed)
      out.update(self.evaluator.score(images_NxHxWxC, labels_N))
    return out

  # --- accounting ------------------------------------------------------------

  def items_per_step(self) -> int:
    return self.config.batch_size

  def flops_per_step(self) -> float:
    """Forward + backward (3x forward) of every network call in one step."""
    g, d = gan.forward_flops(self.model_cfg)
    n_d, m = self.config.gan.d_steps, self.config.batch_size // self.config.gan.d_steps
    per_d_step = g * m + 3 * d * 2 * m  # G makes fakes; D on [real; fake]
    if self.config.gan.r1_gamma > 0:
      per_d_step += 6 * d * m  # the R1 gradient, differentiated again (about twice D's fwd+bwd)
    return float(n_d * per_d_step + 3 * (g + d) * m)

  # --- sampling --------------------------------------------------------------

  def generate(self, g_params, num: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """`num` generator images (float32 [N, H, W, C] in [-1, 1]) and their labels.

    Labels cycle over the classes (None for an unconditional model). The
    noise depends only on `seed`, so evaluations compare generators, not draws.
    """
    k = self.model_cfg.num_classes
    labels_N = (np.arange(num) % k).astype(np.int32) if k else None
    z_NxZ = np.asarray(jax.random.normal(jax.random.key(seed),
                                         (num, self.model_cfg.latent_dim), jnp.float32))
    sample = self._sample_fn()

    def run(_, start):
      z = np.zeros((SAMPLE_CHUNK, z_NxZ.shape[1]), np.float32)  # one shape, one compile
      z[:min(SAMPLE_CHUNK, num - start)] = z_NxZ[start:start + SAMPLE_CHUNK]
      labels = np.arange(start, start + SAMPLE_CHUNK, dtype=np.int32) % k if k else None
      return sample(g_params, z, labels)
    return kit.in_chunks(num, SAMPLE_CHUNK, run), labels_N

  @functools.cache  # noqa: B019  (one compiled sampler per task)
  def _sample_fn(self):
    return jax.jit(self._generate)

  def samples(self, state, seed: int) -> dict[str, np.ndarray]:
    """A grid of EMA-generator samples; for a conditional model, column j is class j % K."""
    rows = self.config.sample.grid_rows
    images_NxHxWxC, _ = self.generate(self.inference_params(state), rows * rows, seed=seed + 2)
    return {'samples/grid': image_eval.image_grid(images_NxHxWxC, rows)}

