"""Keys every family shares. Each family's config starts from these, so the
trainer, the checkpoints and the tools speak one language (see DESIGN.md)."""

import ml_collections


def trainer_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = ''  # which train/tasks module owns the math: lm | ...
  c.seed = 0
  c.steps = 1000
  c.batch_size = 32  # global, across all processes
  c.grad_accum = 1  # microbatches per step; batch_size must divide by it
  c.log_every = 50
  c.eval_every = 500  # 0 disables evaluation
  c.eval_steps = 10  # batches per evaluation
  c.max_nonfinite_steps = 20  # consecutive skipped steps before the run stops

  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=5))  # -1: off

  c.optimizer = ml_collections.ConfigDict(dict(
      name='adamw',
      lr=1e-3,
      warmup_steps=100,
      decay_steps=-1,  # -1: decay over all `steps`
      end_lr=1e-4,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      # Parameters whose path contains any of these names get no weight decay.
      no_decay=('norm', 'bias', 'embed'),
      clip_norm=1.0,  # 0 disables clipping
  ))
  return c
