"""Decoder-only language modelling: next-token cross-entropy on packed windows."""

import functools
import json
from collections.abc import Iterator, Mapping

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
from model import decode, sampling, scoring, transformer
from train import optim, tasks
from train.state import TrainState
from train.tasks import kit


def check_config(config: ml_collections.ConfigDict) -> None:
  """LM-specific checks; `model.*` is checked by TransformerConfig.from_config."""
  check_choice(config, 'data.source',
               ('stdlib', 'text', 'jsonl', 'tfds', 'synthetic', 'arrayrecord'))
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


# The model keys that fix the parameters' shapes and meaning; `init_from` takes them
# from the run it starts from.
ARCHITECTURE_KEYS = (
    'vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'mlp_dim',
    'rope_theta', 'tie_embeddings', 'norm_eps', 'norm', 'mlp', 'position', 'max_positions',
    'qkv_bias', 'attn_out_bias', 'mlp_bias')


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
  meta = epath.Path(config.init_from) / 'tokenizer' / tokenizers.META_FILE
  if meta.exists():
    spec = json.loads(meta.read_text())['config']
    for key, value in spec.items():
      if config.data.tokenizer[key] != value:
        changed[f'data.tokenizer.{key}'] = config.data.tokenizer[key] = value
  if changed:
    logging.info('init_from=%s sets %s.', config.init_from, changed)


@tasks.register('lm')
class LMTask(tasks.Task):
  items_name = 'tokens'
  logical_rules = transformer.LOGICAL_AXIS_RULES

  def __init__(self, config: ml_collections.ConfigDict):
    if config.get('init_from'):
      adopt_init_run(config)
    check_config(config)
    self.config = config
    self.tokenizer = None
    self.data = None
    # The vocabulary is known once the tokenizer exists; until then a stand-in
    # of the same rounding lets every model check and sharding check run before
    # any data is read.
    self._setup_model(1)

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
    self.opt = optim.make_optimizer(self.config.optimizer, self.config.steps,
                                    self.config.max_nonfinite_steps, self._param_specs)

  def _copy_init_tokenizer(self, workdir: str) -> None:
    """The tokenizer of the `init_from` run, so this run's ids mean what its model learnt."""
    init = self.config.init_from
    resuming = (epath.Path(workdir) / 'checkpoints').is_dir()
    if not (epath.Path(init) / 'config.json').exists() and not resuming:
      raise ConfigError(f'init_from={init!r} has no config.json: give the --workdir of a '
                        'training run or of `python -m train.convert import`.')
    source = epath.Path(init) / 'tokenizer'
    target = epath.Path(workdir) / 'tokenizer'
    names = (tokenizers.SPM_FILE, tokenizers.META_FILE)  # the meta file last: it marks whole
    if (target / tokenizers.META_FILE).exists():
      return
    if not (source / tokenizers.META_FILE).exists():
      logging.warning('init_from=%s has no Kiln tokenizer; this run trains its own, whose ids '
                      'need not match the model\'s.', init)
      return
    # The HF files an import keeps with the tokenizer (train.convert), then Kiln's.
    hf_files = [f'hf/{p.name}' for p in sorted((source / 'hf').iterdir())
                ] if (source / 'hf').is_dir() else []
    for name in hf_files + list(names):
      if (source / name).exists():
        storage.write_atomic(target / name, (source / name).read_bytes())

  def warm_start(self, state):
    """A fresh state with the parameters of `init_from`'s newest checkpoint (in the
    state's shardings) and a fresh optimizer state for them."""
    init = self.config.get('init_from')
    if not init:
      return state
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params)
    try:
      params, step = kit.load_run_params(init, abstract)
    except ConfigError as e:
      raise ConfigError(f'init_from={e}') from None
    logging.info('Parameters from step %d of %s; fresh optimizer.', step, init)
    opt_shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
    opt_state = jax.jit(self.opt.init, out_shardings=opt_shardings)(params)
    return state.replace(params=params, opt_state=opt_state)

  def _new_model(self, key: jax.Array) -> transformer.Transformer:
    return transformer.Transformer(self.model_cfg, rngs=nnx.Rngs(params=key))

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

  def _logits(self, params, batch, dropout_key=None):
    model = nnx.merge(self.graphdef, params)
    train = dropout_key is not None and self.model_cfg.dropout > 0
    return model(batch['inputs'], positions_BxL=batch['positions'],
                 segment_ids_BxL=batch['segment_ids'], deterministic=not train,
                 rngs=nnx.Rngs(dropout=dropout_key) if train else None)

  def _loss(self, params, batch, dropout_key):
    logits_BxLxV = self._logits(params, batch, dropout_key).astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, batch['targets'][..., None], -1)[..., 0]
    nll = jnp.mean(lse_BxL - target_logit_BxL)
    z_loss = self.config.loss.z_loss * jnp.mean(jnp.square(lse_BxL))
    return nll + z_loss, {'nll': nll, 'z_loss': z_loss}

  def train_step(self, state, batch, frozen):
    del frozen
    step = state.step
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    loss_fn = functools.partial(self._loss, dropout_key=dropout_key)
    (loss, aux), grads = self.opt.value_and_grad(loss_fn, state.params, batch,
                                                 self.config.grad_accum)
    params, opt_state, update = self.opt.apply(state.params, state.opt_state, grads, loss)
    metrics = {'loss': aux['nll'], 'z_loss': aux['z_loss'], 'lr': self.opt.schedule(step),
               **update}
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
    del state  # perplexity needs only the sums
    if not sums:  # no evaluation data
      return {}
    loss = sums['nll_sum'] / max(sums['tokens'], 1.0)
    return {'eval/loss': loss, 'eval/perplexity': float(np.exp(min(loss, 80.0)))}

  # --- accounting ------------------------------------------------------------

  def items_per_step(self) -> int:
    return self.config.batch_size * self.config.data.seq_len

  def flops_per_step(self) -> float:
    per_token = transformer.train_flops_per_token(self.model_cfg, self.config.data.seq_len)
    return per_token * self.items_per_step()

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
      return decode.generate(self.graphdef, params, prompt_BxL, length_B,
                             max_new_tokens=max_new_tokens, sampling_params=settings,
                             seeds_B=seeds_B, stop_ids=stop_ids,
                             vocab_limit=self.tokenizer.vocab_size)
    return jax.jit(run)


def unencodable(tokenizer: tokenizers.Tokenizer, text: str) -> list[str]:
  """The characters of `text` that `tokenizer` would drop (a character vocabulary) or map
  to its unknown piece (a SentencePiece model without byte fallback)."""
  unk = (tokenizer._sp.unk_id() if isinstance(tokenizer, tokenizers.SentencePieceTokenizer)
         else None)
  return sorted(c for c in set(text)
                if not c.isspace() and (not (ids := tokenizer.encode(c)) or unk in ids))
