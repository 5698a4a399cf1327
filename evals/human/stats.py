"""The summary of a side-by-side comparison: win rate, agreement and position bias.

- Win rate of model A: (A's wins + half the ties) / (wins + ties), each judgement one
  trial; "both bad" judgements are left out. Its 95% interval is Wilson's score interval
  (Wilson 1927), which stays inside [0, 1] and is sound for small counts where the normal
  approximation is not. Judgements of one item by several annotators are not independent,
  so with many such the interval is somewhat narrower than it should be.
- Agreement between annotators, on the items that several judged, over the labels A, B,
  tie and both bad (the model judged better, not the side: each annotator sees their own
  order): Cohen's kappa when exactly two annotators share items, Fleiss' kappa when more
  do.
- Position bias: among judgements that chose a side, how often the left one won, with its
  Wilson interval; 0.5 is no bias.

These few formulas are written here rather than taken from scikit-learn or statsmodels
(the tests check them against scikit-learn and published values), so that the page
needs neither at run time.
"""

import collections
import math
from collections.abc import Iterable, Sequence

import numpy as np

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
LABELS = ('a', 'b', 'tie', 'both_bad')


def wilson_interval(successes: float, n: float, z: float = Z_95) -> tuple[float, float]:
  """Wilson's score interval for a proportion successes / n (successes may be fractional,
  as when ties count half); (0, 1) when n is 0."""
  if n <= 0:
    return 0.0, 1.0
  p = successes / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return max(0.0, centre - half), min(1.0, centre + half)


def cohen_kappa(labels1: Sequence, labels2: Sequence) -> float | None:
  """Cohen's kappa of two raters' labels of the same items; None when chance agreement is
  certain (both gave one and the same label throughout), where kappa is undefined."""
  if len(labels1) != len(labels2) or not labels1:
    raise ValueError('Cohen\'s kappa needs two equally long, nonempty label lists.')
  n = len(labels1)
  observed = sum(x == y for x, y in zip(labels1, labels2, strict=True)) / n
  count1, count2 = collections.Counter(labels1), collections.Counter(labels2)
  expected = sum(count1[k] * count2[k] for k in count1) / (n * n)
  return None if expected == 1 else (observed - expected) / (1 - expected)


def fleiss_kappa(counts_NxK: np.ndarray) -> float | None:
  """Fleiss' kappa of a table whose row i counts the raters who put item i in each
  category. Rows may have different totals (items with fewer than two ratings are left
  out): each item's agreement is the share of agreeing rater pairs among its own pairs,
  which is Fleiss' (1971) statistic when every row has the same total. None when chance
  agreement is certain."""
  counts_NxK = np.asarray(counts_NxK, np.float64)
  raters_N = counts_NxK.sum(axis=1)
  counts_NxK, raters_N = counts_NxK[raters_N >= 2], raters_N[raters_N >= 2]
  if not len(raters_N):
    return None
  agreement_N = ((counts_NxK * (counts_NxK - 1)).sum(axis=1)) / (raters_N * (raters_N - 1))
  shares_K = counts_NxK.sum(axis=0) / raters_N.sum()
  observed, expected = agreement_N.mean(), float((shares_K ** 2).sum())
  return None if expected == 1 else float((observed - expected) / (1 - expected))


def _rate(successes: float, n: float) -> dict:
  lo, hi = wilson_interval(successes, n)
  return {'rate': successes / n if n else None, 'ci95': [lo, hi] if n else None}


def agreement(judgements: Iterable[dict]) -> dict:
  """Kappa over the items judged by at least two annotators (module docstring)."""
  by_item: dict[int, dict[str, str]] = collections.defaultdict(dict)
  for j in judgements:
    by_item[j['item']][j['annotator']] = j['winner']
  shared = {item: labels for item, labels in by_item.items() if len(labels) >= 2}
  annotators = sorted({name for labels in shared.values() for name in labels})
  out = {'statistic': None, 'kappa': None, 'items': len(shared), 'annotators': annotators}
  if not shared:
    out['note'] = 'No item has been judged by two annotators yet.'
  elif len(annotators) == 2:
    first, second = annotators
    items = sorted(shared)
    out.update(statistic='cohen', kappa=cohen_kappa([shared[i][first] for i in items],
                                                    [shared[i][second] for i in items]))
  else:
    table = [[list(labels.values()).count(k) for k in LABELS] for labels in shared.values()]
    out.update(statistic='fleiss', kappa=fleiss_kappa(np.array(table)))
  if shared and out['kappa'] is None:
    out['note'] = 'Kappa is undefined: every shared judgement has the same label.'
  return out


def summarize(judgements: Sequence[dict], num_items: int) -> dict:
  """The summary (module docstring) of judgement records (`evals.human.store`)."""
  count = collections.Counter(j['winner'] for j in judgements)
  trials = count['a'] + count['b'] + count['tie']
  sided = [j for j in judgements if j['choice'] in ('left', 'right')]
  left_wins = sum(j['choice'] == 'left' for j in sided)
  return {
      'items': num_items,
      'judgements': len(judgements),
      'annotators': dict(sorted(collections.Counter(j['annotator'] for j in judgements)
                                .items())),
      'a_vs_b': {'a_wins': count['a'], 'b_wins': count['b'], 'ties': count['tie'],
                 'both_bad': count['both_bad'], 'trials': trials,
                 'win_rate_a': _rate(count['a'] + count['tie'] / 2, trials),
                 'method': 'ties count as half a win; both-bad judgements are left out; '
                           '95% Wilson score interval'},
      'position': {'left_wins': left_wins, 'right_wins': len(sided) - left_wins,
                   'left_win_rate': _rate(left_wins, len(sided)),
                   'method': 'judgements that chose a side; 0.5 is no bias; 95% Wilson '
                             'score interval'},
      'agreement': agreement(judgements),
  }


def format_summary(s: dict) -> str:
  """The summary as a few lines of text, for the terminal."""
  def rate(r):
    if r['rate'] is None:
      return 'n/a (no judgements)'
    lo, hi = r['ci95']
    return f'{r["rate"]:.3f} (95% CI {lo:.3f}-{hi:.3f})'

  w, p, g = s['a_vs_b'], s['position'], s['agreement']
  kappa = 'n/a' if g['kappa'] is None else f'{g["kappa"]:.3f}'
  names = ', '.join(f'{name} ({n})' for name, n in s['annotators'].items()) or 'none'
  return '\n'.join([
      f'{s["judgements"]} judgements of {s["items"]} items by {names}',
      f'A wins {w["a_wins"]}, B wins {w["b_wins"]}, ties {w["ties"]}, both bad '
      f'{w["both_bad"]}',
      f'Win rate of A: {rate(w["win_rate_a"])}; {w["method"]}',
      f'Left side chosen: {rate(p["left_win_rate"])} of {p["left_wins"] + p["right_wins"]} '
      'judgements that chose a side (0.5: no position bias)',
      f'Agreement: {g["statistic"] or "none"} kappa {kappa} over {g["items"]} items judged by '
      f'several of {len(g["annotators"])} annotators' + (f' ({g["note"]})' if 'note' in g
                                                         else ''),
  ])
