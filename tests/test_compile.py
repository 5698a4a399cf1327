"""Ahead-of-time memory plans (launch/compile.py) on the 8 fake CPU devices.

The TPU route differs only in where the devices come from (libtpu's compile-only topology
instead of this host's CPUs), so one compile of a tiny LM's real train step checks the
machinery: the per-device argument bytes against a count by hand from the model's shapes
and the mesh, the total against XLA's parts, and the report of a plan that cannot fit a
tiny HBM. Topology names are checked against Cloud TPU's documented slice shapes.
"""

import types

import numpy as np
import pytest

from configs import lm
from data.errors import ConfigError, exit_on_user_error
from launch import compile as compile_lib
from model import transformer
from train import trainer

D, V, N, H, K, DH, F = 64, 256, 2, 4, 2, 16, 192  # mlp_dim -1: 8/3 * 64 rounded up to 64s
BATCH, SEQ, DATA, FSDP = 8, 32, 2, 4
HBM = 64 * 1024  # bytes: far below what the step needs


def tiny_config():
  c = lm.get_config('tiny')
  c.model.update(vocab_size=V, d_model=D, n_layers=N, n_heads=H, n_kv_heads=K)
  c.data.update(seq_len=SEQ)
  c.batch_size = BATCH
  c.mesh.update(data=DATA, fsdp=FSDP)
  return c


@pytest.fixture(scope='module')
def plan():
  return compile_lib.memory_plan(tiny_config(), 'cpu', hbm_bytes=HBM)


def test_argument_bytes_are_the_shards_counted_by_hand(plan):
  # Every weight splits its d_model ('embed') dimension over fsdp; norms are replicated;
  # the embedding is tied (no lm_head). Parameters, Adam's mu and nu: float32 each.
  sharded = V * D + N * (D * H * DH + 2 * D * K * DH + H * DH * D + 3 * D * F)
  replicated = N * 2 * D + D  # attention and MLP norm per layer, final norm
  params = sharded // FSDP + replicated
  # The batch: 4 int32 fields [BATCH, SEQ] split over data * fsdp.
  batch = 4 * BATCH * SEQ // (DATA * FSDP)
  # Scalars: the int32 step, the rng key (2 x uint32) and 4 int32 counters (Adam's and the
  # schedule's counts, apply_if_finite's two non-finite counts). apply_if_finite's bool
  # `last_finite` is written but never read, so jit drops it from the arguments.
  assert plan.argument_bytes == 4 * (3 * params + batch + 1 + 2 + 4)


def test_plan_fields(plan):
  assert plan.chip == 'cpu' and plan.n_devices == 8 and plan.hbm_bytes == HBM
  assert plan.mesh == dict(data=DATA, stage=1, fsdp=FSDP, expert=1, context=1, tensor=1)
  # The donated state comes back in place: every output but the metrics aliases an argument.
  assert 0 < plan.alias_bytes <= plan.output_bytes < plan.alias_bytes + 1024
  assert plan.per_device_bytes == (plan.argument_bytes + plan.output_bytes - plan.alias_bytes
                                   + plan.temp_bytes + plan.code_bytes)
  assert not plan.fits and plan.compile_seconds > 0
  # One device's FLOPs are about an eighth of the step's model FLOPs (6 N per token for the
  # matmuls plus attention): XLA counts per device, not for the whole program.
  cfg = trainer.validate(tiny_config(), 8, 1).model_cfg
  model_flops = transformer.train_flops_per_token(cfg, SEQ) * BATCH * SEQ
  assert 0.5 < plan.flops / (model_flops / 8) < 2.0
  assert plan.model_flops == model_flops / 8
  assert plan.bytes_accessed > plan.argument_bytes


def test_a_plan_that_does_not_fit_names_its_largest_arrays(plan):
  text = compile_lib.report(plan, tiny_config())
  assert 'DOES NOT FIT' in text and 'of HBM' in text and '64.00 KiB' in text
  # The MLP weights and their Adam moments are the largest: [N, D, F] / FSDP float32.
  largest = plan.largest_arrays[0]
  assert largest.per_device_bytes == N * D * F // FSDP * 4
  assert "state.params['blocks']['mlp']['w_down']" in text
  assert f'{N * D * F // FSDP * 4 / 1024:.2f} KiB' in text
  assert '--config.mesh.fsdp' in text and '--config.model.remat=full' in text


def test_a_plan_that_fits_says_so(plan):
  fitting = compile_lib.MemoryPlan(**{**vars(plan), 'hbm_bytes': 1 << 40, 'fits': True})
  text = compile_lib.report(fitting, tiny_config())
  assert text.endswith('Fits.') and 'Largest arrays' not in text


@pytest.mark.parametrize('name, grid, devices', [
    # Cloud TPU's default slice shapes (v4 and v5p names count TensorCores, 2 per chip).
    ('v5p-8', (2, 2, 1), 4), ('v5p-16', (2, 2, 2), 8), ('v5p-64', (2, 4, 4), 32),
    ('v5p-256', (4, 4, 8), 128), ('v5p-1024', (8, 8, 8), 512), ('v4-32', (2, 2, 4), 16),
    ('v5e-1', (1, 1), 1), ('v5e-8', (2, 4), 8), ('v5e-16', (4, 4), 16),
    ('v5litepod-64', (8, 8), 64), ('v6e-256', (16, 16), 256), ('v5p:4x4x12', (4, 4, 12), 192),
])
def test_topology_names(name, grid, devices):
  topology = compile_lib.parse_topology(name)
  assert topology.grid == grid and np.prod(grid) == devices


@pytest.mark.parametrize('name, message', [
    ('v5x-16', 'is not a TPU slice name'),
    ('tpu', 'is not a TPU slice name'),
    ('v5p-7', 'counts TensorCores, 2 per chip'),
    ('v5p-384', 'give its chip grid instead, e.g. v5p:2x2x1'),
    ('v5e-12', 'give its chip grid instead'),
    ('v5p:4x4', 'a v5p grid has 3 positive sizes'),
])
def test_bad_topology_names(name, message):
  with pytest.raises(ConfigError, match=message):
    compile_lib.parse_topology(name)


def test_without_libtpu_one_line_says_what_to_install(monkeypatch):
  monkeypatch.setattr(compile_lib, 'libtpu_available', lambda: False)
  with pytest.raises(ConfigError, match=r'needs libtpu: pip install "kiln\[aot\]"'):
    compile_lib.topology_devices(compile_lib.parse_topology('v5p-8'))


def test_parse_libtpu_out_of_memory_message():
  message = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
             'temporaries (172.22G) exceeds available HBM (95.74G).')
  assert compile_lib.parse_oom(message) == (int(172.22 * 2**30), int(95.74 * 2**30))
  assert compile_lib.parse_oom('RESOURCE_EXHAUSTED: something else') is None


def test_command_line_bad_topology_is_one_line(capsys):
  # What `python -m launch.compile --config=configs/lm.py --topology=v9-8` runs after absl
  # parses its flags (the flag objects stand in for absl's).
  flag = {name: types.SimpleNamespace(value=value) for name, value in (
      ('config', lm.get_config('tiny')), ('topology', 'v9-8'), ('hbm_gib', None),
      ('json', False))}
  with pytest.raises(SystemExit) as exit_info:
    exit_on_user_error(lambda: compile_lib._run(['launch.compile'], flag))
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == (
      "Config error: --topology='v9-8' is not a TPU slice name; use v4-N, v5p-N, v5e-N, "
      'v5litepod-N, v6e-N (e.g. v5p-256, v5e-16), a chip grid such as v5p:4x4x12, or cpu.\n')
