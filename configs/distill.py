"""Knowledge distillation (train/tasks/distill.py): a student LM against a frozen teacher.

Run (default preset `tiny`: a 2-layer student of configs/lm.py:tiny's run on the stdlib
corpus; the teacher is any Kiln run or HF import):

  python -m train --config=configs/lm.py --workdir=/tmp/kiln_tiny
  python -m train --config=configs/distill.py --workdir=/tmp/kiln_student \
    --config.distill.teacher=/tmp/kiln_tiny

The student takes the teacher's tokenizer unless `init_from` names a run to start from,
whose tokenizer must then be the teacher's. `distill.alpha=0` trains on the LM loss alone
(the baseline that `eval/teacher_kl` compares against).
"""

import ml_collections

from configs import lm


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  preset = preset or 'tiny'
  if preset != 'tiny':
    raise ValueError(f'Unknown preset {preset!r} for configs/distill.py; choose tiny.')
  c = lm.get_config('tiny')
  c.task = 'distill'
  c.distill = ml_collections.ConfigDict(dict(
      teacher='',  # the teacher's run directory (a training run or an HF import)
      # Softens both distributions (the soft term is scaled by its square). Above 1 the
      # student's softened distribution moves T times slower per step under Adam, so short
      # runs come out farther from the teacher (docs/benchmarks.md); raise it for long runs.
      temperature=1.0,
      alpha=0.5,  # weight of the soft (teacher) term; 1 - alpha weighs the LM loss
  ))
  c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
  return c
