"""Tasks in lm-evaluation-harness's YAML format, on local data.

A user's lm-eval task file for local data runs unchanged:

  task: my_mc
  dataset_path: json                  # json (also JSON lines) or csv
  dataset_kwargs:
    data_files: {test: docs.jsonl}    # beside the YAML (else the working directory)
  test_split: test
  output_type: multiple_choice
  doc_to_text: "{{question}}"         # a field name, a jinja template or !function file.fn
  doc_to_choice: "{{choices}}"
  doc_to_target: answer
  metric_list: [{metric: acc}, {metric: acc_norm}]

Also read, with lm-eval's meaning: `custom_dataset: !function` (a callable returning
{split: list of dicts}), `process_docs`, `validation_split`, `training_split`,
`fewshot_split`, `description`, `target_delimiter`, `fewshot_delimiter`, `num_fewshot`,
`fewshot_config.sampler` (default: random with the run's seed; first_n) and `.samples`,
`generation_kwargs`, `repeats`, `filter_list`, `process_results`, the metric keys
(`aggregation`, `higher_is_better`, metric kwargs), `include:` of another YAML, and
`group:` / `tag:` to run several tasks by one name. `!function file.fn` loads `fn` from
`file.py` beside the YAML.

`load_tasks(name)`: a YAML path, or a name under evals/tasks/ (a file `<name>.yaml`, or the
`task`, `group` or `tag` of a file there). A bad file is one ConfigError or DataError that
names the file and the field.
"""

import ast
import collections
import csv
import dataclasses
import importlib.util
import json
import math
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import yaml

from data.errors import ConfigError, DataError
from evals import metrics as metrics_lib

TASKS_DIR = Path(__file__).parent / 'tasks'
OUTPUT_TYPES = ('loglikelihood', 'loglikelihood_rolling', 'multiple_choice', 'generate_until')
SAMPLERS = ('default', 'first_n')
_TEMPLATE_FIELDS = ('doc_to_text', 'doc_to_target', 'doc_to_choice', 'description')

# lm-eval's jinja environment: undefined names are errors, trailing newlines kept.
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_ENV.filters['regex_replace'] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s,
                                                                         count=count)


# --- YAML with !function ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FunctionRef:
  """A `!function file.fn` value: where it comes from, and the function once loaded."""
  spec: str
  fn: Callable

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)

  def __str__(self) -> str:
    return f'!function {self.spec}'


def _loader(path: Path, resolve: bool):
  """A yaml Loader class whose `!function` tags load from files beside `path` (or, when
  not `resolve`, stay as their spec strings: listing tasks imports nothing)."""
  class Loader(yaml.SafeLoader):
    pass

  def function(loader, node):
    spec = loader.construct_scalar(node)
    if not resolve:
      return f'!function {spec}'
    *module, name = spec.split('.')
    file = path.parent / f'{".".join(module)}.py'
    if not module or not file.exists():
      raise ConfigError(f'{path}: !function {spec}: {file} does not exist.')
    module_spec = importlib.util.spec_from_file_location('.'.join(module), file)
    mod = importlib.util.module_from_spec(module_spec)
    try:
      module_spec.loader.exec_module(mod)
    except Exception as e:  # the user's file: say which, not a deep traceback
      raise ConfigError(f'{path}: !function {spec}: importing {file} failed: {e!r}') from None
    if not hasattr(mod, name):
      raise ConfigError(f'{path}: !function {spec}: {file} has no {name!r}.')
    return FunctionRef(spec, getattr(mod, name))

  Loader.add_constructor('!function', function)
  return Loader


def read_yaml(path: Path, resolve: bool = True, _seen: frozenset = frozenset()) -> dict:
  """A task YAML as a dict, its `include`s merged under its own keys (lm-eval's rule)."""
  path = Path(path)
  if path in _seen:
    raise ConfigError(f'{path}: include: the file includes itself.')
  try:
    cfg = yaml.load(path.read_text(), Loader=_loader(path, resolve))  # noqa: S506 (SafeLoader)
  except OSError as e:
    raise ConfigError(f'{path}: cannot read the task file ({e.strerror}).') from None
  except yaml.YAMLError as e:
    raise ConfigError(f'{path}: not valid YAML ({str(e).splitlines()[0]}).') from None
  if not isinstance(cfg, dict):
    raise ConfigError(f'{path}: a task file must be a YAML mapping of fields.')
  includes = cfg.pop('include', None)
  if includes is None:
    return cfg
  merged = {}
  for inc in includes if isinstance(includes, list) else [includes]:
    inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
    if not inc_path.exists():
      raise ConfigError(f'{path}: include: {inc_path} does not exist.')
    merged.update(read_yaml(inc_path, resolve, _seen | {path}))
  merged.update(cfg)
  return merged


# --- data -------------------------------------------------------------------------------


def _read_records(file: Path, kind: str, field: str | None, where: str) -> list[dict]:
  try:
    text = file.read_text()
  except OSError as e:
    raise DataError(f'{where}: cannot read {file} ({e.strerror}).') from None
  if kind == 'csv':
    rows = list(csv.DictReader(text.splitlines()))
    return [{k: _csv_value(v) for k, v in row.items()} for row in rows]
  try:
    data = json.loads(text)
  except json.JSONDecodeError:  # JSON lines
    data = []
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          data.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise DataError(f'{where}: {file} line {n} is not JSON ({e.msg}).') from None
  if field is not None:
    if not isinstance(data, dict) or field not in data:
      raise DataError(f'{where}: field: {file} has no top-level {field!r}.')
    data = data[field]
  if isinstance(data, dict):
    data = [data]
  if not all(isinstance(d, dict) for d in data):
    raise DataError(f'{where}: {file} must hold JSON objects (one document each).')
  return data


def _csv_value(value: str):
  for cast in (int, float):
    try:
      return cast(value)
    except (TypeError, ValueError):
      pass
  return value


def _load_dataset(cfg: dict, path: Path) -> dict[str, list[dict]]:
  kwargs = dict(cfg.get('dataset_kwargs') or {})
  if isinstance(cfg.get('custom_dataset'), FunctionRef):
    data = cfg['custom_dataset'](**(cfg.get('metadata') or {}), **kwargs)
    if not isinstance(data, dict):
      raise DataError(f'{path}: custom_dataset must return a dict of split -> documents.')
    return {k: list(v) for k, v in data.items()}
  kind = cfg.get('dataset_path')
  if kind is None:
    raise ConfigError(f'{path}: dataset_path: missing (json, jsonl or csv with '
                      'dataset_kwargs.data_files, or custom_dataset: !function).')
  if kind not in ('json', 'jsonl', 'csv'):
    raise ConfigError(f'{path}: dataset_path: {kind!r} is not local data; use json, jsonl or '
                      'csv with dataset_kwargs.data_files (nothing is downloaded).')
  files = kwargs.get('data_files')
  if not files:
    raise ConfigError(f'{path}: dataset_kwargs.data_files: missing.')
  if not isinstance(files, dict):
    files = {'train': files}
  out = {}
  for split, names in files.items():
    out[split] = []
    for name in names if isinstance(names, list) else [names]:
      # Beside the YAML; lm-eval's own rule (the working directory) is the fallback, so
      # its users' files run unchanged.
      file = Path(name)
      if not file.is_absolute() and ((path.parent / name).exists() or not file.exists()):
        file = path.parent / name
      out[split] += _read_records(file, kind, kwargs.get('field'),
                                  f'{path}: dataset_kwargs.data_files.{split}')
  return out


# --- the task -------------------------------------------------------------------------------


@dataclasses.dataclass
class MetricSpec:
  name: str
  aggregation: str | Callable
  higher_is_better: bool
  kwargs: dict
  fn: Callable | None = None  # a !function metric: fn(references=[...], predictions=[...])


class Task:
  """One task: its documents and lm-eval's rules for turning them into requests."""

  def __init__(self, cfg: dict, path: Path):
    self.cfg, self.path = cfg, path
    self.name = self._require('task')
    if not isinstance(self.name, str):
      raise ConfigError(f'{path}: task: must be a name (a string).')
    self.output_type = cfg.get('output_type', 'generate_until')
    if self.output_type not in OUTPUT_TYPES:
      raise ConfigError(f'{path}: output_type: {self.output_type!r} is not one of '
                        f'{", ".join(OUTPUT_TYPES)}.')
    for field in _TEMPLATE_FIELDS:
      value = cfg.get(field)
      if isinstance(value, str):
        try:
          _ENV.parse(value)
        except jinja2.TemplateSyntaxError as e:
          raise ConfigError(f'{path}: {field}: bad jinja template ({e.message}).') from None
    if self.output_type != 'loglikelihood_rolling':
      self._require('doc_to_text')
    self._require('doc_to_target')
    if self.output_type == 'multiple_choice':
      self._require('doc_to_choice')
    self.target_delimiter = cfg.get('target_delimiter', ' ')
    self.fewshot_delimiter = cfg.get('fewshot_delimiter', '\n\n')
    self.description = cfg.get('description') or ''
    self.num_fewshot = int(cfg.get('num_fewshot') or 0)
    self.repeats = int(cfg.get('repeats', 1))
    fewshot = cfg.get('fewshot_config') or {}
    self.sampler = fewshot.get('sampler', 'default')
    if self.sampler not in SAMPLERS:
      raise ConfigError(f'{path}: fewshot_config.sampler: {self.sampler!r} is not one of '
                        f'{", ".join(SAMPLERS)}.')
    self.fewshot_samples = fewshot.get('samples')
    self.generation_kwargs = dict(cfg.get('generation_kwargs') or {})
    if self.output_type == 'generate_until' and 'until' not in self.generation_kwargs:
      self.generation_kwargs['until'] = [self.fewshot_delimiter]
    if 'temperature' in self.generation_kwargs:
      self.generation_kwargs['temperature'] = float(self.generation_kwargs['temperature'])
    self.metrics = self._metrics()
    self.filters = self._filters()
    self.process_results = cfg.get('process_results')
    if self.process_results is not None and not callable(self.process_results):
      raise ConfigError(f'{path}: process_results: must be !function file.fn.')

    self.splits = _load_dataset(cfg, path)
    process = cfg.get('process_docs')
    if callable(process):
      self.splits = {k: list(process(v)) for k, v in self.splits.items()}
    for key in ('test_split', 'validation_split', 'training_split', 'fewshot_split'):
      split = cfg.get(key)
      if split is not None and split not in self.splits:
        raise DataError(f'{path}: {key}: the data has no split {split!r} (it has '
                        f'{", ".join(sorted(self.splits)) or "none"}).')
    eval_split = cfg.get('test_split') or cfg.get('validation_split')
    if eval_split is None:
      raise ConfigError(f'{path}: test_split: missing (or validation_split): which split to '
                        'evaluate.')
    self.docs = self.splits[eval_split]
    if not self.docs:
      raise DataError(f'{path}: {"test_split" if cfg.get("test_split") else "validation_split"}'
                      f': the split {eval_split!r} is empty.')
    self.features = set().union(*(d.keys() for d in self.docs))
    first_target = self.doc_to_target(self.docs[0])
    self.multiple_target = isinstance(first_target, list)

  def _require(self, field: str):
    if self.cfg.get(field) is None:
      why = ('the task\'s name' if field == 'task' else 'required for output_type '
             + self.cfg.get('output_type', 'generate_until'))
      raise ConfigError(f'{self.path}: {field}: missing ({why}).')
    return self.cfg[field]

  def _metrics(self) -> list[MetricSpec]:
    listed = self.cfg.get('metric_list') or [
        {'metric': m} for m in metrics_lib.DEFAULT_METRICS[self.output_type]]
    out = []
    for i, entry in enumerate(listed):
      where = f'{self.path}: metric_list[{i}]'
      if not isinstance(entry, dict) or 'metric' not in entry:
        raise ConfigError(f'{where}: each entry needs a `metric` key.')
      entry = dict(entry)
      name = entry.pop('metric')
      agg = entry.pop('aggregation', None)
      hib = entry.pop('higher_is_better', None)
      fn = None
      if callable(name):
        fn, name = name, getattr(name, 'spec', getattr(name, '__name__', 'metric')).split('.')[-1]
        agg = agg or 'mean'
      elif name in metrics_lib.METRICS:
        types, default_agg, default_hib = metrics_lib.METRICS[name]
        if self.output_type not in types and self.process_results_missing():
          raise ConfigError(f'{where}.metric: {name!r} does not apply to output_type '
                            f'{self.output_type}.')
        agg = agg or default_agg
        hib = default_hib if hib is None else hib
      elif self.process_results_missing():
        raise ConfigError(f'{where}.metric: unknown metric {name!r}; known: '
                          f'{", ".join(metrics_lib.METRICS)} (or !function, or a '
                          'process_results that returns it).')
      agg = agg or 'mean'
      if isinstance(agg, str) and agg not in metrics_lib.AGGREGATIONS and agg != 'mauve':
        raise ConfigError(f'{where}.aggregation: unknown aggregation {agg!r}; known: '
                          f'{", ".join(metrics_lib.AGGREGATIONS)} (or !function).')
      out.append(MetricSpec(name, agg, True if hib is None else bool(hib), entry, fn))
    return out

  def process_results_missing(self) -> bool:
    return self.cfg.get('process_results') is None

  def _filters(self) -> list[tuple[str, list[tuple[str, dict]]]]:
    listed = self.cfg.get('filter_list')
    if not listed:
      return [('none', [('take_first', {})])]
    out = []
    for i, entry in enumerate(listed):
      where = f'{self.path}: filter_list[{i}]'
      if not isinstance(entry, dict) or 'name' not in entry or 'filter' not in entry:
        raise ConfigError(f'{where}: each entry needs `name` and `filter` (a list of '
                          '{function: ..., kwargs}).')
      steps = []
      for j, step in enumerate(entry['filter']):
        fn = step.get('function')
        if fn not in FILTERS:
          raise ConfigError(f'{where}.filter[{j}].function: unknown filter {fn!r}; known: '
                            f'{", ".join(FILTERS)}.')
        steps.append((fn, {k: v for k, v in step.items() if k != 'function'}))
      out.append((str(entry['name']), steps))
    return out

  # --- lm-eval's doc_to_* -------------------------------------------------------------

  def _render(self, field: str, template: str, doc: dict) -> str:
    try:
      return _ENV.from_string(template).render(**doc)
    except jinja2.TemplateError as e:
      raise DataError(f'{self.path}: {field}: the template fails on a document ({e}).') from None

  def _resolve(self, field: str, value, doc: dict, *, literal_digits: bool):
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, str):
      if value in self.features:
        return doc[value]
      text = self._render(field, value, doc)
      if literal_digits and text.isdigit() and self.cfg.get('doc_to_choice') is not None:
        return ast.literal_eval(text)
      return text
    if isinstance(value, list):
      return value
    if callable(value):
      return value(doc)
    raise ConfigError(f'{self.path}: {field}: must be a field name, a template, a list or '
                      f'!function (got {type(value).__name__}).')

  def doc_to_text(self, doc: dict):
    return self._resolve('doc_to_text', self.cfg.get('doc_to_text'), doc, literal_digits=True)

  def doc_to_target(self, doc: dict):
    value = self.cfg.get('doc_to_target')
    out = self._resolve('doc_to_target', value, doc, literal_digits=True)
    if (isinstance(value, str) and value not in self.features and isinstance(out, str)
        and len(out) >= 2 and out[0] == '[' and out[-1] == ']'):
      try:
        return ast.literal_eval(out)
      except (SyntaxError, ValueError):
        return out
    return out

  def doc_to_choice(self, doc: dict) -> list[str]:
    value = self.cfg.get('doc_to_choice')
    if isinstance(value, dict):
      return list(value.values())
    if isinstance(value, str) and value not in self.features:
      text = self._render('doc_to_choice', value, doc)
      try:
        out = ast.literal_eval(text)
      except (SyntaxError, ValueError):
        raise DataError(f'{self.path}: doc_to_choice: {text!r} is not a list.') from None
    else:
      out = self._resolve('doc_to_choice', value, doc, literal_digits=False)
    if not isinstance(out, list | tuple):
      raise DataError(f'{self.path}: doc_to_choice: gives {type(out).__name__}, not a list.')
    return list(out)

  # --- few-shot contexts ----------------------------------------------------------------

  def fewshot_pool(self) -> list[dict]:
    """lm-eval's few-shot documents: fewshot_split, else fewshot_config.samples, else the
    training, validation or test split (the first present)."""
    split = self.cfg.get('fewshot_split')
    if split is not None:
      return self.splits[split]
    if self.fewshot_samples is not None:
      samples = self.fewshot_samples
      return list(samples() if callable(samples) else samples)
    for key in ('training_split', 'validation_split', 'test_split'):
      if self.cfg.get(key) is not None:
        return self.splits[self.cfg[key]]
    return []

  def contexts(self, docs: list[dict], num_fewshot: int, seed: int) -> list[str]:
    """Each document's prompt: description, `num_fewshot` solved examples, the document's
    text (lm-eval's fewshot_context; one sampler seeded once for the whole task)."""
    pool = self.fewshot_pool() if num_fewshot > 0 else []
    if num_fewshot > len(pool):
      raise ConfigError(f'{self.path}: num_fewshot: {num_fewshot} examples asked for, but '
                        f'the few-shot pool has {len(pool)} documents.')
    same_split = (self.cfg.get('fewshot_split') is not None
                  and self.cfg.get('fewshot_split') == self.cfg.get('test_split'))
    rnd = random.Random(seed)
    out = []
    for doc in docs:
      parts = [self._maybe_template('description', self.description, doc)]
      for shot in self._sample(pool, num_fewshot, doc if same_split else None, rnd):
        parts.append(self._solved(shot))
      text = self.doc_to_text(doc)
      if not isinstance(text, str):
        raise DataError(f'{self.path}: doc_to_text: gives {type(text).__name__}; multiple-'
                        'input tasks (an int doc_to_text) are not supported.')
      out.append(''.join(parts) + text)
    return out

  def _maybe_template(self, field: str, value, doc):
    if not value:
      return ''
    return doc[value] if value in doc else self._render(field, value, doc)

  def _sample(self, pool, n, eval_doc, rnd: random.Random) -> list[dict]:
    if n == 0:
      return []
    if self.sampler == 'first_n':
      kept = [d for d in pool if d != eval_doc] if eval_doc is not None else pool
      return kept[:n]
    if eval_doc is None:
      return rnd.sample(pool, n)
    shots = [d for d in rnd.sample(pool, n + 1) if d != eval_doc][:n]
    if len(shots) < n:
      shots = rnd.sample([d for d in pool if d != eval_doc], n)
    return shots

  def _solved(self, doc: dict) -> str:
    """A few-shot example: text, target delimiter, answer, few-shot delimiter."""
    q = self.doc_to_text(doc)
    choices = self.doc_to_choice(doc) if self.cfg.get('doc_to_choice') is not None else None
    a = self.doc_to_target(doc)
    if a is None or a == '':
      return q
    if choices and isinstance(a, int):
      a = choices[a]
    elif isinstance(a, list):
      a = a[0]
    if not isinstance(a, str):
      raise DataError(f'{self.path}: doc_to_target: a few-shot answer must be text or a '
                      f'choice index (got {a!r}).')
    return q + self.target_delimiter + a + self.fewshot_delimiter

  def config_summary(self) -> dict:
    """The task's fields as JSON values (functions as their `!function` specs)."""
    def clean(v):
      if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
      if isinstance(v, list | tuple):
        return [clean(x) for x in v]
      if v is None or isinstance(v, bool | int | float | str):
        return v
      return str(v)
    return {**clean(self.cfg), 'task_file': str(self.path)}


# --- filters (lm-eval's names and semantics) ---------------------------------------------------


def _regex(resps, regex_pattern=r'#### (\-?[0-9\.\,]+)', group_select=0, fallback='[invalid]'):
  pattern = re.compile(regex_pattern)
  out = []
  for r in resps:
    found = pattern.findall(r if isinstance(r, str) else '')
    if not found:
      out.append(fallback)
      continue
    match = found[group_select]
    if isinstance(match, tuple):
      match = next((m for m in match if m), fallback)
    out.append(match.strip())
  return out


def _majority(resps):
  return [collections.Counter(resps).most_common(1)[0][0]]


FILTERS: dict[str, Callable[..., Any]] = {
    # Each maps one document's list of responses to a new list ('take_first' to one value).
    'take_first': lambda resps: resps[0],
    'take_first_k': lambda resps, k: resps[:k],
    'regex': _regex,
    'lowercase': lambda resps: [r.lower() for r in resps],
    'uppercase': lambda resps: [r.upper() for r in resps],
    'remove_whitespace': lambda resps: [r.lstrip() for r in resps],
    'majority_vote': _majority,
}


def apply_filter(steps: list[tuple[str, dict]], resps: list):
  for name, kwargs in steps:
    resps = FILTERS[name](resps, **kwargs)
  return resps


# --- finding tasks --------------------------------------------------------------------------


def _builtin_index() -> dict[str, list[Path]]:
  """name -> YAML files under evals/tasks/, by file stem, `task`, `group` and `tag`."""
  index: dict[str, list[Path]] = {}
  for file in sorted(TASKS_DIR.glob('**/*.yaml')) if TASKS_DIR.exists() else []:
    try:
      cfg = read_yaml(file, resolve=False)
    except ConfigError:
      continue
    names = {file.stem}
    for key in ('task', 'group'):
      if isinstance(cfg.get(key), str):
        names.add(cfg[key])
    tags = cfg.get('tag') or []
    names.update([tags] if isinstance(tags, str) else tags)
    for name in names:
      index.setdefault(name, []).append(file)
  return index


def resolve(name: str) -> list[Path]:
  """The YAML files that `name` (a path, or a built-in task, group or tag) stands for."""
  path = Path(name)
  if path.suffix in ('.yaml', '.yml'):
    if not path.exists():
      raise ConfigError(f'--tasks: {name} does not exist.')
    return [path.resolve()]
  files = _builtin_index().get(name)
  if not files:
    known = sorted(_builtin_index())
    raise ConfigError(f'--tasks: unknown task {name!r}; give a YAML file or one of: '
                      f'{", ".join(known) or "(no built-in tasks)"}.')
  return files


def load_tasks(name: str) -> list[Task]:
  """The tasks `name` stands for: a task YAML, a group YAML (`group` with a `task` list of
  names, files or inline task dicts), or a built-in name or tag."""
  out = []
  for file in resolve(name):
    cfg = read_yaml(file)
    if 'group' in cfg and isinstance(cfg.get('task'), list):
      for i, item in enumerate(cfg['task']):
        if isinstance(item, dict):
          out.append(Task(item, file))
        elif isinstance(item, str):
          sub = file.parent / item
          out += load_tasks(str(sub) if sub.suffix in ('.yaml', '.yml') else item)
        else:
          raise ConfigError(f'{file}: task[{i}]: a task name, a YAML file or a task mapping.')
    else:
      out.append(Task(cfg, file))
  return out


def limit_docs(docs: list[dict], limit: int | float | None) -> list[dict]:
  """lm-eval's --limit: the first `limit` documents, or a fraction (< 1) of them."""
  if limit is None:
    return docs
  if limit < 1.0:
    return docs[:int(math.ceil(len(docs) * limit))]
  return docs[:int(limit)]
