"""lm-evaluation-harness's metrics and aggregations, with the same numbers.

A task scores each document into per-document items (`METRICS`: an accuracy 0/1, a
(log-likelihood, bytes) pair, a (reference, prediction) pair), then aggregates each
metric's items over the documents (`AGGREGATIONS`), and gives a standard error where
lm-eval gives one (`stderr`): the closed form for a mean, a bootstrap for the corpus
metrics (perplexity, BLEU, chrF, TER), with lm-eval's seeding, so the bootstrap numbers
match too. BLEU, chrF and TER are sacrebleu's corpus scores; ROUGE is rouge-score's
F-measure per document, averaged (what Hugging Face `evaluate`'s rouge reports).

Written here, not imported from lm-eval, because lm-eval is a test-only dependency (it
pulls in torch); tests/test_evals_harness.py holds these against lm-eval's own results.
"""

import math
import random
import re
import string
from collections.abc import Callable, Sequence

import numpy as np

# --- aggregations -----------------------------------------------------------------------


def mean(items: Sequence[float]) -> float:
  return sum(items) / len(items)


def median(items: Sequence[float]) -> float:
  return sorted(items)[len(items) // 2]


def weighted_mean(items: Sequence[tuple[float, float]]) -> float:
  values, weights = zip(*items, strict=True)
  return sum(values) / sum(weights)


def perplexity(items: Sequence[float]) -> float:
  """exp of the mean negative log-likelihood (items: log-likelihoods)."""
  return math.exp(-mean(items))


def weighted_perplexity(items: Sequence[tuple[float, float]]) -> float:
  """exp(-sum log-likelihood / sum units): per word or per byte."""
  return math.exp(-weighted_mean(items))


def bits_per_byte(items: Sequence[tuple[float, float]]) -> float:
  """-sum log-likelihood (nats) / sum bytes / ln 2: independent of the tokenizer."""
  return -weighted_mean(items) / math.log(2)


def _sacreformat(items):
  """(references as sacrebleu's list of reference streams, predictions) from
  (reference, prediction) items; a reference may be a list of alternatives."""
  refs, preds = zip(*items, strict=True)
  refs = [r if isinstance(r, list | tuple) else [r] for r in refs]
  preds = [p[0] if isinstance(p, list | tuple) else p for p in preds]
  return [list(stream) for stream in zip(*refs, strict=True)], preds


def bleu(items) -> float:
  import sacrebleu
  refs, preds = _sacreformat(items)
  return sacrebleu.corpus_bleu(preds, refs).score


def chrf(items) -> float:
  import sacrebleu
  refs, preds = _sacreformat(items)
  return sacrebleu.corpus_chrf(preds, refs).score


def ter(items) -> float:
  import sacrebleu
  refs, preds = _sacreformat(items)
  return sacrebleu.corpus_ter(preds, refs).score


AGGREGATIONS: dict[str, Callable] = {
    'mean': mean, 'median': median, 'perplexity': perplexity,
    'weighted_perplexity': weighted_perplexity, 'bits_per_byte': bits_per_byte,
    'bleu': bleu, 'chrf': chrf, 'ter': ter,
}

# --- standard errors ----------------------------------------------------------------------


def sample_stddev(xs: Sequence[float]) -> float:
  mu = mean(xs)
  return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def mean_stderr(xs: Sequence[float]) -> float:
  return sample_stddev(xs) / math.sqrt(len(xs))


def bootstrap_stderr(fn: Callable, items: Sequence, iters: int) -> float:
  """lm-eval's bootstrap: chunks of min(1000, iters) resamples, chunk i drawn with
  random.Random(i), and the sample standard deviation of fn over all resamples."""
  chunk = min(1000, iters)
  values = []
  for i in range(iters // chunk):
    rnd = random.Random(i)
    values += [fn(rnd.choices(items, k=len(items))) for _ in range(chunk)]
  return sample_stddev(values)


_BOOTSTRAPPED = (median, perplexity, bleu, chrf, ter)
_CORPUS_TEXT = ('bleu', 'chrf', 'ter')  # lm-eval caps their bootstrap at 100 resamples


def stderr(metric: str, aggregation: Callable, items: Sequence,
           bootstrap_iters: int) -> float | None:
  """The standard error lm-eval reports for `metric` aggregated by `aggregation`, or None
  where it reports 'N/A' (weighted perplexities, bits per byte, custom aggregations, one
  item, bootstrap_iters <= 0)."""
  if bootstrap_iters <= 0 or len(items) < 2:
    return None
  if aggregation is mean:
    return mean_stderr(items)
  if aggregation in _BOOTSTRAPPED:
    iters = min(bootstrap_iters, 100) if metric in _CORPUS_TEXT else bootstrap_iters
    return bootstrap_stderr(aggregation, list(items), iters)
  return None

# --- per-document metrics -------------------------------------------------------------------


def exact_match(predictions: Sequence[str], references: Sequence[str],
                regexes_to_ignore: Sequence[str] | None = None, ignore_case: bool = False,
                ignore_punctuation: bool = False, ignore_numbers: bool = False) -> float:
  """The share of predictions equal to their reference after the optional normalisations
  (Hugging Face evaluate's exact_match, which lm-eval uses)."""
  preds, refs = list(predictions), list(references)
  for pattern in regexes_to_ignore or ():
    preds = [re.sub(pattern, '', x) for x in preds]
    refs = [re.sub(pattern, '', x) for x in refs]
  drop = ''
  if ignore_punctuation:
    drop += string.punctuation
  if ignore_numbers:
    drop += string.digits
  table = str.maketrans('', '', drop)
  if ignore_case:
    preds, refs = [x.lower() for x in preds], [x.lower() for x in refs]
  preds, refs = [x.translate(table) for x in preds], [x.translate(table) for x in refs]
  return float(np.mean([p == r for p, r in zip(preds, refs, strict=True)]))


ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL', 'rougeLsum')


def rouge(prediction: str, reference: str, types: Sequence[str] = ('rouge1', 'rouge2',
                                                                   'rougeLsum')) -> dict:
  """rouge-score's F-measure of each ROUGE type for one document."""
  from rouge_score import rouge_scorer
  scores = _rouge_scorer(tuple(types), rouge_scorer).score(reference, prediction)
  return {t: scores[t].fmeasure for t in types}


_SCORERS: dict = {}


def _rouge_scorer(types, module):
  if types not in _SCORERS:
    _SCORERS[types] = module.RougeScorer(list(types))
  return _SCORERS[types]


# Per-document metric: (output types it applies to, its aggregation, higher is better).
# The value itself is computed by the runner from the backend's results (lm-eval's
# `process_results`); corpus metrics (bleu, chrf, ter, mauve) keep (reference, prediction).
METRICS: dict[str, tuple[tuple[str, ...], str, bool]] = {
    'acc': (('loglikelihood', 'multiple_choice'), 'mean', True),
    'acc_norm': (('multiple_choice',), 'mean', True),
    'acc_bytes': (('multiple_choice',), 'mean', True),
    'acc_mutual_info': (('multiple_choice',), 'mean', True),
    'exact_match': (('multiple_choice', 'generate_until'), 'mean', True),
    'perplexity': (('loglikelihood',), 'perplexity', False),
    'word_perplexity': (('loglikelihood_rolling',), 'weighted_perplexity', False),
    'byte_perplexity': (('loglikelihood_rolling',), 'weighted_perplexity', False),
    'bits_per_byte': (('loglikelihood_rolling',), 'bits_per_byte', False),
    'bleu': (('generate_until',), 'bleu', True),
    'chrf': (('generate_until',), 'chrf', True),
    'ter': (('generate_until',), 'ter', False),
    'rouge': (('generate_until',), 'mean', True),  # expands to rouge1, rouge2, rougeLsum
    **{t: (('generate_until',), 'mean', True) for t in ROUGE_TYPES},
    'mauve': (('generate_until',), 'mauve', True),
}

# lm-eval's metrics when a task lists none.
DEFAULT_METRICS = {
    'loglikelihood': ('perplexity', 'acc'),
    'loglikelihood_rolling': ('word_perplexity', 'byte_perplexity', 'bits_per_byte'),
    'multiple_choice': ('acc', 'acc_norm'),
    'generate_until': ('exact_match',),
}


def mauve_aggregation(features_fn: Callable) -> Callable:
  """MAUVE of the predictions against the references, on `features_fn`'s features
  (evals/mauve.py, imported when a task asks for it)."""
  def aggregate(items) -> float:
    from evals import mauve as mauve_lib
    refs, preds = zip(*items, strict=True)
    refs = [r[0] if isinstance(r, list | tuple) else r for r in refs]
    return float(mauve_lib.mauve(list(preds), list(refs), features_fn=features_fn))
  return aggregate
