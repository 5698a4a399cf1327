"""Embedded data from the stdlib's documented functions: two tasks on the same functions.

Every function and method of the interpreter's standard library (data/sources.py's stdlib
corpus) that has a docstring and a body after it is one example of each:

  SFT (function_examples), complete a body from its signature and docstring:
    prompt      the `def` line(s) and the docstring, as in the source, dedented;
    completion  the rest of the body, up to the function's last line.
  seq2seq (docstring_examples), write a function's docstring summary from its code:
    input       the function's source with its docstring removed, dedented;
    target      the docstring's first paragraph (its summary) on one line.

Modules are split into train and validation as the LM's stdlib source splits them (a hash
of the module's path, `sources.held_out`), so no module gives examples to both splits and
a model pretrained on the stdlib's training split has not read the validation functions.
Nothing is downloaded.
"""

import ast
import os
import textwrap
from collections.abc import Callable, Iterator, Sequence

from data import sources


def _documented_functions(text: str) -> Iterator[tuple[ast.FunctionDef, list[str]]]:
  """(node, the module's lines) of each function in the module `text` that has a docstring
  and code after it on later lines. Functions whose body is only the docstring, or whose
  docstring shares its last line with code, are skipped: they have no code to learn."""
  try:
    tree = ast.parse(text)
  except (SyntaxError, ValueError):  # test fixtures with deliberate errors, null bytes
    return
  lines = text.splitlines(keepends=True)
  for node in ast.walk(tree):
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
      continue
    if ast.get_docstring(node, clean=False) is None or len(node.body) < 2:
      continue
    if node.body[1].lineno <= node.body[0].end_lineno:
      continue
    yield node, lines


def function_examples(text: str) -> Iterator[dict[str, str]]:
  """{'prompt', 'completion', 'name'} of each documented function in the module `text`."""
  for node, lines in _documented_functions(text):
    doc_end = node.body[0].end_lineno
    head = lines[node.lineno - 1:doc_end]
    body = lines[doc_end:node.end_lineno]
    # dedent keeps the line count, so the prompt is still the first len(head) lines.
    whole = textwrap.dedent(''.join(head + body)).splitlines(keepends=True)
    prompt, completion = ''.join(whole[:len(head)]), ''.join(whole[len(head):])
    if not completion.endswith('\n'):
      completion += '\n'
    if completion.strip():
      yield {'prompt': prompt, 'completion': completion, 'name': node.name}


def docstring_examples(text: str) -> Iterator[dict[str, str]]:
  """{'input', 'target', 'name'} of each documented function in the module `text`.

  The target is the docstring's first paragraph, not its first line: PEP 257's one-line
  summary often wraps over two or three lines in the stdlib ("Return the ...\n    of ..."),
  and its first line alone is then half a sentence. Later paragraphs (arguments, examples,
  caveats) are left out: they say what the code cannot show. Functions whose summary is
  empty, or whose docstring starts on the `def` line, are skipped.
  """
  for node, lines in _documented_functions(text):
    doc = node.body[0]
    summary = ' '.join(ast.get_docstring(node).split('\n\n')[0].split())
    if not summary or doc.lineno == node.lineno:  # no summary, or `def f(): """doc"""`
      continue
    # The `def` line(s), then the code after the docstring.
    code = lines[node.lineno - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    source = textwrap.dedent(''.join(code))
    yield {'input': source if source.endswith('\n') else source + '\n', 'target': summary,
           'name': node.name}


def stdlib_examples(split: str, val_fraction: float, modules: Sequence[str] | None = None,
                    make: Callable[[str], Iterator[dict[str, str]]] = function_examples
                    ) -> Iterator[dict[str, str]]:
  """The examples of `split` ('train' or 'validation'), module by module in sorted order,
  each with its 'module' (path relative to the stdlib root).

  Args:
    split: 'train' or 'validation'.
    val_fraction: the share of modules held out (`sources.held_out`).
    modules: the modules to read (default: all of `sources.stdlib_modules()`).
    make: the examples of one module's text (function_examples or docstring_examples).
  """
  root = sources.stdlib_root()
  for rel in sources.stdlib_modules() if modules is None else modules:
    if sources.held_out(rel, val_fraction) != (split == 'validation'):
      continue
    try:
      with open(os.path.join(root, rel), encoding='utf-8') as f:
        text = f.read()
    except UnicodeDecodeError:
      continue  # a few deliberate non-UTF-8 fixtures, as the LM source skips them
    for example in make(text):
      yield {**example, 'module': rel}
