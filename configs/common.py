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

  # resume_step: the checkpoint a rerun resumes from; -1 = the newest that reads. A one-off:
  # while it is set, every rerun goes back to that step.
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True,
                                                resume_step=-1))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, stage=1, fsdp=1, expert=1, context=1, tensor=1))
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
      clip_norm=1.0,  # 0 disables clipping
      # What trains, and how fast (train/optim.py). Parameter paths are keys joined by '/',
      # e.g. 'blocks/attn/wq'; patterns are regexes that must match the whole path.
      freeze='',  # e.g. 'embedding|blocks/attn/.*': these get no gradient and no state
      lr_mults=(),  # ((regex, multiplier), ...): first match scales the update; 0 holds still
      # ((regex, multiplier), ...) on weight_decay; first match wins. Default: no decay on
      # norms, biases and embeddings.
      wd_mults=(('(?i).*(norm|bias|embed).*', 0.0),),
      # Memory levers (train/optim.py). offload: the optimizer state (of `optimizer`, the
      # state's opt_state) waits in host memory between steps.
      offload=False,
      # For model.dtype='float16': none | dynamic (halve on overflow, which skips the step;
      # double after growth_interval finite steps) | static (always loss_scale_init).
      loss_scale='none',
      loss_scale_init=2.0 ** 15,
      loss_scale_growth_interval=2000,
  ))
  return c


def image_data_defaults() -> ml_collections.ConfigDict:
  """`config.data` of the image families (data/images.py reads it)."""
  return ml_collections.ConfigDict(dict(
      source='digits',  # digits | fashion_mnist | tfds | folder | npz
      # folder: a directory of images (class = subfolder); npz: a file with `images` and
      # `labels`; fashion_mnist: the directory of its IDX .gz files ('' = Debian's).
      path='',
      name='',  # TFDS dataset name: mnist, fashion_mnist, cifar10, ...
      data_dir='',  # TFDS data_dir ('' = TFDS default)
      # The model is built from these before any data is read; the data must match them.
      image_size=8,  # height = width
      channels=1,  # 1 (grey) or 3 (RGB)
      num_classes=10,
      random_flip=False,  # mirror left-right: each image appears plain and mirrored per 2 epochs
      eval_fraction=0.2,  # held-out share for sources without a test split (digits, folder, npz)
  ))


def eval_defaults() -> ml_collections.ConfigDict:
  """`config.eval` of the image families: FD, KID and their floors (train/image_eval.py)."""
  return ml_collections.ConfigDict(dict(
      # Images generated per evaluation; the floor uses as many held-out images, because FD's
      # bias depends on the count. At most the held-out split's size (359 for digits).
      num_samples=350,
      classifier_dir='',  # '' = $KILN_CACHE/classifiers, else ~/.cache/kiln/classifiers
      classifier_steps=1000,  # training steps of the feature classifier (batch 128)
      kid_subset_size=1000,  # images per KID subset (as Binkowski et al.), at most num_samples
      kid_subsets=10,  # 1000-image subsets of ~2000 samples overlap: more add little but time
  ))
