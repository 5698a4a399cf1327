"""Image diffusion: a U-Net trained to denoise, sampled with classifier-free guidance.

The state keeps the parameters, their exponential moving average (EMA), the optimizer state
and a base key; the EMA weights are the ones evaluated and sampled. Each train step draws its
timesteps, noise and dropped conditions from the base key folded with the step, so a resumed
run draws exactly what the straight run drew.

Conditioning (`diffusion.conditioning`):
  class  a learned label embedding (ADM); guidance against the "no label" row.
  text   captions (data/captions.py: rendered from the label and attributes measured on the
         image) encoded by a text encoder, read by the U-Net's cross-attention layers:
         `text.encoder='joint'`, a small bidirectional transformer (model/text_encoder.py)
         trained with the U-Net, its parameters (and their EMA) in the state; or
         `text.encoder='frozen_lm'`, the final-normed hidden states of a Kiln LM run
         (`text.lm_workdir`, with its tokenizer), a frozen input. Caption dropout
         (`diffusion.label_dropout`, the same knob) replaces a caption by the empty one, and
         guidance contrasts against it: the "no caption" context is the encoder's encoding of
         the empty caption (its BOS token), as Stable Diffusion does, rather than a learned
         null vector, so both encoders share one rule and the joint one learns it through
         the dropped captions.
  none   unconditional.

Latent diffusion (`autoencoder.workdir`, a `configs/vae.py` run): the images are encoded by the
frozen VAE inside the step (the posterior mean: deterministic, and with the small KL weight of
an LDM autoencoder a sample differs from it by little more than noise the diffusion adds
anyway), times a scale factor (Stable Diffusion's `scale_factor`, 1 / std of the latents,
computed once from training images on a fresh start, or `autoencoder.scale_factor` when set)
kept in the state (`extras['latent_scale']`), so that a resume and `train.sample` use the
factor the run was trained with; samples are decoded by the frozen decoder, and FD/KID,
caption consistency and attribute accuracy score the decoded pixels. Without a workdir the
same task diffuses pixels.

Text evaluation (besides FD/KID and `eval/cond_acc` on captions of held-out images, whose
attribute/class combinations training saw): `eval/attr_acc`, the share of attribute words in
those captions that the generated image has (data/captions.py's measure, training thresholds;
chance about 1/3), and `eval/heldout_cond_acc`, `eval/heldout_attr_acc` on captions of the
(class, attribute) combinations that no training caption holds.
"""

import functools
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from data import captions as captions_lib
from data import images, tokenizers
from data.errors import ConfigError, DataError, check_choice, check_positive, require
from model import diffusion, dit, text_encoder, transformer, unet
from train import mesh as mesh_lib
from train import optim, tasks
from train.state import TrainState
from train.tasks import kit

# Eval noise and sampling keys derive from the seed through these, apart from training's.
_EVAL_SALT, _SAMPLE_SALT, _HELDOUT_SALT = 1, 2, 3
CONDITIONINGS = ('class', 'text', 'none')
TEXT_ENCODERS = ('joint', 'frozen_lm')
# The denoiser (`model.backbone`): model/unet.py's U-Net or model/dit.py's DiT, one call
# signature; each brings its config class, logical-axis rules and FLOP count.
BACKBONES = {'unet': (unet.UNetConfig, unet.UNet, unet.LOGICAL_AXIS_RULES, unet.forward_flops),
             'dit': (dit.DiTConfig, dit.DiT, dit.LOGICAL_AXIS_RULES, dit.forward_flops)}
# Training images encoded to estimate the latents' std (the scale factor).
_SCALE_IMAGES = 1024


def check_config(config: ml_collections.ConfigDict) -> None:
  """Diffusion-specific checks; `model.*` is checked by UNetConfig.from_config."""
  images.check_image_data_config(config.data)
  check_choice(config, 'diffusion.schedule', diffusion.SCHEDULES)
  check_choice(config, 'diffusion.parameterization', diffusion.PARAMETERIZATIONS)
  check_choice(config, 'diffusion.loss_weighting', diffusion.LOSS_WEIGHTINGS)
  check_choice(config, 'diffusion.conditioning', CONDITIONINGS)
  check_choice(config, 'model.backbone', tuple(BACKBONES))
  check_choice(config, 'sample.sampler', diffusion.SAMPLERS)
  check_positive(config, 'diffusion.timesteps', 'diffusion.min_snr_gamma', 'sample.steps',
                 'sample.batch_size', 'sample.grid_rows', 'eval.num_samples')
  check_positive(config, 'sample.eta', 'sample.guidance_scale',
                 'autoencoder.scale_factor', allow_zero=True)
  require(config.autoencoder.workdir is not None, 'autoencoder.workdir is not set: this preset '
          'diffuses the latents of a frozen VAE; give --config.autoencoder.workdir=<the --workdir '
          'of a configs/vae.py run on the same data> (or \'\' for pixel space).')
  d, s = config.diffusion, config.sample
  require(s.steps <= d.timesteps, f'sample.steps={s.steps} must be at most diffusion.timesteps='
          f'{d.timesteps}.')
  require(0.0 <= d.label_dropout < 1.0,
          f'diffusion.label_dropout={d.label_dropout!r} must be in [0, 1).')
  require(0.0 <= config.ema.decay < 1.0, f'ema.decay={config.ema.decay!r} must be in [0, 1).')
  if d.conditioning != 'none' and s.guidance_scale != 1.0:
    require(d.label_dropout > 0, f'sample.guidance_scale={s.guidance_scale} needs an '
            'unconditional model too: set diffusion.label_dropout > 0 (e.g. 0.1), or '
            'sample.guidance_scale=1.0.')
  require(not s.prompt or d.conditioning == 'text',
          f'sample.prompt={s.prompt!r} needs diffusion.conditioning=\'text\' (it is '
          f'{d.conditioning!r}).')
  if d.conditioning == 'text':
    check_choice(config, 'text.encoder', TEXT_ENCODERS)
    require(not config.data.random_flip, 'data.random_flip=True would mirror images whose '
            'captions name their slant; set it False for diffusion.conditioning=\'text\'.')
    require(config.text.encoder != 'frozen_lm' or bool(config.text.lm_workdir),
            "text.encoder='frozen_lm' needs text.lm_workdir: the --workdir of a configs/lm.py "
            'run (or of `python -m train.convert import`).')


def _rules(*rule_sets):
  """The rule sets merged, the first one naming an axis deciding it."""
  merged = {}
  for rules in rule_sets:
    for name, axes in rules:
      merged.setdefault(name, axes)
  return tuple(merged.items())


def read_run_config(run_dir: str, key: str) -> ml_collections.ConfigDict:
  """The config.json of the run `run_dir` (named by config key `key` in errors)."""
  from train.tasks.distill import read_run_config as read_json
  return ml_collections.ConfigDict(read_json(run_dir, key))


@tasks.register('diffusion')
class DiffusionTask(tasks.Task):
  items_name = 'examples'
  logical_rules = _rules(unet.LOGICAL_AXIS_RULES, text_encoder.LOGICAL_AXIS_RULES)

  def __init__(self, config: ml_collections.ConfigDict):
    check_config(config)
    self.config = config
    self.data = None
    self.evaluator = None
    self.captioner = None
    self._frozen = None
    c = config
    self.conditioning = c.diffusion.conditioning
    self.num_classes = c.data.num_classes if self.conditioning == 'class' else 0
    self.latent = bool(c.autoencoder.workdir)
    size, channels = c.data.image_size, c.data.channels
    if self.latent:
      size, channels = self._setup_vae()
    self.text_cfg, self.lm_cfg, context_dim = None, None, 0
    if self.conditioning == 'text':
      context_dim = self._setup_text()
    config_cls, self._backbone_cls, rules, self._forward_flops = BACKBONES[c.model.backbone]
    self.logical_rules = _rules(rules, text_encoder.LOGICAL_AXIS_RULES)
    try:
      self.model_cfg = config_cls.from_config(
          c.model, image_size=size, channels=channels, num_classes=self.num_classes,
          context_dim=context_dim)
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

  # --- frozen inputs and the text encoder, from the config -------------------

  def _setup_vae(self) -> tuple[int, int]:
    """The frozen VAE's config and graph, from its run dir; the latents' (size, channels)."""
    from model import vae as vae_lib
    c, key = self.config, 'autoencoder.workdir'
    workdir = c.autoencoder.workdir
    run = read_run_config(workdir, key)
    require(run.get('task') == 'vae', f'{key}={workdir!r} is a run of task '
            f'{run.get("task")!r}; give the --workdir of a configs/vae.py run.')
    for name in ('image_size', 'channels'):
      require(run.data[name] == c.data[name],
              f'{key}={workdir!r} was trained on images with data.{name}={run.data[name]}, '
              f'but this run has data.{name}={c.data[name]}: train a VAE on this data.')
    try:
      self.vae_cfg = vae_lib.VAEConfig.from_config(
          run.model, image_size=run.data.image_size, channels=run.data.channels)
    except ValueError as e:
      raise ConfigError(f'{key}={workdir!r}: {e}') from None
    self.vae_graphdef, (self._vae_specs,) = kit.abstract_split(
        lambda: vae_lib.VAE(self.vae_cfg, rngs=nnx.Rngs(params=jax.random.key(0))), nnx.Param,
        what='The VAE')
    return self.vae_cfg.latent_size, self.vae_cfg.latent_channels

  def _setup_text(self) -> int:
    """The tokenizer and the text encoder's config; returns the context width."""
    c = self.config
    if c.text.encoder == 'joint':
      self.tokenizer = captions_lib.WordTokenizer(
          captions_lib.vocabulary(c.data.source, c.data.num_classes))
      try:
        self.text_cfg = text_encoder.TextEncoderConfig.from_config(
            c.text, vocab_size=self.tokenizer.vocab_size, dtype=c.model.dtype,
            param_dtype=c.model.param_dtype)
      except ValueError as e:
        raise ConfigError(str(e)) from None
      return self.text_cfg.width
    key, workdir = 'text.lm_workdir', c.text.lm_workdir
    run = read_run_config(workdir, key)
    try:
      self.tokenizer = tokenizers.load_tokenizer(workdir)
    except DataError as e:
      raise ConfigError(f'{key}={workdir!r} has no tokenizer ({e}).') from None
    model = ml_collections.ConfigDict(run.model)
    model.attention = 'xla'  # captions are a few tokens: the einsum path is the fast one
    try:
      self.lm_cfg = transformer.TransformerConfig.from_config(model, self.tokenizer.vocab_size)
    except (ValueError, KeyError) as e:
      raise ConfigError(f'{key}={workdir!r}: {e}') from None
    if model.get('position') == 'learned':
      require(c.text.max_len <= model.max_positions, f'text.max_len={c.text.max_len} exceeds '
              f'the LM\'s model.max_positions={model.max_positions} ({key}={workdir!r}).')
    self.lm_graphdef, (self._lm_specs,) = kit.abstract_split(
        lambda: transformer.Transformer(self.lm_cfg, rngs=nnx.Rngs(params=jax.random.key(0))),
        nnx.Param, what='The text LM')
    return self.lm_cfg.d_model

  def _new_model(self, key: jax.Array) -> nnx.Module:
    backbone_key, text_key = jax.random.split(key)
    backbone = self._backbone_cls(self.model_cfg, rngs=nnx.Rngs(params=backbone_key))
    if self.text_cfg is None:
      return backbone
    return TextConditioned(backbone, text_encoder.TextEncoder(
        self.text_cfg, rngs=nnx.Rngs(params=text_key)))

  # --- setup -----------------------------------------------------------------

  def setup_data(self, workdir: str, process_index: int, process_count: int):
    from train import image_eval  # trains or loads the feature classifier: only for training
    c = self.config
    annotate = None
    if self.conditioning == 'text':
      self._setup_captions()
      annotate = self._caption_tokens
    self.data = images.build_image_data(
        c.data, seed=c.seed, global_batch_size=c.batch_size, eval_steps=c.eval_steps,
        process_index=process_index, process_count=process_count, annotate=annotate)
    if c.eval_every:
      self.evaluator = image_eval.ImageEvaluator(c.data, c.eval, c.seed)
    return self.data.train

  def _setup_captions(self) -> None:
    """The captioner, fitted on the training split (thresholds), and the held-out split's
    captions, the prompts of evaluation."""
    if self.captioner is not None:
      return
    c = self.config
    train_x, _ = images.load_split(c.data, 'train')
    self.captioner = captions_lib.Captioner.fit(c.data.source, train_x, c.data.num_classes)
    test_x, test_y = images.load_split(c.data, 'test')
    self.eval_captions = self.captioner.captions(test_x, test_y)
    self.eval_caption_labels = np.asarray(test_y, np.int32)

  def _caption_tokens(self, images_uint8, labels) -> dict[str, np.ndarray]:
    tokens, mask = self.tokenize(self.captioner.captions(images_uint8, labels))
    return {'tokens': tokens, 'mask': mask}

  def tokenize(self, texts) -> tuple[np.ndarray, np.ndarray]:
    """Caption texts -> (ids int32 [N, text.max_len], mask bool [N, text.max_len])."""
    try:
      return captions_lib.tokenize(self.tokenizer, list(texts), self.config.text.max_len)
    except ValueError as e:
      raise ConfigError(f'A caption or sample.prompt: {e}') from None

  def setup_inference(self, workdir: str) -> None:
    del workdir  # the model is built from the config alone
    if self.conditioning == 'text':
      self._setup_captions()

  # --- state -----------------------------------------------------------------

  def init_state(self, rng: jax.Array):
    init_key, step_key = jax.random.split(rng)
    params = kit.pure_state(kit.build(lambda: self._new_model(init_key)), nnx.Param)
    extras = {'ema': jax.tree.map(jnp.copy, params)}
    if self.latent:  # set by warm_start on a fresh run, restored on resume
      extras['latent_scale'] = jnp.ones((), jnp.float32)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.opt.init(params), rng=jax.random.key_data(step_key),
                      extras=extras)

  def state_logical_specs(self, abstract_state):
    extras = {'ema': self._param_specs}
    if self.latent:
      extras['latent_scale'] = P()
    return TrainState(step=P(), params=self._param_specs, rng=P(),
                      opt_state=self.opt.state_specs(abstract_state.opt_state, self._param_specs),
                      extras=extras)

  def warm_start(self, state):
    """A fresh latent run measures its scale factor (module docstring)."""
    if not self.latent:
      return state
    scale = float(self.config.autoencoder.scale_factor) or self.measure_latent_scale()
    extras = dict(state.extras)
    extras['latent_scale'] = jax.device_put(jnp.asarray(scale, jnp.float32),
                                            state.extras['latent_scale'].sharding)
    return state.replace(extras=extras)

  def measure_latent_scale(self) -> float:
    """1 / std of the frozen VAE's latents (posterior means) of up to 1024 training images."""
    x, _ = images.load_split(self.config.data, 'train')
    x = images.to_float(x[:_SCALE_IMAGES])
    frozen = self.frozen()
    encode = jax.jit(lambda vae_params, x: self._encode_images(vae_params, x))
    latents = kit.in_chunks(len(x), 256, lambda i, lo: encode(
        frozen['vae'], _pad_rows(x[lo:lo + 256], 256)))
    std = float(np.std(np.asarray(latents, np.float64)))
    if not np.isfinite(std) or std <= 0:
      raise ConfigError(f'autoencoder.workdir={self.config.autoencoder.workdir!r}: its latents '
                        f'have std {std}; set autoencoder.scale_factor by hand.')
    return 1.0 / std

  def inference_params(self, state):
    return state.extras['ema']

  def load_frozen(self, mesh):
    frozen = {}
    if self.latent:
      from model import vae as vae_lib
      frozen['vae'] = _load_params(
          'autoencoder.workdir', self.config.autoencoder.workdir,
          lambda: vae_lib.VAE(self.vae_cfg, rngs=nnx.Rngs(params=0)), self._vae_specs, mesh,
          unet.LOGICAL_AXIS_RULES)
    if self.lm_cfg is not None:
      frozen['lm'] = _load_params(
          'text.lm_workdir', self.config.text.lm_workdir,
          lambda: transformer.Transformer(self.lm_cfg, rngs=nnx.Rngs(params=0)), self._lm_specs,
          mesh, transformer.LOGICAL_AXIS_RULES)
    self._frozen = frozen
    return frozen

  def frozen(self):
    """The frozen inputs, loaded on first use outside training (train.sample)."""
    if self._frozen is None:
      self.load_frozen(mesh_lib.make_mesh(mesh_lib.unpipelined(self.config.mesh)))
    return self._frozen

  # --- the networks ----------------------------------------------------------

  def _encode_images(self, vae_params, x_BxHxWxC):
    """The frozen VAE's posterior mean of images in [-1, 1] (unscaled latents)."""
    vae = nnx.merge(self.vae_graphdef, jax.lax.stop_gradient(vae_params))
    mean, _ = vae.encode(x_BxHxWxC)
    return mean.astype(jnp.float32)

  def _decode_latents(self, vae_params, z_BxhxwxZ):
    vae = nnx.merge(self.vae_graphdef, vae_params)
    return vae.decode(z_BxhxwxZ).astype(jnp.float32)

  def _text_context(self, params, frozen, tokens_BxS, mask_BxS):
    """The caption context [B, S, E_ctx] float32 of the joint or the frozen encoder."""
    if self.text_cfg is not None:
      return nnx.merge(self.graphdef, params).text_encoder(tokens_BxS, mask_BxS)
    lm = nnx.merge(self.lm_graphdef, jax.lax.stop_gradient(frozen['lm']))
    return lm(tokens_BxS, features=True).astype(jnp.float32)

  def _model_fn(self, params, dropout_key=None):
    """(x_t, t, cond) -> network output for the given parameters; cond: labels [B] (class),
    (context, mask) (text) or None."""
    model = nnx.merge(self.graphdef, params)
    backbone = model.backbone if self.text_cfg is not None else model
    train = dropout_key is not None and self.model_cfg.dropout > 0

    def fn(x_t, t_B, cond):
      key = dropout_key if train else None
      if self.conditioning == 'text':
        context, mask = cond
        return backbone(x_t, t_B, context=context, context_mask=mask, dropout_key=key)
      return backbone(x_t, t_B, cond if self.num_classes else None, dropout_key=key)
    return fn

  def _null_caption(self, b: int):
    tokens, mask = self.tokenize([''])
    return (jnp.broadcast_to(jnp.asarray(tokens), (b, tokens.shape[1])),
            jnp.broadcast_to(jnp.asarray(mask), (b, mask.shape[1])))

  def _clean(self, state_extras, frozen, images_BxHxWxC):
    """x0 of the diffusion: the images, or their scaled latents."""
    x0 = images_BxHxWxC.astype(jnp.float32)
    if self.latent:
      x0 = self._encode_images(frozen['vae'], x0) * state_extras['latent_scale']
    return x0

  def _noised(self, batch, key, x0):
    """The batch with the draws of one step: timesteps, noise and dropped conditions.

    Drawn for the whole batch before any microbatch split, so gradient accumulation sees
    the same draws as one big batch.
    """
    b = x0.shape[0]
    t_key, noise_key, drop_key = jax.random.split(key, 3)
    drop = jax.random.bernoulli(drop_key, self.config.diffusion.label_dropout, (b,))
    out = {'x0': x0, 't': jax.random.randint(t_key, (b,), 0, self.process.timesteps),
           'eps': jax.random.normal(noise_key, x0.shape, jnp.float32)}
    if self.conditioning == 'text':
      null_tokens, null_mask = self._null_caption(b)
      out['tokens'] = jnp.where(drop[:, None], null_tokens, batch['tokens'])
      out['mask'] = jnp.where(drop[:, None], null_mask, batch['mask'])
    else:
      labels = batch['labels'].astype(jnp.int32)
      out['labels'] = jnp.where(drop, self.num_classes, labels) if self.num_classes else labels
    return out

  def _cond(self, params, frozen, noised):
    if self.conditioning == 'text':
      mask = noised['mask']
      return self._text_context(params, frozen, noised['tokens'], mask), mask
    return noised['labels']

  def _loss(self, params, noised, dropout_key, frozen):
    x_t = self.process.add_noise(noised['x0'], noised['eps'], noised['t'])
    cond = self._cond(params, frozen, noised)
    out = self._model_fn(params, dropout_key)(x_t, noised['t'], cond)
    loss = jnp.mean(self.process.loss(out, noised['x0'], noised['eps'], noised['t']))
    return loss, {}

  # --- steps -----------------------------------------------------------------

  def train_step(self, state, batch, frozen):
    step = state.step
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    noise_key, dropout_key = jax.random.split(key)
    loss_fn = functools.partial(self._loss, dropout_key=dropout_key, frozen=frozen)
    noised = self._noised(batch, noise_key, self._clean(state.extras, frozen, batch['images']))
    (loss, _), grads = self.opt.value_and_grad(
        loss_fn, state.params, noised, self.config.grad_accum, opt_state=state.opt_state)
    params, opt_state, update = self.opt.apply(state.params, state.opt_state, grads, loss)
    ema = optim.ema_update(state.extras['ema'], params, decay=self.config.ema.decay, step=step,
                           skipped=update['skipped'])
    metrics = {'loss': loss, 'lr': self.opt.schedule(step), **update}
    return state.replace(step=step + 1, params=params, opt_state=opt_state,
                         extras={**state.extras, 'ema': ema}), metrics

  def eval_batches(self) -> Iterator[Mapping[str, np.ndarray]]:
    return self.data.eval_batches()

  def eval_step(self, state, batch, frozen):
    """Held-out loss of the EMA weights: timesteps evenly spread over [0, T), fixed noise."""
    x0 = self._clean(state.extras, frozen, batch['images'])
    b = x0.shape[0]
    t = (jnp.arange(b, dtype=jnp.int32) * self.process.timesteps) // b
    eps = jax.random.normal(jax.random.key(self.config.seed + _EVAL_SALT), x0.shape, jnp.float32)
    x_t = self.process.add_noise(x0, eps, t)
    params = self.inference_params(state)
    if self.conditioning == 'text':
      cond = (self._text_context(params, frozen, batch['tokens'], batch['mask']), batch['mask'])
    else:
      cond = batch['labels'].astype(jnp.int32)
    out = self._model_fn(params)(x_t, t, cond)
    per_example = self.process.loss(out, x0, eps, t)
    return {'loss_sum': jnp.sum(per_example), 'count': jnp.asarray(b, jnp.float32)}

  def eval_summary(self, sums: Mapping[str, float], state) -> dict[str, float]:
    out = {}
    if sums:
      out['eval/loss'] = sums['loss_sum'] / max(sums['count'], 1.0)
    if self.evaluator is None:
      return out
    n, seed = self.config.eval.num_samples, self.config.seed + _SAMPLE_SALT
    params = self.inference_params(state)
    if self.conditioning != 'text':
      labels = self._cycle_labels(n)
      out.update(self.evaluator.score(self.generate(params, labels, n=n, seed=seed,
                                                    state=state), labels))
      return out
    # Captions of held-out images (combinations training saw), cycled to n.
    idx = np.arange(n) % len(self.eval_captions)
    texts = [self.eval_captions[i] for i in idx]
    labels = self.eval_caption_labels[idx]
    x = self.generate(params, self.tokenize(texts), seed=seed, state=state)
    out.update(self.evaluator.score(x, labels))
    out['eval/attr_acc'] = self._attribute_accuracy(x, texts)
    # Combinations no training caption holds.
    prompts = self.captioner.heldout_prompts()
    if prompts:
      per = max(1, n // (2 * len(prompts)))
      texts = [p[0] for p in prompts for _ in range(per)]
      labels = np.asarray([p[1] for p in prompts for _ in range(per)], np.int32)
      x = self.generate(params, self.tokenize(texts), seed=seed + _HELDOUT_SALT, state=state)
      logits = self.evaluator.features_and_logits(x)[1]
      out['eval/heldout_cond_acc'] = float(np.mean(np.argmax(logits, -1) == labels))
      out['eval/heldout_attr_acc'] = self._attribute_accuracy(x, texts)
    return out

  def _attribute_accuracy(self, images_NxHxWxC, texts) -> float:
    """The share of attribute words in `texts` that the image of each text has."""
    values = self.captioner.attribute_values(images_NxHxWxC)
    hits, total = 0, 0
    for i, text in enumerate(texts):
      words = set(captions_lib._split(text))
      for attribute, (low, high) in captions_lib.ATTRIBUTE_WORDS.items():
        if attribute not in values:
          continue
        for word, side in ((low, -1), (high, 1)):
          if word in words:
            total += 1
            hits += int(values[attribute][i] == side)
    return hits / total if total else float('nan')

  # --- accounting ------------------------------------------------------------

  def items_per_step(self) -> int:
    return self.config.batch_size

  def flops_per_step(self) -> float:
    # Forward and backward: about three forward passes.
    return 3.0 * self._forward_flops(self.model_cfg, self.config.batch_size,
                                     context_len=self.config.text.max_len)

  # --- sampling --------------------------------------------------------------

  def _cycle_labels(self, n: int) -> np.ndarray | None:
    return (np.arange(n) % self.num_classes).astype(np.int32) if self.num_classes else None

  def samples(self, state, seed: int) -> dict[str, np.ndarray]:
    from train import image_eval
    rows = self.config.sample.grid_rows
    params = self.inference_params(state)
    if self.conditioning != 'text':
      # Row-major grid: with as many columns as classes, each column is one class.
      labels = self._cycle_labels(rows * rows)
      grid = self.generate(params, labels, n=rows * rows, seed=seed + _SAMPLE_SALT,
                           state=state)
      return {'samples/grid': image_eval.image_grid(grid, rows)}
    # One caption per row: the prompt, or the held-out combinations, then held-out images'.
    if self.config.sample.prompt:
      row_texts = [self.config.sample.prompt] * rows
    else:
      row_texts = [p[0] for p in self.captioner.heldout_prompts()]
      row_texts = (row_texts + self.eval_captions)[:rows]
    texts = [t for t in row_texts for _ in range(rows)]
    grid = self.generate(params, self.tokenize(texts), seed=seed + _SAMPLE_SALT, state=state)
    return {'samples/grid': image_eval.image_grid(grid, rows),
            'samples/captions': '\n'.join(f'row {i}: {t}' for i, t in enumerate(row_texts))}

  def generate(self, params, cond_N, *, n: int | None = None, seed: int = 0,
               state=None) -> np.ndarray:
    """Images float32 [N, H, W, C] in [-1, 1] (clipped; decoded from latents in a latent
    run, whose `state` gives the scale factor), from `sample.*` of the config.

    cond_N: the class of each image (class conditioning), (tokens, mask) [N, S] each (text:
    see `tokenize`), or None with `n` images. Images go through one compiled sampler
    `sample.batch_size` at a time.
    """
    if cond_N is not None:
      n = len(jax.tree.leaves(cond_N)[0])
    bs = min(self.config.sample.batch_size, n)
    sampler = self._sampler_fn(bs)
    key = jax.random.key(seed)
    frozen = self.frozen() if (self.latent or self.lm_cfg is not None) else {}
    scale = (jnp.asarray(state.extras['latent_scale'], jnp.float32) if self.latent
             else jnp.ones((), jnp.float32))

    def run(i, lo):
      cond = None
      if cond_N is not None:
        cond = jax.tree.map(lambda a: _pad_rows(np.asarray(a)[lo:lo + bs], bs), cond_N)
      return sampler(params, frozen, scale, jax.random.fold_in(key, i), cond)
    return kit.in_chunks(n, bs, run)

  @functools.cache  # noqa: B019  (one compiled sampler per batch size)
  def _sampler_fn(self, batch_size: int):
    s = self.config.sample
    m = self.model_cfg
    shape = (batch_size, m.image_size, m.image_size, m.channels)

    @jax.jit
    def sampler(params, frozen, scale, key, cond):
      kwargs = {}
      if self.conditioning == 'text':
        tokens, mask = cond
        null_tokens, null_mask = self._null_caption(batch_size)
        null_context = self._text_context(params, frozen, null_tokens, null_mask)
        kwargs = dict(cond=(self._text_context(params, frozen, tokens, mask), mask),
                      null_cond=(null_context, null_mask))
      elif self.num_classes and cond is not None:
        kwargs = dict(labels_B=cond, null_label=self.num_classes)
      # Latents have no fixed range: their x0 predictions are not clipped.
      clip = (-1.0, 1.0) if s.clip_denoised and not self.latent else None
      x = diffusion.sample(self._model_fn(params), self.process, shape, key, sampler=s.sampler,
                           steps=s.steps, eta=s.eta, guidance_scale=s.guidance_scale,
                           clip_x0=clip, **kwargs)
      if self.latent:
        x = self._decode_latents(frozen['vae'], x / scale)
      return jnp.clip(x, -1.0, 1.0)
    return sampler


class TextConditioned(nnx.Module):
  """The denoiser and its jointly trained text encoder: one parameter tree, one optimizer."""

  def __init__(self, backbone: nnx.Module, encoder: text_encoder.TextEncoder):
    self.backbone = backbone
    self.text_encoder = encoder


def _load_params(key: str, workdir: str, make_model, specs, mesh, rules):
  """The newest parameters of the run `workdir` (config key `key`) for the model `make_model`
  builds, sharded on `mesh` by its logical `specs` under `rules`."""
  abstract = jax.eval_shape(lambda: kit.pure_state(kit.build(make_model), nnx.Param))
  shardings = mesh_lib.shardings(abstract, specs, mesh, rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  try:
    params, _ = kit.load_run_params(workdir, target)
  except ConfigError as e:
    raise ConfigError(f'{key}={e}') from None
  return params


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """`x` with zero rows appended up to `rows` (a fixed shape for one compiled program)."""
  x = np.asarray(x)
  return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)]) if len(
      x) < rows else x
