"""`evaluate`: tasks in, lm-eval-shaped results out.

For each task: every document's prompt (few-shot examples sampled as lm-eval samples
them), its requests (`repeats` times), ONE batched backend call per request type for the
whole task, the filters, lm-eval's `process_results` (or the task's own), and the
aggregations with their standard errors. The results dict has lm-eval's shape:

  {'results': {task: {'acc': 0.5, 'acc_stderr': 0.1, ...}},   # 'metric,filter' for
   'higher_is_better': {task: {...}}, 'configs': {task: {...}}, #  filters other than 'none'
   'n-samples': {task: {'original': N, 'effective': n}},
   'samples': {task: [...]}}                                  # with log_samples
"""

import collections
import math
import re
from collections.abc import Sequence

import numpy as np

from data.errors import DataError
from evals import metrics as metrics_lib
from evals import task_config


def evaluate(backend, tasks: Sequence[str], *, limit: int | float | None = None,
             num_fewshot: int | None = None, seed: int = 1234, bootstrap_iters: int = 100000,
             log_samples: bool = False) -> dict:
  """Runs `tasks` (YAML paths, built-in names, groups or tags) on `backend` (evals.backend.
  KilnLM, or anything with its loglikelihood / loglikelihood_rolling / generate_until)."""
  loaded = [t for name in tasks for t in task_config.load_tasks(name)]
  out = {'results': {}, 'higher_is_better': {}, 'configs': {}, 'n-samples': {}}
  if log_samples:
    out['samples'] = {}
  for task in loaded:
    results, samples = run_task(backend, task, limit=limit, num_fewshot=num_fewshot, seed=seed,
                                bootstrap_iters=bootstrap_iters)
    out['results'][task.name] = results
    hib = {m.name: m.higher_is_better for m in task.metrics}
    if 'rouge' in hib:  # its per-type scores inherit it (lm-eval's rule for dict metrics)
      hib.update({t: hib['rouge'] for t in metrics_lib.ROUGE_TYPES})
    out['higher_is_better'][task.name] = hib
    shots = task.num_fewshot if num_fewshot is None else num_fewshot
    out['configs'][task.name] = {**task.config_summary(), 'num_fewshot': shots}
    out['n-samples'][task.name] = {'original': len(task.docs), 'effective': len(samples)}
    if log_samples:
      out['samples'][task.name] = samples
  return out


def _requests(task: task_config.Task, doc: dict, context: str) -> list[tuple]:
  """lm-eval's construct_requests: the backend arguments of one document."""
  if task.output_type == 'loglikelihood':
    return [(context, task.doc_to_target(doc))]
  if task.output_type == 'loglikelihood_rolling':
    return [(task.doc_to_target(doc),)]
  if task.output_type == 'multiple_choice':
    choices = task.doc_to_choice(doc)
    reqs = [(context, f'{task.target_delimiter}{c}') for c in choices]
    if any(m.name == 'acc_mutual_info' for m in task.metrics):
      reqs += [('', f'{task.target_delimiter}{c}') for c in choices]
    return reqs
  return [(context, dict(task.generation_kwargs))]


def _call(backend, output_type: str, args: list[tuple]) -> list:
  """One batched backend call for every request of one type."""
  if not args:
    return []
  if output_type in ('loglikelihood', 'multiple_choice'):
    return backend.loglikelihood(args)
  if output_type == 'loglikelihood_rolling':
    return backend.loglikelihood_rolling([a[0] for a in args])
  return backend.generate_until(args)


def run_task(backend, task: task_config.Task, *, limit=None, num_fewshot=None, seed=1234,
             bootstrap_iters=100000) -> tuple[dict, list[dict]]:
  """(results {metric: value, metric_stderr: se}, per-document samples) of one task."""
  docs = task_config.limit_docs(task.docs, limit)
  shots = task.num_fewshot if num_fewshot is None else num_fewshot
  contexts = task.contexts(docs, shots, seed) if task.output_type != 'loglikelihood_rolling' \
      else [''] * len(docs)
  per_doc = [_requests(task, doc, ctx) for doc, ctx in zip(docs, contexts, strict=True)]
  flat = [a for reqs in per_doc for a in reqs for _ in range(task.repeats)]
  answers = iter(_call(backend, task.output_type, flat))
  # resps[d][i]: the `repeats` answers of request i of document d.
  resps = [[[next(answers) for _ in range(task.repeats)] for _ in reqs] for reqs in per_doc]

  items = collections.defaultdict(list)  # (metric, filter) -> per-document items
  samples = []
  for filter_name, steps in task.filters:
    for d, doc in enumerate(docs):
      filtered = [task_config.apply_filter(steps, r) for r in resps[d]]
      scores = process_results(task, doc, filtered)
      for metric, value in scores.items():
        items[(metric, filter_name)].append(value)
      if filter_name == task.filters[0][0]:
        samples.append({'doc_id': d, 'doc': doc, 'arguments': [list(map(str, a))
                                                               for a in per_doc[d]],
                        'resps': resps[d], 'filtered_resps': filtered, 'filter': filter_name,
                        **{k: _jsonable(v) for k, v in scores.items()}})
  return aggregate(task, items, bootstrap_iters, backend), samples


def _jsonable(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  return value


def process_results(task: task_config.Task, doc: dict, results: list) -> dict:
  """lm-eval's ConfigurableTask.process_results: one document's items per metric."""
  if task.process_results is not None:
    return dict(task.process_results(doc, results))
  names = [m.name for m in task.metrics]
  if task.output_type == 'loglikelihood':
    ll, greedy = results[0]
    return {**({'perplexity': ll} if 'perplexity' in names else {}),
            **({'acc': int(greedy)} if 'acc' in names else {})}
  if task.output_type == 'loglikelihood_rolling':
    (ll,) = results
    text = task.doc_to_target(doc)
    words, n_bytes = len(re.split(r'\s+', text)), len(text.encode('utf-8'))
    return {**({'word_perplexity': (ll, words)} if 'word_perplexity' in names else {}),
            **({'byte_perplexity': (ll, n_bytes)} if 'byte_perplexity' in names else {}),
            **({'bits_per_byte': (ll, n_bytes)} if 'bits_per_byte' in names else {})}
  if task.output_type == 'multiple_choice':
    return _multiple_choice(task, doc, results, names)
  return _generation(task, doc, results[0], names)


def _multiple_choice(task, doc, results, names) -> dict:
  lls, greedy = zip(*results, strict=True)
  choices = task.doc_to_choice(doc)
  lls = np.asarray(lls, np.float64)
  lls_uncond = None
  if 'acc_mutual_info' in names and len(lls) == 2 * len(choices):
    lls, lls_uncond = lls[:len(choices)], lls[len(choices):]
  # acc_norm: log-likelihood per character of the choice (lm-eval's normalisation).
  chars = np.asarray([float(len(c)) for c in choices])
  n_bytes = np.asarray([float(len(c.encode('utf-8'))) for c in choices])
  pred, pred_norm, pred_bytes = (int(np.argmax(lls)), int(np.argmax(lls / chars)),
                                 int(np.argmax(lls / n_bytes)))
  gold = task.doc_to_target(doc)
  if isinstance(gold, list):
    gold = [g if g < len(choices) else -100 for g in gold]
  elif isinstance(gold, str):
    gold = choices.index(gold) if gold in choices else -100
  elif isinstance(gold, int):
    gold = gold if gold < len(choices) else -100
  else:
    raise DataError(f'{task.path}: doc_to_target: a multiple-choice target must be a choice '
                    f'index or text (got {gold!r}).')
  if isinstance(gold, list):
    hit = lambda p: 1.0 if p in gold else 0.0
    em = int(any(greedy[g] if g != -100 else 0 for g in gold))
  else:
    hit = lambda p: 1.0 if p == gold else 0.0
    em = int(greedy[gold]) if gold != -100 else 0
  out = {'acc': hit(pred), 'acc_norm': hit(pred_norm), 'acc_bytes': hit(pred_bytes),
         'exact_match': em}
  if lls_uncond is not None:
    out['acc_mutual_info'] = hit(int(np.argmax(lls - lls_uncond)))
  return {k: v for k, v in out.items() if k in names}


def _generation(task, doc, result, names) -> dict:
  gold = task.doc_to_target(doc)
  if task.cfg.get('doc_to_choice') is not None:
    gold = task.doc_to_choice(doc)[gold]
  elif task.multiple_target:
    gold = list(gold) if isinstance(gold, list) else [gold]
  elif not isinstance(gold, type(result)) and not isinstance(result, list):
    gold = type(result)(gold)
  out = {}
  for m in task.metrics:
    golds = gold if task.multiple_target else [gold]
    if m.fn is not None:
      score = m.fn(references=golds, predictions=[result], **m.kwargs)
      if isinstance(score, dict):
        out.update(score)
        continue
      out[m.name] = score
    elif m.name == 'exact_match':
      out[m.name] = 1.0 if metrics_lib.exact_match([result] * len(golds), golds,
                                                   **m.kwargs) > 0 else 0.0
    elif m.name in ('rouge', *metrics_lib.ROUGE_TYPES):
      types = ('rouge1', 'rouge2', 'rougeLsum') if m.name == 'rouge' else (m.name,)
      best = [metrics_lib.rouge(result, g, types) for g in golds]
      out.update({t: max(b[t] for b in best) for t in types})
    else:  # corpus metrics keep (reference, prediction) for their aggregation
      out[m.name] = (gold, result)
  return out


def aggregate(task: task_config.Task, items: dict, bootstrap_iters: int, backend=None) -> dict:
  """{metric[,filter]: value, metric_stderr[,filter]: stderr or None}."""
  specs = {m.name: m for m in task.metrics}
  out = {}
  for (metric, filter_name), values in items.items():
    spec = specs.get(metric)
    agg = spec.aggregation if spec is not None else 'mean'
    if metric in metrics_lib.ROUGE_TYPES and 'rouge' in specs and metric not in specs:
      agg = 'mean'
    if agg == 'mauve':
      fn = metrics_lib.mauve_aggregation(backend.features)
    elif callable(agg):
      fn = agg
    else:
      fn = metrics_lib.AGGREGATIONS[agg]
    suffix = '' if filter_name == 'none' else f',{filter_name}'
    value = fn(values)
    out[metric + suffix] = float(value) if isinstance(value, int | float | np.number) else value
    se = metrics_lib.stderr(metric, fn, values, bootstrap_iters)
    out[f'{metric}_stderr{suffix}'] = None if se is None or math.isnan(se) else float(se)
  return out
