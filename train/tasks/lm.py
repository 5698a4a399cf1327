"""Decoder-only language modelling: next-token cross-entropy on packed windows."""

import dataclasses
import functools
import json
from collections.abc import Iterator, Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import PartitionSpec as P

from data import lm_pipeline, storage, tokenizers
from data.errors import ConfigError, check_choice, check_positive, require
from model import decode, lora, pipeline, quant, sampling, scoring, transformer
from train import mesh as mesh_lib
from train import optim, tasks
from train.state import TrainState
from train.tasks import kit

DATA_SOURCES = ('stdlib', 'text', 'jsonl', 'tfds', 'synthetic', 'arrayrecord')
# The tasks whose training loss is one forward of the batch through the transformer: the
# ones mesh.stage > 1 pipelines (the others run several forwards of other shapes).
PIPELINED_TASKS = ('lm', 'sft')


def check_config(config: ml_collections.ConfigDict,
                 data_sources: tuple[str, ...] = DATA_SOURCES) -> None:
  """LM-specific checks; `model.*` is checked by TransformerConfig.from_config. Subclasses
  that read other data (SFT) name their own `data_sources`."""
  check_choice(config, 'data.source', data_sources)
  check_choice(config, 'data.tokenizer.kind', ('sentencepiece', 'byte', 'char'))
  check_choice(config, 'data.tokenizer.model_type', ('bpe', 'unigram'))
  check_positive(config, 'data.seq_len')
  check_positive(config, 'loss.z_loss', allow_zero=True)
  require(0.0 < config.data.val_fraction < 1.0,
          f'data.val_fraction={config.data.val_fraction!r} must be in (0, 1).')
  if config.data.source in ('text', 'jsonl'):
    require(bool(config.data.path), f'data.source={config.data.source!r} needs data.path: a file '
            'or glob, e.g. --config.data.path=/path/to/input.txt.')
  if config.data.source == 'arrayrecord':
    require(bool(config.data.path), "data.source='arrayrecord' needs data.path: a directory "
            'written by python -m data.tokenize.')
  model = config.model
  if model.get('position') == 'learned' and config.data.seq_len > model.get('max_positions', 0):
    raise ConfigError(f'data.seq_len={config.data.seq_len} exceeds model.max_positions='
                      f'{model.max_positions}, the size of the learned position table.')
  if config.data.source == 'tfds':
    require(bool(config.data.name), "data.source='tfds' needs data.name, e.g. "
            '--config.data.name=tiny_shakespeare.')


def check_context_parallel(config: ml_collections.ConfigDict) -> None:
  """With `mesh.context` > 1 (model/context_parallel.py): every row splits into its chunks and
  the attention implementation runs on a split row. Any LM-family task (`data.seq_len`)."""
  ways = int(config.mesh.get('context', 1))
  if ways == -1:
    ways = dict(zip(mesh_lib.AXES, mesh_lib.mesh_shape(config.mesh, jax.device_count()),
                    strict=True))['context']
  if ways == 1:
    return
  balance = bool(config.model.get('context_load_balance', True))
  chunks = 2 * ways if balance else ways
  seq_len = config.data.seq_len
  how = ' (two per device: model.context_load_balance=True)' if balance else ''
  require(seq_len % chunks == 0, f'data.seq_len={seq_len} must be divisible by {chunks}: '
          f'mesh.context={ways} splits every row into {chunks} chunks{how}.')
  attention = config.model.attention
  require(attention in ('xla', 'auto'), f'model.attention={attention!r} does not run with '
          f'mesh.context={ways}: context-parallel attention runs the xla implementation over '
          "gathered keys and values; use model.attention='xla' (or 'auto').")


# The model keys that fix the parameters' shapes and meaning; `init_from` takes them
# from the run it starts from.
ARCHITECTURE_KEYS = (
    'vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'mlp_dim',
    'rope_theta', 'tie_embeddings', 'norm_eps', 'norm', 'mlp', 'position', 'max_positions',
    'qkv_bias', 'attn_out_bias', 'mlp_bias')
# The same for `model.moe` (capacity and loss weights are training choices, not architecture).
MOE_ARCHITECTURE_KEYS = (
    'n_experts', 'top_k', 'expert_mlp_dim', 'shared_mlp_dim', 'shared_gate', 'router')


def adopt_init_run(config: ml_collections.ConfigDict) -> None:
  """Sets `config.model`'s architecture keys and `config.data.tokenizer` to those of the
  run in `config.init_from`, so that the written config.json describes this run's model.

  Does nothing when that run's config.json is absent (checked in `setup_data`, since a
  finished run can be sampled after the run it started from is gone).
  """
  path = epath.Path(config.init_from) / 'config.json'
  if not path.exists():
    return
  other = json.loads(path.read_text())
  changed = {}
  for key in ARCHITECTURE_KEYS:
    if key in other.get('model', {}) and other['model'][key] != config.model[key]:
      changed[f'model.{key}'] = config.model[key] = type(config.model[key])(other['model'][key])
  # A run saved before model.moe existed is dense.
  other_moe = other.get('model', {}).get('moe') or {'n_experts': 0}
  for key in MOE_ARCHITECTURE_KEYS if 'moe' in config.model else ():
    if key in other_moe and other_moe[key] != config.model.moe[key]:
      value = type(config.model.moe[key])(other_moe[key])
      changed[f'model.moe.{key}'] = config.model.moe[key] = value
  meta = epath.Path(config.init_from) / 'tokenizer' / tokenizers.META_FILE
  if meta.exists():
    spec = json.loads(meta.read_text())['config']
    for key, value in spec.items():
      if config.data.tokenizer[key] != value:
        changed[f'data.tokenizer.{key}'] = config.data.tokenizer[key] = value
  # The long-context keys too, unless this config sets them: a fine-tune that extends the
  # context changes its RoPE scaling or window on purpose.
  theirs = other.get('model', {})
  scaling = config.model.get('rope_scaling')
  if theirs.get('rope_scaling') and scaling is not None and scaling.type == 'none' and (
      theirs['rope_scaling'] != scaling.to_dict()):
    scaling.update(theirs['rope_scaling'])
    changed['model.rope_scaling'] = theirs['rope_scaling']
  if theirs.get('sliding_window') and not config.model.get('sliding_window', 0):
    changed['model.sliding_window'] = config.model.sliding_window = int(theirs['sliding_window'])
  if changed:
    logging.info('init_from=%s sets %s.', config.init_from, changed)


@tasks.register('lm')
class LMTask(tasks.Task):
  items_name = 'tokens'
  logical_rules = transformer.LOGICAL_AXIS_RULES
  # Whether the run's model is a language model the engine can serve (a reward model, whose
  # trunk is one, is not).
  makes_text: ClassVar[bool] = True
  data_sources = DATA_SOURCES  # the allowed `data.source` values

  def __init__(self, config: ml_collections.ConfigDict):
    if config.get('init_from'):
      adopt_init_run(config)
    self._check_config(config)
    check_context_parallel(config)
    self._check_eval_tasks(config)
    self.config = config
    self.tokenizer = None
    self.data = None
    # The vocabulary is known once the tokenizer exists; until then a stand-in
    # of the same rounding lets every model check and sharding check run before
    # any data is read.
    self._setup_model(1)

  def _check_config(self, config: ml_collections.ConfigDict) -> None:
    """The task's config checks, after `init_from`'s model and tokenizer are adopted and
    before anything is built. Subclasses with other data or keys replace it."""
    check_config(config, self.data_sources)

  def _check_eval_tasks(self, config: ml_collections.ConfigDict) -> None:
    """`eval.tasks` names known tasks, before anything compiles, for every LM-family task."""
    names = eval_task_names(config)
    if not names:
      return
    require(self.makes_text, f'eval.tasks={config.eval.tasks!r}: a {config.task!r} run makes '
            'no text to evaluate; leave eval.tasks empty.')
    check_positive(config, 'eval.task_limit', allow_zero=True)
    from evals import training  # evals sits beside train; only runs with eval.tasks need it
    training.check_tasks(names)

  def check_mesh(self, mesh_shape):
    """A pipeline (mesh.stage > 1) must split the layers and each forward's batch evenly
    (model/pipeline.py); it runs beside data, FSDP and tensor parallelism, not yet beside the
    expert and context axes or with MoE blocks, and only for the tasks whose loss is one
    forward of the batch."""
    stages = mesh_shape.get('stage', 1)
    if stages == 1:
      return
    c, cfg = self.config, self.model_cfg
    if c.task not in PIPELINED_TASKS:
      raise ConfigError(f'mesh.stage={stages}: pipelines are supported for the '
                        f'{" and ".join(PIPELINED_TASKS)} tasks, not {c.task!r}; use '
                        'mesh.stage=1.')
    for axis in ('expert', 'context'):
      if mesh_shape.get(axis, 1) > 1:
        raise ConfigError(f'mesh.stage={stages} with mesh.{axis}={mesh_shape[axis]}: a '
                          f'pipeline does not run beside the {axis} axis yet; set one to 1.')
    if cfg.n_experts:
      raise ConfigError(f'mesh.stage={stages} with model.moe.n_experts={cfg.n_experts}: a '
                        'pipeline does not carry the MoE losses through its stages yet; use '
                        'mesh.stage=1 (with mesh.expert for expert parallelism).')
    microbatches = pipeline.resolve_microbatches(cfg.pipeline_microbatches, stages)
    problem = pipeline.check(cfg.n_layers, stages, microbatches, cfg.pipeline_schedule,
                             cfg.pipeline_repeats, c.batch_size // c.grad_accum,
                             mesh_lib.data_parallel_size(mesh_shape))
    if problem:
      raise ConfigError(problem)

  # --- setup -----------------------------------------------------------------

  def setup_data(self, workdir: str, process_index: int, process_count: int):
    c = self.config
    if c.get('init_from'):
      self._copy_init_tokenizer(workdir)
    self.data = lm_pipeline.build_lm_data(
        c.data, seed=c.seed, global_batch_size=c.batch_size, eval_steps=c.eval_steps,
        workdir=workdir, process_index=process_index, process_count=process_count)
    self._set_tokenizer(self.data.tokenizer)
    return self.data.train

  def setup_inference(self, workdir: str) -> None:
    self._set_tokenizer(tokenizers.load_tokenizer(workdir))

  def _set_tokenizer(self, tokenizer: tokenizers.Tokenizer) -> None:
    self.tokenizer = tokenizer
    self._setup_model(tokenizer.vocab_size)

  def _setup_model(self, tokenizer_vocab_size: int) -> None:
    try:
      self.model_cfg = transformer.TransformerConfig.from_config(
          self.config.model, tokenizer_vocab_size)
    except ValueError as e:  # the model names the key; the trainer reports it as a config error
      raise ConfigError(str(e)) from None
    self.graphdef, (self._param_specs,) = kit.abstract_split(
        lambda: self._new_model(jax.random.key(0)), nnx.Param, what='The transformer')
    # Tools sample, serve and export the model without adapters and with float weights:
    # `inference_params` merges them in (model/lora.py).
    self._set_inference_cfg(self.model_cfg.base())
    self.opt = optim.make_optimizer(self._optimizer_config(), self.config.steps,
                                    self.config.max_nonfinite_steps, self._param_specs)

  def _optimizer_config(self) -> ml_collections.ConfigDict:
    """`config.optimizer`, with everything but the adapters frozen when LoRA is on (and
    whatever `optimizer.freeze` names besides)."""
    opt_cfg = self.config.optimizer
    if not self.model_cfg.lora_rank:
      return opt_cfg
    opt_cfg = ml_collections.ConfigDict(opt_cfg.to_dict())
    user = opt_cfg.freeze
    opt_cfg.freeze = f'(?:{user})|{lora.FREEZE_BASE}' if user else lora.FREEZE_BASE
    return opt_cfg

  def _copy_init_tokenizer(self, workdir: str, init: str = '') -> None:
    """The tokenizer of the `init_from` run (or of the run `init`), so this run's ids mean
    what its model learnt."""
    init = init or self.config.init_from
    resuming = (epath.Path(workdir) / 'checkpoints').is_dir()
    if not (epath.Path(init) / 'config.json').exists() and not resuming:
      raise ConfigError(f'init_from={init!r} has no config.json: give the --workdir of a '
                        'training run or of `python -m train.convert import`.')
    source = epath.Path(init) / 'tokenizer'
    target = epath.Path(workdir) / 'tokenizer'
    names = (tokenizers.SPM_FILE, tokenizers.META_FILE)  # the meta file last: it marks whole
    hf = tokenizers.HF_DIR
    if (target / tokenizers.META_FILE).exists() or (target / hf / tokenizers.HF_FILE).exists():
      return
    # The HF files an import keeps with the tokenizer (train.convert), tokenizer.json last (it
    # marks an HF-only tokenizer whole), then Kiln's.
    hf_files = sorted((p.name for p in (source / hf).iterdir()),
                      key=lambda n: (n == tokenizers.HF_FILE, n)) if (source / hf).is_dir() else []
    if not (source / tokenizers.META_FILE).exists() and tokenizers.HF_FILE not in hf_files:
      logging.warning('init_from=%s has no tokenizer; this run trains its own, whose ids '
                      'need not match the model\'s.', init)
      return
    for name in [f'{hf}/{n}' for n in hf_files] + list(names):
      if (source / name).exists():
        storage.write_atomic(target / name, (source / name).read_bytes())

  def warm_start(self, state):
    """A fresh state with the parameters of `init_from`'s newest checkpoint (in the
    state's shardings) and a fresh optimizer state for them.

    With LoRA the checkpoint holds the base model: it fills the base weights (quantized to
    NF4 for QLoRA) and the adapters keep their fresh values. A checkpoint of a LoRA run is
    merged first, so a run can start from another's fine-tuned weights.
    """
    init = self.config.get('init_from')
    if not init:
      return state
    params = self._warm_params(init, state.params)
    opt_shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
    opt_state = jax.jit(self.opt.init, out_shardings=opt_shardings)(params)
    return state.replace(params=params, opt_state=opt_state)

  def _warm_params(self, init: str, current):
    """The Transformer parameters of `init`'s newest checkpoint, in the tree and shardings of
    `current` (placed; warm_start's docstring). A reward model overrides it for its trunk."""
    init_cfg = self._init_run_model_cfg(init)
    if init_cfg == self.model_cfg:
      abstract = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current)
      params, step = self._load_init_params(init, abstract)
    else:
      mesh = jax.tree.leaves(current)[0].sharding.mesh
      make = lambda: transformer.Transformer(init_cfg, rngs=nnx.Rngs(0))  # noqa: E731
      _, (specs,) = kit.abstract_split(make, nnx.Param)
      with nnx.use_eager_sharding(False):
        abstract = kit.pure_state(nnx.eval_shape(make), nnx.Param)
      shardings = mesh_lib.shardings(abstract, specs, mesh, self.logical_rules)
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              abstract, shardings)
      loaded, step = self._load_init_params(init, abstract)
      params = jax.jit(functools.partial(self._fill_base, init_cfg),
                       out_shardings=jax.tree.map(lambda x: x.sharding, current))(
                           loaded, current)
    logging.info('Parameters from step %d of %s; fresh optimizer.', step, init)
    return params

  @staticmethod
  def _load_init_params(init: str, abstract):
    try:
      return kit.load_run_params(init, abstract)
    except ConfigError as e:
      raise ConfigError(f'init_from={e}') from None

  def _init_run_model_cfg(self, init: str) -> transformer.TransformerConfig:
    """The model whose parameters `init`'s checkpoint holds: this one's architecture (set by
    adopt_init_run) with that run's adapters and storage (none for an import)."""
    path = epath.Path(init) / 'config.json'
    theirs = json.loads(path.read_text()).get('model', {}).get('lora') if path.exists() else None
    model = ml_collections.ConfigDict(self.config.model.to_dict())
    model.lora.update(theirs or {'rank': 0, 'base_quant': 'none'})
    try:
      return transformer.TransformerConfig.from_config(model, self.model_cfg.vocab_size)
    except ValueError as e:
      raise ConfigError(f'init_from={init!r}: its model.lora does not load: {e}') from None

  def _fill_base(self, init_cfg: transformer.TransformerConfig, loaded, params):
    """`params` with the base weights taken from `loaded` (parameters of `init_cfg`'s
    model): merged to float, then stored as this model stores them; adapters kept."""
    base = lora.merge_params(loaded, init_cfg.lora_scale, init_cfg.quant_scheme,
                             self.model_cfg.param_dtype)
    stored = quant.quantize_params(base, self.model_cfg.quant_scheme)

    def fill(tree, new):
      return {k: fill(v, new[k]) if isinstance(v, dict) else new.get(k, v)
              for k, v in tree.items()}
    return fill(params, stored)

  def _new_model(self, key: jax.Array) -> transformer.Transformer:
    return transformer.Transformer(self.model_cfg, rngs=nnx.Rngs(params=key))

  def abstract_batch(self):
    """The batches of data/lm_pipeline.py: int32 [batch_size, seq_len] inputs, targets,
    segment_ids and positions. A subclass with another pipeline (preference pairs, prompts)
    or with frozen inputs gets Task's refusal unless it declares its own batch."""
    if type(self).setup_data is not LMTask.setup_data or (
        type(self).load_frozen is not tasks.Task.load_frozen):
      return super().abstract_batch()
    return self._window_batch()

  def _window_batch(self, **extra_dtypes: str):
    """[batch_size, seq_len] int32 windows (inputs, targets, segment_ids, positions), and
    `extra_dtypes` fields of the same shape."""
    shape = (self.config.batch_size, self.config.data.seq_len)
    dtypes = dict.fromkeys(('inputs', 'targets', 'segment_ids', 'positions'), 'int32')
    return {k: jax.ShapeDtypeStruct(shape, jnp.dtype(d))
            for k, d in {**dtypes, **extra_dtypes}.items()}

  # --- state -----------------------------------------------------------------

  def init_state(self, rng: jax.Array):
    init_key, dropout_key = jax.random.split(rng)
    params = kit.pure_state(kit.build(lambda: self._new_model(init_key)), nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.opt.init(params), rng=jax.random.key_data(dropout_key),
                      extras={})

  def state_logical_specs(self, abstract_state):
    return TrainState(step=P(), params=self._param_specs, rng=P(), extras={},
                      opt_state=self.opt.state_specs(abstract_state.opt_state, self._param_specs))

  # --- steps -----------------------------------------------------------------

  def _logits(self, params, batch, dropout_key=None, graphdef=None, return_aux=False):
    """float32 logits of the batch; with `return_aux`, (logits, the MoE aux terms of
    Transformer.__call__)."""
    model = nnx.merge(self.graphdef if graphdef is None else graphdef, params)
    cfg = self.model_cfg
    train = dropout_key is not None and (cfg.dropout > 0 or cfg.lora_dropout > 0)
    return model(batch['inputs'], positions_BxL=batch['positions'],
                 segment_ids_BxL=batch['segment_ids'], deterministic=not train,
                 rngs=nnx.Rngs(dropout=dropout_key) if train else None, return_aux=return_aux)

  def _loss(self, params, batch, dropout_key, frozen=None):
    """(objective, metrics) of one batch; metrics['loss'] is the loss to report (the NLL,
    without z-loss). `frozen` serves subclasses whose loss reads frozen inputs (a teacher).
    An MoE model adds its load-balancing and router z-losses (model.moe.balance_weight and
    z_weight, layer means) to the objective and reports them unweighted, with the dropped
    fraction when a capacity limit is set."""
    del frozen
    logits_BxLxV, aux = self._logits(params, batch, dropout_key, return_aux=True)
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, batch['targets'][..., None], -1)[..., 0]
    nll = jnp.mean(lse_BxL - target_logit_BxL)
    z_loss = self.config.loss.z_loss * jnp.mean(jnp.square(lse_BxL))
    moe_loss, moe_metrics = self._moe_terms(aux)
    return nll + z_loss + moe_loss, {'loss': nll, 'z_loss': z_loss, **moe_metrics}

  def _moe_terms(self, aux) -> tuple[jax.Array | float, dict[str, jax.Array]]:
    """(weighted MoE losses to add to the objective, their metrics) from the model's aux
    terms: balance_weight * balance + z_weight * z, the two unweighted as metrics and the
    dropped fraction when a capacity limit is set; (0, {}) for a dense model."""
    cfg = self.model_cfg
    if not cfg.n_experts:
      return 0.0, {}
    metrics = {k: aux[k] for k in ('moe_balance_loss', 'moe_z_loss')}
    if cfg.capacity_factor > 0:
      metrics['moe_dropped_fraction'] = aux['moe_dropped_fraction']
    loss = cfg.balance_weight * aux['moe_balance_loss'] + cfg.z_weight * aux['moe_z_loss']
    return loss, metrics

  def train_step(self, state, batch, frozen):
    step = state.step
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    loss_fn = functools.partial(self._loss, dropout_key=dropout_key, frozen=frozen)
    (loss, aux), grads = self.opt.value_and_grad(loss_fn, state.params, batch,
                                                 self.config.grad_accum,
                                                 opt_state=state.opt_state)
    params, opt_state, update = self.opt.apply(state.params, state.opt_state, grads, loss)
    metrics = {**aux, 'lr': self.opt.schedule(step), **update}
    return state.replace(step=step + 1, params=params, opt_state=opt_state), metrics

  def eval_batches(self) -> Iterator[Mapping[str, np.ndarray]]:
    return self.data.eval_batches()

  def token_nll(self, params, batch):
    """Next-token negative log-likelihood at every position, float32 [B, L]."""
    return scoring.token_nll(self._logits(params, batch), batch['targets'])

  def eval_step(self, state, batch, frozen):
    del frozen
    nll_BxL = self.token_nll(state.params, batch)
    return {'nll_sum': jnp.sum(nll_BxL), 'tokens': jnp.asarray(nll_BxL.size, jnp.float32)}

  def eval_summary(self, sums: Mapping[str, float], state) -> dict[str, float]:
    out = {}
    if sums:  # else no evaluation data
      loss = sums['nll_sum'] / max(sums['tokens'], 1.0)
      out = {'eval/loss': loss, 'eval/perplexity': float(np.exp(min(loss, 80.0)))}
    return {**out, **self.task_evals(state)}

  def task_evals(self, state) -> dict[str, float]:
    """`eval/<task>/<metric>` of the evaluation tasks in `eval.tasks` (evals/), scored on
    `inference_params(state)` in memory (no checkpoint round trip); {} when there are none.
    Subclasses that replace `eval_summary` add these to theirs."""
    names = eval_task_names(self.config)
    if not names:
      return {}
    from evals import training  # evals sits beside train; only runs with eval.tasks need it
    return training.task_scalars(self, state, names, limit=self.config.eval.task_limit or None)

  # --- accounting ------------------------------------------------------------

  def items_per_step(self) -> int:
    return self.config.batch_size * self.config.data.seq_len

  def flops_per_step(self) -> float:
    per_token = transformer.train_flops_per_token(self.model_cfg, self.config.data.seq_len)
    return per_token * self.items_per_step()

  # --- what tools read -------------------------------------------------------

  def _set_inference_cfg(self, cfg: transformer.TransformerConfig) -> None:
    graphdef = self.graphdef if cfg == self.model_cfg else transformer.graphdef(cfg)
    self.inference_model_cfg, self.inference_graphdef = cfg, graphdef

  def set_inference_quant(self, mode: str, group: int = 0) -> None:
    """Tools from here on sample and serve the inference model with its projections
    quantized at load (weight-only, model/quant.py: 'int8' per channel, 'int4' or 'nf4'
    group-wise along the contraction axis, `group` 0 for the default): `inference_model_cfg`,
    `inference_graphdef` and `inference_params` change together. 'none' is the float model.
    A group that does not split a projection's contraction axis is a ConfigError. Call it
    before the first `generate`: the compiled sampler keeps the graph it was traced with."""
    cfg = dataclasses.replace(self.model_cfg.base(), quant=mode, quant_group=group)
    try:  # the graph is built from shapes alone; building it checks the mode and the group
      self._set_inference_cfg(cfg)
    except ValueError as e:
      raise ConfigError(f'Cannot quantize this model to {mode!r}: {e}') from None
    self._generate_fn.cache_clear()

  def inference_params(self, state):
    """The parameters of `inference_model_cfg` (apply with `inference_graphdef`): `params`
    itself, or with LoRA its adapters merged into float weights (a quantized base
    dequantized), in `param_dtype`; then quantized when `set_inference_quant` asked."""
    if self.inference_model_cfg == self.model_cfg:
      return state.params
    return self._inference_fn(self.inference_model_cfg)(state.params)

  @functools.cache  # noqa: B019  (one compiled conversion per task and inference model)
  def _inference_fn(self, inference_cfg: transformer.TransformerConfig):
    cfg = self.model_cfg

    def convert(params):
      if cfg != cfg.base():  # adapters or a quantized base: merged into float weights
        params = lora.merge_params(params, scale=cfg.lora_scale, scheme=cfg.quant_scheme,
                                   dtype=cfg.param_dtype)
      return quant.quantize_params(params, inference_cfg.quant_scheme)
    return jax.jit(convert)

  # --- sampling --------------------------------------------------------------

  def samples(self, state, seed: int) -> dict[str, str]:
    s = self.config.sample
    text = self.generate(self.inference_params(state), s.prompt,
                         max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                         top_k=s.top_k, top_p=s.top_p, min_p=s.get('min_p', 0.0), seed=seed)
    return {'samples/text': text}

  def generate(self, params, prompt: str, *, max_new_tokens: int, temperature: float,
               top_k: int, top_p: float, seed: int, min_p: float = 0.0) -> str:
    """Samples a continuation of `prompt` (the prompt included in the result) with the KV
    cache decoder (model/decode.py), stopping at the tokenizer's end of sequence."""
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0 or not 0.0 <= min_p < 1.0:
      raise ConfigError(f'Sampling needs temperature >= 0, top_k >= 0, 0 < top_p <= 1 and '
                        f'0 <= min_p < 1; got temperature={temperature}, top_k={top_k}, '
                        f'top_p={top_p}, min_p={min_p}.')
    unknown = unencodable(self.tokenizer, prompt)
    if unknown:
      shown = ', '.join(f'{c!r} (U+{ord(c):04X})' for c in unknown[:5])
      raise ConfigError(f'The prompt has characters this tokenizer cannot encode: {shown}. '
                        'Remove or replace them.')
    ids = list(self.tokenizer.encode(prompt))
    bos = self.tokenizer.bos_id
    if bos >= 0:
      ids = [bos] + ids
    if not ids:
      raise ConfigError('The prompt encodes to no tokens and the tokenizer has no BOS; give a '
                        'non-empty prompt.')
    limit = self.model_cfg.max_positions or None  # learned positions end somewhere
    if limit is not None and len(ids) + max_new_tokens > limit:
      raise ConfigError(f'The prompt ({len(ids)} tokens) and max_new_tokens={max_new_tokens} '
                        f'exceed the model\'s {limit} positions.')
    settings = sampling.SamplingParams.make(1, temperature=temperature, top_k=top_k,
                                            top_p=top_p, min_p=min_p)
    eos = getattr(self.tokenizer, 'eos_id', -1)
    out = self._generate_fn(max_new_tokens, (eos,) if eos >= 0 else ())(
        params, np.asarray([ids], np.int32), np.asarray([len(ids)], np.int32), settings,
        np.asarray([seed], np.int32))
    new = [int(t) for t in np.asarray(out.tokens[0, :int(out.lengths[0])])]
    if new and new[-1] == eos:
      new = new[:-1]
    return self.tokenizer.decode(ids[1 if bos >= 0 else 0:] + new)

  @functools.cache  # noqa: B019  (one compiled sampler per length and stop set)
  def _generate_fn(self, max_new_tokens: int, stop_ids: tuple[int, ...]):
    def run(params, prompt_BxL, length_B, settings, seeds_B):
      return decode.generate(self.inference_graphdef, params, prompt_BxL, length_B,
                             max_new_tokens=max_new_tokens, sampling_params=settings,
                             seeds_B=seeds_B, stop_ids=stop_ids,
                             vocab_limit=self.tokenizer.vocab_size)
    return jax.jit(run)


def eval_task_names(config: ml_collections.ConfigDict) -> list[str]:
  """The evaluation tasks `eval.tasks` names (comma-separated), [] when the key is absent."""
  spec = config.get('eval', {}).get('tasks', '')
  return [name.strip() for name in spec.split(',') if name.strip()]


def unencodable(tokenizer: tokenizers.Tokenizer, text: str) -> list[str]:
  """The characters of `text` that `tokenizer` would drop (a character vocabulary) or map
  to its unknown piece (a SentencePiece model without byte fallback)."""
  unk = (tokenizer._sp.unk_id() if isinstance(tokenizer, tokenizers.SentencePieceTokenizer)
         else None)
  return sorted(c for c in set(text)
                if not c.isspace() and (not (ids := tokenizer.encode(c)) or unk in ids))
