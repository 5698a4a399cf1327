"""lm-evaluation-harness's model class `kiln`: any Kiln LM-family run, scored by KilnLM.

lm-eval 0.4.13 finds models only in its own `MODEL_MAPPING` or in its model registry
(`register_model`) once a module has put them there; it has no plugin entry point for model
classes, so `lm_eval --model kiln` alone cannot find this one. The class registers when this
module is imported, and this module is also the command that imports it and then runs
lm-eval's own CLI:

  python -m evals.lm_eval_model run --model kiln --model_args workdir=DIR \
      --tasks stdlib_ppl --include_path evals/tasks [any other lm_eval argument]

From Python, `import evals.lm_eval_model` before `lm_eval.simple_evaluate(model='kiln',
model_args='workdir=DIR', ...)`. Model arguments: `workdir` (required), `batch_size`
(lm-eval's --batch_size, default 32), `max_length` (default: the run's data.seq_len),
`add_bos_token`, `quant` (none | int8 | int4 | nf4) and `seed`.

The requests are answered by `evals.backend.KilnLM`, the backend of `python -m evals`, so
lm-eval's own task code and metrics over this class score what Kiln's harness scores.
"""

import sys

import lm_eval.models  # noqa: F401  (see _register)
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry

from data.errors import ConfigError
from evals.backend import KilnLM

_DEFAULT_BATCH_SIZE = 32


def _flag(value) -> bool:
  return value if isinstance(value, bool) else str(value).lower() in ('1', 'true', 'yes')


class KilnLMEval(LM):
  """lm-eval's `LM` over a `KilnLM`; `model_args` are the keyword arguments."""

  def __init__(self, workdir: str = '', batch_size=_DEFAULT_BATCH_SIZE, max_length=None,
               add_bos_token=False, quant: str = 'none', seed=1234, backend: KilnLM | None = None,
               **unused):
    super().__init__()
    del unused  # lm-eval also passes max_batch_size and device, which do not apply here
    if backend is None:
      if not workdir:
        raise ConfigError('--model kiln needs --model_args workdir=DIR (a Kiln run or import).')
      size = _DEFAULT_BATCH_SIZE if str(batch_size).startswith('auto') else int(batch_size)
      backend = KilnLM.from_run(
          workdir, quant=quant, batch_size=size, add_bos_token=_flag(add_bos_token),
          seed=int(seed), **({} if max_length is None else {'max_seq_len': int(max_length)}))
    self.backend = backend

  def _answer(self, method: str, requests, fn) -> list:
    results = fn([req.args for req in requests])
    for req, result in zip(requests, results, strict=True):
      self.cache_hook.add_partial(method, req.args, result)
    return results

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    return self._answer('loglikelihood', requests, self.backend.loglikelihood)

  def loglikelihood_rolling(self, requests) -> list[float]:
    return self._answer('loglikelihood_rolling', requests,
                        lambda args: self.backend.loglikelihood_rolling([a[0] for a in args]))

  def generate_until(self, requests) -> list[str]:
    return self._answer('generate_until', requests, self.backend.generate_until)

  @property
  def tokenizer_name(self) -> str:
    return f'kiln-{type(self.backend.tokenizer).__name__}'


def _register() -> None:
  """Registers `kiln` as the lazy name 'evals.lm_eval_model:KilnLMEval' rather than with
  `@register_model`: the same name registered twice is accepted, where two class objects
  (this file run as `__main__` and then imported) would be refused. lm-eval's own models
  were imported above because `get_model` loads them only into an empty registry."""
  model_registry.register('kiln', target='evals.lm_eval_model:KilnLMEval')


_register()


def main(argv: list[str] | None = None) -> None:
  """lm-eval's CLI with the `kiln` model registered."""
  from lm_eval.__main__ import cli_evaluate

  sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
  cli_evaluate()


if __name__ == '__main__':
  main()
