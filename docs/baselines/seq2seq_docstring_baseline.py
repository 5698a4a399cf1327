"""Floors for the seq2seq docstring demo (configs/seq2seq.py:docstring): held-out BLEU and
ROUGE of docstrings written without a model, on the same examples and with the same scoring
as the task's `eval/bleu`, `eval/rouge1`, `eval/rouge2` and `eval/rougeL`.

  python docs/baselines/seq2seq_docstring_baseline.py [--num_generate=256]

Baselines, each a "docstring summary" for every held-out function:
  name       the function's name split into lower-case words (`_get_fileobj` -> "get fileobj");
  return     "Return the " + those words + "." (many summaries open with "Return");
  frequent   the most frequent summary of the training functions.
"""

import collections
import re

from absl import app, flags

from configs import seq2seq as seq2seq_config
from data import stdlib_functions
from train.tasks.seq2seq import text_scores

_NUM = flags.DEFINE_integer('num_generate', 0, 'Held-out examples (0: the preset\'s).')


def name_words(name: str) -> str:
  """`_readHeaderLine` -> 'read header line'."""
  spaced = re.sub(r'(?<=[a-z0-9])(?=[A-Z])', ' ', name).replace('_', ' ')
  return ' '.join(spaced.lower().split())


def main(argv):
  del argv
  c = seq2seq_config.get_config('docstring')
  n = _NUM.value or c.eval.num_generate
  held_out = list(stdlib_functions.stdlib_examples(
      'validation', c.data.val_fraction, make=stdlib_functions.docstring_examples))[:n]
  train = stdlib_functions.stdlib_examples('train', c.data.val_fraction,
                                           make=stdlib_functions.docstring_examples)
  frequent, count = collections.Counter(e['target'] for e in train).most_common(1)[0]
  refs = [e['target'] for e in held_out]
  print(f'{len(refs)} held-out summaries; most frequent training summary ({count}x): '
        f'{frequent!r}')
  for label, preds in (
      ('name', [name_words(e['name']) for e in held_out]),
      ('return', [f'Return the {name_words(e["name"])}.' for e in held_out]),
      ('frequent', [frequent] * len(refs))):
    scores = text_scores(refs, preds)
    print(f'{label:9s} ' + '  '.join(f'{k} {v:.4f}' for k, v in scores.items()))


if __name__ == '__main__':
  app.run(main)
