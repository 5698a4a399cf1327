"""Evaluation tasks during training: `eval.tasks` of an LM-family config, at each evaluation.

`LMTask.task_evals` calls `task_scalars` with the live training task and state: the
harness scores `task.inference_params(state)` (a LoRA run's adapters merged) through a
`KilnLM` built in memory, so there is no checkpoint round trip, and every metric comes back
as the scalar `eval/<task>/<metric>` that the trainer logs with `eval/loss`.
"""

from data.errors import ConfigError
from evals import backend, runner, task_config


def check_tasks(names: list[str]) -> None:
  """ConfigError naming `eval.tasks` for a name that is neither a built-in task, group or
  tag (evals/tasks/) nor an existing YAML file; called before anything compiles."""
  for name in names:
    try:
      task_config.resolve(name)
    except ConfigError as e:
      raise ConfigError(f'eval.tasks: {str(e).removeprefix("--tasks: ")}') from None


def scalars(results: dict) -> dict[str, float]:
  """`eval/<task>/<metric>` for each metric of `evaluate`'s results, standard errors left
  out (`eval/<task>/<metric>/<filter>` for a filter other than lm-eval's 'none')."""
  out = {}
  for task, metrics in results['results'].items():
    for key, value in metrics.items():
      metric = key.removesuffix(',none').replace(',', '/')
      if metric.split('/')[0].endswith('_stderr') or isinstance(value, bool):
        continue
      if isinstance(value, int | float):
        out[f'eval/{task}/{metric}'] = float(value)
  return out


def task_scalars(task, state, names: list[str], *, limit: int | None = None
                 ) -> dict[str, float]:
  """Runs the tasks `names` on the training `task`'s inference model at `state`.

  The model reads at most the run's `data.seq_len` tokens at once, as it was trained.
  """
  model = backend.KilnLM(task.inference_graphdef, task.inference_params(state),
                         task.inference_model_cfg, task.tokenizer,
                         max_seq_len=int(task.config.data.seq_len), step=int(state.step))
  # Standard errors are not logged: no bootstrap (BLEU's would resample 100k times).
  return scalars(runner.evaluate(model, names, limit=limit, bootstrap_iters=0))
