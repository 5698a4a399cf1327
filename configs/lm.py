"""Decoder-only language model.

Run (default preset `tiny`, the embedded CPython standard library corpus):

  python -m train --config=configs/lm.py --workdir=/tmp/kiln_tiny

Other presets: `configs/lm.py:nanogpt_cpu` (with --config.data.path=FILE),
`configs/lm.py:gpt2_124m`, `configs/lm.py:llama_1b`, `configs/lm.py:llama_7b`,
`configs/lm.py:llama_70b` (for memory plans: python -m launch.compile), and the mixtures of
experts `configs/lm.py:moe_cpu` and `configs/lm.py:mixtral_8x7b`. Any key can be
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
      # Long context (model/rope.py): RoPE scaling with HF's rope_scaling semantics. type:
      # none | linear | llama3 | yarn; original_max_positions is HF's
      # original_max_position_embeddings (llama3, yarn); low/high_freq_factor: llama3;
      # beta_fast, beta_slow, attention_factor (0: derived), mscale, mscale_all_dim,
      # truncate: yarn.
      rope_scaling=ml_collections.ConfigDict(dict(
          type='none', factor=1.0, original_max_positions=0, low_freq_factor=1.0,
          high_freq_factor=4.0, beta_fast=32.0, beta_slow=1.0, attention_factor=0.0,
          mscale=0.0, mscale_all_dim=0.0, truncate=True)),
      # Sliding-window attention (Mistral): a token sees itself and the sliding_window - 1
      # tokens before it, in training and in decoding; 0: every earlier token.
      sliding_window=0,
      tie_embeddings=True,
      norm_eps=1e-5,
      dropout=0.0,
      dtype='bfloat16',  # compute dtype
      param_dtype='float32',
      # What the backward pass keeps (model/transformer.py REMAT_POLICIES): none | full |
      # dots | offload_dots | outputs | offload_outputs (offload_*: in host memory).
      remat='none',
      attention='xla',  # xla | cudnn | pallas | auto (model/attention.py)
      # With mesh.context > 1 (model/context_parallel.py): each device holds chunks i and
      # 2C-1-i of the row's 2C, so all do the same causal work (data.seq_len % 2C == 0).
      context_load_balance=True,
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
      # Mixture of experts (model/moe.py): with n_experts > 0 every block's MLP is E SwiGLU
      # experts of width expert_mlp_dim (-1: mlp_dim), top_k of them per token. router:
      # topk_softmax (Mixtral) | softmax_topk (Qwen2-MoE, unrenormalised). shared_mlp_dim > 0
      # adds a dense shared expert, gated by sigmoid(x @ shared_gate) when shared_gate.
      # capacity_factor 0 is dropless; cf > 0 caps each expert at ceil(cf * tokens * k / E).
      # The load-balancing and router z-losses are added to the loss with these weights.
      # Expert parallelism: mesh.expert > 1 splits the experts (and the batch outside them).
      moe=ml_collections.ConfigDict(dict(
          n_experts=0, top_k=2, expert_mlp_dim=-1, shared_mlp_dim=0, shared_gate=False,
          router='topk_softmax', capacity_factor=0.0, balance_weight=0.01, z_weight=0.001)),
      # Pipeline parallelism, used when mesh.stage > 1 (model/pipeline.py): the layers split
      # evenly into stages and each forward's batch into `microbatches` (-1: 2 * mesh.stage).
      # schedule: gpipe | circular (MaxText's interleaved schedule: each stage runs `repeats`
      # non-contiguous chunks of layers; bubble (S-1)/(repeats*M+S-1) instead of (S-1)/(M+S-1)).
      pipeline=ml_collections.ConfigDict(dict(microbatches=-1, schedule='gpipe', repeats=1)),
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
  elif preset == 'llama_70b':
    # Llama-3-70B shape (GQA with 8 k/v heads, untied head, the Llama 3 vocabulary):
    # bf16 compute on float32 weights, full remat and FSDP over the whole slice; what
    # launch.compile plans (docs/benchmarks.md has its memory on TPU slices).
    c.steps = 10_000
    c.batch_size = 256
    c.log_every = 10
    c.eval_every = 500
    c.eval_steps = 20
    c.checkpoint.every = 500
    c.model.update(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
                   mlp_dim=28672, vocab_size=128256, rope_theta=500_000.0,
                   tie_embeddings=False, remat='full')
    c.data.update(seq_len=4096)
    c.data.tokenizer.update(vocab_size=32000)
    c.mesh.update(data=1, fsdp=-1)
    c.optimizer.update(lr=1.5e-4, warmup_steps=2000, end_lr=1.5e-5, b2=0.95, weight_decay=0.1)
  elif preset == 'moe_cpu':
    # `tiny` with 8 experts, top 2, each half tiny's MLP width: the same active parameters
    # per token as tiny (plus the router), 4x its MLP parameters. Trains on 2 CPU cores
    # (docs/baselines/moe_step.py compares its step time with tiny's).
    c = get_config('tiny')
    c.model.moe.update(n_experts=8, top_k=2, expert_mlp_dim=192)
  elif preset == 'mixtral_8x7b':
    # Mixtral-8x7B's shape (46.7B parameters, 12.9B active): 8 experts of width 14336, top 2,
    # experts split over the expert axis and everything else over fsdp.
    c.steps = 10_000
    c.batch_size = 256
    c.log_every = 10
    c.eval_every = 500
    c.eval_steps = 20
    c.checkpoint.every = 500
    c.model.update(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                   mlp_dim=14336, vocab_size=32000, rope_theta=1_000_000.0,
                   tie_embeddings=False, dtype='bfloat16', remat='full')
    # router_aux_loss_coef=0.02 in Mixtral's HF config.
    c.model.moe.update(n_experts=8, top_k=2, expert_mlp_dim=-1, balance_weight=0.02)
    c.mesh.update(data=1, fsdp=-1, expert=8)
    c.data.update(seq_len=4096)
    c.data.tokenizer.update(vocab_size=32000)
    c.optimizer.update(lr=3e-4, warmup_steps=2000, end_lr=3e-5, b2=0.95, weight_decay=0.1)
  else:
    raise ValueError(
        f'Unknown preset {preset!r} for configs/lm.py; choose one of '
        'tiny, nanogpt_cpu, gpt2_124m, llama_1b, llama_7b, llama_70b, moe_cpu, mixtral_8x7b.')
  return c
