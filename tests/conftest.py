"""Every test process sees 8 fake CPU devices, so multi-device code is tested
on real meshes. This must run before jax initialises its backends.

Compiling is most of the cost of these tests on CPU (they run a few steps of
small models), so subprocesses inherit two settings through the environment:
a persistent compilation cache for the session (many tests train the same
small model) and LLVM optimisation level 0, which halves compile time. Each
test compares paths compiled the same way.
"""

import atexit
import os
import shutil
import tempfile

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
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0']).strip()
