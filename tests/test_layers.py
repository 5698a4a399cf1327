"""The layers of the code base, read from its import statements (`ast`, nothing imported).

Data flows one way: configs -> train -> model -> kernels, with data/ lowest and
serve/ and evals/ beside train/. So nothing in data/, model/ or kernels/
imports train/, serve/ or evals/; no module imports itself through others; and
nothing imports JAX's private modules (`jax._src`), which change without notice.
Function-level imports count: they run too, only later.

Each check also runs on a small made-up tree with the fault it looks for, so a
checker that finds nothing cannot pass by accident.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LOW_LAYERS = ('data', 'model', 'kernels')
HIGH_LAYERS = ('train', 'serve', 'evals')


def module_name(root: pathlib.Path, path: pathlib.Path) -> str:
  parts = list(path.relative_to(root).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def project_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Module name -> file, for every .py outside hidden directories."""
  files = {}
  for path in sorted(root.rglob('*.py')):
    if not any(part.startswith('.') for part in path.relative_to(root).parts):
      files[module_name(root, path)] = path
  return files


def imported_names(path: pathlib.Path, module: str) -> list[tuple[str, int]]:
  """(module, line) for every import in the file, at any depth; `from a import b` gives
  `a.b` (which is `a`'s attribute when no module `a.b` exists; see `edges`)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  package = module if path.name == '__init__.py' else module.rpartition('.')[0]
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [(alias.name, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: from the package, up level - 1
        anchor = package.split('.')[:len(package.split('.')) - (node.level - 1)]
        base = '.'.join([*anchor, base] if base else anchor)
      names.append((base, node.lineno))
      names += [(f'{base}.{alias.name}', node.lineno) for alias in node.names]
  return names


def edges(root: pathlib.Path) -> dict[str, set[str]]:
  """The project's import graph: module -> the project modules it imports."""
  files = project_files(root)
  graph = {}
  for module, path in files.items():
    targets = set()
    for name, _ in imported_names(path, module):
      if name in files and name != module:
        targets.add(name)
    graph[module] = targets
  return graph


def upward_imports(root: pathlib.Path) -> list[str]:
  found = []
  for module, path in project_files(root).items():
    if module.split('.')[0] not in LOW_LAYERS:
      continue
    for name, line in imported_names(path, module):
      if name.split('.')[0] in HIGH_LAYERS:
        found.append(f'{path.relative_to(root)}:{line} imports {name}')
  return sorted(set(found))


def private_jax_imports(root: pathlib.Path) -> list[str]:
  found = []
  for module, path in project_files(root).items():
    for name, line in imported_names(path, module):
      if name == 'jax._src' or name.startswith('jax._src.'):
        found.append(f'{path.relative_to(root)}:{line} imports {name}')
  return sorted(set(found))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), sorted."""
  index, low, on_stack, stack, found = {}, {}, set(), [], []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(found)


# --- the checkers on a made-up tree -------------------------------------------------


@pytest.fixture
def faulty_tree(tmp_path) -> pathlib.Path:
  sources = {
      'data/__init__.py': '',
      'data/a.py': 'from data import b\n',
      'data/b.py': 'def f():\n  from . import c  # late, and relative\n',
      'data/c.py': 'import data.a\n',
      'data/d.py': 'import numpy\n',
      'model/__init__.py': '',
      'model/m.py': 'def f():\n  from train.trainer import x\n',
      'kernels/__init__.py': '',
      'kernels/k.py': 'from jax._src import core\n',
      'train/__init__.py': '',
      'train/trainer.py': 'from data import d\nimport jax._src.clusters as c\nx = 1\n',
  }
  for name, text in sources.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  return tmp_path


def test_the_checkers_find_each_fault_in_a_made_up_tree(faulty_tree):
  graph = edges(faulty_tree)
  # A package counts as imported with its modules (its __init__ runs first).
  assert graph['data.a'] == {'data', 'data.b'} and graph['data.b'] == {'data', 'data.c'}
  assert graph['data.c'] == {'data.a'} and graph['train.trainer'] == {'data', 'data.d'}
  assert cycles(graph) == [['data.a', 'data.b', 'data.c']]
  assert upward_imports(faulty_tree) == ['model/m.py:2 imports train.trainer',
                                         'model/m.py:2 imports train.trainer.x']
  assert private_jax_imports(faulty_tree) == [
      'kernels/k.py:1 imports jax._src', 'kernels/k.py:1 imports jax._src.core',
      'train/trainer.py:2 imports jax._src.clusters']


# --- the real tree ------------------------------------------------------------------


def test_the_real_tree_is_read():
  graph = edges(REPO)
  assert {'data.errors', 'model.scoring', 'train.trainer', 'tests.test_layers'} <= set(graph)
  assert 'data.errors' in graph['train.trainer'] and 'model.transformer' in graph['train.tasks.lm']


def test_data_model_and_kernels_never_import_train_serve_or_evals():
  assert upward_imports(REPO) == []


def test_no_import_cycles():
  assert cycles(edges(REPO)) == []


def test_no_private_jax_modules():
  assert private_jax_imports(REPO) == []
