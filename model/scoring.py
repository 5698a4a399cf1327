"""Scoring documents with a trained Kiln LM: the mean next-token NLL of each.

The curation pipeline's perplexity filter (data/curate/stages.py) scores with
the newest checkpoint of an LM run directory. It reads the run itself, below
the trainer: the run's `config.json` and tokenizer rebuild the transformer, and
only the parameters are restored from the checkpoint, on one device.
"""

import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data import tokenizers
from data.errors import ConfigError, DataError
from model import run_params, transformer

Batch = dict[str, np.ndarray]
Scorer = Callable[[Sequence[str]], np.ndarray]


def load_scorer(run_dir: str, batch_rows: int = 8) -> Scorer:
  """`document_scorer` of the newest checkpoint of the LM run in `run_dir`."""
  config = _read_config(run_dir)
  if config.get('task', 'lm') != 'lm':
    raise ConfigError(f'{run_dir} is a {config["task"]!r} run; scoring documents needs an LM run.')
  tokenizer = tokenizers.load_tokenizer(run_dir)
  try:
    model_cfg = transformer.TransformerConfig.from_config(
        ml_collections.ConfigDict(config['model']), tokenizer.vocab_size)
  except ValueError as e:
    raise ConfigError(f'{run_dir}/config.json: {e}') from None
  with nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(
        lambda: transformer.Transformer(model_cfg, rngs=nnx.Rngs(params=0)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  abstract = run_params.on_one_device(nnx.to_pure_dict(abstract_params))
  params, _ = run_params.restore_params(run_dir, abstract)
  if params is None:
    raise DataError(f'{run_dir} has no checkpoint in {run_params.checkpoints_dir(run_dir)}; '
                    'train it first.')

  @jax.jit
  def batch_nll(params, batch: Batch) -> jax.Array:
    model = nnx.merge(graphdef, params)
    return token_nll(model(batch['inputs'], positions_BxL=batch['positions'],
                           segment_ids_BxL=batch['segment_ids']), batch['targets'])

  return document_scorer(lambda batch: batch_nll(params, batch), tokenizer,
                         config['data']['seq_len'], batch_rows)


def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """The negative log-likelihood of each target under its logits, float32 [B, L]."""
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32))
  return -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], -1)[..., 0]


def _read_config(run_dir: str) -> dict:
  path = os.path.join(run_dir, 'config.json')
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f'Cannot read {path} ({e}); give the --workdir of an LM training run.'
                    ) from None


def document_scorer(token_nll: Callable[[Batch], jax.Array], tokenizer: tokenizers.Tokenizer,
                    seq_len: int, batch_rows: int = 8) -> Scorer:
  """A function from documents to their mean next-token NLL (nats per token), float64 [D].

  Args:
    token_nll: an LM batch [batch_rows, seq_len] -> the NLL of every target, [B, L].

  A document is tokenized as in training (BOS first, when the tokenizer has
  one) and read in windows of seq_len + 1 tokens with stride seq_len, each
  window a fresh context, as the training batches are; every token after the
  first is predicted once. Documents with nothing to predict (no BOS and one
  token) score NaN. Windows go through the model `batch_rows` at a time, so
  one program serves all.
  """
  bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []

  def score(texts: Sequence[str]) -> np.ndarray:
    windows, owners = [], []
    for d, ids in enumerate(tokenizer.encode_batch(list(texts))):
      ids = bos + list(ids)
      for start in range(0, len(ids) - 1, seq_len):
        windows.append(ids[start:start + seq_len + 1])
        owners.append(d)
    nll_sum, count = np.zeros(len(texts)), np.zeros(len(texts))
    for lo in range(0, len(windows), batch_rows):
      batch, mask_BxL = _padded_batch(windows[lo:lo + batch_rows], batch_rows, seq_len)
      nll_BxL = np.asarray(token_nll(batch), np.float64)
      rows = np.asarray(owners[lo:lo + batch_rows])
      np.add.at(nll_sum, rows, (nll_BxL * mask_BxL)[:len(rows)].sum(axis=1))
      np.add.at(count, rows, mask_BxL[:len(rows)].sum(axis=1))
    with np.errstate(invalid='ignore'):
      return nll_sum / count

  return score


def _padded_batch(windows: list[list[int]], rows: int, seq_len: int) -> tuple[Batch, np.ndarray]:
  """An LM batch [rows, seq_len] of the windows, zero-padded, and the mask of real targets."""
  tokens_BxW = np.zeros((rows, seq_len + 1), np.int32)
  mask_BxL = np.zeros((rows, seq_len), np.float64)
  for i, window in enumerate(windows):
    tokens_BxW[i, :len(window)] = window
    mask_BxL[i, :len(window) - 1] = 1.0
  batch = {
      'inputs': tokens_BxW[:, :-1],
      'targets': tokens_BxW[:, 1:],
      # Padding is its own segment: real tokens never attend to it (nor could, being causal).
      'segment_ids': np.where(mask_BxL > 0, 1, 2).astype(np.int32),
      'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
  }
  return batch, mask_BxL
