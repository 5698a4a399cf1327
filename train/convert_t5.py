"""Hugging Face T5 checkpoints (T5ForConditionalGeneration: T5 v1.0, v1.1, flan-t5, mT5's
layout) in and out of Kiln's seq2seq family (model/seq2seq.py). `python -m train.convert`
dispatches here on `model_type == 't5'` (import) and on a run's `task == 'seq2seq'`
(export); the safetensors reading, staging, shard planning and tokenizer copying are
train/hf_files.py's, shared with it.

Import writes a run directory: config.json (task='seq2seq', the model keys), an orbax
checkpoint at step 0 whose state holds `params` (and the step; no optimizer state: a
seq2seq run starts from it with `--config.init_from=DIR`, which builds a fresh one), and the
tokenizer: the HF `spiece.model` as Kiln's SentencePiece with T5's layout (pad 0, EOS 1,
unknown 2, the `extra_ids` sentinels `<extra_id_i>` = vocab_size - 1 - i above its pieces)
plus the HF tokenizer files, kept for export.

The head: T5 v1.0 ties it to the embedding and scales the decoder output by d_model ** -0.5
(Kiln's tie_embeddings=True); v1.1 has a separate `lm_head.weight` and no scale
(tie_embeddings=False). HF's config says which by `tie_word_embeddings` (transformers < 5)
or `scale_decoder_outputs` (transformers 5, which always writes tie_word_embeddings=true and
drops an lm_head equal to the embedding from the file); an unscaled model whose file has no
`lm_head.weight` gets the embedding as its untied head.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from configs import seq2seq as seq2seq_config
from data import storage, tokenizers
from data.errors import ConfigError, DataError
from model import run_params, seq2seq
from train import checkpoint, hf_files, trainer
from train import mesh as mesh_lib
from train.runs import load_run_config
from train.state import TrainState

# Tied copies of the embedding that some files carry, and a tensor HF itself ignores.
IGNORED = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight',
           'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight')
SPM_NAMES = ('spiece.model', 'tokenizer.model')  # T5's SentencePiece, as HF saves it
DEFAULT_EXTRA_IDS = 100  # T5's sentinels when the HF tokenizer config does not say


# ---------------------------------------------------------------------------
# config.json <-> config.model.
# ---------------------------------------------------------------------------


def _scaled(hf: dict) -> bool:
  """Whether HF scales the decoder output by d_model ** -0.5 (T5 v1.0's tied head)."""
  if 'scale_decoder_outputs' in hf:
    return bool(hf['scale_decoder_outputs'])
  return hf.get('tie_word_embeddings', True) is not False


def model_keys_from_hf(hf: dict) -> dict:
  """`config.model` keys (configs/seq2seq.py) for a T5 config.json.

  Raises:
    ConfigError: a T5 variant Kiln's model does not express, naming the key.
  """
  proj = hf.get('feed_forward_proj', 'relu')
  mlp = {'relu': 'relu', 'gated-gelu': 'gated-gelu', 'gated-gelu_new': 'gated-gelu',
         'gated-silu': 'gated-silu'}.get(proj)
  if mlp is None:
    raise ConfigError(f'Unsupported HF T5 model: feed_forward_proj={proj!r}; Kiln has relu, '
                      'gated-gelu (tanh GELU, as HF\'s gelu_new) and gated-silu.')
  if hf.get('is_gated_act') is False and mlp != 'relu':
    raise ConfigError(f'Unsupported HF T5 model: is_gated_act=false with {proj!r}.')
  return dict(
      d_model=int(hf['d_model']), num_heads=int(hf['num_heads']), head_dim=int(hf['d_kv']),
      mlp_dim=int(hf['d_ff']), encoder_layers=int(hf['num_layers']),
      decoder_layers=int(hf.get('num_decoder_layers') or hf['num_layers']), mlp=mlp,
      position='relative', relative_buckets=int(hf.get('relative_attention_num_buckets', 32)),
      relative_max_distance=int(hf.get('relative_attention_max_distance', 128)),
      tie_embeddings=_scaled(hf), dropout=0.0,
      norm_eps=float(hf.get('layer_norm_epsilon', 1e-6)),
      decoder_start_id=int(hf.get('decoder_start_token_id') or 0))


def hf_config(cfg: seq2seq.Seq2SeqConfig, dtype: str, original: dict | None) -> dict:
  """The HF config.json of a Kiln seq2seq model; the keys Kiln does not model (token ids,
  task_specific_params, ...) come from the imported `original` when there is one.

  Raises:
    ConfigError: the model has RoPE, which HF's T5 does not.
  """
  if cfg.position != 'relative':
    raise ConfigError(f"Exporting to HF T5 needs model.position='relative'; this run has "
                      f'{cfg.position!r}, which T5 does not express.')
  out = dict(original or {}) if (original or {}).get('model_type') == 't5' else {
      'pad_token_id': 0, 'eos_token_id': 1}
  for key in ('dense_act_fn', 'is_gated_act', 'transformers_version', 'torch_dtype'):
    out.pop(key, None)  # derived by transformers from the keys below
  out.update(
      architectures=['T5ForConditionalGeneration'], model_type='t5',
      vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.mlp_dim,
      num_layers=cfg.encoder_layers, num_decoder_layers=cfg.decoder_layers,
      num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_buckets,
      relative_attention_max_distance=cfg.relative_max_distance,
      dropout_rate=cfg.dropout, layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=cfg.mlp,
      is_encoder_decoder=True, tie_word_embeddings=cfg.tie_embeddings,
      scale_decoder_outputs=cfg.tie_embeddings, decoder_start_token_id=cfg.decoder_start_id,
      dtype=dtype)
  return out


# ---------------------------------------------------------------------------
# The tensor map.
# ---------------------------------------------------------------------------


def tensor_map(cfg: seq2seq.Seq2SeqConfig) -> list[hf_files.Tensor]:
  """Every Kiln parameter of `cfg` and its HF tensor (`{i}`: the layer of a stacked one).
  An untied head is HF's lm_head [V, D] transposed; attention projections are HF's
  [H * Dh, D] Linear split into heads; T5's one relative-bias table per stack lives in HF's
  layer 0."""
  d, h, dh, f, v = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  same, t = hf_files.same, hf_files.transpose
  proj_in = (lambda w: w.T.reshape(d, h, dh), lambda x: x.reshape(d, h * dh).T)
  proj_out = (lambda w: w.T.reshape(h, dh, d), lambda x: x.reshape(h * dh, d).T)

  def attention(kiln: str, hf: str) -> list[tuple]:
    return [((kiln, f'w{n}'), f'{hf}.{n}.weight', (h * dh, d), *proj_in) for n in 'qkv'] + [
        ((kiln, 'wo'), f'{hf}.o.weight', (d, h * dh), *proj_out)]

  def mlp(layer: int) -> list[tuple]:
    hf = f'layer.{layer}.DenseReluDense'
    ins = [('w_up', 'wi')] if cfg.mlp == 'relu' else [('w_gate', 'wi_0'), ('w_up', 'wi_1')]
    return [(('mlp', k), f'{hf}.{n}.weight', (f, d), t, t) for k, n in ins] + [
        (('mlp', 'w_down'), f'{hf}.wo.weight', (d, f), t, t)]

  def norm(kiln: str, layer: int) -> tuple:
    return ((kiln, 'scale'), f'layer.{layer}.layer_norm.weight', (d,), same, same)

  encoder = [norm('attn_norm', 0), *attention('attn', 'layer.0.SelfAttention'),
             norm('mlp_norm', 1), *mlp(1)]
  decoder = [norm('self_norm', 0), *attention('self_attn', 'layer.0.SelfAttention'),
             norm('cross_norm', 1), *attention('cross_attn', 'layer.1.EncDecAttention'),
             norm('mlp_norm', 2), *mlp(2)]
  out = [hf_files.Tensor(('embedding',), 'shared.weight', (v, d), same, same)]
  if not cfg.tie_embeddings:
    out.append(hf_files.Tensor(('lm_head',), 'lm_head.weight', (v, d), t, t))
  for stack, blocks in (('encoder', encoder), ('decoder', decoder)):
    out.append(hf_files.Tensor((stack, 'final_norm', 'scale'), f'{stack}.final_layer_norm.weight',
                              (d,), same, same))
    if cfg.position == 'relative':
      out.append(hf_files.Tensor(
          (stack, 'rel_bias', 'embedding'),
          f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
          (cfg.relative_buckets, h), same, same))
    out += [hf_files.Tensor((stack, 'blocks', *path), f'{stack}.block.{{i}}.{name}', shape, *fns)
            for path, name, shape, *fns in blocks]
  return out


def _layers(t: hf_files.Tensor, cfg: seq2seq.Seq2SeqConfig) -> list[str]:
  """The HF names behind `t`: one, or one per layer of its stack."""
  if '{i}' not in t.hf:
    return [t.hf]
  n = cfg.encoder_layers if t.kiln[0] == 'encoder' else cfg.decoder_layers
  return [t.hf.format(i=i) for i in range(n)]


# ---------------------------------------------------------------------------
# Import.
# ---------------------------------------------------------------------------


def _check_names(reader: hf_files.SafetensorsReader, tensors: list[hf_files.Tensor],
                 cfg: seq2seq.Seq2SeqConfig) -> None:
  """Raises DataError naming missing, unexpected, misshapen or non-float tensors."""
  expected = {n: t.hf_shape for t in tensors for n in _layers(t, cfg)}
  names = reader.names()
  head_from_embedding = not cfg.tie_embeddings and 'lm_head.weight' not in names
  missing = sorted(set(expected) - names - ({'lm_head.weight'} if head_from_embedding else set()))
  if missing:
    raise DataError(f'The HF T5 checkpoint lacks {len(missing)} tensor(s) config.json needs: '
                    f'{", ".join(missing[:8])}{" ..." if len(missing) > 8 else ""}.')
  unexpected = sorted(names - set(expected) - set(IGNORED) - {'lm_head.weight'})
  if unexpected:
    raise DataError(f'The HF T5 checkpoint has {len(unexpected)} tensor(s) config.json does '
                    f'not explain: {", ".join(unexpected[:8])}'
                    f'{" ..." if len(unexpected) > 8 else ""}. Is it the config of these weights?')
  for name, shape in expected.items():
    if name in names and reader.shapes[name] != shape:
      raise DataError(f'HF tensor {name} has shape {reader.shapes[name]}; config.json implies '
                      f'{shape}.')
    if name in names and reader.dtypes[name] not in hf_files.FLOAT_DTYPES:
      raise DataError(f'HF tensor {name} has dtype {reader.dtypes[name]}; expected one of '
                      f'{", ".join(hf_files.FLOAT_DTYPES)}.')
  if cfg.tie_embeddings and 'lm_head.weight' in names and not np.array_equal(
      reader.read('lm_head.weight'), reader.read('shared.weight')):
    raise ConfigError('Unsupported HF T5 model: its lm_head differs from the embedding but '
                      'config.json scales the decoder output (tie_word_embeddings / '
                      'scale_decoder_outputs): Kiln ties a scaled head to the embedding.')


def load_params(reader: hf_files.SafetensorsReader, cfg: seq2seq.Seq2SeqConfig,
                abstract_params: dict, shardings: dict) -> dict:
  """Kiln's params, each built in its NamedSharding from its HF tensor(s): a parameter is
  read and converted once, when the first of its shards is asked for."""
  tensors = tensor_map(cfg)
  _check_names(reader, tensors, cfg)
  by_path = {t.kiln: t for t in tensors}
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  paths = {tuple(k.key for k in p) for p, _ in flat}
  if paths != set(by_path):  # a bug in tensor_map, not a user error
    raise AssertionError(f'tensor_map does not cover the model: {paths ^ set(by_path)}')

  def build(path, abstract):
    t = by_path[path]
    cache = []

    def callback(index):
      if not cache:
        names = _layers(t, cfg)
        if names == ['lm_head.weight'] and 'lm_head.weight' not in reader.names():
          names = ['shared.weight']  # an unscaled model saved with its head tied
        parts = [t.to_kiln(reader.read(n)) for n in names]
        full = parts[0] if '{i}' not in t.hf else np.stack(parts)
        cache.append(hf_files.cast(full, abstract.dtype, t.hf))
      return cache[0][tuple(index)]

    return jax.make_array_from_callback(abstract.shape, _get(shardings, path), callback)

  return jax.tree_util.tree_map_with_path(
      lambda p, a: build(tuple(k.key for k in p), a), abstract_params)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _extra_ids(hf_dir: str) -> int:
  """How many `<extra_id_i>` sentinels the HF tokenizer has (tokenizer_config.json's
  `extra_ids`, or the sentinels among its added tokens; T5's 100 without a config)."""
  path = os.path.join(hf_dir, 'tokenizer_config.json')
  if not os.path.exists(path):
    return DEFAULT_EXTRA_IDS
  tok = hf_files.read_json(path)
  if tok.get('extra_ids'):
    return int(tok['extra_ids'])
  added = [v.get('content', '') for v in (tok.get('added_tokens_decoder') or {}).values()]
  added += [a if isinstance(a, str) else a.get('content', '')
            for a in tok.get('additional_special_tokens') or tok.get('extra_special_tokens') or []]
  return len({a for a in added if a.startswith('<extra_id_')})


def import_t5(hf_dir: str, workdir: str, *, param_dtype: str = 'float32',
              dtype: str = 'bfloat16', fsdp: int = 1, tensor: int = 1,
              overwrite: bool = False) -> None:
  """Converts the HF T5 checkpoint in `hf_dir` into a Kiln seq2seq run directory."""
  hf_files.check_target(workdir, '--workdir', overwrite)
  hf = hf_files.read_json(os.path.join(hf_dir, 'config.json'))
  config = seq2seq_config.base()
  config.model.update(model_keys_from_hf(hf), dtype=dtype, param_dtype=param_dtype)
  config.mesh.update(data=1 if -1 in (fsdp, tensor) else -1, fsdp=fsdp, tensor=tensor)
  config.checkpoint.async_save = False
  spm_proto = hf_files.read_spm(hf_dir, SPM_NAMES)
  tok = None
  if spm_proto is not None:
    tok = dict(kind='sentencepiece', vocab_size=hf_files.piece_count(spm_proto),
               model_type=hf_files.spm_model_type(spm_proto), train_chars=0,
               extra_ids=_extra_ids(hf_dir))
    if 'data' in config and 'tokenizer' in config.data:  # the seq2seq task's schema
      config.data.tokenizer.update(tok)
  vocab = int(hf['vocab_size'])
  rows = -(-(tok['vocab_size'] + tok['extra_ids']) // 128) * 128 if tok else vocab
  if rows != vocab:
    raise ConfigError(
        f'{hf_dir}: the tokenizer has {tok["vocab_size"]} pieces and {tok["extra_ids"]} '
        f'sentinels, which Kiln rounds up to {rows} vocabulary rows, but config.json has '
        f'vocab_size={vocab}.')
  try:
    cfg = seq2seq.Seq2SeqConfig.from_config(config.model, vocab_size=vocab)
  except ValueError as e:
    raise ConfigError(f'{hf_dir}/config.json: {e}') from None
  if cfg.vocab_size != vocab:
    raise ConfigError(f'{hf_dir}/config.json has vocab_size={vocab}; Kiln\'s seq2seq models '
                      'have a multiple of 128 rows (T5\'s 32128, mT5\'s 250112).')

  mesh = mesh_lib.make_mesh(config.mesh)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: seq2seq.Seq2Seq(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
  abstract_params = nnx.to_pure_dict(state)
  shardings = mesh_lib.shardings(abstract_params, specs, mesh, seq2seq.LOGICAL_AXIS_RULES)
  params = load_params(hf_files.SafetensorsReader(hf_dir), cfg, abstract_params, shardings)
  rng = jax.random.key_data(jax.random.key(config.seed))
  train_state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state={},
                           rng=rng, extras={})

  with hf_files.Staging(workdir, overwrite) as tmp:
    trainer.write_config(config, tmp)
    hf_files.copy_tokenizer(hf_dir, tmp, spm_proto, ml_collections.ConfigDict(
        {'data': {'tokenizer': tok or {}}}))
    if tok is not None:  # the spec with `extra_ids`: data/tokenizers.py's T5 id layout
      meta = {'config': {**tokenizers.tokenizer_spec(ml_collections.ConfigDict(tok)),
                         'extra_ids': tok['extra_ids']}}
      storage.write_atomic(os.path.join(tmp, 'tokenizer', tokenizers.META_FILE),
                           json.dumps(meta, indent=1).encode())
    ckpt = checkpoint.Checkpointer(tmp, config.checkpoint)
    ckpt.save(0, train_state, None)
    ckpt.wait()
    ckpt.close()
  logging.info('Imported %s (T5, %d parameters) into %s.', hf_dir, seq2seq.count_params(cfg),
               workdir)


# ---------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------


def load_run(workdir: str) -> tuple[seq2seq.Seq2SeqConfig, dict, int]:
  """(model config, host params, step) of the newest checkpoint of a seq2seq run: the
  vocabulary from the checkpoint's embedding, the rest from config.json."""
  config = load_run_config(workdir)
  step = run_params.latest_step(workdir)
  if step is None:
    raise ConfigError(f'{workdir} has no checkpoint to export.')
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(run_params.checkpoints_dir(workdir) / str(step) /
                                 run_params.STATE_ITEM).item_metadata
  try:
    rows = int(tree['params']['embedding'].shape[0])
  except (KeyError, TypeError):
    raise DataError(f'{workdir}: the checkpoint has no params/embedding; is it a seq2seq '
                    'run?') from None
  try:
    cfg = seq2seq.Seq2SeqConfig.from_config(config.model, vocab_size=rows)
  except ValueError as e:
    raise ConfigError(f'{workdir}/config.json: {e}') from None
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: seq2seq.Seq2Seq(cfg, rngs=nnx.Rngs(0)))
  abstract_params = run_params.on_one_device(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  params, step = run_params.restore_params(workdir, abstract_params, step=step)
  return cfg, jax.device_get(params), step


def export_t5(workdir: str, hf_dir: str, *, dtype: str = '', max_shard_gb: float = 5.0,
              overwrite: bool = False) -> None:
  """Writes the newest checkpoint of the seq2seq run in `workdir` as an HF T5 model
  (model.safetensors, split with an index above `max_shard_gb`)."""
  from safetensors.numpy import save_file

  hf_files.check_target(hf_dir, '--hf_dir', overwrite)
  cfg, params, step = load_run(workdir)
  out_dtype = np.dtype(seq2seq.DTYPES[dtype] if dtype else cfg.param_dtype)
  if out_dtype not in (np.float32, np.float16, jnp.bfloat16):
    raise ConfigError(f'--dtype={dtype!r}: choose float32, bfloat16 or float16.')
  original_path = os.path.join(workdir, 'tokenizer', hf_files.HF_TOKENIZER_DIR, 'config.json')
  original = hf_files.read_json(original_path) if os.path.exists(original_path) else None
  dtype_name = {np.dtype(np.float32): 'float32', np.dtype(np.float16): 'float16',
                np.dtype(jnp.bfloat16): 'bfloat16'}[out_dtype]
  config = hf_config(cfg, dtype_name, original)
  tensors = {}
  for t in tensor_map(cfg):
    value = np.asarray(_get(params, t.kiln))
    for i, name in enumerate(_layers(t, cfg)):
      tensors[name] = np.ascontiguousarray(t.to_hf(value[i] if '{i}' in t.hf else value),
                                           out_dtype)
  nbytes = {n: x.nbytes for n, x in tensors.items()}
  shards = hf_files.plan_shards(list(tensors), nbytes, int(max_shard_gb * 2**30))
  with hf_files.Staging(hf_dir, overwrite) as tmp:
    weight_map = {}
    for k, names in enumerate(shards):
      file = ('model.safetensors' if len(shards) == 1 else
              f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors')
      save_file({n: tensors[n] for n in names}, os.path.join(tmp, file),
                metadata={'format': 'pt'})
      weight_map.update({n: file for n in names})
    if len(shards) > 1:
      hf_files.write_json(os.path.join(tmp, 'model.safetensors.index.json'), {
          'metadata': {'total_size': sum(nbytes.values())}, 'weight_map': weight_map})
    hf_files.write_json(os.path.join(tmp, 'config.json'), config)
    _export_tokenizer(workdir, tmp, config)
  logging.info('Exported step %d of %s as T5 into %s.', step, workdir, hf_dir)


def _export_tokenizer(workdir: str, hf_dir: str, config: dict) -> None:
  """The HF tokenizer files kept at import, as they were; for a run with its own T5-layout
  SentencePiece, `spiece.model` and a tokenizer_config.json naming its sentinels, which
  transformers' T5Tokenizer reads."""
  kept = os.path.join(workdir, 'tokenizer', hf_files.HF_TOKENIZER_DIR)
  if os.path.isdir(kept):
    for name in set(os.listdir(kept)) - {'config.json'}:
      with open(os.path.join(kept, name), 'rb') as f:
        storage.write_atomic(os.path.join(hf_dir, name), f.read())
  spm_path = os.path.join(workdir, 'tokenizer', tokenizers.SPM_FILE)
  meta_path = os.path.join(workdir, 'tokenizer', tokenizers.META_FILE)
  if not os.path.isdir(kept) and os.path.exists(spm_path) and os.path.exists(meta_path):
    extra = int(hf_files.read_json(meta_path)['config'].get('extra_ids', 0))
    with open(spm_path, 'rb') as f:
      storage.write_atomic(os.path.join(hf_dir, 'spiece.model'), f.read())
    hf_files.write_json(os.path.join(hf_dir, 'tokenizer_config.json'), {
        'tokenizer_class': 'T5Tokenizer', 'extra_ids': extra, 'eos_token': '</s>',
        'pad_token': '<pad>', 'unk_token': '<unk>',
        'model_max_length': int(1e30)})
  if not os.path.exists(os.path.join(hf_dir, 'generation_config.json')):
    hf_files.write_json(os.path.join(hf_dir, 'generation_config.json'), {
        'decoder_start_token_id': config['decoder_start_token_id'],
        'eos_token_id': config.get('eos_token_id', 1),
        'pad_token_id': config.get('pad_token_id', 0)})
