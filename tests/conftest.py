"""Every test process sees 8 fake CPU devices, so multi-device code is tested
on real meshes. This must run before jax initialises its backends.

Compiled programs are shared through a persistent compilation cache for the
session (subprocesses inherit it through the environment): many tests train
the same small model, and compiling its step is most of their cost on CPU.
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
