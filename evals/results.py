"""The harness's outputs: the results JSON, a printed table, TensorBoard scalars, and a
side-by-side comparison of two runs.

A run's results live in `WORKDIR/evals/results-step<step>.json`; evaluating more tasks at
the same step adds them to that file. `--compare` reads such files (or the newest one of
a run directory).
"""

import json
import math
import re

from etils import epath

from data import storage
from data.errors import ConfigError

RESULTS_DIR = 'evals'


def results_path(workdir: str, step: int | None) -> epath.Path:
  return epath.Path(workdir) / RESULTS_DIR / f'results-step{step if step is not None else 0}.json'


def write_json(results: dict, path, merge: bool = True) -> dict:
  """Writes `results` to `path`; with `merge`, tasks already in the file that this run did
  not evaluate are kept. Returns what was written."""
  path = epath.Path(path)
  if merge and path.exists():
    old = json.loads(path.read_text())
    for key in ('results', 'higher_is_better', 'configs', 'n-samples', 'samples'):
      if key in results or key in old:
        results[key] = {**old.get(key, {}), **results.get(key, {})}
  storage.write_atomic(path, json.dumps(results, indent=2, default=str).encode())
  return results


def read_results(source: str) -> dict:
  """A results JSON, or the newest `evals/results-step*.json` of a run directory."""
  path = epath.Path(source)
  if path.is_dir():
    found = sorted(path.glob(f'{RESULTS_DIR}/results-step*.json'),
                   key=lambda p: int(re.search(r'step(\d+)', p.name).group(1)))
    if not found:
      raise ConfigError(f'{source} has no {RESULTS_DIR}/results-step*.json: evaluate it first '
                        '(python -m evals --workdir=...).')
    path = found[-1]
  try:
    data = json.loads(path.read_text())
  except OSError as e:
    raise ConfigError(f'Cannot read {source} ({e.strerror}).') from None
  except json.JSONDecodeError as e:
    raise ConfigError(f'{source} is not a results JSON ({e.msg}).') from None
  if not isinstance(data, dict) or not isinstance(data.get('results'), dict):
    raise ConfigError(f'{source} is not a results JSON (no "results" mapping).')
  return data


def _rows(results: dict) -> list[tuple[str, str, float, float | None]]:
  """(task, metric, value, stderr) for every numeric metric."""
  rows = []
  for task, values in sorted(results['results'].items()):
    for key, value in values.items():
      metric, _, filt = key.partition(',')
      if metric.endswith('_stderr') or not isinstance(value, int | float):
        continue
      se_key = f'{metric}_stderr' + (f',{filt}' if filt else '')
      rows.append((task, key, float(value), values.get(se_key)))
  return rows


def _fmt(x) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return 'N/A'
  return f'{x:.4f}'


def _table(header: list[str], rows: list[list[str]]) -> str:
  """A markdown table, as lm-eval prints its results."""
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(header)]
  line = lambda cells: '|' + '|'.join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
  return '\n'.join([line(header) + '|', '|' + '|'.join('-' * w for w in widths) + '|',
                    *(line(r) + '|' for r in rows)])


def table(results: dict) -> str:
  """Task, metric, value, ± stderr, and whether higher is better."""
  hib = results.get('higher_is_better', {})
  rows = []
  for task, metric, value, se in _rows(results):
    up = hib.get(task, {}).get(metric.partition(',')[0])
    rows.append([task, metric, '↑' if up else '↓' if up is not None else ' ', _fmt(value),
                 '±', _fmt(se)])
  return _table(['Task', 'Metric', ' ', 'Value', ' ', 'Stderr'], rows)


def compare(a: dict, b: dict, names: tuple[str, str] = ('A', 'B')) -> str:
  """Two runs side by side: each metric of either, and B - A where both have it."""
  va = {(t, m): v for t, m, v, _ in _rows(a)}
  vb = {(t, m): v for t, m, v, _ in _rows(b)}
  rows = []
  for key in sorted(set(va) | set(vb)):
    x, y = va.get(key), vb.get(key)
    diff = f'{y - x:+.4f}' if x is not None and y is not None else ''
    rows.append([key[0], key[1], _fmt(x), _fmt(y), diff])
  steps = [str((r.get('model') or {}).get('step', '?')) for r in (a, b)]
  header = [f'{n} (step {s})' for n, s in zip(names, steps, strict=True)]
  return _table(['Task', 'Metric', *header, 'B - A'], rows)


def write_tensorboard(results: dict, workdir: str, step: int | None) -> None:
  """`evals/<task>/<metric>` scalars in the run directory, at the checkpoint's step."""
  from train.metrics import SummaryWriter  # evals sits beside train; imported when used

  writer = SummaryWriter(workdir)
  scalars = {f'evals/{task}/{metric}': value for task, metric, value, _ in _rows(results)
             if math.isfinite(value)}
  writer.scalars(step or 0, scalars)
  writer.close()
