"""Verifiable rewards: Python functions that score a completion, looked up by name.

A reward function is `fn(prompt: str, completion: str, example: dict) -> float`, where
`example` is the problem the prompt came from (data/verifiable.py: `answer`, `tests`, ...).
`grpo.reward` names one:

  exact_match      1.0 when the completion equals example['answer'] after normalising both
                   (surrounding whitespace stripped, inner runs of whitespace made one space,
                   case folded), else 0.0
  format:<regex>   1.0 when the whole completion (stripped) matches <regex> (re.fullmatch,
                   DOTALL), else 0.0; e.g. 'format:-?[0-9]+' for a bare integer
  unit_tests       1.0 when example['tests'] passes after the prompt and the completion,
                   run as one program in the sandbox (evals/sandbox.py: a subprocess with
                   time and memory limits), else 0.0

`batch_rewards` scores a batch; unit tests run there in parallel subprocesses. Names are
checked by `get` before anything compiles (a ConfigError naming the key).
"""

import re
from collections.abc import Callable, Sequence

from data.errors import ConfigError

RewardFn = Callable[[str, str, dict], float]
UNIT_TEST_TIMEOUT_S = 5.0
UNIT_TEST_MEMORY_MB = 512

_REGISTRY: dict[str, RewardFn] = {}


def register(name: str):
  """Decorator: makes `fn` available as the reward `name`."""
  def add(fn: RewardFn) -> RewardFn:
    _REGISTRY[name] = fn
    return fn
  return add


def normalize(text: str) -> str:
  """What exact match compares: whitespace runs as one space, ends stripped, case folded."""
  return ' '.join(text.split()).casefold()


@register('exact_match')
def exact_match(prompt: str, completion: str, example: dict) -> float:
  del prompt
  return float(normalize(completion) == normalize(str(example['answer'])))


def format_reward(pattern: str) -> RewardFn:
  """The reward of `format:<pattern>`."""
  regex = re.compile(pattern, re.DOTALL)

  def fn(prompt: str, completion: str, example: dict) -> float:
    del prompt, example
    return float(regex.fullmatch(completion.strip()) is not None)
  return fn


def unit_test_program(prompt: str, completion: str, example: dict) -> str:
  """The program a unit-test reward runs: the prompt (a signature and docstring, say), the
  completion (the body) and the tests."""
  return f'{prompt}{completion}\n\n{example["tests"]}\n'


@register('unit_tests')
def unit_tests(prompt: str, completion: str, example: dict) -> float:
  return batch_rewards(unit_tests, [prompt], [completion], [example])[0]


def get(name: str, key: str = 'grpo.reward') -> RewardFn:
  """The reward function called `name`; a ConfigError naming `key` when there is none."""
  if name.startswith('format:'):
    try:
      return format_reward(name[len('format:'):])
    except re.error as e:
      raise ConfigError(f'{key}={name!r}: the regex does not compile ({e}).') from None
  if name not in _REGISTRY:
    raise ConfigError(f'{key}={name!r} is not a reward; choose one of '
                      f'{", ".join(sorted(_REGISTRY))} or format:<regex>.')
  return _REGISTRY[name]


def batch_rewards(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
                  examples: Sequence[dict]) -> list[float]:
  """`fn` of every (prompt, completion, example); unit tests in parallel subprocesses."""
  if fn is unit_tests:
    from evals import sandbox  # evals sits beside train; only this reward needs it
    programs = [unit_test_program(p, c, e) for p, c, e in zip(prompts, completions, examples,
                                                              strict=True)]
    results = sandbox.run_many(programs, timeout_s=UNIT_TEST_TIMEOUT_S,
                               memory_mb=UNIT_TEST_MEMORY_MB)
    return [float(r.passed) for r in results]
  return [float(fn(p, c, e)) for p, c, e in zip(prompts, completions, examples, strict=True)]
