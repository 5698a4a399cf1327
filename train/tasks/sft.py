"""Supervised fine-tuning: next-token loss on completion (or assistant) tokens only.

The LM task with another data pipeline (data/sft_pipeline.py: chat templates, loss
weights, packed rows with segment ids) and a loss averaged over the weighted tokens. The
model, warm start from `init_from` (a Kiln run or an HF import), optimizer, sampling and
export are the LM task's. Evaluation is the held-out completion loss.
"""

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from data import chat, sft_examples, sft_pipeline, tokenizers
from data.errors import check_choice, check_positive, require
from train import tasks
from train.tasks.lm import LMTask


def check_config(config: ml_collections.ConfigDict) -> None:
  check_choice(config, 'data.loss_on', ('completion', 'all'))
  check_positive(config, 'data.max_examples', allow_zero=True)
  for key in ('messages_field', 'prompt_field', 'completion_field'):
    require(bool(config.data[key]), f'data.{key} is empty; name the jsonl field.')


@tasks.register('sft')
class SFTTask(LMTask):
  data_sources = ('stdlib', 'addition', 'jsonl')

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    check_config(config)

  def setup_data(self, workdir: str, process_index: int, process_count: int):
    c = self.config
    if c.get('init_from'):
      self._copy_init_tokenizer(workdir)
    template = chat.load_chat_template(workdir, self._tokenizer(workdir))
    self.data = sft_pipeline.build_sft_data(
        c.data, template=template, seed=c.seed, global_batch_size=c.batch_size,
        eval_steps=c.eval_steps, process_index=process_index, process_count=process_count)
    self._set_tokenizer(tokenizers.load_tokenizer(workdir))
    return self.data.train

  def abstract_batch(self):
    """The LM windows plus float32 loss `weights` (data/sft_pipeline.py FIELDS)."""
    return self._window_batch(weights='float32')

  def _tokenizer(self, workdir: str) -> tokenizers.Tokenizer:
    """The run's tokenizer (copied from init_from), or one trained on the training texts."""
    directory = epath.Path(workdir) / 'tokenizer'
    if ((directory / tokenizers.META_FILE).exists()
        or (directory / tokenizers.HF_DIR / tokenizers.HF_FILE).exists()):
      return tokenizers.load_tokenizer(workdir)

    def texts():
      for e in sft_examples.read_examples(self.config.data, 'train', sft_examples.RowCounts()):
        yield ''.join(m['content'] for m in e.messages) if e.messages else e.prompt + e.completion

    return tokenizers.load_or_train_tokenizer(self.config.data.tokenizer, texts, workdir)

  def _loss(self, params, batch, dropout_key, frozen=None):
    """The mean NLL (and z-loss) over the tokens of weight 1, not over all positions."""
    del frozen
    logits_BxLxV = self._logits(params, batch, dropout_key).astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, batch['targets'][..., None], -1)[..., 0]
    weights_BxL = batch['weights']
    count = jnp.maximum(jnp.sum(weights_BxL), 1.0)
    nll = jnp.sum((lse_BxL - target_logit_BxL) * weights_BxL) / count
    z_loss = self.config.loss.z_loss * jnp.sum(jnp.square(lse_BxL) * weights_BxL) / count
    return nll + z_loss, {'loss': nll, 'z_loss': z_loss}

  def eval_step(self, state, batch, frozen):
    del frozen
    nll_BxL = self.token_nll(state.params, batch)
    return {'nll_sum': jnp.sum(nll_BxL * batch['weights']), 'tokens': jnp.sum(batch['weights'])}

  def samples(self, state, seed: int) -> dict[str, str]:
    """The greedy (by default) completion of the first held-out prompt."""
    s = self.config.sample
    prompt = s.prompt or (self.data.sample_prompt if self.data is not None else '')
    text = self.generate(self.inference_params(state), prompt,
                         max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                         top_k=s.top_k, top_p=s.top_p, seed=seed)
    return {'samples/text': text}
