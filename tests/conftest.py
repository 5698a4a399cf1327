"""Every test process sees 8 fake CPU devices, so multi-device code is tested
on real meshes. This must run before jax initialises its backends.

Compiling is most of the cost of these tests on CPU (they run a few steps of
small models), so subprocesses inherit two settings through the environment:
a persistent compilation cache for the session (many tests train the same
small model), LLVM optimisation level 0, which halves compile time, and XLA's
older elemental CPU emitters instead of its fusion emitters, which compile the
steps of these tests 2 to 3 times faster again. Each test compares paths
compiled the same way.

The suite runs on two pytest-xdist workers (`addopts` in pyproject.toml). This
file is imported by the controller first, before it starts the workers, and the
workers inherit its environment: they all share the controller's compilation
cache and classifier cache (written atomically, so a race costs time, never a
wrong read), which the controller alone removes at exit.
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['JAX_NUM_CPU_DEVICES'] = os.environ.get('KILN_TEST_DEVICES', '8')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='kiln-test-jax-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
# Trained evaluation classifiers (train/image_eval.py) go to a session directory, never
# to the user's ~/.cache/kiln.
if 'KILN_CACHE' not in os.environ:
  os.environ['KILN_CACHE'] = tempfile.mkdtemp(prefix='kiln-test-cache-')
  atexit.register(shutil.rmtree, os.environ['KILN_CACHE'], ignore_errors=True)
# The trainer runs its jitted step under this transfer guard (train/trainer.py): an implicit
# host transfer inside any test's training step is an error.
os.environ.setdefault('KILN_TRANSFER_GUARD', 'disallow')
# XLA's CPU fusion emitters (MLIR) compile a small train step 2 to 3 times slower than the
# elemental emitters they replace, at O0 too (the steps then run about 20% faster, which
# only long runs notice). A flag the user sets in XLA_FLAGS wins, e.g.
# XLA_FLAGS=--xla_cpu_use_fusion_emitters=true to time the suite both ways.
for _flag in ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false'):
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):  # workers inherit them
    os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), _flag]).strip()

# The slowest tests that are not in a group, started first so that the two workers
# finish together instead of one running a long test alone at the end.
SLOW_FIRST = (  # 20, 16, 15 and 11 s alone on a quiet machine (2026-12-01)
    'test_attention.py::test_training_with_pallas_matches_xla',
    'test_diffusion.py::test_unet_shapes_and_conditioning',
    'test_diffusion.py::test_generate_and_grid',
    'test_bench.py::test_every_implementation_runs_on_the_same_inputs_and_is_checked',
)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the marks
def pytest_collection_modifyitems(items):
  """Tests that share a module-scoped fixture of their file (a trained run, an import),
  directly or through another test's fixtures, run on one worker, so each fixture is built
  once (`--dist loadgroup`, which starts the largest groups first): a file's fixtures are
  joined into connected sets (tests using {a, b} and {b, c} make one group a, b, c). All
  other tests are spread one by one; known slow tests go first among those."""
  shared = {}
  for item in items:
    path = item.nodeid.split('::')[0]
    info = getattr(item, '_fixtureinfo', None)
    names = {d.argname for defs in (info.name2fixturedefs.values() if info else ())
             for d in defs if d.scope in ('module', 'package') and d.baseid == path}
    if names:
      shared[item] = (path, names)
  parent = {}  # union-find over (file, fixture name)

  def root(key):
    while parent.setdefault(key, key) != key:
      key = parent[key]
    return key

  for path, names in shared.values():
    first, *rest = sorted(names)
    root((path, first))
    for name in rest:
      parent[root((path, name))] = root((path, first))
  members = {}
  for key in list(parent):
    members.setdefault(root(key), []).append(key[1])
  for item, (path, names) in shared.items():
    group = sorted(members[root((path, min(names)))])
    item.add_marker(pytest.mark.xdist_group(f'{path}:{",".join(group)}'))
  rank = lambda item: next(  # noqa: E731
      (i for i, key in enumerate(SLOW_FIRST) if key in item.nodeid), len(SLOW_FIRST))
  items.sort(key=rank)
