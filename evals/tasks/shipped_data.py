"""The documents of the shipped tasks, built offline from what Kiln already holds.

Each public function is a task's `custom_dataset` (lm-eval's TaskConfig key, named in the
YAML beside this file as `!function shipped_data.<fn>`): it returns {'test': docs}. lm-eval
calls it with the task's `metadata` and the model arguments as keyword arguments, so every
function takes `**unused`; its own keyword arguments (the caps) can be changed with
lm-eval's `--metadata='{"max_docs": 20}'`.

The stdlib tasks read the modules the LM holds out (`data.sources.held_out` over
`sources.stdlib_modules()`, the split `configs/lm.py`'s `data.val_fraction` makes), so a
model trained on the stdlib corpus is scored on modules it never read. Documents are in a
fixed shuffled order, so lm-eval's `--limit N` (the first N) spans many modules rather than
the first one. The texts depend on the running interpreter's stdlib, as the corpus does.
"""

import ast
import functools
import inspect
import os
import pathlib
import random
import re
from collections.abc import Iterator

import ml_collections

from data import sources, stdlib_functions
from data.errors import DataError

# configs/lm.py's data.val_fraction: the share of stdlib modules the LM holds out.
STDLIB_VAL_FRACTION = 0.1
# The file README.md's nanogpt_cpu command trains on (--config.data.path), from the
# repository root; nanogpt_cpu's val_fraction.
SHAKESPEARE = (pathlib.Path(__file__).resolve().parents[3] / 'shared' / 'data'
               / 'tinyshakespeare.txt')
SHAKESPEARE_VAL_FRACTION = 0.1
_ORDER_SEED = 0


class Docs(list):
  """A list of document dicts that also answers `.features` (their keys), the one
  attribute of a `datasets.Dataset` that lm-eval's ConfigurableTask reads beyond list
  behaviour. Kiln's harness reads it as the list it is; no `datasets` import at run time."""

  @property
  def features(self) -> dict[str, None]:
    return dict.fromkeys(self[0]) if self else {}


def _shuffled(items: list, seed: int = _ORDER_SEED) -> list:
  items = list(items)
  random.Random(seed).shuffle(items)
  return items


@functools.cache
def _held_out_modules(val_fraction: float) -> tuple[str, ...]:
  """The held-out stdlib modules (paths relative to the stdlib root), in a fixed shuffled
  order."""
  held = [m for m in sources.stdlib_modules() if sources.held_out(m, val_fraction)]
  return tuple(_shuffled(held))


def _read_module(rel: str) -> str | None:
  try:
    with open(os.path.join(sources.stdlib_root(), rel), encoding='utf-8') as f:
      return f.read()
  except UnicodeDecodeError:
    return None  # the LM source skips these deliberate non-UTF-8 fixtures too


def _head(text: str, max_chars: int) -> str:
  """The first `max_chars` characters of `text`, cut back to a line end when one is there."""
  if len(text) <= max_chars:
    return text
  cut = text.rfind('\n', 0, max_chars)
  return text[:cut + 1] if cut > 0 else text[:max_chars]


def stdlib_ppl(max_docs: int = 40, max_chars: int = 4000,
               val_fraction: float = STDLIB_VAL_FRACTION, **unused) -> dict[str, Docs]:
  """Held-out stdlib modules as {'text', 'module'}: the first `max_chars` characters (cut
  at a line end) of each of `max_docs` modules. The caps keep the task about a minute on
  one CPU core for the tiny model; raise them for a tighter estimate."""
  del unused
  docs = Docs()
  for rel in _held_out_modules(float(val_fraction)):
    if len(docs) >= int(max_docs):
      break
    text = _read_module(rel)
    if text and text.strip():
      docs.append({'text': _head(text, int(max_chars)), 'module': rel})
  return {'test': docs}


def _is_test_code(rel: str) -> bool:
  return any(part in ('test', 'tests', 'idle_test') for part in rel.split('/')[:-1])


def _functions(val_fraction: float, per_module: int = 5) -> Iterator[dict]:
  """stdlib_functions' examples of the held-out library modules (the test suite left out),
  module by module in their fixed shuffled order, at most `per_module` from each (a fixed
  sample of its functions), so a hundred documents span twenty-odd modules and only those
  modules are parsed."""
  for rel in _held_out_modules(val_fraction):
    if _is_test_code(rel):
      continue
    examples = list(stdlib_functions.stdlib_examples('validation', val_fraction, modules=[rel]))
    yield from _shuffled(examples)[:per_module]


def stdlib_completion(max_docs: int = 100, val_fraction: float = STDLIB_VAL_FRACTION,
                      **unused) -> dict[str, Docs]:
  """Next-line completion: {'context', 'target', 'name', 'module'} per documented held-out
  function. The context is the function's `def` line(s) and docstring (and any blank lines
  after it), the target its first line of code, without its indentation or newline."""
  del unused
  docs = Docs()
  for ex in _functions(float(val_fraction)):
    if len(docs) >= int(max_docs):
      break
    body = ex['completion'].splitlines(keepends=True)
    first = next(i for i, line in enumerate(body) if line.strip())
    docs.append({'context': ex['prompt'] + ''.join(body[:first]),
                 'target': body[first].strip(), 'name': ex['name'], 'module': ex['module']})
  return {'test': docs}


def _split_docstring(prompt: str) -> tuple[str, str] | None:
  """(the `def` line(s), the cleaned docstring) of a stdlib_functions prompt, which is a
  function's header and docstring (a valid function on its own)."""
  try:
    node = ast.parse(prompt).body[0]
  except (SyntaxError, IndexError):
    return None
  doc = ast.get_docstring(node, clean=True)
  lines = prompt.splitlines(keepends=True)
  return ''.join(lines[:node.body[0].lineno - 1]), doc or ''


def summary(docstring: str) -> str:
  """A docstring's first paragraph on one line (what the docstring task asks for)."""
  first = inspect.cleandoc(docstring).split('\n\n')[0]
  return ' '.join(first.split())


def stdlib_docstring(max_docs: int = 100, max_code_chars: int = 1500,
                     val_fraction: float = STDLIB_VAL_FRACTION, **unused) -> dict[str, Docs]:
  """Docstring generation: {'code', 'target', 'name', 'module'} per documented held-out
  function of at most `max_code_chars` characters without its docstring. `code` is the
  function with the docstring removed; `target` the docstring's first paragraph."""
  del unused
  docs = Docs()
  for ex in _functions(float(val_fraction)):
    if len(docs) >= int(max_docs):
      break
    parts = _split_docstring(ex['prompt'])
    if parts is None:
      continue
    header, doc = parts
    target = summary(doc)
    code = header + ex['completion']
    if target and len(code) <= int(max_code_chars):
      docs.append({'code': code, 'target': target, 'name': ex['name'], 'module': ex['module']})
  return {'test': docs}


def docstring_results(doc: dict, results: list[str]) -> dict:
  """Per-document scores of the docstring task (its `process_results`): the (reference,
  prediction) pair that lm-eval's `bleu` aggregation (sacrebleu's corpus BLEU) reads, and
  ROUGE-1/2/L F-measures from rouge-score, averaged over documents. The prediction is the
  generation's whitespace-normalised text, as the target is."""
  from rouge_score import rouge_scorer  # only this task needs it

  prediction = ' '.join(results[0].split())
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True)
  scores = scorer.score(doc['target'], prediction)
  return {'bleu': (doc['target'], prediction),
          **{name: score.fmeasure for name, score in scores.items()}}


def shakespeare_bpb(shakespeare_path: str = '', chunk_chars: int = 2000,
                    val_fraction: float = SHAKESPEARE_VAL_FRACTION, **unused) -> dict[str, Docs]:
  """Tiny Shakespeare's validation split (the last `val_fraction` of its characters, as
  the `text` source splits it for nanogpt_cpu) as {'text'} chunks of whole speeches (cut
  after a blank line) of about `chunk_chars` characters; the chunks join back to the split."""
  del unused
  path = pathlib.Path(shakespeare_path or SHAKESPEARE)
  if not path.is_file():
    raise DataError(f'shakespeare_bpb: {path} does not exist; give the file with '
                    '--metadata=\'{"shakespeare_path": "FILE"}\'.')
  cfg = ml_collections.ConfigDict(dict(source='text', path=str(path),
                                       val_fraction=float(val_fraction)))
  text = ''.join(sources.read_documents(cfg, 'validation'))
  docs, piece = Docs(), ''
  for block in re.split(r'(?<=\n\n)', text):
    piece += block
    if len(piece) >= int(chunk_chars):
      docs.append({'text': piece})
      piece = ''
  if piece:
    docs.append({'text': piece})
  return {'test': docs}
