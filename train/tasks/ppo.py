"""PPO for language models (RLHF; Ziegler et al. 2019, Ouyang et al. 2022) with TRL's
PPOTrainer semantics and metric names, on the shared trainer.

Each trainer step is one jitted program:

1. `collect`: the policy (`state.params`, the LM; `init_from` an LM/SFT/DPO run) samples a
   completion of `ppo.response_length` tokens at most for every prompt of the batch, with
   the jittable KV-cache `generate` (model/decode.py) on the training mesh, from the current
   weights; a completion ends at `ppo.stop_token_id` (-1: the tokenizer's EOS), kept as its
   last token. Then, without gradients: the policy's log-probs of its tokens (of the logits
   divided by `ppo.temperature`, as TRL), the reference's, the values, and the score of each
   sequence: the frozen reward model's (`ppo.reward_model`, a `task='reward'` run) at its
   last token, or a Python reward function's (`ppo.reward_fn`, train/rewards.py). A
   completion without a stop token loses `ppo.missing_eos_penalty` (TRL's).
   The per-token reward is -kl_coef * KL_t (`ppo.kl_estimator` k1 or k3 against the
   reference), plus the score at the last token; GAE with `ppo.gamma` and `ppo.lam` gives
   advantages (whitened over the batch) and returns (train/ppo_losses.py).
2. `train_step`: `ppo.num_ppo_epochs` passes over the rollout batch, each in a fresh random
   order cut into `ppo.num_mini_batches` minibatches: a `lax.scan` with one finite-guarded
   optax update per minibatch of clipped policy loss + vf_coef * clipped value loss
   - entropy_coef * entropy.

The value head (`ppo.critic`):
  shared    a scalar head on the policy's final hidden states (`features=True`): the value
            loss also trains the trunk;
  separate  a critic of its own, a `RewardModel` (model/reward_model.py: a transformer
            trunk with a scalar head), started from `ppo.critic_from` ('' =
            `ppo.reward_model` when set, TRL's choice, else `init_from`): a reward run
            whole, an LM run as the trunk with a zero head.
The value parameters and their optimizer state live in `state.extras`, so `state.params`
stays the LM: sampling, serving, export and a later `init_from` read a PPO run as any LM run.

The reference is the starting policy, a frozen input reloaded from `init_from` (the seed's
initialisation without one); with LoRA (`model.lora.rank > 0`) it is the policy with its
adapters off, so policy and reference share one frozen base and nothing is copied.

The learning-rate schedule is in trainer steps: each step makes
num_ppo_epochs * num_mini_batches optimizer updates, and `optimizer.warmup_steps` and
`decay_steps` are scaled by that count. Dropout is off in every forward pass (TRL turns it
off too): the rollout's log-probs are then those the first update recomputes.

Metrics (TRL's names, the trainer prefixes `train/`): objective/kl (mean summed KL per
completion), objective/entropy (mean summed -log p of the sampled tokens),
objective/non_score_reward, objective/rlhf_reward (scores + non-score reward),
objective/scores, policy/approxkl_avg, policy/clipfrac_avg, loss/policy_avg, loss/value_avg,
val/clipfrac_avg, policy/entropy_avg, val/ratio, val/ratio_var (across updates),
val/num_eos_tokens; objective/kl_coef; evaluation logs eval/scores and eval/kl over held-out
prompts. Where this differs from TRL: the score goes on the completion's last token (TRL puts
it one past it when there is room) and values and entropies are averaged over completion
tokens only.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import PartitionSpec as P

from data import chat, prompt_data
from data.errors import ConfigError, check_choice, check_positive, require
from model import lora, reward_model, sampling, transformer
from train import mesh as mesh_lib
from train import optim, ppo_losses, rl, tasks
from train.tasks import kit, lm, reward

CRITICS = ('shared', 'separate')
# The shared critic's head on the policy's hidden states, named as RewardModel's.
HEAD_SPECS = {'head': P('embed'), 'head_bias': P()}
# What `collect` hands `train_step` per row, for the updates.
ROLLOUT_KEYS = ('sequences', 'prompt_len', 'responses', 'mask', 'logprobs', 'values',
                'advantages', 'returns')


def check_config(config: ml_collections.ConfigDict) -> None:
  p = config.ppo
  check_choice(config, 'data.source', ('stdlib', 'jsonl'))
  check_choice(config, 'data.tokenizer.kind', ('sentencepiece', 'byte', 'char'))
  check_choice(config, 'ppo.critic', CRITICS)
  check_choice(config, 'ppo.kl_estimator', ppo_losses.KL_ESTIMATORS)
  check_positive(config, 'data.max_prompt_len', 'ppo.response_length', 'ppo.temperature',
                 'ppo.num_ppo_epochs', 'ppo.num_mini_batches', 'ppo.cliprange',
                 'ppo.cliprange_value')
  check_positive(config, 'ppo.kl_coef', 'ppo.vf_coef', 'ppo.entropy_coef',
                 'ppo.missing_eos_penalty', 'ppo.kl_target', allow_zero=True)
  require(0.0 <= p.gamma <= 1.0 and 0.0 <= p.lam <= 1.0,
          f'ppo.gamma={p.gamma!r} and ppo.lam={p.lam!r} must be in [0, 1].')
  require(0.0 < config.data.val_fraction < 1.0,
          f'data.val_fraction={config.data.val_fraction!r} must be in (0, 1).')
  require(bool(p.reward_model) != bool(p.reward_fn),
          'PPO needs exactly one source of rewards: ppo.reward_model (the --workdir of a '
          "task='reward' run) or ppo.reward_fn (a name in train/rewards.py); got "
          f'reward_model={p.reward_model!r}, reward_fn={p.reward_fn!r}.')
  require(config.grad_accum == 1,
          f'grad_accum={config.grad_accum}: PPO cuts its rollout batch into updates with '
          'ppo.num_mini_batches instead; set grad_accum=1.')
  require(config.batch_size % p.num_mini_batches == 0,
          f'batch_size={config.batch_size} must divide into ppo.num_mini_batches='
          f'{p.num_mini_batches} minibatches.')
  if p.kl_target > 0:
    check_positive(config, 'ppo.kl_horizon')
  need = config.data.max_prompt_len + p.response_length
  require(config.data.seq_len >= need,
          f'data.seq_len={config.data.seq_len} must hold a prompt and its completion: '
          f'data.max_prompt_len + ppo.response_length = {need}.')
  if config.data.source == 'jsonl':
    require(bool(config.data.path), "data.source='jsonl' needs data.path: a file or glob of "
            'jsonl rows with a "prompt" (a string or a list of messages).')
  if config.model.get('position') == 'learned' and need > config.model.get('max_positions', 0):
    raise ConfigError(f'data.max_prompt_len + ppo.response_length = {need} exceeds '
                      f'model.max_positions={config.model.max_positions}.')


def _per_update(opt_cfg: ml_collections.ConfigDict, updates: int) -> ml_collections.ConfigDict:
  """`opt_cfg` with its schedule lengths counted in optimizer updates instead of steps."""
  out = ml_collections.ConfigDict(opt_cfg.to_dict())
  out.warmup_steps = opt_cfg.warmup_steps * updates
  if opt_cfg.decay_steps != -1:
    out.decay_steps = opt_cfg.decay_steps * updates
  return out


def value_head(head, x_BxMxD: jax.Array) -> jax.Array:
  """A scalar per position: x . head + head_bias in float32 [B, M] (as RewardModel's)."""
  return (jnp.einsum('bmd,d->bm', x_BxMxD.astype(jnp.float32), head['head'].astype(jnp.float32))
          + head['head_bias'].astype(jnp.float32))


def is_reward_run(run_dir: str) -> bool:
  path = epath.Path(run_dir) / 'config.json'
  return path.exists() and json.loads(path.read_text()).get('task') == 'reward'


def _reward_function(name: str):
  """The Python reward `name` of train/rewards.py (GRPO's registry)."""
  try:
    from train import rewards
  except ImportError:
    raise ConfigError(f'ppo.reward_fn={name!r} needs train/rewards.py, the reward registry, '
                      'which this checkout lacks; use ppo.reward_model.') from None
  return rewards.get(name, 'ppo.reward_fn')


@tasks.register('ppo')
class PPOTask(lm.LMTask):
  """PPO of an LM against a frozen reward model or a reward function (module docstring)."""

  items_name = 'examples'  # completions

  def _check_config(self, config: ml_collections.ConfigDict) -> None:
    check_config(config)
    self.reward_fn = _reward_function(config.ppo.reward_fn) if config.ppo.reward_fn else None

  @property
  def updates_per_step(self) -> int:
    return self.config.ppo.num_ppo_epochs * self.config.ppo.num_mini_batches

  # --- setup -----------------------------------------------------------------

  def _setup_model(self, tokenizer_vocab_size: int) -> None:
    super()._setup_model(tokenizer_vocab_size)
    c, k = self.config, self.updates_per_step
    if c.optimizer.get('loss_scale', 'none') != 'none':  # one gradient for policy and value
      raise ConfigError(f'optimizer.loss_scale={c.optimizer.loss_scale!r}: PPO does not scale '
                        "its loss; use optimizer.loss_scale='none'.")
    self.opt = optim.make_optimizer(_per_update(self._optimizer_config(), k), c.steps * k,
                                    c.max_nonfinite_steps * k, self._param_specs)
    if c.ppo.critic == 'separate':
      self.critic_cfg = self._critic_cfg(tokenizer_vocab_size)
      self.critic_graphdef, (self._value_specs,) = kit.abstract_split(
          lambda: reward_model.RewardModel(self.critic_cfg, rngs=nnx.Rngs(0)), nnx.Param,
          what='The critic')
    else:
      self._value_specs = HEAD_SPECS
    value_cfg = _per_update(c.optimizer, k)
    value_cfg.freeze = ''  # optimizer.freeze names policy paths
    self.value_opt = optim.make_optimizer(value_cfg, c.steps * k, c.max_nonfinite_steps * k,
                                          self._value_specs)

  def _critic_source(self) -> str:
    p = self.config.ppo
    return p.critic_from or p.reward_model or self.config.get('init_from') or ''

  def _critic_cfg(self, tokenizer_vocab_size: int) -> transformer.TransformerConfig:
    """A separate critic's model: a reward run's architecture when it starts from one, else
    the policy's; without adapters and in float either way (the critic trains whole)."""
    source = self._critic_source()
    if not (source and is_reward_run(source)):
      return self.model_cfg.base()
    model = ml_collections.ConfigDict(
        json.loads((epath.Path(source) / 'config.json').read_text())['model'])
    try:
      return transformer.TransformerConfig.from_config(model, tokenizer_vocab_size).base()
    except ValueError as e:
      raise ConfigError(f'The critic from {source!r}: {e}') from None

  def setup_data(self, workdir: str, process_index: int, process_count: int):
    c = self.config
    if c.get('init_from'):
      self._copy_init_tokenizer(workdir)
    self.data = prompt_data.build_prompt_data(
        c.data, seed=c.seed, global_batch_size=c.batch_size, eval_steps=c.eval_steps,
        workdir=workdir, process_index=process_index, process_count=process_count,
        chat_template=lambda tok: chat.load_chat_template(workdir, tok))
    self._set_tokenizer(self.data.tokenizer)
    return self.data.train

  def _stop_ids(self) -> tuple[int, ...]:
    stop = self.config.ppo.stop_token_id
    if stop < 0:
      stop = getattr(self.tokenizer, 'eos_id', -1)
    return (stop,) if stop >= 0 else ()

  # --- state -----------------------------------------------------------------

  def _init_value(self, key: jax.Array):
    if self.config.ppo.critic == 'separate':
      return kit.pure_state(kit.build(lambda: reward_model.RewardModel(
          self.critic_cfg, rngs=nnx.Rngs(params=key))), nnx.Param)
    d = self.model_cfg.d_model
    return {'head': jnp.zeros((d,), jnp.float32), 'head_bias': jnp.zeros((), jnp.float32)}

  def init_state(self, rng: jax.Array):
    state = super().init_state(rng)
    value = self._init_value(jax.random.fold_in(rng, 1))
    extras = {'value': value, 'value_opt': self.value_opt.init(value)}
    if self.config.ppo.kl_target > 0:  # the adaptive controller's coefficient
      extras['kl_coef'] = jnp.asarray(self.config.ppo.kl_coef, jnp.float32)
    return state.replace(extras=extras)

  def state_logical_specs(self, abstract_state):
    specs = super().state_logical_specs(abstract_state)
    extras = {'value': self._value_specs,
              'value_opt': self.value_opt.state_specs(abstract_state.extras['value_opt'],
                                                      self._value_specs)}
    if 'kl_coef' in abstract_state.extras:
      extras['kl_coef'] = P()
    return specs.replace(extras=extras)

  def warm_start(self, state):
    """The policy from `init_from` (LMTask's), and a separate critic from its source
    (`_critic_source`): a reward run whole, or an LM run's parameters as its trunk (head 0)."""
    state = super().warm_start(state)
    source = self._critic_source()
    if self.config.ppo.critic != 'separate' or not source:
      return state
    value = state.extras['value']
    shardings = jax.tree.map(lambda x: x.sharding, value)
    if is_reward_run(source):
      mesh = jax.tree.leaves(value)[0].sharding.mesh
      _, loaded, tokenizer = reward.load_reward_model(source, mesh=mesh,
                                                      rules=self.logical_rules)
      self._check_tokenizer(tokenizer, source)
      loaded = jax.jit(lambda x: x, out_shardings=shardings)(loaded)
    else:
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              value['trunk'], shardings['trunk'])
      try:
        trunk, _ = kit.load_run_params(source, abstract)
      except ConfigError as e:
        raise ConfigError(f'The critic from {e}') from None
      loaded = {**value, 'trunk': trunk}
    logging.info('Critic from %s.', source)
    opt_shardings = jax.tree.map(lambda x: x.sharding, state.extras['value_opt'])
    value_opt = jax.jit(self.value_opt.init, out_shardings=opt_shardings)(loaded)
    return state.replace(extras={**state.extras, 'value': loaded, 'value_opt': value_opt})

  # --- frozen inputs ---------------------------------------------------------

  def _reference_params(self, mesh):
    """The starting policy, placed as the policy is: `init_from`'s newest parameters, or
    the seed's initialisation."""
    rng = jax.random.key(self.config.seed)
    abstract = jax.eval_shape(lambda: lm.LMTask.init_state(self, rng).params)
    shardings = mesh_lib.shardings(abstract, self._param_specs, mesh, self.logical_rules)
    init = self.config.get('init_from')
    if not init:
      return jax.jit(lambda: lm.LMTask.init_state(self, rng).params,
                     out_shardings=shardings)()
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    params, step = self._load_init_params(init, target)
    logging.info('PPO reference: step %d of %s.', step, init)
    return params

  def load_frozen(self, mesh):
    frozen = {}
    if not self.model_cfg.lora_rank:  # with LoRA the reference is the policy without adapters
      frozen['ref'] = self._reference_params(mesh)
    if self.config.ppo.reward_model:
      frozen['reward'] = self._load_reward_model(mesh)
    return frozen

  def _load_reward_model(self, mesh):
    """The frozen reward model's parameters (its graph kept on the task)."""
    graphdef, params, tokenizer = reward.load_reward_model(
        self.config.ppo.reward_model, mesh=mesh, rules=self.logical_rules)
    self._check_tokenizer(tokenizer, self.config.ppo.reward_model)
    self.reward_graphdef = graphdef
    return params

  def _check_tokenizer(self, tokenizer, run_dir: str) -> None:
    """A reward model or critic reads the policy's token ids: their tokenizers must agree."""
    if (type(tokenizer) is not type(self.tokenizer)
        or tokenizer.vocab_size != self.tokenizer.vocab_size):
      raise ConfigError(
          f'{run_dir!r} uses another tokenizer ({type(tokenizer).__name__}, '
          f'{tokenizer.vocab_size} ids) than the policy ({type(self.tokenizer).__name__}, '
          f'{self.tokenizer.vocab_size} ids); train it with the same tokenizer.')

  # --- rollouts --------------------------------------------------------------

  def _forward(self, params, value, sequences_BxT, prompt_len_B, responses_BxM):
    """(log p of each response token [B, M] under logits / temperature, their entropies
    [B, M], the values before each token [B, M]) of the policy and value model."""
    m = responses_BxM.shape[1]
    # Position prompt_len - 1 + i predicts response token i; only those M are computed.
    cols_BxM = prompt_len_B[:, None] - 1 + jnp.arange(m)[None]
    model = nnx.merge(self.graphdef, params)
    x_BxTxD = model(sequences_BxT, features=True)
    x_BxMxD = jnp.take_along_axis(x_BxTxD, cols_BxM[..., None], axis=1)
    logits_BxMxV = model._head(x_BxMxD) / self.config.ppo.temperature  # noqa: SLF001
    vocab = logits_BxMxV.shape[-1]
    # Padded vocabulary ids are never sampled: a large negative logit (not -inf, which
    # would make 0 * -inf in the entropy) removes them.
    logits_BxMxV = jnp.where(jnp.arange(vocab) < self.tokenizer.vocab_size, logits_BxMxV, -1e9)
    logp_BxMxV = jax.nn.log_softmax(logits_BxMxV, axis=-1)
    logprobs_BxM = jnp.take_along_axis(logp_BxMxV, responses_BxM[..., None], axis=-1)[..., 0]
    entropy_BxM = -jnp.sum(jnp.exp(logp_BxMxV) * logp_BxMxV, axis=-1)
    if self.config.ppo.critic == 'shared':
      values_BxM = value_head(value, x_BxMxD)
    else:
      values_BxT = nnx.merge(self.critic_graphdef, value)(sequences_BxT)
      values_BxM = jnp.take_along_axis(values_BxT, cols_BxM, axis=1)
    return logprobs_BxM, entropy_BxM, values_BxM

  def _scores(self, frozen, rollout: rl.Rollout, index_B: jax.Array) -> jax.Array:
    """The score of each completion [B]: the reward model's at its last token, or the
    Python reward function's of the decoded prompt and completion (a host callback)."""
    if self.config.ppo.reward_model:
      return reward.score(self.reward_graphdef, frozen['reward'], rollout.tokens_BxL,
                          rollout.length_B)
    return jax.pure_callback(
        self._python_scores, jax.ShapeDtypeStruct(rollout.length_B.shape, jnp.float32),
        rollout.tokens_BxL, rollout.prompt_len_B, rollout.length_B, index_B)

  def _python_scores(self, tokens_BxL, prompt_len_B, length_B, index_B) -> np.ndarray:
    """`ppo.reward_fn` of each row's prompt and completion text (BOS and an EOS stop token
    left out) and the prompt's record (its jsonl row, for fields such as `answer`)."""
    from train import rewards
    tok = self.tokenizer
    eos = getattr(tok, 'eos_id', -1)
    prompts, completions, records = [], [], []
    for row, p, n, i in zip(np.asarray(tokens_BxL), np.asarray(prompt_len_B),
                            np.asarray(length_B), np.asarray(index_B), strict=True):
      prompt = [int(t) for t in row[:p]]
      completion = [int(t) for t in row[p:n]]
      if prompt and prompt[0] == tok.bos_id:
        prompt = prompt[1:]
      if completion and completion[-1] == eos:
        completion = completion[:-1]
      prompts.append(tok.decode(prompt))
      completions.append(tok.decode(completion))
      records.append(self.data.record(int(i)))
    return np.asarray(rewards.batch_rewards(self.reward_fn, prompts, completions, records),
                      np.float32)

  def _rollout(self, params, value, batch, frozen, seeds_B, kl_coef):
    """Completions of the batch's prompts and everything PPO computes from them before
    updating: (rollout arrays [B, ...] (ROLLOUT_KEYS), per-row scores and KL for metrics)."""
    p = self.config.ppo
    prompt_BxP, prompt_len_B = batch['prompt'], batch['prompt_len']
    b = prompt_BxP.shape[0]
    settings = sampling.SamplingParams(
        temperature=jnp.full((b,), p.temperature, jnp.float32),
        top_k=jnp.zeros((b,), jnp.int32), top_p=jnp.ones((b,), jnp.float32),
        min_p=jnp.zeros((b,), jnp.float32), repetition_penalty=jnp.ones((b,), jnp.float32))
    out = rl.rollout(self.graphdef, params, prompt_BxP, prompt_len_B,
                     max_new_tokens=p.response_length, sampling_params=settings,
                     seeds_B=seeds_B, stop_ids=self._stop_ids(),
                     vocab_limit=self.tokenizer.vocab_size)
    sequences_BxT = out.tokens_BxL  # prompt then completion, then zeros
    arange_M = jnp.arange(p.response_length)
    responses_BxM = jnp.take_along_axis(sequences_BxT, prompt_len_B[:, None] + arange_M[None],
                                        axis=1)
    mask_BxM = (arange_M[None] < out.completion_len_B[:, None]).astype(jnp.float32)
    logprobs_BxM, _, values_BxM = self._forward(params, value, sequences_BxT, prompt_len_B,
                                                responses_BxM)
    ref_params = frozen['ref'] if 'ref' in frozen else lora.disabled(params)
    ref_logprobs_BxM, _, _ = self._forward(ref_params, value, sequences_BxT, prompt_len_B,
                                           responses_BxM)
    scores_B = self._scores(frozen, out, batch['index']).astype(jnp.float32)
    if p.missing_eos_penalty and self._stop_ids():
      scores_B = scores_B - p.missing_eos_penalty * (~out.stopped_B).astype(jnp.float32)
    rewards_BxM, kl_BxM, non_score_BxM = ppo_losses.kl_penalized_rewards(
        scores_B, logprobs_BxM, ref_logprobs_BxM, mask_BxM, kl_coef=kl_coef,
        estimator=p.kl_estimator)
    if p.whiten_rewards:
      rewards_BxM = ppo_losses.masked_whiten(rewards_BxM, mask_BxM, shift_mean=False)
    advantages_BxM, returns_BxM = ppo_losses.gae(rewards_BxM, values_BxM, mask_BxM,
                                                 gamma=p.gamma, lam=p.lam)
    rollout = {
        'sequences': sequences_BxT, 'prompt_len': prompt_len_B, 'responses': responses_BxM,
        'mask': mask_BxM, 'logprobs': logprobs_BxM, 'values': values_BxM * mask_BxM,
        'advantages': ppo_losses.masked_whiten(advantages_BxM, mask_BxM),
        'returns': returns_BxM,
    }
    per_row = {'scores': scores_B, 'kl': jnp.sum(kl_BxM, axis=1),
               'non_score_reward': jnp.sum(non_score_BxM, axis=1),
               'entropy': -jnp.sum(logprobs_BxM * mask_BxM, axis=1),
               'stopped': out.stopped_B.astype(jnp.float32)}
    return jax.tree.map(jax.lax.stop_gradient, (rollout, per_row))

  def _kl_coef(self, state) -> jax.Array:
    return state.extras.get('kl_coef', jnp.asarray(self.config.ppo.kl_coef, jnp.float32))

  def collect(self, state, batch, frozen):
    """The rollout batch of this step, from the current policy (module docstring, 1)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    b = batch['prompt'].shape[0]
    seeds_B = rl.rollout_seeds(key, b)
    rollout, per_row = self._rollout(state.params, state.extras['value'], batch, frozen,
                                     seeds_B, self._kl_coef(state))
    return {**rollout, **{f'row_{k}': v for k, v in per_row.items()}}

  # --- the update --------------------------------------------------------------

  def train_step(self, state, batch, frozen):
    del frozen  # everything frozen was read in `collect`
    p = self.config.ppo
    b = batch['mask'].shape[0]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                                state.step), 1)
    orders_ExB = jax.vmap(lambda k: jax.random.permutation(k, b))(
        jax.random.split(key, p.num_ppo_epochs))
    rows_KxR = orders_ExB.reshape(self.updates_per_step, b // p.num_mini_batches)
    rollout = {k: batch[k] for k in ROLLOUT_KEYS}

    def update(carry, rows_R):
      params, value, opt_state, value_opt_state = carry
      mb = jax.tree.map(lambda x: x[rows_R], rollout)

      def loss_fn(trainable):
        policy_part, value_params = trainable
        logprobs, entropy, values = self._forward(
            self.opt.merge(params, policy_part), value_params, mb['sequences'],
            mb['prompt_len'], mb['responses'])
        return ppo_losses.ppo_loss(
            logprobs_BxT=logprobs, old_logprobs_BxT=mb['logprobs'],
            advantages_BxT=mb['advantages'], values_BxT=values, old_values_BxT=mb['values'],
            returns_BxT=mb['returns'], entropy_BxT=entropy, mask_BxT=mb['mask'],
            cliprange=p.cliprange, cliprange_value=p.cliprange_value, vf_coef=p.vf_coef,
            entropy_coef=p.entropy_coef)

      (loss, stats), (g_policy, g_value) = jax.value_and_grad(loss_fn, has_aux=True)(
          (self.opt.select(params), value))
      params, opt_state, upd = self.opt.apply(params, opt_state, g_policy, loss)
      value, value_opt_state, value_upd = self.value_opt.apply(value, value_opt_state, g_value,
                                                               loss)
      out = {**stats, 'loss': loss, 'grad_norm': optax.tree.norm((g_policy, g_value)),
             'skipped': jnp.maximum(upd['skipped'], value_upd['skipped'])}
      return (params, value, opt_state, value_opt_state), out

    carry = (state.params, state.extras['value'], state.opt_state, state.extras['value_opt'])
    (params, value, opt_state, value_opt_state), per_update = jax.lax.scan(update, carry,
                                                                          rows_KxR)
    kl_coef = self._kl_coef(state)
    metrics = {k: jnp.mean(v) for k, v in per_update.items()}
    metrics['skipped'] = jnp.max(per_update['skipped'])
    metrics['val/ratio_var'] = jnp.var(per_update['val/ratio'])
    scores, non_score = jnp.mean(batch['row_scores']), jnp.mean(batch['row_non_score_reward'])
    metrics.update({
        'objective/kl': jnp.mean(batch['row_kl']),
        'objective/entropy': jnp.mean(batch['row_entropy']),
        'objective/non_score_reward': non_score,
        'objective/rlhf_reward': scores + non_score,
        'objective/scores': scores,
        'objective/kl_coef': kl_coef,
        'val/num_eos_tokens': jnp.sum(batch['row_stopped']),
        'lr': self.opt.schedule(state.step * self.updates_per_step),
    })
    extras = {**state.extras, 'value': value, 'value_opt': value_opt_state}
    if 'kl_coef' in extras:
      extras['kl_coef'] = ppo_losses.adaptive_kl_coef(
          kl_coef, metrics['objective/kl'], target=p.kl_target, horizon=p.kl_horizon,
          n_steps=self.config.batch_size)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         extras=extras), metrics

  # --- evaluation --------------------------------------------------------------

  def eval_step(self, state, batch, frozen):
    """Sums of the scores and KL of completions of held-out prompts (fixed seeds)."""
    b = batch['prompt'].shape[0]
    _, per_row = self._rollout(state.params, state.extras['value'], batch, frozen,
                               jnp.arange(b, dtype=jnp.int32), self._kl_coef(state))
    return {'scores': jnp.sum(per_row['scores']), 'kl': jnp.sum(per_row['kl']),
            'rows': jnp.asarray(b, jnp.float32)}

  def eval_summary(self, sums, state):
    out = {}
    if sums:
      n = max(sums['rows'], 1.0)
      out = {'eval/scores': sums['scores'] / n, 'eval/kl': sums['kl'] / n}
    return {**out, **self.task_evals(state)}

  # --- accounting ------------------------------------------------------------

  def items_per_step(self) -> int:
    return self.config.batch_size

  def flops_per_step(self) -> float:
    """Model FLOPs: the generation and the rollout's forward passes (policy, reference,
    critic, reward model: a third of a train step's each), then every update's
    forward and backward."""
    p = self.config.ppo
    tokens = self.config.batch_size * (self.config.data.max_prompt_len + p.response_length)
    per_token = transformer.train_flops_per_token(self.model_cfg, self.config.data.seq_len)
    forwards = 3 + (p.critic == 'separate') + 1  # generation, policy, ref, critic, reward
    return per_token * tokens * (forwards / 3.0 + self.updates_per_step
                                 * (1 + (p.critic == 'separate')))

