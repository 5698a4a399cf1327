"""Reward models (RLHF's first stage) with TRL's RewardTrainer semantics.

A transformer with a scalar head (model/reward_model.py) scores a sequence by its value at
the last real token. For a pair (prompt x, chosen y_w, rejected y_l) with rewards
r_w = r(x, y_w), r_l = r(x, y_l), an optional per-pair margin m (the jsonl's `margin`, 0
without one) and the reward-centring coefficient c (`reward.center_coefficient`, TRL's
`center_rewards_coefficient`, Eisenstein et al. 2023), the Bradley-Terry loss of a pair is

  -log sigmoid(r_w - r_l - m) + c (r_w + r_l)^2

and the loss is its mean over pairs. The centring term pins the rewards' mean near 0, so
that a PPO run reading them needs no whitening. Logged like TRL: `accuracy` (the share of
pairs with r_w > r_l), `rewards/chosen`, `rewards/rejected`, `rewards/margins`; the trainer
prefixes them with `train/`, evaluation logs the same over held-out pairs as `eval/...`;
`mean_reward` (TRL's name) is the mean of both, what centring holds near 0.

The data are DPO's (data/preference_data.py: the embedded rule set or preference jsonl, a
string or chat-message pair per line); the model, tokenizer and `init_from` warm start are
the LM's: the trunk starts from an LM or SFT run's parameters, the head from zero. With LoRA
(`model.lora.rank` > 0) only the adapters and the head train.

A finished run is a frozen input for PPO: `load_reward_model(run_dir, mesh)` gives its
graph, placed parameters and tokenizer, and `score` the reward of each token row.
`python -m train.sample --workdir=RUN` prints the rewards of `sample.completions` to
`sample.prompt`.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data import tokenizers
from data.errors import ConfigError, check_choice, check_positive, require
from model import lora, run_params, transformer
from model import reward_model as reward_lib
from train import mesh as mesh_lib
from train import runs, tasks
from train.tasks import dpo, kit, lm

PAIR_METRICS = ('accuracy', 'rewards/chosen', 'rewards/rejected', 'rewards/margins',
                'mean_reward')
# With LoRA: everything frozen but the adapters and the scalar head.
FREEZE_BASE = r'(?!head$|head_bias$)' + lora.FREEZE_BASE


def bradley_terry_loss(chosen_B: jax.Array, rejected_B: jax.Array, margin_B: jax.Array, *,
                       center_coefficient: float = 0.0):
  """(loss per pair [B], metrics per pair {name: [B]}) from rewards [B] (module docstring)."""
  losses_B = -jax.nn.log_sigmoid(chosen_B - rejected_B - margin_B)
  if center_coefficient:
    losses_B = losses_B + center_coefficient * jnp.square(chosen_B + rejected_B)
  chosen_B, rejected_B = jax.lax.stop_gradient(chosen_B), jax.lax.stop_gradient(rejected_B)
  metrics = {
      'accuracy': (chosen_B > rejected_B).astype(jnp.float32),
      'rewards/chosen': chosen_B, 'rewards/rejected': rejected_B,
      'rewards/margins': chosen_B - rejected_B, 'mean_reward': (chosen_B + rejected_B) / 2,
  }
  return losses_B, metrics


def check_config(config: ml_collections.ConfigDict) -> None:
  check_choice(config, 'data.source', ('stdlib', 'jsonl'))
  check_choice(config, 'data.tokenizer.kind', ('sentencepiece', 'byte', 'char'))
  check_positive(config, 'data.seq_len')
  check_positive(config, 'reward.center_coefficient', allow_zero=True)
  require(0.0 < config.data.val_fraction < 1.0,
          f'data.val_fraction={config.data.val_fraction!r} must be in (0, 1).')
  if config.data.source == 'jsonl':
    require(bool(config.data.path), "data.source='jsonl' needs data.path: a file or glob of "
            'preference jsonl ({"prompt": ..., "chosen": ..., "rejected": ...} per line).')
  if config.model.get('position') == 'learned' and config.data.seq_len > config.model.get(
      'max_positions', 0):
    raise ConfigError(f'data.seq_len={config.data.seq_len} exceeds model.max_positions='
                      f'{config.model.max_positions}, the size of the learned position table.')
  completions = config.sample.get('completions', ())
  require(isinstance(completions, (list, tuple)) and all(isinstance(c, str) for c in completions),
          f'sample.completions={completions!r} must be a list of strings to score.')


@tasks.register('reward')
class RewardTask(lm.LMTask):
  """A Bradley-Terry reward model on preference pairs (module docstring)."""

  items_name = 'examples'  # preference pairs
  makes_text = False  # a scalar head: nothing to serve or generate

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.workdir = None

  def _check_config(self, config: ml_collections.ConfigDict) -> None:
    check_config(config)

  # --- setup -----------------------------------------------------------------

  setup_data = dpo.DPOTask.setup_data  # the same pairs, tokenizer and warm-start tokenizer

  def _new_model(self, key: jax.Array) -> reward_lib.RewardModel:
    return reward_lib.RewardModel(self.model_cfg, rngs=nnx.Rngs(params=key))

  def _set_inference_cfg(self, cfg) -> None:
    graphdef = self.graphdef if cfg == self.model_cfg else reward_lib.graphdef(cfg)
    self.inference_model_cfg, self.inference_graphdef = cfg, graphdef

  def _optimizer_config(self) -> ml_collections.ConfigDict:
    opt_cfg = self.config.optimizer
    if not self.model_cfg.lora_rank:
      return opt_cfg
    opt_cfg = ml_collections.ConfigDict(opt_cfg.to_dict())
    user = opt_cfg.freeze
    opt_cfg.freeze = f'(?:{user})|{FREEZE_BASE}' if user else FREEZE_BASE
    return opt_cfg

  def _warm_params(self, init: str, current):
    """The trunk from `init_from`'s newest checkpoint (an LM, SFT or DPO run, or an import);
    the head keeps its zeros."""
    return dict(current, trunk=super()._warm_params(init, current['trunk']))

  def set_inference_quant(self, mode: str, group: int = 0) -> None:
    del group
    if mode != 'none':
      raise ConfigError(f'--quant={mode} does not apply to a reward run: it scores, it does not '
                        'generate.')

  # --- steps -----------------------------------------------------------------

  def _pair_rewards(self, params, batch, dropout_key=None) -> jax.Array:
    """Rewards [B, 2] of the chosen and rejected rows."""
    B, _, L = batch['inputs'].shape
    model = nnx.merge(self.graphdef, params)
    train = dropout_key is not None and (self.model_cfg.dropout > 0
                                         or self.model_cfg.lora_dropout > 0)
    values_RxL = model(batch['inputs'].reshape(2 * B, L),
                       positions_BxL=batch['positions'].reshape(2 * B, L),
                       segment_ids_BxL=batch['segment_ids'].reshape(2 * B, L),
                       deterministic=not train,
                       rngs=nnx.Rngs(dropout=dropout_key) if train else None)
    return reward_lib.sequence_values(values_RxL, batch['lengths'].reshape(2 * B)).reshape(B, 2)

  def _pair_terms(self, params, batch, dropout_key=None):
    rewards_Bx2 = self._pair_rewards(params, batch, dropout_key)
    return bradley_terry_loss(rewards_Bx2[:, 0], rewards_Bx2[:, 1], batch['margin'],
                              center_coefficient=self.config.reward.center_coefficient)

  def train_step(self, state, batch, frozen):
    del frozen
    step = state.step
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)

    def loss_fn(params, b):
      losses_B, metrics = self._pair_terms(params, b, dropout_key)
      return jnp.mean(losses_B), {k: jnp.mean(v) for k, v in metrics.items()}

    (loss, aux), grads = self.opt.value_and_grad(loss_fn, state.params, batch,
                                                 self.config.grad_accum,
                                                 opt_state=state.opt_state)
    params, opt_state, update = self.opt.apply(state.params, state.opt_state, grads, loss)
    metrics = {'loss': loss, 'lr': self.opt.schedule(step), **aux, **update}
    return state.replace(step=step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(self, state, batch, frozen):
    del frozen
    losses_B, metrics = self._pair_terms(state.params, batch)
    return {'loss': jnp.sum(losses_B), **{k: jnp.sum(v) for k, v in metrics.items()},
            'pairs': jnp.asarray(losses_B.shape[0], jnp.float32)}

  def eval_summary(self, sums, state):
    del state
    if not sums:
      return {}
    n = max(sums['pairs'], 1.0)
    return {f'eval/{k}': sums[k] / n for k in ('loss', *PAIR_METRICS)}

  # --- accounting ------------------------------------------------------------

  def items_per_step(self) -> int:
    return self.config.batch_size

  def flops_per_step(self) -> float:
    tokens = 2 * self.config.batch_size * self.config.data.seq_len  # two rows per pair
    return transformer.train_flops_per_token(self.model_cfg, self.config.data.seq_len) * tokens

  # --- what tools read -------------------------------------------------------

  def samples(self, state, seed: int) -> dict[str, str]:
    """The reward of each of `sample.completions` after `sample.prompt`, best first."""
    del seed
    s = self.config.sample
    if not s.get('completions'):
      raise ConfigError('A reward run scores completions rather than generating: set '
                        "sample.completions (a list of strings) in the run's config.json.")
    rows = [encode_pair(self.tokenizer, s.prompt, c) for c in s.completions]
    tokens_BxL, lengths_B = pad_rows(rows, self.model_cfg.max_positions or None)
    rewards = np.asarray(jax.device_get(_jitted_score(
        self.inference_graphdef, self.inference_params(state), tokens_BxL, lengths_B)))
    order = np.argsort(-rewards, kind='stable')
    lines = [f'{rewards[i]:+.4f}  {s.completions[i]!r}' for i in order]
    return {'samples/rewards': f'prompt: {s.prompt!r}\n' + '\n'.join(lines)}


# --- a finished run as a frozen input ------------------------------------------


def load_reward_model(run_dir: str, mesh: jax.sharding.Mesh | None = None, rules=None):
  """(graphdef, params, tokenizer) of the newest checkpoint of the reward run `run_dir`.

  The parameters are the inference model's (a LoRA run's adapters merged into float
  weights), placed with their logical shardings on `mesh` under `rules` (default: the
  transformer's table), or whole on the first local device without a mesh. Apply them with
  `score` or `nnx.merge(graphdef, params)`.

  Raises:
    ConfigError: `run_dir` is not a reward run, or has no checkpoint.
  """
  config = runs.load_run_config(run_dir)
  if config.get('task') != 'reward':
    raise ConfigError(f'{run_dir!r} is a {config.get("task")!r} run, not a reward model '
                      "(train one with configs/reward.py: task='reward').")
  task = RewardTask(config)
  task.setup_inference(run_dir)
  rules = rules or task.logical_rules
  stored = _placed_abstract(task.model_cfg, mesh, rules)
  params, _ = kit.load_run_params(run_dir, stored)
  if task.model_cfg != task.inference_model_cfg:  # LoRA: adapters merged into float weights
    merged = _placed_abstract(task.inference_model_cfg, mesh, rules)
    params = jax.jit(task._inference_fn(task.inference_model_cfg),
                     out_shardings=jax.tree.map(lambda a: a.sharding, merged))(params)
  return task.inference_graphdef, params, task.tokenizer


def _placed_abstract(cfg: transformer.TransformerConfig, mesh: jax.sharding.Mesh | None, rules):
  """ShapeDtypeStructs of a RewardModel(cfg)'s parameters with their shardings on `mesh`
  (whole on the first local device without one)."""
  def make():
    return reward_lib.RewardModel(cfg, rngs=nnx.Rngs(0))
  _, (specs,) = kit.abstract_split(make, nnx.Param)
  with nnx.use_eager_sharding(False):
    abstract = kit.pure_state(nnx.eval_shape(make), nnx.Param)
  if mesh is None:
    return run_params.on_one_device(abstract)
  shardings = mesh_lib.shardings(abstract, specs, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def score(graphdef: nnx.GraphDef, params, tokens_BxL: jax.Array,
          lengths_B: jax.Array) -> jax.Array:
  """float32 rewards_B of left-aligned token rows: each row's value at its last real token
  (index length - 1). Rows are what training saw: BOS, the prompt's tokens, the
  completion's (and EOS when the tokenizer has one), then any padding. Jittable, with
  `graphdef` static."""
  values_BxL = nnx.merge(graphdef, params)(tokens_BxL)
  return reward_lib.sequence_values(values_BxL, lengths_B)


_jitted_score = jax.jit(score, static_argnums=0)


def encode_pair(tokenizer: tokenizers.Tokenizer, prompt: str, completion: str) -> list[int]:
  """The token row of (prompt, completion) as data/preference_data.py builds it for strings:
  BOS + prompt, then completion + EOS (each when the tokenizer has it)."""
  bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
  eos = [tokenizer.eos_id] if getattr(tokenizer, 'eos_id', -1) >= 0 else []
  return bos + list(tokenizer.encode(prompt)) + list(tokenizer.encode(completion)) + eos


def pad_rows(rows: list[list[int]], limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_BxL int32 zero-padded, lengths_B int32) of token rows; L is the longest row.

  Raises:
    ConfigError: a row is empty, or longer than `limit` (a learned position table).
  """
  if not rows or not all(rows):
    raise ConfigError('Every row to score needs at least one token.')
  width = max(len(r) for r in rows)
  if limit is not None and width > limit:
    raise ConfigError(f'A row of {width} tokens exceeds the model\'s {limit} positions.')
  tokens = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  return tokens, np.asarray([len(r) for r in rows], np.int32)
