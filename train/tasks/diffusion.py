"""Image diffusion: a U-Net trained to denoise, sampled with classifier-free guidance.

The state keeps the parameters, their exponential moving average (EMA), the optimizer state
and a base key; the EMA weights are the ones evaluated and sampled. Each train step draws its
timesteps, noise and dropped labels from the base key folded with the step, so a resumed run
draws exactly what the straight run drew.
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
from data.errors import ConfigError, check_choice, check_positive, require
from model import diffusion, unet
from train import optim, tasks
from train.state import TrainState
from train.tasks import kit

# Eval noise and sampling keys derive from the seed through these, apart from training's.
_EVAL_SALT, _SAMPLE_SALT = 1, 2


def check_config(config: ml_collections.ConfigDict) -> None:
  """Diffusion-specific checks; `model.*` is checked by UNetConfig.from_config."""
  images.check_image_data_config(config.data)
  check_choice(config, 'diffusion.schedule', diffusion.SCHEDULES)
  check_choice(config, 'diffusion.parameterization', diffusion.PARAMETERIZATIONS)
  check_choice(config, 'diffusion.loss_weighting', diffusion.LOSS_WEIGHTINGS)
  check_choice(config, 'sample.sampler', diffusion.SAMPLERS)
  check_positive(config, 'diffusion.timesteps', 'diffusion.min_snr_gamma', 'sample.steps',
                 'sample.batch_size', 'sample.grid_rows', 'eval.num_samples')
  check_positive(config, 'sample.eta', 'sample.guidance_scale', allow_zero=True)
  d, s = config.diffusion, config.sample
  require(s.steps <= d.timesteps, f'sample.steps={s.steps} must be at most diffusion.timesteps='
          f'{d.timesteps}.')
  require(0.0 <= d.label_dropout < 1.0,
          f'diffusion.label_dropout={d.label_dropout!r} must be in [0, 1).')
  require(0.0 <= config.ema.decay < 1.0, f'ema.decay={config.ema.decay!r} must be in [0, 1).')
  if config.model.class_conditional and s.guidance_scale != 1.0:
    require(d.label_dropout > 0, f'sample.guidance_scale={s.guidance_scale} needs an '
            'unconditional model too: set diffusion.label_dropout > 0 (e.g. 0.1), or '
            'sample.guidance_scale=1.0.')


@tasks.register('diffusion')
class DiffusionTask(tasks.Task):
  items_name = 'examples'
  logical_rules = unet.LOGICAL_AXIS_RULES

  def __init__(self, config: ml_collections.ConfigDict):
    check_config(config)
    self.config = config
    self.data = None
    self.evaluator = None
    c = config
    self.num_classes = c.data.num_classes if c.model.class_conditional else 0
    try:
      self.model_cfg = unet.UNetConfig.from_config(
          c.model, image_size=c.data.image_size, channels=c.data.channels,
          num_classes=self.num_classes)
    except ValueError as e:  # the model names the key; the trainer reports it as a config error
      raise ConfigError(str(e)) from None
    self.process = diffusion.Process(
        schedule=c.diffusion.schedule, timesteps=c.diffusion.timesteps,
        parameterization=c.diffusion.parameterization,
        loss_weighting=c.diffusion.loss_weighting, min_snr_gamma=c.diffusion.min_snr_gamma)
    self.graphdef, (self._param_specs,) = kit.abstract_split(
        lambda: self._new_model(jax.random.key(0)), nnx.Param, what='The U-Net')
    self.opt = optim.make_optimizer(c.optimizer, c.steps, c.max_nonfinite_steps,
                                    self._param_specs)

  def _new_model(self, key: jax.Array) -> unet.UNet:
    return unet.UNet(self.model_cfg, rngs=nnx.Rngs(params=key))

  # --- setup -----------------------------------------------------------------

  def setup_data(self, workdir: str, process_index: int, process_count: int):
    from train import image_eval  # trains or loads the feature classifier: only for training
    c = self.config
    self.data = images.build_image_data(
        c.data, seed=c.seed, global_batch_size=c.batch_size, eval_steps=c.eval_steps,
        process_index=process_index, process_count=process_count)
    if c.eval_every:
      self.evaluator = image_eval.ImageEvaluator(c.data, c.eval, c.seed)
    return self.data.train

  def setup_inference(self, workdir: str) -> None:
    del workdir  # the model is built from the config alone

  # --- state -----------------------------------------------------------------

  def init_state(self, rng: jax.Array):
    init_key, step_key = jax.random.split(rng)
    params = kit.pure_state(kit.build(lambda: self._new_model(init_key)), nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.opt.init(params), rng=jax.random.key_data(step_key),
                      extras={'ema': jax.tree.map(jnp.copy, params)})

  def state_logical_specs(self, abstract_state):
    return TrainState(step=P(), params=self._param_specs, rng=P(),
                      opt_state=self.opt.state_specs(abstract_state.opt_state, self._param_specs),
                      extras={'ema': self._param_specs})

  def inference_params(self, state):
    return state.extras['ema']

  # --- steps -----------------------------------------------------------------

  def _model_fn(self, params, dropout_key=None):
    """(x_t, t, labels) -> network output, for the given parameters."""
    model = nnx.merge(self.graphdef, params)
    train = dropout_key is not None and self.model_cfg.dropout > 0

    def fn(x_t, t_B, labels_B):
      return model(x_t, t_B, labels_B if self.num_classes else None,
                   dropout_key=dropout_key if train else None)
    return fn

  def _noised(self, batch, key):
    """The batch with the draws of one step: timesteps, noise and (dropped) labels.

    Drawn for the whole batch before any microbatch split, so gradient accumulation sees
    the same draws as one big batch.
    """
    x0 = batch['images'].astype(jnp.float32)
    b = x0.shape[0]
    t_key, noise_key, drop_key = jax.random.split(key, 3)
    labels = batch['labels'].astype(jnp.int32)
    if self.num_classes:
      drop = jax.random.bernoulli(drop_key, self.config.diffusion.label_dropout, (b,))
      labels = jnp.where(drop, self.num_classes, labels)
    return {'x0': x0, 'labels': labels,
            't': jax.random.randint(t_key, (b,), 0, self.process.timesteps),
            'eps': jax.random.normal(noise_key, x0.shape, jnp.float32)}

  def _loss(self, params, noised, dropout_key):
    x_t = self.process.add_noise(noised['x0'], noised['eps'], noised['t'])
    out = self._model_fn(params, dropout_key)(x_t, noised['t'], noised['labels'])
    loss = jnp.mean(self.process.loss(out, noised['x0'], noised['eps'], noised['t']))
    return loss, {}

  def train_step(self, state, batch, frozen):
    del frozen
    step = state.step
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    noise_key, dropout_key = jax.random.split(key)
    loss_fn = functools.partial(self._loss, dropout_key=dropout_key)
    (loss, _), grads = self.opt.value_and_grad(
        loss_fn, state.params, self._noised(batch, noise_key), self.config.grad_accum,
        opt_state=state.opt_state)
    params, opt_state, update = self.opt.apply(state.params, state.opt_state, grads, loss)
    ema = optim.ema_update(state.extras['ema'], params, decay=self.config.ema.decay, step=step,
                           skipped=update['skipped'])
    metrics = {'loss': loss, 'lr': self.opt.schedule(step), **update}
    return state.replace(step=step + 1, params=params, opt_state=opt_state,
                         extras={'ema': ema}), metrics

  def eval_batches(self) -> Iterator[Mapping[str, np.ndarray]]:
    return self.data.eval_batches()

  def eval_step(self, state, batch, frozen):
    """Held-out loss of the EMA weights: timesteps evenly spread over [0, T), fixed noise."""
    x0 = batch['images'].astype(jnp.float32)
    b = x0.shape[0]
    t = (jnp.arange(b, dtype=jnp.int32) * self.process.timesteps) // b
    eps = jax.random.normal(jax.random.key(self.config.seed + _EVAL_SALT), x0.shape, jnp.float32)
    x_t = self.process.add_noise(x0, eps, t)
    del frozen
    out = self._model_fn(self.inference_params(state))(x_t, t, batch['labels'].astype(jnp.int32))
    per_example = self.process.loss(out, x0, eps, t)
    return {'loss_sum': jnp.sum(per_example), 'count': jnp.asarray(b, jnp.float32)}

  def eval_summary(self, sums: Mapping[str, float], state) -> dict[str, float]:
    out = {}
    if sums:
      out['eval/loss'] = sums['loss_sum'] / max(sums['count'], 1.0)
    if self.evaluator is not None:
      labels = self._cycle_labels(self.config.eval.num_samples)
      samples = self.generate(self.inference_params(state), labels,
                              seed=self.config.seed + _SAMPLE_SALT)
      out.update(self.evaluator.score(samples, labels))
    return out

  # --- accounting ------------------------------------------------------------

  def items_per_step(self) -> int:
    return self.config.batch_size

  def flops_per_step(self) -> float:
    # Forward and backward: about three forward passes.
    return 3.0 * unet.forward_flops(self.model_cfg, self.config.batch_size)

  # --- sampling --------------------------------------------------------------

  def _cycle_labels(self, n: int) -> np.ndarray | None:
    return (np.arange(n) % self.num_classes).astype(np.int32) if self.num_classes else None

  def samples(self, state, seed: int) -> dict[str, np.ndarray]:
    from train import image_eval
    rows = self.config.sample.grid_rows
    # Row-major grid: with as many columns as classes, each column is one class.
    labels = self._cycle_labels(rows * rows)
    grid = self.generate(self.inference_params(state), labels, n=rows * rows,
                         seed=seed + _SAMPLE_SALT)
    return {'samples/grid': image_eval.image_grid(grid, rows)}

  def generate(self, params, labels_N: np.ndarray | None, *, n: int | None = None,
               seed: int = 0) -> np.ndarray:
    """Images float32 [N, H, W, C] in [-1, 1] (clipped), from `sample.*` of the config.

    labels_N: the class of each image (conditional models), or None with `n` images.
    Images go through one compiled sampler `sample.batch_size` at a time.
    """
    n = len(labels_N) if labels_N is not None else n
    bs = min(self.config.sample.batch_size, n)
    sampler = self._sampler_fn(bs)
    key = jax.random.key(seed)

    def run(i, lo):
      labels = None
      if labels_N is not None:
        labels = np.zeros(bs, np.int32)
        chunk = labels_N[lo:lo + bs]
        labels[:len(chunk)] = chunk
      return sampler(params, jax.random.fold_in(key, i), labels)
    return kit.in_chunks(n, bs, run)

  @functools.cache  # noqa: B019  (one compiled sampler per batch size)
  def _sampler_fn(self, batch_size: int):
    s = self.config.sample
    shape = (batch_size, self.model_cfg.image_size, self.model_cfg.image_size,
             self.model_cfg.channels)

    @jax.jit
    def sampler(params, key, labels_B):
      x = diffusion.sample(
          self._model_fn(params), self.process, shape, key, sampler=s.sampler, steps=s.steps,
          eta=s.eta, labels_B=labels_B, null_label=self.num_classes,
          guidance_scale=s.guidance_scale, clip_x0=(-1.0, 1.0) if s.clip_denoised else None)
      return jnp.clip(x, -1.0, 1.0)
    return sampler
