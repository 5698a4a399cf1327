"""Every test process sees 8 fake CPU devices, so multi-device code is tested
on real meshes. This must run before jax initialises its backends."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['JAX_NUM_CPU_DEVICES'] = os.environ.get('KILN_TEST_DEVICES', '8')
