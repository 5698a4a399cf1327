"""Embedded instruction data: complete a stdlib function's body from its signature and docstring.

Every function and method of the interpreter's standard library (data/sources.py's stdlib
corpus) that has a docstring and a body after it is one prompt/completion example:

  prompt      the `def` line(s) and the docstring, as in the source, dedented;
  completion  the rest of the body, up to the function's last line.

Modules are split into train and validation as the LM's stdlib source splits them (a hash
of the module's path, `sources.held_out`), so no module gives examples to both splits and
a model pretrained on the stdlib's training split has not read the validation functions.
Nothing is downloaded.
"""

import ast
import os
import textwrap
from collections.abc import Iterator, Sequence

from data import sources


def function_examples(text: str) -> Iterator[dict[str, str]]:
  """{'prompt', 'completion', 'name'} of each documented function in the module `text`.

  Functions whose body is only the docstring, or whose docstring shares its last line
  with code, are skipped: they have no completion to learn.
  """
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
    doc_end = node.body[0].end_lineno
    if node.body[1].lineno <= doc_end:
      continue
    head = lines[node.lineno - 1:doc_end]
    body = lines[doc_end:node.end_lineno]
    # dedent keeps the line count, so the prompt is still the first len(head) lines.
    whole = textwrap.dedent(''.join(head + body)).splitlines(keepends=True)
    prompt, completion = ''.join(whole[:len(head)]), ''.join(whole[len(head):])
    if not completion.endswith('\n'):
      completion += '\n'
    if completion.strip():
      yield {'prompt': prompt, 'completion': completion, 'name': node.name}


def stdlib_examples(split: str, val_fraction: float,
                    modules: Sequence[str] | None = None) -> Iterator[dict[str, str]]:
  """The examples of `split` ('train' or 'validation'), module by module in sorted order,
  each with its 'module' (path relative to the stdlib root).

  Args:
    split: 'train' or 'validation'.
    val_fraction: the share of modules held out (`sources.held_out`).
    modules: the modules to read (default: all of `sources.stdlib_modules()`).
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
    for example in function_examples(text):
      yield {**example, 'module': rel}
