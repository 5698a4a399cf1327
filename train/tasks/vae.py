"""VAE: a convolutional autoencoder with a KL-regularised latent (model/vae.py), the first
stage of latent diffusion.

The loss of one step, per image and averaged over the batch:

  recon(x, decode(z))                       `vae.recon_loss`: l1 | l2, mean per pixel
  + kl_weight * KL(q(z | x) || N(0, I)) / (H * W * C)
  + perceptual_weight * d_feat(x, decode(z))
  + adversarial_weight * [step >= adversarial_start] * g_loss(D(decode(z)))

with z = mean + exp(logvar / 2) * eps, the reparameterised sample.

The KL is normalised per pixel, like the reconstruction: LDM sums both over pixels (and the
KL over latents) and weighs the KL by 1e-6; dividing both sums by the pixel count H * W * C
leaves that objective, and so the meaning of its weight, unchanged, and the loss reads as a
per-pixel error whatever the image size. With l2, kl_weight = 2 sigma^2 makes the loss the
negative ELBO (per pixel, up to a constant) of a Gaussian decoder with variance sigma^2.

Perceptual term: LPIPS needs VGG weights and its learned layer weights, which we cannot
download. Its stand-in is the feature classifier that train/image_eval.py trains once per
dataset on the same training images and caches (model/classifier.py): the distance between
its unit-normalised activations of x and of the reconstruction at every layer
(`vae.perceptual_distance`). It is a frozen input of the step (never trained, never
checkpointed). A classifier's features see what separates the classes (strokes and shapes),
not textures; they are what the FD of the evaluation measures, so the term pulls toward
what the evaluation scores.

Adversarial term: the GAN family's discriminator (model/gan.py, with spectral norm, a global
logit per image), trained on real images against reconstructions with `vae.d_loss` (hinge by
default, as LDM) by its own optimizer (`d_optimizer.*`), and switched on from step
`vae.adversarial_start` (LDM's disc_start): before it the discriminator neither trains nor
enters the loss. Its parameters, optimizer state and power-iteration vectors live in
`state.extras` ('d_params', 'd_opt', 'sn'), never in `state.params`, which hold only the VAE
(what a latent diffusion run loads). LDM's adaptive weight (the ratio of the gradient norms
of both terms at the decoder's last layer) is left out: a fixed weight, tuned per preset.

The discriminator updates after the autoencoder, on the same real images against the
reconstructions that the autoencoder's loss saw (the same z), from before its update.

Randomness (the posterior samples) comes from the state's key folded with the step, so a
resumed run draws what the straight run drew.

Evaluation on held-out images, with z = mean (the reconstruction a user gets): `eval/loss`
(reconstruction + the weighted KL), `eval/recon_mse` and `eval/psnr` (of the reconstruction
clipped to [-1, 1]; PSNR per image, peak-to-peak 2, averaged), `eval/kl` (nats per image).
Through train/image_eval.py: `eval/recon_fd` (and `eval/recon_kid`) of the reconstructions of
`eval.num_samples` held-out images, and `eval/fd`, `eval/kid` (with their floors, precision,
recall) of images decoded from the prior z ~ N(0, I).
"""

import functools
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data import images
from data.errors import ConfigError, check_choice, check_positive, get, require
from model import classifier as classifier_lib
from model import gan, vae
from train import optim, tasks
from train.state import TrainState
from train.tasks import kit

SAMPLE_CHUNK = 500  # images per call of the jitted decoder (one compiled shape)
# Keys of the prior samples derive from the seed through this, apart from training's.
_PRIOR_SALT = 2


def check_config(config: ml_collections.ConfigDict) -> None:
  """VAE-specific checks; `model.*` is checked by VAEConfig.from_config."""
  from train import image_eval
  images.check_image_data_config(config.data)
  check_choice(config, 'vae.recon_loss', vae.RECON_LOSSES)
  check_choice(config, 'vae.d_loss', gan.LOSSES)
  check_positive(config, 'vae.kl_weight', 'vae.perceptual_weight', 'vae.adversarial_weight',
                 'vae.adversarial_start', allow_zero=True)
  check_positive(config, 'vae.power_iterations', 'sample.grid_rows')
  d_channels = tuple(config.vae.d_channels)
  require(bool(d_channels) and all(int(c) > 0 for c in d_channels),
          f'vae.d_channels={d_channels!r} must be a non-empty tuple of positive channel counts.')
  if config.vae.adversarial_weight > 0:
    check_positive(config, 'd_optimizer.lr', 'd_optimizer.eps')
    check_positive(config, 'd_optimizer.warmup_steps', 'd_optimizer.weight_decay',
                   'd_optimizer.clip_norm', allow_zero=True)
    check_choice(config, 'd_optimizer.name', ('adamw',))
    for key in ('d_optimizer.b1', 'd_optimizer.b2'):
      value = get(config, key)
      require(0.0 <= value < 1.0, f'{key}={value!r} must be in [0, 1).')
  image_eval.check_eval_config(config.eval)


def logical_rules() -> tuple:
  """The VAE's (the U-Net's) rules, plus the discriminator's names that they lack."""
  names = {name for name, _ in vae.LOGICAL_AXIS_RULES}
  return vae.LOGICAL_AXIS_RULES + tuple(r for r in gan.LOGICAL_AXIS_RULES if r[0] not in names)


@tasks.register('vae')
class VAETask(tasks.Task):
  items_name = 'examples'
  logical_rules = logical_rules()

  def __init__(self, config: ml_collections.ConfigDict):
    check_config(config)
    self.config = config
    c = config
    try:
      self.model_cfg = vae.VAEConfig.from_config(c.model, image_size=c.data.image_size,
                                                 channels=c.data.channels)
    except ValueError as e:  # the model names the key; the trainer reports it as a config error
      raise ConfigError(str(e)) from None
    self.adversarial = c.vae.adversarial_weight > 0
    self.perceptual = c.vae.perceptual_weight > 0
    self.data = None
    self.evaluator = None
    self._heldout = None
    key = jax.random.key(0)
    self.graphdef, (self._param_specs,) = kit.abstract_split(
        lambda: self._new_vae(key), nnx.Param, what='The VAE')
    self.opt = optim.make_optimizer(c.optimizer, c.steps, c.max_nonfinite_steps,
                                    self._param_specs)
    if self.adversarial:
      self.d_cfg = gan.GANConfig(
          image_size=c.data.image_size, channels=c.data.channels, num_classes=0, latent_dim=1,
          g_channels=(1,), d_channels=tuple(int(x) for x in c.vae.d_channels),
          spectral_norm=bool(c.vae.spectral_norm),
          power_iterations=int(c.vae.power_iterations), dtype=self.model_cfg.dtype,
          param_dtype=self.model_cfg.param_dtype)
      self.d_graphdef, (self._d_specs, self._sn_specs) = kit.abstract_split(
          lambda: self._new_discriminator(key), nnx.Param, gan.SpectralState,
          what='The discriminator')
      self.d_opt = optim.make_optimizer(c.d_optimizer, c.steps, c.max_nonfinite_steps,
                                        self._d_specs, key='d_optimizer')

  def _new_vae(self, key: jax.Array) -> vae.VAE:
    return vae.VAE(self.model_cfg, rngs=nnx.Rngs(params=jax.random.split(key)[0]))

  def _new_discriminator(self, key: jax.Array) -> gan.Discriminator:
    return gan.Discriminator(self.d_cfg, rngs=nnx.Rngs(params=jax.random.split(key)[1]))

  # --- setup -----------------------------------------------------------------

  def setup_data(self, workdir: str, process_index: int, process_count: int):
    del workdir  # nothing to save beside the checkpoints
    c = self.config
    self.data = images.build_image_data(
        c.data, seed=c.seed, global_batch_size=c.batch_size, eval_steps=c.eval_steps,
        process_index=process_index, process_count=process_count)
    if c.eval_every:
      self._make_evaluator()
    return self.data.train

  def _make_evaluator(self):
    """The FD/KID scorer; its feature classifier is also the perceptual term's network."""
    from train import image_eval  # trains or loads the classifier: only when needed
    if self.evaluator is None:
      c = self.config
      self.evaluator = image_eval.ImageEvaluator(c.data, c.eval, c.seed)
    return self.evaluator

  def setup_inference(self, workdir: str) -> None:
    del workdir  # the model is built from the config alone

  def load_frozen(self, mesh: jax.sharding.Mesh):
    """The feature classifier of the perceptual term, replicated on every device."""
    if not self.perceptual:
      return {}
    evaluator = self._make_evaluator()
    self._classifier_graphdef = evaluator.graphdef
    params = jax.device_get(evaluator.params)
    return {'classifier': jax.device_put(params, NamedSharding(mesh, P()))}

  # --- state -----------------------------------------------------------------

  def init_state(self, rng: jax.Array):
    model_key, step_key = jax.random.split(rng)
    params = kit.pure_state(kit.build(lambda: self._new_vae(model_key)), nnx.Param)
    extras = {}
    if self.adversarial:
      d_params, sn = kit.pure_state(kit.build(lambda: self._new_discriminator(model_key)),
                                    nnx.Param, gan.SpectralState)
      extras = {'d_params': d_params, 'd_opt': self.d_opt.init(d_params), 'sn': sn}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.opt.init(params), rng=jax.random.key_data(step_key),
                      extras=extras)

  def state_logical_specs(self, abstract_state):
    extras = {}
    if self.adversarial:
      extras = {'d_params': self._d_specs, 'sn': self._sn_specs,
                'd_opt': self.d_opt.state_specs(abstract_state.extras['d_opt'],
                                                self._d_specs)}
    return TrainState(step=P(), params=self._param_specs, rng=P(),
                      opt_state=self.opt.state_specs(abstract_state.opt_state, self._param_specs),
                      extras=extras)

  # --- the networks as functions of pure dicts -------------------------------

  def _vae(self, params) -> vae.VAE:
    return nnx.merge(self.graphdef, params)

  def _discriminate(self, d_params, sn, images_BxHxWxC, update: bool = False):
    """Logits [B] and the spectral-norm vectors after the call (advanced if `update`)."""
    d = nnx.merge(self.d_graphdef, d_params, sn)
    logits_B = d(images_BxHxWxC, None, update=update)
    return logits_B, nnx.to_pure_dict(nnx.state(d, gan.SpectralState))

  def _perceptual(self, classifier_params, x, recon):
    model = nnx.merge(self._classifier_graphdef, classifier_params)
    return vae.perceptual_distance(model.activations, x, recon)

  # --- steps -----------------------------------------------------------------

  def _loss(self, params, batch, *, key, frozen, d_state, adversarial_on):
    """The autoencoder's loss (module docstring) and its terms, each a batch mean."""
    v, x = self.config.vae, batch['images'].astype(jnp.float32)
    recon, mean, logvar = self._vae(params)(x, key=key)
    rec = jnp.mean(vae.reconstruction_loss(v.recon_loss, recon, x))
    kl = jnp.mean(vae.kl_divergence(mean, logvar))
    loss = rec + v.kl_weight * kl / x[0].size
    aux = {'recon_loss': rec, 'kl': kl}
    if self.perceptual:
      perceptual = jnp.mean(self._perceptual(frozen['classifier'], x, recon))
      loss = loss + v.perceptual_weight * perceptual
      aux['perceptual'] = perceptual
    if self.adversarial:
      logits_B, _ = self._discriminate(d_state['d_params'], d_state['sn'], recon)
      g_loss = gan.g_loss(v.d_loss, logits_B)
      loss = loss + v.adversarial_weight * adversarial_on * g_loss
      aux['g_loss'] = g_loss
    return loss, aux

  def _d_step(self, d_state, x, recon):
    """One discriminator update on real images against (fixed) reconstructions."""
    kind = self.config.vae.d_loss

    def loss_fn(d_params, _):
      # One call on [real; fake]: the power iteration advances once per step.
      logits_2B, new_sn = self._discriminate(
          d_params, d_state['sn'], jnp.concatenate([x, recon]), update=True)
      real_B, fake_B = jnp.split(logits_2B, 2)
      return gan.d_loss(kind, real_B, fake_B), (new_sn, jnp.mean(real_B), jnp.mean(fake_B))

    (loss, (new_sn, d_real, d_fake)), grads = self.d_opt.value_and_grad(
        loss_fn, d_state['d_params'], None, opt_state=d_state['d_opt'])
    d_params, d_opt, update = self.d_opt.apply(d_state['d_params'], d_state['d_opt'], grads,
                                               loss)
    # A skipped step leaves the power-iteration vectors as they were, like the weights.
    sn = jax.tree.map(lambda new, old: jnp.where(update['skipped'] > 0, old, new), new_sn,
                      d_state['sn'])
    metrics = {'d_loss': loss, 'd_real': d_real, 'd_fake': d_fake,
               'd_grad_norm': update['grad_norm'], 'd_skipped': update['skipped']}
    return {'d_params': d_params, 'd_opt': d_opt, 'sn': sn}, metrics

  def train_step(self, state, batch, frozen):
    c, step = self.config, state.step
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    adversarial_on = (step >= c.vae.adversarial_start).astype(jnp.float32)
    loss_fn = functools.partial(self._loss, key=key, frozen=frozen, d_state=state.extras,
                                adversarial_on=adversarial_on)
    (loss, aux), grads = self.opt.value_and_grad(loss_fn, state.params, batch, c.grad_accum,
                                                 opt_state=state.opt_state)
    params, opt_state, update = self.opt.apply(state.params, state.opt_state, grads, loss)
    metrics = {'loss': loss, 'lr': self.opt.schedule(step), **aux, **update}
    extras = state.extras
    if self.adversarial:
      x = batch['images'].astype(jnp.float32)
      # The reconstructions the autoencoder's loss saw: same parameters, same z.
      recon = jax.lax.stop_gradient(self._vae(state.params)(x, key=key)[0])
      d_step = lambda d_state: self._d_step(d_state, x, recon)  # noqa: E731
      shapes = jax.eval_shape(d_step, state.extras)[1]
      idle = lambda d_state: (d_state, jax.tree.map(  # noqa: E731
          lambda s: jnp.zeros(s.shape, s.dtype), shapes))
      # Before vae.adversarial_start the discriminator is neither run nor updated.
      extras, d_metrics = jax.lax.cond(adversarial_on > 0, d_step, idle, state.extras)
      d_skipped = d_metrics.pop('d_skipped')
      metrics.update(d_metrics, d_lr=self.d_opt.schedule(step),
                     skipped=jnp.maximum(update['skipped'], d_skipped.astype(jnp.int32)))
    return state.replace(step=step + 1, params=params, opt_state=opt_state,
                         extras=extras), metrics

  def eval_batches(self) -> Iterator[Mapping[str, np.ndarray]]:
    return self.data.eval_batches()

  def eval_step(self, state, batch, frozen):
    """Sums over held-out images of the reconstruction from z = mean (module docstring)."""
    del frozen
    x = batch['images'].astype(jnp.float32)
    v = self.config.vae
    model = self._vae(self.inference_params(state))
    mean, logvar = model.encode(x)
    recon = model.decode(mean)
    kl_B = vae.kl_divergence(mean, logvar)
    loss_B = vae.reconstruction_loss(v.recon_loss, recon, x) + v.kl_weight * kl_B / x[0].size
    mse_B = vae.reconstruction_loss('l2', jnp.clip(recon, -1.0, 1.0), x)
    psnr_B = 10.0 * jnp.log10(4.0 / jnp.maximum(mse_B, 1e-10))  # peak-to-peak 2 in [-1, 1]
    return {'loss_sum': jnp.sum(loss_B), 'mse_sum': jnp.sum(mse_B),
            'psnr_sum': jnp.sum(psnr_B), 'kl_sum': jnp.sum(kl_B),
            'count': jnp.asarray(x.shape[0], jnp.float32)}

  def eval_summary(self, sums: Mapping[str, float], state) -> dict[str, float]:
    out = {}
    if sums:
      n = max(sums['count'], 1.0)
      out = {'eval/loss': sums['loss_sum'] / n, 'eval/recon_mse': sums['mse_sum'] / n,
             'eval/psnr': sums['psnr_sum'] / n, 'eval/kl': sums['kl_sum'] / n}
    if self.evaluator is not None:
      params = self.inference_params(state)
      num = self.config.eval.num_samples
      recon = self.reconstruct(params, self.heldout_images(num))
      scores = self.evaluator.score(recon)
      out.update({'eval/recon_fd': scores['eval/fd'], 'eval/recon_kid': scores['eval/kid']})
      out.update(self.evaluator.score(self.generate(params, num,
                                                    seed=self.config.seed + _PRIOR_SALT)))
    return out

  # --- accounting ------------------------------------------------------------

  def items_per_step(self) -> int:
    return self.config.batch_size

  def flops_per_step(self) -> float:
    """Forward + backward (about 3x forward) of the VAE, plus the discriminator's and the
    classifier's calls (each of their passes is counted by the same rule)."""
    b = self.config.batch_size
    flops = 3.0 * vae.forward_flops(self.model_cfg, b)
    if self.adversarial:
      _, d = gan.forward_flops(self.d_cfg)
      flops += vae.forward_flops(self.model_cfg, b)  # the D step's reconstructions
      flops += 3.0 * d * 2 * b + 3.0 * d * b  # D on [real; fake], then through D to the VAE
    if self.perceptual:
      flops += 3.0 * _classifier_flops(self.config.data, 2 * b)
    return flops

  # --- sampling and reconstruction -------------------------------------------

  def heldout_images(self, n: int) -> np.ndarray:
    """The first `n` held-out images, float32 [n, H, W, C] in [-1, 1] (fixed across runs)."""
    if self._heldout is None or len(self._heldout) < n:
      test_x, _ = images.load_split(self.config.data, 'test')
      self._heldout = images.to_float(test_x[:max(n, self.config.eval.num_samples)])
    return self._heldout[:n]

  def reconstruct(self, params, x_NxHxWxC: np.ndarray) -> np.ndarray:
    """decode(mean of q(z | x)), clipped to [-1, 1], float32 [N, H, W, C]."""
    fn = self._jitted('reconstruct')
    s = x_NxHxWxC.shape[1:]

    def run(_, start):
      chunk = np.zeros((SAMPLE_CHUNK, *s), np.float32)  # one shape, one compile
      part = x_NxHxWxC[start:start + SAMPLE_CHUNK]
      chunk[:len(part)] = part
      return fn(params, chunk)
    return kit.in_chunks(len(x_NxHxWxC), SAMPLE_CHUNK, run)

  def generate(self, params, num: int, seed: int) -> np.ndarray:
    """`num` images decoded from z ~ N(0, I), clipped to [-1, 1]: float32 [N, H, W, C]. The
    latents depend only on `seed`, so evaluations compare decoders, not draws."""
    z_NxhxwxZ = np.asarray(jax.random.normal(jax.random.key(seed),
                                             (num, *self.model_cfg.latent_shape), jnp.float32))
    fn = self._jitted('decode')

    def run(_, start):
      z = np.zeros((SAMPLE_CHUNK, *self.model_cfg.latent_shape), np.float32)
      part = z_NxhxwxZ[start:start + SAMPLE_CHUNK]
      z[:len(part)] = part
      return fn(params, z)
    return kit.in_chunks(num, SAMPLE_CHUNK, run)

  @functools.cache  # noqa: B019  (one compiled function of each kind per task)
  def _jitted(self, kind: str):
    if kind == 'reconstruct':
      def fn(params, x):
        model = self._vae(params)
        return jnp.clip(model.decode(model.encode(x)[0]), -1.0, 1.0)
    else:
      def fn(params, z):
        return jnp.clip(self._vae(params).decode(z), -1.0, 1.0)
    return jax.jit(fn)

  def samples(self, state, seed: int) -> dict[str, np.ndarray]:
    """`samples/reconstructions`: held-out images, each beside its reconstruction (pairs
    left to right, grid_rows rows); `samples/prior`: grid_rows^2 images decoded from the
    prior."""
    from train import image_eval
    rows = self.config.sample.grid_rows
    params = self.inference_params(state)
    pairs_per_row = max(1, rows // 2)
    x = self.heldout_images(rows * pairs_per_row)
    recon = self.reconstruct(params, x)
    paired = np.stack([x, recon], axis=1).reshape(-1, *x.shape[1:])  # x0, r0, x1, r1, ...
    prior = self.generate(params, rows * rows, seed=seed + _PRIOR_SALT)
    return {'samples/reconstructions': image_eval.image_grid(paired, rows),
            'samples/prior': image_eval.image_grid(prior, rows)}


def _classifier_flops(cfg_data: ml_collections.ConfigDict, batch: int) -> float:
  """FLOPs of the feature classifier's activations of `batch` images (XLA's cost analysis)."""
  info = images.dataset_info(cfg_data)
  cfg = classifier_lib.ClassifierConfig(*info.shape[1:], info.num_classes)
  graphdef, params = nnx.split(nnx.eval_shape(
      lambda: classifier_lib.Classifier(cfg, rngs=nnx.Rngs(0))))
  fwd = lambda p, x: nnx.merge(graphdef, p).activations(x)  # noqa: E731
  cost = jax.jit(fwd).lower(params, jax.ShapeDtypeStruct((batch, *info.shape),
                                                         jnp.float32)).cost_analysis()
  return float(cost.get('flops', 0.0)) if cost else 0.0
