"""Decoder-only language model.

Run (default preset `tiny`, the embedded CPython standard library corpus):

  python -m train --config=configs/lm.py --workdir=/tmp/kiln_tiny

Other presets: `configs/lm.py:nanogpt_cpu` (with --config.data.path=FILE),
`configs/lm.py:gpt2_124m`, `configs/lm.py:llama_1b`, `configs/lm.py:llama_7b`. Any key can be
overridden with `--config.a.b=value`. LoRA: `--config.model.lora.rank=16`; QLoRA adds
`--config.model.lora.base_quant=nf4` (both usually with `--config.init_from=DIR`).
"""

import ml_collections

from configs import common


def base() -> ml_collections.ConfigDict:
  """The LM schema: every key an LM run can have, with its default."""
  c = common.trainer_defaults()
  c.task = 'lm'
  # A run directory (python -m train, or python -m train.convert import) whose newest
  # checkpoint's parameters start this run, with a fresh optimizer at step 0. The model
  # architecture keys and the tokenizer come from that run; the rest from this config.
  c.init_from = ''

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=-1,  # -1: taken from the tokenizer.
      d_model=256,
      n_layers=4,
      n_heads=4,
      n_kv_heads=4,
      head_dim=-1,  # -1: d_model // n_heads.
      mlp_dim=-1,  # -1: 8/3 * d_model rounded up to a multiple of 64.
      rope_theta=10_000.0,
      tie_embeddings=True,
      norm_eps=1e-5,
      dropout=0.0,
      dtype='bfloat16',  # compute dtype
      param_dtype='float32',
      # What the backward pass keeps (model/transformer.py REMAT_POLICIES): none | full |
      # dots | offload_dots | outputs | offload_outputs (offload_*: in host memory).
      remat='none',
      attention='xla',  # xla | cudnn | pallas | auto (model/attention.py)
      # Layers per iteration of the scan over blocks; -1 unrolls them all (no loop). 1 keeps
      # compile time flat in depth; small CPU models run faster unrolled (docs/benchmarks.md).
      scan_unroll=1,
      # Block switches (model/transformer.py): the defaults are the Llama block; GPT-2 is
      # norm=layernorm, mlp=gelu_tanh, position=learned and all three biases.
      norm='rmsnorm',  # rmsnorm | layernorm
      mlp='swiglu',  # swiglu | gelu_tanh
      position='rope',  # rope | learned
      max_positions=-1,  # size of the learned position table (position=learned only)
      qkv_bias=False,  # biases on the q, k, v projections (Qwen2)
      attn_out_bias=False,  # bias on the attention output projection
      mlp_bias=False,  # biases on the MLP projections
      # Low-rank adapters (model/lora.py): with rank > 0 only the adapters train (the rest is
      # frozen, with no optimizer state); x @ W + alpha / rank * (dropout(x) @ A) @ B, B = 0
      # at the start. targets: a regex fully matching the projection names wq wk wv wo
      # w_gate w_up w_down. base_quant='nf4' stores the frozen base in NF4 (QLoRA;
      # model/quant.py), with the block scales in int8 when double_quant.
      lora=ml_collections.ConfigDict(dict(
          rank=0, alpha=16.0, dropout=0.0, targets='.*', base_quant='none', double_quant=True)),
  ))

  c.data = ml_collections.ConfigDict(dict(
      source='stdlib',  # stdlib | text | jsonl | tfds | synthetic | arrayrecord
      path='',  # file or glob for text/jsonl; data.tokenize's directory for arrayrecord
      name='',  # TFDS dataset name, e.g. 'tiny_shakespeare'
      data_dir='',  # TFDS data_dir ('' = TFDS default)
      text_field='text',  # jsonl/TFDS feature that holds the text
      val_fraction=0.1,  # held-out share for text/jsonl
      seq_len=256,  # context length
      tokenizer=ml_collections.ConfigDict(dict(
          kind='sentencepiece',  # sentencepiece | byte | char
          vocab_size=4096,
          model_type='bpe',  # bpe | unigram
          train_chars=20_000_000,  # at most this much text trains the SentencePiece model
      )),
  ))

  c.loss = ml_collections.ConfigDict(dict(z_loss=0.0))

  # Evaluation tasks (evals/, lm-eval's YAML format) run at each evaluation on the current
  # parameters and logged as eval/<task>/<metric>: comma-separated built-in names
  # (evals/tasks/<name>.yaml, e.g. 'stdlib_ppl,stdlib_completion') or YAML paths.
  # task_limit: documents per task (0: all the task has).
  c.eval = ml_collections.ConfigDict(dict(tasks='', task_limit=0))

  c.sample = ml_collections.ConfigDict(dict(
      prompt='',
      max_new_tokens=200,
      temperature=0.8,
      top_k=40,
      top_p=0.95,
      min_p=0.0,
  ))
  return c


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  c = base()
  preset = preset or 'tiny'
  if preset == 'tiny':
    # A ~1M parameter model over the stdlib corpus; 8 minutes on 2 CPU cores
    # (docs/benchmarks.md).
    c.steps = 1000
    c.batch_size = 16
    c.log_every = 50
    c.eval_every = 500
    c.eval_steps = 10
    c.checkpoint.every = 500
    # Unrolled layers: about 10% faster steps on CPU than the scan (docs/benchmarks.md).
    c.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, dtype='float32',
                   scan_unroll=-1)
    c.data.update(seq_len=128)
    c.data.tokenizer.update(vocab_size=2048)
    c.optimizer.update(lr=3e-3, warmup_steps=100, end_lr=3e-4)
    # No trailing space: SentencePiece joins a space to the word after it, so a prompt
    # ending in one asks for a lone-space token the model has rarely seen.
    c.sample.update(prompt='def', max_new_tokens=160)
  elif preset == 'nanogpt_cpu':
    # nanoGPT's CPU "baby GPT" (config/train_shakespeare_char.py with its CPU overrides).
    c.steps = 2000
    c.batch_size = 12
    c.log_every = 100
    c.eval_every = 500
    c.eval_steps = 20
    c.checkpoint.every = 1000
    c.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, dtype='float32',
                   scan_unroll=-1)
    c.data.update(source='text', path='', seq_len=64, val_fraction=0.1)
    c.data.tokenizer.update(kind='char')
    c.optimizer.update(lr=1e-3, warmup_steps=100, end_lr=1e-4, b2=0.99, weight_decay=0.1,
                       clip_norm=1.0)
    c.sample.update(prompt='\n', max_new_tokens=300)
  elif preset == 'gpt2_124m':
    c.steps = 600_000
    c.batch_size = 512
    c.log_every = 100
    c.eval_every = 2000
    c.eval_steps = 50
    c.checkpoint.every = 2000
    c.model.update(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=50304,
                   remat='dots')
    c.data.update(seq_len=1024)
    c.data.tokenizer.update(vocab_size=50304)
    c.optimizer.update(lr=6e-4, warmup_steps=2000, end_lr=6e-5, b2=0.95, weight_decay=0.1)
  elif preset == 'llama_1b':
    # Llama-3.2-1B shape.
    c.steps = 100_000
    c.batch_size = 256
    c.log_every = 10
    c.eval_every = 2000
    c.eval_steps = 20
    c.checkpoint.every = 1000
    c.model.update(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                   mlp_dim=8192, vocab_size=128256, rope_theta=500_000.0, remat='dots')
    c.data.update(seq_len=2048)
    c.data.tokenizer.update(vocab_size=32000)
    c.optimizer.update(lr=3e-4, warmup_steps=2000, end_lr=3e-5, b2=0.95, weight_decay=0.1)
  elif preset == 'llama_7b':
    # Llama-2-7B shape (untied head, no GQA), for fine-tuning an import:
    # --config.init_from=DIR; with --config.model.lora.rank=16 and
    # --config.model.lora.base_quant=nf4 it is QLoRA (docs/baselines/lora_memory.py).
    c.steps = 10_000
    c.batch_size = 64
    c.log_every = 10
    c.eval_every = 500
    c.eval_steps = 20
    c.checkpoint.every = 500
    c.model.update(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                   mlp_dim=11008, vocab_size=32000, tie_embeddings=False, remat='dots')
    c.data.update(seq_len=4096)
    c.data.tokenizer.update(vocab_size=32000)
    c.optimizer.update(lr=2e-5, warmup_steps=100, end_lr=2e-6, b2=0.95, weight_decay=0.0)
  else:
    raise ValueError(
        f'Unknown preset {preset!r} for configs/lm.py; choose one of '
        'tiny, nanogpt_cpu, gpt2_124m, llama_1b, llama_7b.')
  return c
