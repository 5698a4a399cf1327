"""GRPO (Shao et al. 2024, DeepSeekMath) on verifiable rewards, with DAPO's and Dr. GRPO's
variants, as TRL's GRPOTrainer computes it.

Each step, inside the one jitted program:

1. collect: `batch_size` prompts from the data iterator, each repeated `grpo.num_generations`
   (G) times, sampled with the current policy (`rl.rollout`, model/decode.generate); the
   completions are scored on the host by a reward function from train/rewards.py
   (`grpo.reward`), or drawn at random (`grpo.reward='random'`, the control); advantages are
   each reward minus its group's mean, divided by the group's standard deviation
   (`grpo.scale_rewards`; Dr. GRPO turns it off); the frozen reference's log-probs when
   `grpo.beta` > 0, and the rollout policy's when `grpo.num_iterations` > 1.
2. update, `grpo.num_iterations` times over the batch: per completion token the clipped
   ratio to the rollout policy (`clip_low`, `clip_high`: DAPO's clip-higher when larger),
   plus beta times the k3 estimate of KL(policy || reference), aggregated by
   `grpo.loss_aggregation` (rl.aggregate: `sequence_mean` GRPO, `token_mean` DAPO,
   `dr_grpo` Dr. GRPO with the constant max_new_tokens).

Rewards are Python (string compare, regexes, subprocesses), so they run on the host through
`jax.pure_callback` from inside the jitted step, rather than by collecting outside it: the
trainer stays the one loop (rollout and update in one program, randomness from state.rng
folded with state.step, the prompt iterator in the checkpoint), so a resumed run collects,
scores and trains exactly what the straight run did. A reward is a pure function of its
inputs, which pure_callback requires; the random control is drawn in JAX from the step's
key for the same reason.

The reference is the frozen starting model (`init_from`, a frozen input), or with LoRA the
policy with its adapters off (`lora.disabled`): policy and reference share one frozen base.

Metrics are TRL's names: `reward`, `reward_std` (mean over groups of the group's standard
deviation), `frac_reward_zero_std`, `completions/mean_length`, `completions/min_length`,
`completions/max_length`, `completions/clipped_ratio` (completions that hit max_new_tokens
without a stop token), `kl`, `entropy`, `clip_ratio/low_mean`, `clip_ratio/high_mean`,
`clip_ratio/region_mean`, and `rewards/<name>/mean`. Evaluation: `eval/accuracy`, the mean
of `grpo.eval_reward` (exact match) of greedy completions of held-out prompts, `eval/reward`,
the same of completions sampled as in training, and `eval/completions/mean_length`.

`batch_size` counts prompts; a step trains on batch_size * G completions (TRL counts
completions in its batch size).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from data import chat, lm_pipeline, tokenizers, verifiable
from data.errors import ConfigError, check_choice, check_positive, require
from model import lora, sampling
from train import optim, rewards, rl, tasks
from train.state import setup_state
from train.tasks import lm

Batch = dict[str, np.ndarray]


def check_config(config: ml_collections.ConfigDict) -> None:
  g = config.grpo
  check_choice(config, 'data.source', verifiable.SOURCES)
  check_choice(config, 'data.tokenizer.kind', ('sentencepiece', 'byte', 'char'))
  check_choice(config, 'grpo.loss_aggregation', rl.AGGREGATIONS)
  check_positive(config, 'grpo.num_generations', 'grpo.max_new_tokens', 'grpo.num_iterations',
                 'grpo.max_prompt_len', 'grpo.eval_prompts')
  check_positive(config, 'grpo.temperature')  # greedy groups would have no spread
  check_positive(config, 'grpo.beta', 'grpo.top_k', allow_zero=True)
  require(g.num_generations >= 2, f'grpo.num_generations={g.num_generations} must be >= 2: '
          'advantages compare the samples of a prompt with each other.')
  require(0 < g.clip_low < 1 and g.clip_high > 0, f'grpo.clip_low={g.clip_low} must be in '
          f'(0, 1) and grpo.clip_high={g.clip_high} > 0.')
  require(0.0 < g.top_p <= 1.0, f'grpo.top_p={g.top_p} must be in (0, 1].')
  # data.seq_len is the context a served GRPO run gets (serve/engine.py's max_seq_len).
  require(config.data.seq_len >= g.max_prompt_len + g.max_new_tokens,
          f'data.seq_len={config.data.seq_len} must hold grpo.max_prompt_len + '
          f'grpo.max_new_tokens = {g.max_prompt_len + g.max_new_tokens} positions.')
  require(0.0 < config.data.val_fraction < 1.0,
          f'data.val_fraction={config.data.val_fraction!r} must be in (0, 1).')
  if config.data.source == 'jsonl':
    require(bool(config.data.path), "data.source='jsonl' needs data.path: a jsonl of problems "
            '({"prompt": ..., "answer": ...} per line).')
  if g.reward != 'random':
    rewards.get(g.reward, 'grpo.reward')
  rewards.get(g.eval_reward, 'grpo.eval_reward')
  require(config.grad_accum == 1 or g.loss_aggregation != 'token_mean',
          "grpo.loss_aggregation='token_mean' divides by the tokens of the whole batch, which "
          'microbatches (grad_accum > 1) do not see; use grad_accum=1.')


def repeat_rows(x: jax.Array, n: int) -> jax.Array:
  """Each row `n` times in a row: row i*n + j of the result is row i (sharded like `x`)."""
  b = x.shape[0]
  return jnp.broadcast_to(x[:, None], (b, n, *x.shape[1:])).reshape(b * n, *x.shape[1:])


class Prompts:
  """Tokenized prompts of one split; prompts[i] is {'prompt': int32 [P] (zero-padded),
  'prompt_len': int32 [], 'index': int32 [] (= i, the problem's place in the split)}."""

  def __init__(self, ids: list[list[int]], max_len: int):
    self.ids, self.max_len = ids, max_len

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, i: int) -> Batch:
    i = int(i)
    row = np.zeros(self.max_len, np.int32)
    row[:len(self.ids[i])] = self.ids[i]
    return {'prompt': row, 'prompt_len': np.int32(len(self.ids[i])), 'index': np.int32(i)}


@tasks.register('grpo')
class GRPOTask(lm.LMTask):
  """GRPO on the LM's model, tokenizer, warm start (`init_from`) and LoRA."""

  items_name = 'examples'  # completions

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.problems = {'train': [], 'validation': []}
    self.stop_ids: tuple[int, ...] = ()

  def _check_config(self, config: ml_collections.ConfigDict) -> None:
    check_config(config)
    # Unknown reward names stop the run here, before any model is built.
    self.reward_fn = None if config.grpo.reward == 'random' else rewards.get(config.grpo.reward)
    self.eval_reward_fn = rewards.get(config.grpo.eval_reward, 'grpo.eval_reward')

  def _setup_model(self, tokenizer_vocab_size: int) -> None:
    super()._setup_model(tokenizer_vocab_size)
    # `num_iterations` optimizer updates per step: the schedule spans all of them.
    self.opt = optim.make_optimizer(self._optimizer_config(), self.updates,
                                    self.config.max_nonfinite_steps, self._param_specs)

  @property
  def updates(self) -> int:
    return self.config.steps * self.config.grpo.num_iterations

  # --- setup -----------------------------------------------------------------

  def setup_data(self, workdir: str, process_index: int, process_count: int):
    c = self.config
    if c.get('init_from'):
      self._copy_init_tokenizer(workdir)
    prompts = self._setup_problems(workdir)
    if len(prompts['train']) < c.batch_size:
      raise ConfigError(f'The training split has {len(prompts["train"])} problems, fewer than '
                        f'one batch (batch_size={c.batch_size}).')
    train = lm_pipeline.train_dataset(prompts['train'], seed=c.seed,
                                      global_batch_size=c.batch_size,
                                      process_index=process_index, process_count=process_count)
    logging.info('GRPO problems: %d train, %d held out; stop ids %s.', len(prompts['train']),
                 len(prompts['validation']), self.stop_ids)
    return iter(train.to_iter_dataset())

  def setup_inference(self, workdir: str) -> None:
    self._setup_problems(workdir)  # samples are completions of held-out problems

  def _setup_problems(self, workdir: str) -> dict[str, Prompts]:
    """Reads both splits' problems, sets the tokenizer and the stop ids; the tokenized
    prompts by split."""
    c = self.config
    for split in self.problems:
      self.problems[split] = verifiable.problems(c.data.source, split, c.data.val_fraction,
                                                 c.data.path)
    texts = lambda: (p['prompt'] for p in self.problems['train'])  # noqa: E731
    tokenizer = tokenizers.load_or_train_tokenizer(c.data.tokenizer, texts, workdir)
    self._set_tokenizer(tokenizer)
    # A completion ends as SFT taught it to: with the template's end-of-turn token (EOS,
    # BOS for byte tokenizers), its last id when it is several.
    template = chat.load_chat_template(workdir, tokenizer)
    self.stop_ids = tuple(template.encode(template.end_of_turn)[-1:])
    prompts = {split: self._tokenize(rows, split) for split, rows in self.problems.items()}
    require(len(prompts['validation']) > 0, 'The validation split has no problems; raise '
            'data.val_fraction.')
    self.eval_prompts = prompts['validation']
    return prompts

  def _tokenize(self, rows: list[dict], split: str) -> Prompts:
    bos = [self.tokenizer.bos_id] if self.tokenizer.bos_id >= 0 else []
    ids = [bos + list(self.tokenizer.encode(r['prompt'])) for r in rows]
    limit = self.config.grpo.max_prompt_len
    too_long = sum(len(x) > limit for x in ids)
    if too_long:
      raise ConfigError(f'{too_long} {split} prompts are longer than grpo.max_prompt_len='
                        f'{limit} tokens (the longest has {max(map(len, ids))}); raise it.')
    if any(not x for x in ids):
      raise ConfigError(f'A {split} prompt encodes to no tokens and the tokenizer has no BOS.')
    return Prompts(ids, limit)

  # --- frozen inputs ---------------------------------------------------------

  def _reference(self) -> str:
    """'none' (beta = 0), 'lora_base' (LoRA: the policy with adapters off) or 'model'."""
    if self.config.grpo.beta == 0:
      return 'none'
    return 'lora_base' if self.model_cfg.lora_rank else 'model'

  def load_frozen(self, mesh):
    """The reference: the policy's starting parameters, made again as `warm_start` makes
    them (from `init_from`, a LoRA run's merged; else the seed's initialisation), on every
    start, resume included."""
    if self._reference() != 'model':
      return {}
    rng, _, _, init = setup_state(self, self.config, mesh)
    logging.info('GRPO reference: the starting model (%s).',
                 self.config.get('init_from') or f'seed {self.config.seed}')
    return {'ref': self.warm_start(init(rng)).params}

  # --- collect ---------------------------------------------------------------

  def _sampling_params(self, rows: int, greedy: bool = False) -> sampling.SamplingParams:
    g = self.config.grpo
    full = lambda v, dtype=jnp.float32: jnp.full((rows,), v, dtype)  # noqa: E731
    return sampling.SamplingParams(
        temperature=full(0.0 if greedy else g.temperature), top_k=full(g.top_k, jnp.int32),
        top_p=full(g.top_p), min_p=full(0.0), repetition_penalty=full(1.0))

  def _score_on_host(self, fn, split: str, index_R, tokens_RxL, prompt_len_R, length_R,
                     stopped_R) -> np.ndarray:
    """Rewards [R] float32 of completions given as rollout rows (host arrays). Inside a
    callback they arrive as jax Arrays: converted first, since indexing one would dispatch
    work to the device that is waiting for this callback."""
    index_R, tokens_RxL, prompt_len_R, length_R, stopped_R = map(
        np.asarray, (index_R, tokens_RxL, prompt_len_R, length_R, stopped_R))
    examples = [self.problems[split][int(i)] for i in index_R]
    completions = [self.completion_text(row[p:n], stop)
                   for row, p, n, stop in zip(tokens_RxL, prompt_len_R, length_R, stopped_R,
                                              strict=True)]
    prompts = [e['prompt'] for e in examples]
    return np.asarray(rewards.batch_rewards(fn, prompts, completions, examples), np.float32)

  def completion_text(self, ids, stopped: bool) -> str:
    """The text of completion ids, without the stop token it ended on."""
    ids = [int(t) for t in ids]
    return self.tokenizer.decode(ids[:-1] if stopped and ids else ids)

  def _host_rewards(self, fn, split: str, index_R, ro: rl.Rollout) -> jax.Array:
    """`fn`'s rewards of a rollout, computed on the host from inside jit (module docstring)."""
    args = (index_R, ro.tokens_BxL, ro.prompt_len_B, ro.length_B, ro.stopped_B)
    args = jax.tree.map(lambda x: jax.sharding.reshard(x, jax.P()), args)  # one host gets all
    return jax.pure_callback(functools.partial(self._score_on_host, fn, split),
                             jax.ShapeDtypeStruct(index_R.shape, jnp.float32), *args)

  def collect(self, state, batch, frozen):
    g = self.config.grpo
    n = g.num_generations
    r = batch['prompt'].shape[0] * n
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    seed_key, reward_key = jax.random.split(key)

    index_R = repeat_rows(batch['index'], n)
    ro = rl.rollout(self.graphdef, state.params, repeat_rows(batch['prompt'], n),
                    repeat_rows(batch['prompt_len'], n), max_new_tokens=g.max_new_tokens,
                    sampling_params=self._sampling_params(r), seeds_B=rl.rollout_seeds(seed_key, r),
                    stop_ids=self.stop_ids, vocab_limit=self.tokenizer.vocab_size)
    if self.reward_fn is None:  # the control: a fair coin per completion
      rewards_R = jax.random.bernoulli(reward_key, 0.5, (r,)).astype(jnp.float32)
    else:
      rewards_R = self._host_rewards(self.reward_fn, 'train', index_R, ro)
    out = {'tokens': ro.tokens_BxL, 'prompt_len': ro.prompt_len_B, 'length': ro.length_B,
           'mask': ro.completion_mask_BxL, 'stopped': ro.stopped_B,
           'sample_logp': ro.logprobs_BxL, 'rewards': rewards_R,
           'advantages': rl.group_advantages(rewards_R, n, scale=g.scale_rewards)}
    score = functools.partial(rl.token_logprobs, rollout_=ro, temperature=g.temperature,
                              vocab_limit=self.tokenizer.vocab_size)
    if g.num_iterations > 1:  # the rollout policy, fixed while the params move
      out['old_logp'] = score(self.graphdef, state.params)
    reference = self._reference()
    if reference == 'model':
      out['ref_logp'] = score(self.graphdef, frozen['ref'])
    elif reference == 'lora_base':
      out['ref_logp'] = score(self.graphdef, lora.disabled(state.params))
    return jax.tree.map(jax.lax.stop_gradient, out)

  # --- update ----------------------------------------------------------------

  @staticmethod
  def rollout_of(batch) -> rl.Rollout:
    return rl.Rollout(tokens_BxL=batch['tokens'], prompt_len_B=batch['prompt_len'],
                      length_B=batch['length'], completion_mask_BxL=batch['mask'],
                      logprobs_BxL=batch['sample_logp'], stopped_B=batch['stopped'])

  def _loss(self, params, batch, dropout_key=None, frozen=None):
    """(GRPO objective, metrics) of a rollout batch (module docstring)."""
    del dropout_key, frozen
    g = self.config.grpo
    mask = batch['mask']
    logp, ent = rl.token_logprobs(self.graphdef, params, self.rollout_of(batch),
                                  temperature=g.temperature,
                                  vocab_limit=self.tokenizer.vocab_size, with_entropy=True)
    old = batch['old_logp'] if 'old_logp' in batch else jax.lax.stop_gradient(logp)
    loss, metrics = rl.clipped_policy_loss(
        logp, old, batch['advantages'], mask, clip_low=g.clip_low, clip_high=g.clip_high,
        aggregation=g.loss_aggregation, max_len=g.max_new_tokens)
    if 'ref_logp' in batch:
      kl = rl.kl_estimate(logp, batch['ref_logp'], 'k3')
      loss = loss + g.beta * rl.aggregate(kl, mask, g.loss_aggregation, g.max_new_tokens)
      metrics['kl'] = rl.masked_mean(jax.lax.stop_gradient(kl), mask)
    metrics['entropy'] = rl.masked_mean(jax.lax.stop_gradient(ent), mask)
    return loss, metrics

  def train_step(self, state, batch, frozen):
    del frozen  # the reference was read in `collect`
    g = self.config.grpo
    rollout_keys = ('tokens', 'prompt_len', 'length', 'mask', 'stopped', 'sample_logp',
                    'advantages', 'old_logp', 'ref_logp')
    train_batch = {k: batch[k] for k in rollout_keys if k in batch}

    def update(carry, _):
      params, opt_state = carry
      (loss, aux), grads = self.opt.value_and_grad(self._loss, params, train_batch,
                                                   self.config.grad_accum, opt_state=opt_state)
      params, opt_state, upd = self.opt.apply(params, opt_state, grads, loss)
      return (params, opt_state), {'loss': loss, **aux, **upd}

    (params, opt_state), per_update = jax.lax.scan(
        update, (state.params, state.opt_state), length=g.num_iterations)
    metrics = {k: jnp.mean(v) for k, v in per_update.items()}
    metrics['skipped'] = jnp.max(per_update['skipped'])
    metrics.update(self._rollout_metrics(batch))
    metrics['lr'] = self.opt.schedule(state.step * g.num_iterations)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def _rollout_metrics(self, batch) -> dict[str, jax.Array]:
    g = self.config.grpo
    rewards_R = batch['rewards']
    std_N = rl.group_std(rewards_R, g.num_generations)
    lengths_R = (batch['length'] - batch['prompt_len']).astype(jnp.float32)
    name = 'random' if self.reward_fn is None else g.reward.split(':')[0]
    return {
        'reward': jnp.mean(rewards_R),
        f'rewards/{name}/mean': jnp.mean(rewards_R),
        'reward_std': jnp.mean(std_N),
        'frac_reward_zero_std': jnp.mean((std_N < 1e-6).astype(jnp.float32)),
        'completions/mean_length': jnp.mean(lengths_R),
        'completions/min_length': jnp.min(lengths_R),
        'completions/max_length': jnp.max(lengths_R),
        'completions/clipped_ratio': 1.0 - jnp.mean(batch['stopped'].astype(jnp.float32)),
    }

  # --- evaluation --------------------------------------------------------------

  def eval_batches(self):
    return iter(())  # evaluation generates; see eval_summary

  def eval_rollouts(self, params, prompts: Prompts, count: int,
                    greedy: bool = True) -> rl.Rollout:
    """Completions of the first `count` prompts, greedy or sampled as in training (seeds
    0, 1, ...: the same draws at every evaluation), gathered to host, in chunks of
    batch_size * G rows (one compiled program for any count)."""
    chunk = self.config.batch_size * self.config.grpo.num_generations
    fn = self._eval_fn(chunk)
    settings = jax.device_get(self._sampling_params(chunk, greedy=greedy))
    outs = []
    for start in range(0, count, chunk):
      rows = [prompts[i % len(prompts)] for i in range(start, start + chunk)]
      stacked = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
      seeds = np.arange(start, start + chunk, dtype=np.int32)
      outs.append(jax.device_get(fn(params, stacked['prompt'], stacked['prompt_len'], seeds,
                                    settings)))
    return jax.tree.map(lambda *x: np.concatenate(x)[:count], *outs)

  @functools.cache  # noqa: B019  (one compiled program per chunk size, greedy or not)
  def _eval_fn(self, rows: int):
    g = self.config.grpo

    def run(params, prompt_BxP, prompt_len_B, seeds_B, settings):
      return rl.rollout(self.graphdef, params, prompt_BxP, prompt_len_B,
                        max_new_tokens=g.max_new_tokens, sampling_params=settings,
                        seeds_B=seeds_B, stop_ids=self.stop_ids,
                        vocab_limit=self.tokenizer.vocab_size)
    return jax.jit(run)

  def eval_summary(self, sums, state):
    """`eval/accuracy`: the mean `grpo.eval_reward` of greedy completions of the held-out
    prompts; `eval/reward`: the same of completions sampled as in training (TRL's eval
    reward, pass@1 at the training temperature)."""
    del sums
    count = min(self.config.grpo.eval_prompts, len(self.eval_prompts))
    out = {}
    for name, greedy in (('accuracy', True), ('reward', False)):
      ro = self.eval_rollouts(state.params, self.eval_prompts, count, greedy)
      scores = self._score_on_host(self.eval_reward_fn, 'validation', np.arange(count),
                                   ro.tokens_BxL, ro.prompt_len_B, ro.length_B, ro.stopped_B)
      out[f'eval/{name}'] = float(np.mean(scores))
      if greedy:
        out['eval/completions/mean_length'] = float(np.mean(ro.length_B - ro.prompt_len_B))
    return {**out, **self.task_evals(state)}

  def samples(self, state, seed: int) -> dict[str, str]:
    """Greedy completions of the first held-out prompts, one per line."""
    del seed
    ro = self.eval_rollouts(state.params, self.eval_prompts, min(8, len(self.eval_prompts)))
    lines = []
    for i, (row, p, n, stop) in enumerate(zip(ro.tokens_BxL, ro.prompt_len_B, ro.length_B,
                                              ro.stopped_B, strict=True)):
      problem = self.problems['validation'][i]
      completion = self.completion_text(row[p:n], stop)
      lines.append(f'{problem["prompt"]!r} -> {completion!r} '
                   f'(reward {self.eval_reward_fn(problem["prompt"], completion, problem)})')
    return {'samples/text': '\n'.join(lines)}

  # --- accounting ------------------------------------------------------------

  def items_per_step(self) -> int:
    return self.config.batch_size * self.config.grpo.num_generations

  def flops_per_step(self) -> float:
    return 0.0  # generation dominates and has no simple count; see docs/benchmarks.md
