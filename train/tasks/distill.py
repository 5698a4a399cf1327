"""Knowledge distillation: a student LM trained against a frozen teacher's logits.

The loss at every position mixes Hinton et al.'s soft-target term with the LM loss:

  loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * NLL(s)

with t and s the teacher's and student's logits over the tokenizer's real vocabulary
(padded rows dropped), T = `distill.temperature` and alpha = `distill.alpha`. The T^2
keeps the soft term's gradients on the scale of the hard term's as T changes.

The teacher (`distill.teacher`) is any Kiln run directory: a training run or
`python -m train.convert import` of a Hugging Face checkpoint. It is a frozen input: its
newest parameters are read at every start (resume included), never checkpointed, built
with its own architecture from its config.json, and sharded by the same logical rules as
the student. The student's data is the LM pipeline (the stdlib corpus by default).

Logits compare token by token, so teacher and student need one tokenizer. Without
`init_from`, the student takes the teacher's (copied into the workdir, as `init_from` does);
with `init_from`, the student keeps that run's, and a tokenizer that differs from the
teacher's is a config error naming both. Evaluation logs `eval/teacher_kl`, the held-out
KL(teacher || student) per token at temperature 1, beside the LM's `eval/loss`.
"""

import hashlib
import json

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx

from data import tokenizers
from data.errors import ConfigError, check_positive, require
from model import transformer
from train import mesh as mesh_lib
from train import tasks
from train.tasks import kit, lm


def distill_kl(teacher_logits, student_logits, temperature: float):
  """KL(softmax(teacher / T) || softmax(student / T)) over the last axis, float32 [...]."""
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def read_run_config(run_dir: str, key: str) -> dict:
  """The config.json of the run `run_dir`, named by config key `key` in errors."""
  path = epath.Path(run_dir) / 'config.json'
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f'{key}={run_dir!r}: cannot read its config.json ({e}); give the '
                      '--workdir of a training run or of `python -m train.convert import`.'
                      ) from None


def tokenizer_identity(run_dir: str) -> tuple[str, str]:
  """(a description, a digest of the files) of the tokenizer cached in `run_dir`."""
  directory = epath.Path(run_dir) / 'tokenizer'
  if not directory.is_dir():
    return 'no tokenizer', ''
  digest = hashlib.sha256()
  for path in _files_under(directory):
    digest.update(str(path.relative_to(directory)).encode() + b'\0' + path.read_bytes())
  meta = directory / tokenizers.META_FILE
  spec = json.loads(meta.read_text())['config'] if meta.exists() else {'kind': 'hf'}
  return f'{spec} (files {digest.hexdigest()[:12]})', digest.hexdigest()


def _files_under(directory: epath.Path) -> list[epath.Path]:
  """The files under `directory`, sorted, hidden ones left out (epath has no `**` on gs://)."""
  files = []
  for path in sorted(directory.iterdir(), key=lambda p: p.name):
    if path.name.startswith('.'):
      continue
    files += _files_under(path) if path.is_dir() else [path]
  return files


@tasks.register('distill')
class DistillTask(lm.LMTask):
  """The LM task with a frozen teacher in its loss (module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict):
    d = config.distill
    require(bool(d.teacher), 'distill.teacher is empty: give the --workdir of the teacher run '
            '(a Kiln training run or a `python -m train.convert import`).')
    check_positive(config, 'distill.temperature')
    require(0.0 <= d.alpha <= 1.0, f'distill.alpha={d.alpha!r} must be in [0, 1].')
    self.teacher_config = read_run_config(d.teacher, 'distill.teacher')
    if not config.get('init_from'):
      meta = epath.Path(d.teacher) / 'tokenizer' / tokenizers.META_FILE
      if meta.exists():  # the student takes the teacher's tokenizer (module docstring)
        config.data.tokenizer.update(json.loads(meta.read_text())['config'])
    super().__init__(config)
    self.teacher_graphdef = None

  def setup_data(self, workdir: str, process_index: int, process_count: int):
    d = self.config.distill
    if not self.config.get('init_from'):
      self._copy_init_tokenizer(workdir, d.teacher)
    train = super().setup_data(workdir, process_index, process_count)
    teacher, teacher_digest = tokenizer_identity(d.teacher)
    student, student_digest = tokenizer_identity(workdir)
    if teacher_digest != student_digest:
      source = (f'init_from={self.config.init_from!r}' if self.config.get('init_from')
                else 'data.tokenizer')
      raise ConfigError(
          f'The teacher distill.teacher={d.teacher!r} has tokenizer {teacher}, but the student '
          f'(from {source}) has {student}. Distillation compares logits token by token, so '
          'both need one tokenizer: start the student from a run with the teacher\'s tokenizer, '
          'or drop init_from to take the teacher\'s.')
    self._setup_teacher()
    return train

  def _setup_teacher(self) -> None:
    model = ml_collections.ConfigDict(self.teacher_config['model'])
    model.attention = self.config.model.attention  # how it computes here, not what it is
    vocab = tokenizers.load_tokenizer(self.config.distill.teacher).vocab_size
    try:
      self.teacher_cfg = transformer.TransformerConfig.from_config(model, vocab)
    except ValueError as e:
      raise ConfigError(f'distill.teacher={self.config.distill.teacher!r}: {e}') from None
    if model.get('position') == 'learned' and self.config.data.seq_len > model.max_positions:
      raise ConfigError(f'data.seq_len={self.config.data.seq_len} exceeds the teacher\'s '
                        f'model.max_positions={model.max_positions}.')
    self.teacher_graphdef, (self._teacher_specs,) = kit.abstract_split(
        lambda: transformer.Transformer(self.teacher_cfg,
                                        rngs=nnx.Rngs(params=jax.random.key(0))),
        nnx.Param, what='The teacher')

  def load_frozen(self, mesh):
    if self.teacher_graphdef is None:
      raise RuntimeError('setup_data builds the teacher; call it before load_frozen.')
    abstract = jax.eval_shape(lambda: kit.pure_state(kit.build(
        lambda: transformer.Transformer(self.teacher_cfg, rngs=nnx.Rngs(params=0))), nnx.Param))
    shardings = mesh_lib.shardings(abstract, self._teacher_specs, mesh, self.logical_rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    try:
      params, _ = kit.load_run_params(self.config.distill.teacher, target)
    except ConfigError as e:
      raise ConfigError(f'distill.teacher={e}') from None
    return {'teacher': params}

  # --- steps -----------------------------------------------------------------

  def _teacher_logits(self, teacher_params, batch):
    model = nnx.merge(self.teacher_graphdef, teacher_params)
    logits_BxLxV = model(batch['inputs'], positions_BxL=batch['positions'],
                         segment_ids_BxL=batch['segment_ids'])
    return jax.lax.stop_gradient(logits_BxLxV[..., :self.tokenizer.vocab_size])

  def _loss(self, params, batch, dropout_key, frozen=None):
    d = self.config.distill
    logits_BxLxV, aux = self._logits(params, batch, dropout_key, return_aux=True)
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, batch['targets'][..., None], -1)[..., 0]
    nll = jnp.mean(lse_BxL - target_logit_BxL)
    z_loss = self.config.loss.z_loss * jnp.mean(jnp.square(lse_BxL))
    moe_loss, moe_metrics = self._moe_terms(aux)
    teacher_BxLxV = self._teacher_logits(frozen['teacher'], batch)
    kd = d.temperature**2 * jnp.mean(distill_kl(
        teacher_BxLxV, logits_BxLxV[..., :self.tokenizer.vocab_size], d.temperature))
    loss = d.alpha * kd + (1.0 - d.alpha) * nll
    return loss + z_loss + moe_loss, {'loss': loss, 'kd_loss': kd, 'lm_loss': nll,
                                      'z_loss': z_loss, **moe_metrics}

  def eval_step(self, state, batch, frozen):
    sums = super().eval_step(state, batch, frozen)
    V = self.tokenizer.vocab_size
    student_BxLxV = self._logits(state.params, batch)[..., :V]
    kl_BxL = distill_kl(self._teacher_logits(frozen['teacher'], batch), student_BxLxV, 1.0)
    return {**sums, 'teacher_kl_sum': jnp.sum(kl_BxL)}

  def eval_summary(self, sums, state):
    out = super().eval_summary(sums, state)
    if sums:
      out['eval/teacher_kl'] = sums['teacher_kl_sum'] / max(sums['tokens'], 1.0)
    return out

  def flops_per_step(self) -> float:
    seq_len = self.config.data.seq_len
    teacher_forward = transformer.train_flops_per_token(self.teacher_cfg, seq_len) / 3.0
    return super().flops_per_step() + teacher_forward * self.items_per_step()
