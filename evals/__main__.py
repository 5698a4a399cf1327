"""Evaluates a run on lm-evaluation-harness style tasks, offline.

  python -m evals --workdir=DIR --tasks=NAME_OR_YAML[,...] [--limit=N] [--num_fewshot=K]
                  [--output=FILE.json] [--batch_size=32] [--seed=1234] [--log_samples]
  python -m evals --compare DIR_OR_JSON_A DIR_OR_JSON_B

DIR is any Kiln LM-family run (lm, sft, dpo, distill) or an HF import. A task is a YAML
file in lm-eval's format or a built-in name (evals/tasks/). The results go to
`DIR/evals/results-step<step>.json` (or --output), a table is printed, and each metric is
a TensorBoard scalar `evals/<task>/<metric>` in DIR at the checkpoint's step. Every flag
and task file is checked before the model loads; a mistake is one line and exit status 2.
"""

import sys

from absl import app, flags

from data import cli
from data.errors import ConfigError, exit_on_user_error


def _define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A Kiln run directory or an HF import.')
  flags.DEFINE_list('tasks', [], 'Task YAML files or built-in task, group or tag names.')
  flags.DEFINE_float('limit', None, 'Documents per task: the first N, or a fraction (< 1).')
  flags.DEFINE_integer('num_fewshot', None, 'Few-shot examples (default: each task\'s own).')
  flags.DEFINE_string('output', None, 'The results JSON (default: '
                      'WORKDIR/evals/results-step<step>.json, merged with earlier tasks).')
  flags.DEFINE_integer('batch_size', 32, 'Rows per scoring call and generation slots.')
  flags.DEFINE_integer('max_seq_len', None, 'Context length (default: the run\'s seq_len).')
  flags.DEFINE_integer('seed', 1234, 'Few-shot sampling and generation seed.')
  flags.DEFINE_integer('bootstrap_iters', 100000, 'Bootstrap resamples for the standard '
                       'errors of corpus metrics (0: none).')
  flags.DEFINE_bool('log_samples', False, 'Keep every document\'s requests, responses and '
                    'scores in the results JSON.')
  flags.DEFINE_bool('tensorboard', True, 'Write the metrics as TensorBoard scalars in WORKDIR.')
  flags.DEFINE_bool('add_bos_token', False, 'Put BOS before every encoded string.')
  flags.DEFINE_bool('compare', False, 'Print two results side by side: '
                    '--compare DIR_OR_JSON_A DIR_OR_JSON_B.')


def check_flags(f, argv) -> list:
  """Every check before anything loads; returns the tasks (their files read, data loaded)."""
  if f.compare:
    if len(argv) != 3:
      raise ConfigError('--compare takes two runs or results files: '
                        '--compare DIR_OR_JSON_A DIR_OR_JSON_B.')
    return []
  if len(argv) > 1:
    raise ConfigError(f'Unexpected arguments: {" ".join(argv[1:])}.')
  if not f.tasks:
    raise ConfigError('--tasks is required: task YAML files or built-in task names.')
  if f.limit is not None and f.limit <= 0:
    raise ConfigError(f'--limit={f.limit} must be > 0.')
  if f.num_fewshot is not None and f.num_fewshot < 0:
    raise ConfigError(f'--num_fewshot={f.num_fewshot} must be >= 0.')
  if f.batch_size < 1:
    raise ConfigError(f'--batch_size={f.batch_size} must be >= 1.')
  from evals import task_config
  from train.runs import load_run_config

  tasks = [t for name in f.tasks for t in task_config.load_tasks(name)]
  if not f.workdir:
    raise ConfigError('--workdir is required: the --workdir of a training run or an import.')
  load_run_config(f.workdir)  # a run directory, or one line saying it is not
  return tasks


def _run(argv) -> None:
  f = flags.FLAGS
  check_flags(f, argv)
  from evals import results as results_lib
  if f.compare:
    a, b = (results_lib.read_results(x) for x in argv[1:3])
    print(results_lib.compare(a, b))
    return
  import time

  from evals import backend, runner

  kwargs = {'batch_size': f.batch_size, 'seed': f.seed, 'add_bos_token': f.add_bos_token}
  if f.max_seq_len is not None:
    kwargs['max_seq_len'] = f.max_seq_len
  lm = backend.KilnLM.from_run(f.workdir, **kwargs)
  limit = None if f.limit is None else (int(f.limit) if f.limit >= 1 else f.limit)
  start = time.time()
  out = runner.evaluate(lm, f.tasks, limit=limit, num_fewshot=f.num_fewshot, seed=f.seed,
                        bootstrap_iters=f.bootstrap_iters, log_samples=f.log_samples)
  out['model'] = lm.model_info()
  out['args'] = {'tasks': f.tasks, 'limit': limit, 'num_fewshot': f.num_fewshot,
                 'seed': f.seed, 'batch_size': f.batch_size,
                 'seconds': round(time.time() - start, 2)}
  path = f.output or results_lib.results_path(f.workdir, lm.step)
  print(results_lib.table(out))
  if f.tensorboard:
    results_lib.write_tensorboard(out, f.workdir, lm.step)
  results_lib.write_json(out, path, merge=f.output is None)
  print(f'Results: {path}', file=sys.stderr)


def main(argv) -> None:
  exit_on_user_error(lambda: _run(argv))


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
