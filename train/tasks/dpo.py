"""Direct preference optimisation (Rafailov et al. 2023) with TRL's semantics.

For a pair (prompt x, chosen y_w, rejected y_l), with log-probs summed over completion
tokens under the policy (pi) and a frozen reference (ref):

  h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))

  sigmoid (default): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                     (eps = dpo.label_smoothing, the conservative DPO of TRL)
  hinge:             max(0, 1 - beta h)                    (SLiC)
  ipo:               (h - 1 / (2 beta))^2, with log-probs averaged over completion
                     tokens instead of summed, as TRL does for IPO (Azar et al.)

The loss is the mean over pairs. The logged metrics are TRL's: `rewards/chosen` and
`rewards/rejected` (beta times the policy-reference log-ratio), `rewards/margins` (their
difference), `rewards/accuracies` (the share of pairs whose chosen reward is the larger),
`logps/chosen` and `logps/rejected` (the policy's); the trainer prefixes them with
`train/`, and evaluation logs the same over held-out pairs as `eval/...`.

The reference (`dpo.reference`) is one of:
  model        the frozen starting model, a frozen input: the newest parameters of
               `dpo.ref_from`, else of `init_from`, else the seed's initialisation;
  lora_base    the policy itself with its LoRA adapters switched off (model.lora.rank > 0):
               no second copy of the weights;
  precomputed  the starting model's log-probs of every example, computed in one pass before
               training and cached in WORKDIR/reference_logps/, so the reference weights are
               never held during training (TRL's precompute_ref_log_probs).
"""

import hashlib
import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from data import chat, preference_data, storage
from data.errors import ConfigError, check_choice, check_positive, require
from model import lora, run_params, scoring
from train import mesh as mesh_lib
from train import tasks
from train.tasks import kit, lm

LOSS_TYPES = ('sigmoid', 'hinge', 'ipo')
REFERENCES = ('model', 'lora_base', 'precomputed')
# The per-pair metrics, summed in evaluation and averaged in training.
PAIR_METRICS = ('rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies',
                'logps/chosen', 'logps/rejected')


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float,
             loss_type: str, label_smoothing: float = 0.0):
  """(loss per pair [B], metrics per pair {name: [B]}) from log-probs [B] (module docstring)."""
  h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
  if loss_type == 'sigmoid':
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
              - label_smoothing * jax.nn.log_sigmoid(-beta * h))
  elif loss_type == 'hinge':
    losses = jax.nn.relu(1.0 - beta * h)
  elif loss_type == 'ipo':
    losses = jnp.square(h - 1.0 / (2.0 * beta))
  else:
    raise ValueError(f'Unknown loss type {loss_type!r}.')
  chosen_rewards = beta * jax.lax.stop_gradient(policy_chosen - ref_chosen)
  rejected_rewards = beta * jax.lax.stop_gradient(policy_rejected - ref_rejected)
  metrics = {
      'rewards/chosen': chosen_rewards, 'rewards/rejected': rejected_rewards,
      'rewards/margins': chosen_rewards - rejected_rewards,
      'rewards/accuracies': (chosen_rewards > rejected_rewards).astype(jnp.float32),
      'logps/chosen': jax.lax.stop_gradient(policy_chosen),
      'logps/rejected': jax.lax.stop_gradient(policy_rejected),
  }
  return losses, metrics


def check_config(config: ml_collections.ConfigDict) -> None:
  check_choice(config, 'data.source', ('stdlib', 'jsonl'))
  check_choice(config, 'data.tokenizer.kind', ('sentencepiece', 'byte', 'char'))
  check_positive(config, 'data.seq_len', 'dpo.beta')
  check_choice(config, 'dpo.loss_type', LOSS_TYPES)
  check_choice(config, 'dpo.reference', REFERENCES)
  require(0.0 < config.data.val_fraction < 1.0,
          f'data.val_fraction={config.data.val_fraction!r} must be in (0, 1).')
  require(0.0 <= config.dpo.label_smoothing < 0.5,
          f'dpo.label_smoothing={config.dpo.label_smoothing!r} must be in [0, 0.5).')
  if config.data.source == 'jsonl':
    require(bool(config.data.path), "data.source='jsonl' needs data.path: a file or glob of "
            'preference jsonl ({"prompt": ..., "chosen": ..., "rejected": ...} per line).')
  rank = config.model.get('lora', {}).get('rank', 0)
  if config.dpo.reference == 'lora_base':
    require(rank > 0, "dpo.reference='lora_base' needs LoRA adapters: set model.lora.rank > 0 "
            f'(it is {rank}).')
  else:  # a second model with the policy's adapters would read them from a run without any
    require(rank == 0, f"dpo.reference={config.dpo.reference!r} with LoRA adapters "
            f"(model.lora.rank={rank}): use dpo.reference='lora_base', the base model the "
            'adapters start from (B = 0), which needs no second copy of the weights.')
  if config.model.get('position') == 'learned' and config.data.seq_len > config.model.get(
      'max_positions', 0):
    raise ConfigError(f'data.seq_len={config.data.seq_len} exceeds model.max_positions='
                      f'{config.model.max_positions}, the size of the learned position table.')


@tasks.register('dpo')
class DPOTask(lm.LMTask):
  """DPO on preference pairs; the model, tokenizer, warm start and sampling are the LM's."""

  items_name = 'examples'  # preference pairs

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.workdir = None

  def _check_config(self, config: ml_collections.ConfigDict) -> None:
    check_config(config)

  # --- setup -----------------------------------------------------------------

  def setup_data(self, workdir: str, process_index: int, process_count: int):
    c = self.config
    self.workdir = workdir
    if c.get('init_from'):
      self._copy_init_tokenizer(workdir)
    self.data = preference_data.build_preference_data(
        c.data, seed=c.seed, global_batch_size=c.batch_size, eval_steps=c.eval_steps,
        workdir=workdir, process_index=process_index, process_count=process_count,
        chat_template=lambda tok: chat.load_chat_template(workdir, tok))
    self._set_tokenizer(self.data.tokenizer)
    return self.data.train

  def _reference_source(self) -> str:
    """The run whose parameters are the reference ('' = the seed's initialisation)."""
    return self.config.dpo.ref_from or self.config.get('init_from') or ''

  def _reference_params(self, mesh):
    """The starting model's parameters, placed as the policy's are."""
    rng = jax.random.key(self.config.seed)
    abstract = jax.eval_shape(lambda: self.init_state(rng).params)
    shardings = mesh_lib.shardings(abstract, self._param_specs, mesh, self.logical_rules)
    source = self._reference_source()
    if not source:
      return jax.jit(lambda: self.init_state(rng).params, out_shardings=shardings)()
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    try:
      params, step = kit.load_run_params(source, target)
    except ConfigError as e:
      key = 'dpo.ref_from' if self.config.dpo.ref_from else 'init_from'
      raise ConfigError(f'{key}={e}') from None
    logging.info('DPO reference: step %d of %s.', step, source)
    return params

  def load_frozen(self, mesh):
    reference = self.config.dpo.reference
    if reference == 'model':
      return {'ref': self._reference_params(mesh)}
    if reference == 'precomputed':
      table = self._reference_table(mesh)
      return {'ref_logps': jax.device_put(table, mesh_lib.replicated(mesh))}
    return {}

  def _reference_table(self, mesh) -> np.ndarray:
    """Summed reference log-probs of every example [N, 2] (chosen, rejected), from the cache
    in the workdir, or computed in one pass over train and validation and cached."""
    source = self._reference_source()
    step = run_params.latest_step(source) if source else None
    origin = (f'{storage.absolute(source)}:{step}' if source else f'seed {self.config.seed}'
              ) + self.config.model.to_json(sort_keys=True)  # what made the reference
    key = f'{self.data.digest()}-{hashlib.sha256(origin.encode()).hexdigest()[:16]}'
    path = epath.Path(self.workdir) / 'reference_logps' / f'{key}.npy'
    if path.exists():
      return np.load(path.open('rb'))
    logging.info('Computing the reference log-probs of every example into %s.', path)
    params = self._reference_params(mesh)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    rows = self.config.batch_size
    fn = jax.jit(lambda p, b: self._pair_logps(p, b)[0], out_shardings=mesh_lib.replicated(mesh))
    examples = list(self.data.all_pairs())
    out = []
    for lo in range(0, len(examples), rows):
      chunk = examples[lo:lo + rows]
      chunk += [examples[0]] * (rows - len(chunk))  # one program for every chunk
      host = {k: np.stack([e[k] for e in chunk]) for k in chunk[0]}
      batch = {k: jax.make_array_from_callback(v.shape, batch_sharding, lambda i, v=v: v[i])
               for k, v in host.items()}
      out.append(np.asarray(jax.device_get(fn(params, batch))))
    table = np.concatenate(out)[:len(examples)].astype(np.float32)
    del params
    if jax.process_index() == 0:
      storage.write_atomic(path, _npy_bytes(table))
    return table

  # --- steps -----------------------------------------------------------------

  def _pair_logps(self, params, batch, dropout_key=None):
    """(summed log-probs [B, 2], completion tokens [B, 2]) of the chosen and rejected rows."""
    B, _, L = batch['inputs'].shape
    rows = {k: batch[k].reshape(2 * B, L) for k in ('inputs', 'positions', 'segment_ids')}
    nll_RxL = scoring.token_nll(self._logits(params, rows, dropout_key),
                                batch['targets'].reshape(2 * B, L))
    mask_RxL = batch['mask'].reshape(2 * B, L)
    logps_Bx2 = -jnp.sum(nll_RxL * mask_RxL, axis=-1).reshape(B, 2)
    return logps_Bx2, jnp.sum(mask_RxL, axis=-1).reshape(B, 2)

  def _reference_logps(self, params, batch, frozen):
    reference = self.config.dpo.reference
    if reference == 'model':
      logps_Bx2, _ = self._pair_logps(frozen['ref'], batch)
    elif reference == 'precomputed':
      logps_Bx2 = frozen['ref_logps'][batch['index']]
    else:
      logps_Bx2, _ = self._pair_logps(lora.disabled(params), batch)
    return jax.lax.stop_gradient(logps_Bx2)

  def _pair_terms(self, params, batch, frozen, dropout_key=None):
    """(loss per pair [B], metrics per pair)."""
    d = self.config.dpo
    policy_Bx2, tokens_Bx2 = self._pair_logps(params, batch, dropout_key)
    ref_Bx2 = self._reference_logps(params, batch, frozen)
    if d.loss_type == 'ipo':  # TRL averages over completion tokens for IPO
      tokens_Bx2 = jnp.maximum(tokens_Bx2, 1.0)
      policy_Bx2, ref_Bx2 = policy_Bx2 / tokens_Bx2, ref_Bx2 / tokens_Bx2
    return dpo_loss(policy_Bx2[:, 0], policy_Bx2[:, 1], ref_Bx2[:, 0], ref_Bx2[:, 1],
                    beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing)

  def train_step(self, state, batch, frozen):
    step = state.step
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)

    def loss_fn(params, b):
      losses_B, metrics = self._pair_terms(params, b, frozen, dropout_key)
      return jnp.mean(losses_B), {k: jnp.mean(v) for k, v in metrics.items()}

    (loss, aux), grads = self.opt.value_and_grad(loss_fn, state.params, batch,
                                                 self.config.grad_accum,
                                                 opt_state=state.opt_state)
    params, opt_state, update = self.opt.apply(state.params, state.opt_state, grads, loss)
    metrics = {'loss': loss, 'lr': self.opt.schedule(step), **aux, **update}
    return state.replace(step=step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(self, state, batch, frozen):
    losses_B, metrics = self._pair_terms(state.params, batch, frozen)
    sums = {k: jnp.sum(v) for k, v in metrics.items()}
    return {'loss': jnp.sum(losses_B), **sums,
            'pairs': jnp.asarray(losses_B.shape[0], jnp.float32)}

  def eval_summary(self, sums, state):
    out = {}
    if sums:
      n = max(sums['pairs'], 1.0)
      out = {f'eval/{k}': sums[k] / n for k in ('loss', *PAIR_METRICS)}
    return {**out, **self.task_evals(state)}

  # --- accounting ------------------------------------------------------------

  def items_per_step(self) -> int:
    return self.config.batch_size

  def flops_per_step(self) -> float:
    tokens = 2 * self.config.batch_size * self.config.data.seq_len  # two rows per pair
    per_token = lm.transformer.train_flops_per_token(self.model_cfg, self.config.data.seq_len)
    forward_share = 1.0 / 3.0  # the reference's forward pass, without its backward
    extra = forward_share if self.config.dpo.reference != 'precomputed' else 0.0
    return per_token * tokens * (1.0 + extra)


def _npy_bytes(table: np.ndarray) -> bytes:
  """`table` as the bytes of a .npy file."""
  buffer = io.BytesIO()
  np.save(buffer, table)
  return buffer.getvalue()

