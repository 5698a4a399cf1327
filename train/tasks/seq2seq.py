"""Encoder-decoder (T5) training: span corruption pre-training, or supervised pairs.

The model is model/seq2seq.py's; the batches are data/seq2seq_data.py's fixed-length
(inputs, input_mask, targets, target_mask). The decoder reads the targets shifted right
behind `model.decoder_start_id` (teacher forcing) and the loss is the token cross-entropy
averaged over `target_mask` (plus `loss.z_loss` * logsumexp², T5X's z-loss).

Evaluation: `eval/loss`, `eval/perplexity` and `eval/token_accuracy` over the held-out
targets; for `objective='pairs'` also the model's greedy generations (its cached
`generate`) from the first `eval.num_generate` held-out inputs, scored against their
targets with evals/metrics.py: `eval/bleu` (sacrebleu's corpus BLEU) and `eval/rouge1`,
`eval/rouge2`, `eval/rougeL` (rouge-score's F-measures, averaged over the examples).
`samples` is one held-out (or `sample.prompt`) input and its generated target.

`init_from` starts from another seq2seq run's newest parameters (a span-corruption run, or
an HF T5 import by `python -m train.convert import`) with its architecture and tokenizer.
"""

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

from data import seq2seq_data, span_corruption, storage, tokenizers
from data.errors import ConfigError, check_choice, check_positive, require
from model import seq2seq
from train import optim, tasks
from train.state import TrainState
from train.tasks import kit

# The model keys that fix the parameters' shapes and meaning; `init_from` takes them from
# the run it starts from.
ARCHITECTURE_KEYS = (
    'd_model', 'num_heads', 'head_dim', 'mlp_dim', 'encoder_layers', 'decoder_layers', 'mlp',
    'position', 'relative_buckets', 'relative_max_distance', 'rope_theta', 'tie_embeddings',
    'norm_eps', 'decoder_start_id')
ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL')
_SAMPLE_SALT = 3  # the sampling key of `samples`, apart from the seed's other uses


def check_config(config: ml_collections.ConfigDict) -> None:
  """Every seq2seq check on `objective`, `data`, `eval`, `loss` and `sample`, before
  anything is read or compiled; `model.*` is checked by Seq2SeqConfig.from_config."""
  check_choice(config, 'objective', seq2seq_data.OBJECTIVES)
  d = config.data
  sources = (seq2seq_data.SPAN_SOURCES if config.objective == 'span_corruption'
             else seq2seq_data.PAIR_SOURCES)
  require(d.source in sources, f'data.source={d.source!r} is not allowed with '
          f'objective={config.objective!r}; choose one of {", ".join(sources)}.')
  if d.source in ('text', 'jsonl'):
    require(bool(d.path), f'data.source={d.source!r} needs data.path: a file or glob, e.g. '
            f'--config.data.path=/path/to/data.{d.source}.')
  check_choice(config, 'data.tokenizer.kind', ('sentencepiece', 'byte'))
  check_choice(config, 'data.tokenizer.model_type', ('bpe', 'unigram'))
  check_positive(config, 'data.input_len', 'data.target_len', 'eval.generate_batch',
                 'data.mean_noise_span_length')
  check_positive(config, 'data.tokenizer.extra_ids', 'data.max_examples', 'eval.num_generate',
                 'loss.z_loss', 'sample.temperature', 'sample.top_k', allow_zero=True)
  require(0.0 < d.val_fraction < 1.0, f'data.val_fraction={d.val_fraction!r} must be in (0, 1).')
  require(0.0 < config.sample.top_p <= 1.0,
          f'sample.top_p={config.sample.top_p!r} must be in (0, 1].')
  require(config.sample.max_new_tokens == -1 or config.sample.max_new_tokens > 0,
          f'sample.max_new_tokens={config.sample.max_new_tokens!r} must be > 0 (or -1: '
          'data.target_len).')
  if config.objective == 'span_corruption':
    require(0.0 < d.noise_density <= 0.5,
            f'data.noise_density={d.noise_density!r} must be in (0, 0.5].')
    raw, target_len = span_corruption.chunk_length(d.input_len, d.noise_density,
                                                   d.mean_noise_span_length)
    require(target_len <= d.target_len, f'data.target_len={d.target_len} is shorter than the '
            f'{target_len} targets span corruption makes from data.input_len={d.input_len} '
            f'({raw} raw tokens); set data.target_len={target_len}.')
    _, spans = span_corruption.noise_counts(raw, d.noise_density, d.mean_noise_span_length)
    require(spans <= d.tokenizer.extra_ids, f'data.tokenizer.extra_ids='
            f'{d.tokenizer.extra_ids} is fewer than the {spans} sentinels a chunk of {raw} '
            f'tokens needs (data.input_len={d.input_len}); raise it to {spans} or more.')


def tokenizer_vocab_size(tok_cfg: ml_collections.ConfigDict) -> int:
  """The size of the T5-layout tokenizer `tok_cfg` makes (data/tokenizers.py), known before
  it is trained: its pieces (or ByT5's 259 ids) and the sentinels on top."""
  base = tok_cfg.vocab_size if tok_cfg.kind == 'sentencepiece' else 3 + 256
  return int(base) + int(tok_cfg.extra_ids)


def adopt_init_run(config: ml_collections.ConfigDict) -> None:
  """`config.model`'s architecture keys and `config.data.tokenizer` set to those of the run
  in `config.init_from`, so that config.json describes this run's model.

  Does nothing when that run's config.json is absent (checked in `setup_data`, since a
  finished run can be sampled after the run it started from is gone).

  Raises:
    ConfigError: init_from is not a seq2seq run.
  """
  path = epath.Path(config.init_from) / 'config.json'
  if not path.exists():
    return
  other = json.loads(path.read_text())
  if other.get('task') != 'seq2seq':
    raise ConfigError(f'init_from={config.init_from!r} is a {other.get("task")!r} run, not a '
                      'seq2seq one.')
  changed = {}
  for key in ARCHITECTURE_KEYS:
    theirs = other.get('model', {}).get(key)
    if theirs is not None and theirs != config.model[key]:
      changed[f'model.{key}'] = config.model[key] = type(config.model[key])(theirs)
  meta = epath.Path(config.init_from) / 'tokenizer' / tokenizers.META_FILE
  if meta.exists():
    for key, value in json.loads(meta.read_text())['config'].items():
      if key in config.data.tokenizer and config.data.tokenizer[key] != value:
        changed[f'data.tokenizer.{key}'] = config.data.tokenizer[key] = value
  if changed:
    logging.info('init_from=%s sets %s.', config.init_from, changed)


@tasks.register('seq2seq')
class Seq2SeqTask(tasks.Task):
  items_name = 'tokens'
  logical_rules = seq2seq.LOGICAL_AXIS_RULES

  def __init__(self, config: ml_collections.ConfigDict):
    if config.get('init_from'):
      adopt_init_run(config)
    check_config(config)
    self.config = config
    self.data = None
    self.tokenizer = None
    # The vocabulary is known before the tokenizer exists (its size follows from its config,
    # or an import's is on disk), so every check runs before any data is read.
    hf_only = epath.Path(config.get('init_from') or '.') / 'tokenizer'
    if config.get('init_from') and not (hf_only / tokenizers.META_FILE).exists() and (
        hf_only / tokenizers.HF_DIR / tokenizers.HF_FILE).exists():
      self._set_tokenizer(tokenizers.load_tokenizer(config.init_from))
    else:
      self._setup_model(tokenizer_vocab_size(config.data.tokenizer))

  # --- setup -----------------------------------------------------------------

  def _setup_model(self, vocab_size: int) -> None:
    try:
      self.model_cfg = seq2seq.Seq2SeqConfig.from_config(self.config.model,
                                                         vocab_size=vocab_size)
    except ValueError as e:  # the model names the key; the trainer reports it as a config error
      raise ConfigError(str(e)) from None
    self.graphdef, (self._param_specs,) = kit.abstract_split(
        lambda: self._new_model(jax.random.key(0)), nnx.Param, what='The seq2seq model')
    self.opt = optim.make_optimizer(self.config.optimizer, self.config.steps,
                                    self.config.max_nonfinite_steps, self._param_specs)

  def _set_tokenizer(self, tokenizer: tokenizers.Tokenizer) -> None:
    if tokenizer.eos_id < 0:
      raise ConfigError('This tokenizer has no EOS, which seq2seq inputs and targets end with; '
                        'use data.tokenizer.kind=sentencepiece or byte (T5 ids).')
    self.tokenizer = tokenizer
    if self.config.objective == 'span_corruption':
      self._check_sentinels(tokenizer)
    self._setup_model(tokenizer.vocab_size)

  def _check_sentinels(self, tokenizer: tokenizers.Tokenizer) -> None:
    """Span corruption writes `<extra_id_i>` as vocab_size - 1 - i (T5's convention)."""
    d = self.config.data
    raw, _ = span_corruption.chunk_length(d.input_len, d.noise_density,
                                          d.mean_noise_span_length)
    _, spans = span_corruption.noise_counts(raw, d.noise_density, d.mean_noise_span_length)
    for i in range(spans):
      got = tokenizer.special_tokens.get(f'<extra_id_{i}>')
      require(got == span_corruption.sentinel_id(tokenizer.vocab_size, i),
              f'The tokenizer has no sentinel <extra_id_{i}> at id vocab_size - 1 - {i} '
              f'(T5\'s convention), which span corruption needs; got {got}.')

  def _new_model(self, key: jax.Array) -> seq2seq.Seq2Seq:
    return seq2seq.Seq2Seq(self.model_cfg, rngs=nnx.Rngs(params=key))

  def setup_data(self, workdir: str, process_index: int, process_count: int):
    c = self.config
    if c.get('init_from'):
      self._copy_init_tokenizer(workdir)
      tokenizer = tokenizers.load_tokenizer(workdir)
    else:
      tokenizer = tokenizers.load_or_train_tokenizer(
          c.data.tokenizer, seq2seq_data.tokenizer_texts(c.data, c.objective), workdir)
    self._set_tokenizer(tokenizer)
    num_generate = c.eval.num_generate if c.eval_every else 0
    self.data = seq2seq_data.build_seq2seq_data(
        c.data, objective=c.objective, tokenizer=tokenizer, seed=c.seed,
        global_batch_size=c.batch_size, eval_steps=c.eval_steps,
        num_generate=num_generate if c.objective == 'pairs' else 1, workdir=workdir,
        process_index=process_index, process_count=process_count)
    return self.data.train

  def setup_inference(self, workdir: str) -> None:
    self._set_tokenizer(tokenizers.load_tokenizer(workdir))

  def _copy_init_tokenizer(self, workdir: str) -> None:
    """The tokenizer of the `init_from` run (Kiln's files, or an import's HF files), so this
    run's ids mean what its model learnt; kept when the run has one already (resume)."""
    source = epath.Path(self.config.init_from) / 'tokenizer'
    target = epath.Path(workdir) / 'tokenizer'
    if (target / tokenizers.META_FILE).exists() or (
        target / tokenizers.HF_DIR / tokenizers.HF_FILE).exists():
      return
    if not (epath.Path(self.config.init_from) / 'config.json').exists():
      raise ConfigError(f'init_from={self.config.init_from!r} has no config.json: give the '
                        '--workdir of a seq2seq training run or of `python -m train.convert '
                        'import`.')
    hf = source / tokenizers.HF_DIR
    # The marker files last: tokenizer.json (Kiln's, or HF's when it is the only one) says
    # the copy is whole.
    names = sorted((f'{tokenizers.HF_DIR}/{p.name}' for p in hf.iterdir()),
                   key=lambda n: n.endswith(tokenizers.HF_FILE)) if hf.is_dir() else []
    names += [tokenizers.SPM_FILE, tokenizers.META_FILE]
    for name in names:
      if (source / name).exists():
        storage.write_atomic(target / name, (source / name).read_bytes())

  def warm_start(self, state):
    """A fresh state with the parameters of `init_from`'s newest checkpoint (in the state's
    shardings) and a fresh optimizer state for them."""
    init = self.config.get('init_from')
    if not init:
      return state
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state.params)
    try:
      params, step = kit.load_run_params(init, abstract)
    except ConfigError as e:
      raise ConfigError(f'init_from={e}') from None
    opt_shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
    opt_state = jax.jit(self.opt.init, out_shardings=opt_shardings)(params)
    logging.info('Parameters from step %d of %s; fresh optimizer.', step, init)
    return state.replace(params=params, opt_state=opt_state)

  def abstract_batch(self):
    """The global batch: [batch_size, input_len] and [batch_size, target_len] ids and masks."""
    b, d = self.config.batch_size, self.config.data
    return {'inputs': jax.ShapeDtypeStruct((b, d.input_len), jnp.int32),
            'input_mask': jax.ShapeDtypeStruct((b, d.input_len), jnp.bool_),
            'targets': jax.ShapeDtypeStruct((b, d.target_len), jnp.int32),
            'target_mask': jax.ShapeDtypeStruct((b, d.target_len), jnp.bool_)}

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
    """float32 logits [B, T, V] of every target position."""
    model = nnx.merge(self.graphdef, params)
    key = dropout_key if self.model_cfg.dropout > 0 else None
    decoder_inputs_BxT = seq2seq.shift_right(batch['targets'], self.model_cfg.decoder_start_id)
    logits_BxTxV = model(batch['inputs'], batch['input_mask'], decoder_inputs_BxT,
                         dropout_key=key)
    return logits_BxTxV.astype(jnp.float32)

  def _loss(self, params, batch, dropout_key):
    """The mean NLL over the target tokens (target_mask), plus the z-loss."""
    logits_BxTxV = self._logits(params, batch, dropout_key)
    lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, batch['targets'][..., None], -1)[..., 0]
    weights_BxT = batch['target_mask'].astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weights_BxT), 1.0)
    nll = jnp.sum((lse_BxT - target_logit_BxT) * weights_BxT) / count
    z_loss = self.config.loss.z_loss * jnp.sum(jnp.square(lse_BxT) * weights_BxT) / count
    return nll + z_loss, {'loss': nll, 'z_loss': z_loss}

  def train_step(self, state, batch, frozen):
    del frozen
    step = state.step
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    loss_fn = functools.partial(self._loss, dropout_key=dropout_key)
    (loss, aux), grads = self.opt.value_and_grad(loss_fn, state.params, batch,
                                                 self.config.grad_accum,
                                                 opt_state=state.opt_state)
    params, opt_state, update = self.opt.apply(state.params, state.opt_state, grads, loss)
    metrics = {**aux, 'lr': self.opt.schedule(step), **update}
    return state.replace(step=step + 1, params=params, opt_state=opt_state), metrics

  def eval_batches(self) -> Iterator[Mapping[str, np.ndarray]]:
    return self.data.eval_batches()

  def eval_step(self, state, batch, frozen):
    del frozen
    logits_BxTxV = self._logits(state.params, batch)
    targets_BxT = batch['targets']
    nll_BxT = jax.nn.logsumexp(logits_BxTxV, -1) - jnp.take_along_axis(
        logits_BxTxV, targets_BxT[..., None], -1)[..., 0]
    weights_BxT = batch['target_mask'].astype(jnp.float32)
    correct_BxT = (jnp.argmax(logits_BxTxV, -1) == targets_BxT).astype(jnp.float32)
    return {'nll_sum': jnp.sum(nll_BxT * weights_BxT), 'tokens': jnp.sum(weights_BxT),
            'correct': jnp.sum(correct_BxT * weights_BxT)}

  def eval_summary(self, sums: Mapping[str, float], state) -> dict[str, float]:
    out = {}
    if sums:
      tokens = max(sums['tokens'], 1.0)
      loss = sums['nll_sum'] / tokens
      out = {'eval/loss': loss, 'eval/perplexity': float(np.exp(min(loss, 80.0))),
             'eval/token_accuracy': sums['correct'] / tokens}
    if self.config.objective == 'pairs' and self.data is not None and self.data.references:
      n = len(self.data.references)
      val = self.data.validation
      predictions = self.generate_texts(self.inference_params(state),
                                        val.arrays['inputs'][:n], val.arrays['input_mask'][:n])
      out.update({f'eval/{k}': v for k, v in text_scores(self.data.references,
                                                         predictions).items()})
    return out

  # --- accounting ------------------------------------------------------------

  def items_per_step(self) -> int:
    """Encoder and decoder positions of one global batch (padding included)."""
    d = self.config.data
    return self.config.batch_size * (d.input_len + d.target_len)

  def flops_per_step(self) -> float:
    d = self.config.data
    per_token = seq2seq.train_flops_per_token(self.model_cfg, d.input_len, d.target_len)
    return per_token * self.items_per_step()

  # --- generation and samples ----------------------------------------------------

  def generate_texts(self, params, inputs_NxS: np.ndarray, mask_NxS: np.ndarray, *,
                     max_new_tokens: int = -1, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int = 0) -> list[str]:
    """The decoded generations (up to EOS) from encoder inputs [N, S], greedy by default, in
    chunks of `eval.generate_batch` rows (the last one padded): one compiled program for the
    evaluation and the samples alike."""
    n = len(inputs_NxS)
    bs = self.config.eval.generate_batch
    max_new = self.config.data.target_len if max_new_tokens == -1 else max_new_tokens
    key = jax.random.key(seed)

    def run(i, lo):
      chunk_BxS = np.zeros((bs, inputs_NxS.shape[1]), np.int32)
      mask_BxS = np.zeros((bs, inputs_NxS.shape[1]), bool)
      rows = slice(lo, min(lo + bs, n))
      chunk_BxS[:rows.stop - lo], mask_BxS[:rows.stop - lo] = inputs_NxS[rows], mask_NxS[rows]
      mask_BxS[rows.stop - lo:, 0] = True  # padding rows: one visible pad token
      return seq2seq.generate(
          (self.graphdef, params), chunk_BxS, mask_BxS, max_new_tokens=max_new,
          eos_id=self.tokenizer.eos_id, key=jax.random.fold_in(key, i),
          temperature=temperature, top_k=top_k, top_p=top_p,
          vocab_limit=self.tokenizer.vocab_size)
    tokens_NxT = kit.in_chunks(n, bs, run)
    return [self.decode(row) for row in tokens_NxT]

  def decode(self, ids) -> str:
    """Text of generated ids, up to the first EOS, without padding."""
    ids = [int(i) for i in ids]
    if self.tokenizer.eos_id in ids:
      ids = ids[:ids.index(self.tokenizer.eos_id)]
    return self.tokenizer.decode([i for i in ids if i != 0])

  def encode_input(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """[1, input_len] encoder ids (the text, EOS, padding) and mask of one input text."""
    ids = list(self.tokenizer.encode(text)) + [self.tokenizer.eos_id]
    s = self.config.data.input_len
    if len(ids) > s:
      raise ConfigError(f'The input is {len(ids)} tokens with EOS; the model reads at most '
                        f'data.input_len={s}. Shorten it.')
    row = seq2seq_data.pad_example(ids, [], s, 1)
    return row['inputs'][None], row['input_mask'][None]

  def samples(self, state, seed: int) -> dict[str, str]:
    """One input (`sample.prompt`, else the first held-out one) and the model's output."""
    s = self.config.sample
    if s.prompt:
      text, (inputs, mask) = s.prompt, self.encode_input(s.prompt)
    else:
      row = (self.data.validation[0] if self.data is not None and self.data.validation is not None
             else seq2seq_data.first_example(self.config.data, self.config.objective,
                                             self.tokenizer, self.config.seed))
      text, inputs, mask = self.decode(row['inputs']), row['inputs'][None], row['input_mask'][None]
    (output,) = self.generate_texts(self.inference_params(state), inputs, mask,
                                    max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                    top_k=s.top_k, top_p=s.top_p, seed=seed + _SAMPLE_SALT)
    return {'samples/text': f'{text}\n--> {output}'}


def text_scores(references: list[str], predictions: list[str]) -> dict[str, float]:
  """sacrebleu's corpus BLEU (0-100) and rouge-score's ROUGE-1, -2 and -L F-measures (0-1),
  averaged over the examples (evals/metrics.py, as the evaluation harness scores them)."""
  from evals import metrics  # evals sits beside train; only generation scores need it
  items = list(zip(references, predictions, strict=True))
  out = {'bleu': metrics.bleu(items)}
  per_doc = [metrics.rouge(p, r, ROUGE_TYPES) for r, p in items]
  out.update({t: float(np.mean([d[t] for d in per_doc])) for t in ROUGE_TYPES})
  return out
