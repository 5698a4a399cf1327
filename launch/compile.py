"""Ahead-of-time memory plans: the real train step, compiled for a TPU slice on this host.

  python -m launch.compile --config=configs/lm.py:llama_7b --topology=v5p-256 \\
      [--config.key=value ...]

Before a slice is rented, this says whether a configuration fits it: the trainer's own train
step (train/trainer.py `lower_train_step`: the task's abstract state, its shardings, the
donated state) is lowered from shapes alone and compiled by libtpu for compile-only devices
of the topology (`jax.experimental.topologies.get_topology_desc`), as MaxText's
train_compile.py does. XLA's `memory_analysis()` then gives the bytes per device of the
arguments (parameters, optimizer state, batch), outputs, temporaries and generated code, and
`cost_analysis()` the FLOPs and bytes accessed of one step (what the planner reads).

Topologies are Cloud TPU's names: v4-N and v5p-N count TensorCores (two per chip, which JAX
shows as one device: v5p-256 is 128 chips), v5e-N (or v5litepod-N) and v6e-N count chips.
Power-of-two slices get the default chip grid (v5p-256 is 4x4x8); any other grid is
written out, as `v5p:4x4x12`. `cpu` compiles for this host's devices instead (no libtpu;
the tests run this same path on 8 fake CPU devices). The mesh is the config's (`mesh.*`;
a -1 axis fills the slice).

Needs libtpu: `pip install "kiln[aot]"`. libtpu's warnings about unset TPU_ACCELERATOR_TYPE
and TPU_WORKER_HOSTNAMES, printed when it loads, are harmless here.
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from data.errors import ConfigError, exit_on_user_error
from launch import chips as chips_lib
from train import mesh as mesh_lib
from train import trainer

GIB = chips_lib.GIB
AOT_INSTALL = 'pip install "kiln[aot]"'

# Cloud TPU family -> (the chip in launch/chips.py, its name in get_topology_desc's
# topology strings, ICI dimensions, chip config: megacore chips are one device of 2 cores).
_FAMILIES = {
    'v4': ('v4', 'v4', 3, 'megacore'),
    'v5p': ('v5p', 'v5p', 3, 'megacore'),
    'v5e': ('v5e', 'v5e', 2, 'default'),
    'v5litepod': ('v5e', 'v5e', 2, 'default'),
    'v6e': ('v6e', 'v6e', 2, 'default'),
}
# The smallest slice of each kind of torus, whose grid the larger ones grow from.
_SMALLEST_GRID = {2: (1, 1), 3: (2, 2, 1)}
_HOST_BOUNDS = (2, 2, 1)  # chips per host of every family above (a v5e-8 host has 8; no matter)


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice: its chip and chip grid, or this host's devices (`chip.name == 'cpu'`)."""
  name: str
  chip: chips_lib.Chip
  grid: tuple[int, ...]  # chips along each ICI axis; () for the host's CPU devices
  prefix: str = ''  # the family in get_topology_desc's names ('v5p' of 'v5p:4x4x8')
  chip_config: str = 'default'


@dataclasses.dataclass(frozen=True)
class ArrayBytes:
  """One argument of the step and what a device holds of it."""
  path: str  # e.g. "state.params['blocks']['mlp']['w_up']"
  shape: tuple[int, ...]  # global
  dtype: str
  per_device_bytes: int


@dataclasses.dataclass
class MemoryPlan:
  """What one device needs for one train step, from XLA's compiled program.

  Byte counts are per device. `per_device_bytes` is arguments + outputs - aliased outputs
  (the donated state updated in place) + temporaries + generated code; it `fits` when it is
  at most `hbm_bytes`. `flops` and `bytes_accessed` are one step of one device
  (cost_analysis); `largest_arrays` the arguments that take the most memory per device.
  """
  topology: str
  chip: str
  n_devices: int
  mesh: dict[str, int]
  argument_bytes: int  # parameters, optimizer state, batch, step and rng
  output_bytes: int
  alias_bytes: int  # outputs that reuse donated argument buffers
  temp_bytes: int
  code_bytes: int
  per_device_bytes: int
  hbm_bytes: int
  fits: bool
  # XLA's cost_analysis counts the body of a loop once: with layers under a scan
  # (model.scan_unroll=1) `flops` and `bytes_accessed` cover one layer's iteration plus the
  # rest, not the whole step. `model_flops` is the task's formula (task.flops_per_step(),
  # as MFU uses) over the devices: the planner's step FLOPs.
  flops: float
  bytes_accessed: float
  model_flops: float
  compile_seconds: float  # wall time to trace, lower and compile
  compile_cpu_seconds: float  # this process's CPU time for the same (steadier on a busy host)
  largest_arrays: list[ArrayBytes]
  notes: list[str] = dataclasses.field(default_factory=list)


# --- topologies ------------------------------------------------------------------------


def default_grid(n_chips: int, dims: int) -> tuple[int, ...] | None:
  """The chip grid of a power-of-two slice: from the smallest slice (1x1, 2x2x1), double the
  shortest axis (the last of equals) until the count is reached, which gives Cloud TPU's
  default shapes (v5p-256: 4x4x8; v5e-64: 8x8). None when no such grid has n_chips."""
  grid = list(_SMALLEST_GRID[dims])
  while math.prod(grid) < n_chips:
    shortest = min(grid)
    grid[max(i for i, g in enumerate(grid) if g == shortest)] *= 2
  return tuple(grid) if math.prod(grid) == n_chips else None


def parse_topology(name: str, hbm_bytes: int | None = None) -> Topology:
  """`v5p-256`, `v5e-16`, `v5p:4x4x12` or `cpu`; a ConfigError names the problem.

  hbm_bytes replaces the chip's memory (for 'cpu': the host's memory shared by its devices).
  """
  text = name.strip().lower()
  if text == 'cpu':
    n = jax.device_count('cpu')
    ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    chip = chips_lib.Chip('cpu', hbm_bytes or ram // n, 0.0, 0.0)
    return Topology('cpu', chip, ())
  known = ', '.join(f'{f}-N' for f in _FAMILIES)
  match = re.fullmatch(r'([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))', text)
  if not match or match.group(1) not in _FAMILIES:
    raise ConfigError(f'--topology={name!r} is not a TPU slice name; use {known} (e.g. v5p-256, '
                      'v5e-16), a chip grid such as v5p:4x4x12, or cpu.')
  family, count, grid_text = match.groups()
  chip_name, prefix, dims, chip_config = _FAMILIES[family]
  chip = chips_lib.get_chip(chip_name)
  if hbm_bytes:
    chip = dataclasses.replace(chip, hbm_bytes=hbm_bytes)
  if grid_text:
    grid = tuple(int(g) for g in grid_text.split('x'))
    if len(grid) != dims or min(grid) < 1:
      raise ConfigError(f'--topology={name!r}: a {family} grid has {dims} positive sizes '
                        f'(e.g. {family}:{"x".join(map(str, _SMALLEST_GRID[dims]))}).')
  else:
    units = int(count)
    cores = chip.cores_per_chip
    if units % cores:
      raise ConfigError(f'--topology={name!r}: {family}-N counts TensorCores, {cores} per chip; '
                        f'N must be a multiple of {cores}.')
    grid = default_grid(units // cores, dims)
    if grid is None:
      unit = 'TensorCores' if cores > 1 else 'chips'
      raise ConfigError(
          f'--topology={name!r}: {units} {unit} is not a power-of-two slice of at least '
          f'{math.prod(_SMALLEST_GRID[dims]) * cores}; give its chip grid instead, e.g. '
          f'{family}:{"x".join(map(str, _SMALLEST_GRID[dims]))}.')
  return Topology(name, chip, grid, prefix, chip_config)


def libtpu_available() -> bool:
  return bool(importlib.util.find_spec('libtpu') or os.environ.get('TPU_LIBRARY_PATH'))


def topology_devices(topology: Topology) -> list:
  """Compile-only devices of the slice (one per chip), or this host's CPU devices."""
  if not topology.grid:
    return jax.devices('cpu')
  if not libtpu_available():
    raise ConfigError(f'--topology={topology.name} compiles for TPU, which needs libtpu: '
                      f'{AOT_INSTALL}.')
  # A compile-only topology uses no chip: it need not take libtpu's one-process lock
  # (/tmp/libtpu_lockfile), so plans may compile while another libtpu process runs.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies
  grid = 'x'.join(map(str, topology.grid))
  bounds = tuple(min(b, g) for b, g in zip(_HOST_BOUNDS, (*topology.grid, 1), strict=False))
  try:
    desc = topologies.get_topology_desc(
        f'{topology.prefix}:{grid}', 'tpu', chip_config_name=topology.chip_config,
        chips_per_host_bounds=bounds, num_slices=1)
  except Exception as e:  # libtpu's own message says what it could not build
    raise ConfigError(f'--topology={topology.name}: libtpu cannot describe '
                      f'{topology.prefix}:{grid}: {str(e).splitlines()[0]}') from None
  return list(desc.devices)


# --- the plan --------------------------------------------------------------------------


def _planned_config(config: ml_collections.ConfigDict, notes: list[str]):
  """A copy of `config` with what only data would settle filled in (the LM vocabulary)."""
  config = ml_collections.ConfigDict(config.to_dict())
  model = config.get('model')
  if model is not None and model.get('vocab_size') == -1:
    vocab = int(config.data.tokenizer.vocab_size) if config.data.tokenizer.kind == (
        'sentencepiece') else 256
    model.vocab_size = -(-vocab // 128) * 128  # as the model rounds a tokenizer's size
    notes.append(f'model.vocab_size=-1 comes from the tokenizer; planned with '
                 f'{model.vocab_size} (set --config.model.vocab_size to be exact).')
  return config


def _largest_arrays(args, top: int) -> list[ArrayBytes]:
  """The `top` arguments (state, batch) that take the most bytes per device."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(args)[0]:
    shape, dtype = tuple(x.shape), np.dtype(x.dtype)
    per_device = math.prod(x.sharding.shard_shape(shape)) * dtype.itemsize
    out.append(ArrayBytes(_path_name(path), shape, dtype.name, per_device))
  out.sort(key=lambda a: -a.per_device_bytes)
  return out[:top]


def _path_name(path) -> str:
  head, *rest = path
  root = ('state', 'batch')[head.idx]
  return root + jax.tree_util.keystr(tuple(rest))


def memory_plan(config: ml_collections.ConfigDict, topology: str, *,
                hbm_bytes: int | None = None, top: int = 10) -> MemoryPlan:
  """Compiles `config`'s train step for `topology` (see the module docstring) and returns
  its per-device memory and cost. `hbm_bytes` replaces the chip's memory."""
  topo = parse_topology(topology, hbm_bytes)
  notes: list[str] = []
  config = _planned_config(config, notes)
  devices = topology_devices(topo)
  processes = len({d.process_index for d in devices})
  task = trainer.validate(config, len(devices), processes)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  start, cpu_start = time.perf_counter(), time.process_time()
  lowered, args = trainer.lower_train_step(task, config, mesh)
  common = dict(topology=topo.name, chip=topo.chip.name, n_devices=len(devices),
                mesh={k: int(v) for k, v in mesh.shape.items()},
                hbm_bytes=int(topo.chip.hbm_bytes), largest_arrays=_largest_arrays(args, top),
                model_flops=float(task.flops_per_step()) / len(devices),
                notes=notes)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    common.update(compile_seconds=time.perf_counter() - start,
                  compile_cpu_seconds=time.process_time() - cpu_start)
    return _out_of_memory_plan(str(e), args, common)
  common.update(compile_seconds=time.perf_counter() - start,
                compile_cpu_seconds=time.process_time() - cpu_start)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list | tuple) else cost) or {}
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes + memory.temp_size_in_bytes
           + memory.generated_code_size_in_bytes)
  return MemoryPlan(
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes),
      per_device_bytes=int(total), fits=total <= topo.chip.hbm_bytes,
      flops=float(cost.get('flops', 0.0)), bytes_accessed=float(cost.get('bytes accessed', 0.0)),
      **common)


_UNITS = {'': 1, 'K': 1024, 'M': 1024**2, 'G': GIB, 'T': 1024**4}


def parse_oom(message: str) -> tuple[int, int] | None:
  """(bytes of temporaries required, bytes available) from libtpu's out-of-memory error,
  "... required for HLO temporaries (172.22G) exceeds available HBM (95.74G)", or None."""
  size = r'\(([\d.]+)([KMGT]?)i?B?\)'
  match = re.search(rf'temporaries {size} exceeds available HBM {size}', message)
  if not match:
    return None
  need, need_unit, have, have_unit = match.groups()
  return (int(float(need) * _UNITS[need_unit]), int(float(have) * _UNITS[have_unit]))


def _out_of_memory_plan(message: str, args, common: dict) -> MemoryPlan:
  """The plan of a step that libtpu refused to compile because its temporaries exceed the
  chip's HBM (XLA stops there, so there is no memory or cost analysis): the arguments from
  their shardings, the temporaries from the error."""
  arguments = sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                  for x in jax.tree.leaves(args))
  state = sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
              for x in jax.tree.leaves(args[0]))  # donated: its outputs reuse its buffers
  parsed = parse_oom(message)
  temp = parsed[0] if parsed else 0
  notes = [*common.pop('notes'), 'libtpu stopped at its memory check: ' + (
      'no FLOPs or bytes accessed, no code size; temporaries from its message.' if parsed
      else f'{message.splitlines()[0]}')]
  return MemoryPlan(
      argument_bytes=int(arguments), output_bytes=int(state), alias_bytes=int(state),
      temp_bytes=int(temp), code_bytes=0, per_device_bytes=int(arguments + temp), fits=False,
      flops=0.0, bytes_accessed=0.0, notes=notes, **common)


# --- the report ------------------------------------------------------------------------


def _size(n: float) -> str:
  """Bytes in binary units: 512 B, 3.00 KiB, 1.25 GiB."""
  for unit, scale in (('GiB', GIB), ('MiB', 1024**2), ('KiB', 1024)):
    if abs(n) >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{n:.0f} B'


def hints(plan: MemoryPlan, config: ml_collections.ConfigDict) -> list[str]:
  """What would make a plan that does not fit smaller, the bigger share first."""
  mesh = ', '.join(f'{a}={s}' for a, s in plan.mesh.items() if s != 1) or 'one device'
  state = (f'Parameters and optimizer state ({_size(plan.argument_bytes)} of arguments per '
           f'device, mesh {mesh}): shard them over more devices with --config.mesh.fsdp '
           '(e.g. --config.mesh.fsdp=-1 --config.mesh.data=1), or rent a larger slice.')
  model = config.get('model') or {}
  remat = model.get('remat') if model else None
  remat_hint = (f'--config.model.remat=full (now {remat!r}), ' if remat not in (None, 'full')
                else '')
  acts = (f'Activations ({_size(plan.temp_bytes)} of temporaries per device): '
          f'{remat_hint}a smaller --config.batch_size (now {config.batch_size}), '
          f'microbatches with --config.grad_accum (now {config.get("grad_accum", 1)}), '
          'or a shorter --config.data.seq_len.')
  return [state, acts] if plan.argument_bytes >= plan.temp_bytes else [acts, state]


def report(plan: MemoryPlan, config: ml_collections.ConfigDict) -> str:
  """The printed plan; a plan that does not fit lists its largest arrays and hints."""
  mesh = ' '.join(f'{a}={s}' for a, s in plan.mesh.items())
  lines = [
      f'Memory plan on {plan.topology}: {plan.n_devices} x {plan.chip} devices, mesh {mesh}',
      'Per device:',
      f'  arguments       {_size(plan.argument_bytes):>12}  (parameters, optimizer state, '
      'batch)',
      f'  outputs         {_size(plan.output_bytes):>12}',
      f'  aliased        -{_size(plan.alias_bytes):>12}  (outputs in donated buffers)',
      f'  temporaries     {_size(plan.temp_bytes):>12}',
      f'  generated code  {_size(plan.code_bytes):>12}',
      f'  total           {_size(plan.per_device_bytes):>12}  of {_size(plan.hbm_bytes)} '
      f'HBM ({100 * plan.per_device_bytes / plan.hbm_bytes:.0f}%)',
      f'One step per device: {plan.model_flops:.3g} model FLOPs; XLA counts {plan.flops:.3g} '
      f'FLOPs, {plan.bytes_accessed:.3g} bytes accessed (a scanned loop\'s body once).',
      f'Compiled in {plan.compile_seconds:.1f} s ({plan.compile_cpu_seconds:.1f} s of CPU).',
  ]
  lines += [f'Note: {n}' for n in plan.notes]
  if plan.fits:
    lines.append('Fits.')
    return '\n'.join(lines)
  lines.append(f'DOES NOT FIT: {_size(plan.per_device_bytes)} per device, but a {plan.chip} '
               f'has {_size(plan.hbm_bytes)} of HBM '
               f'({_size(plan.per_device_bytes - plan.hbm_bytes)} over).')
  lines.append('Largest arrays per device (the step\'s arguments):')
  width = max(len(a.path) for a in plan.largest_arrays)
  for a in plan.largest_arrays:
    shape = 'x'.join(map(str, a.shape)) or 'scalar'
    lines.append(f'  {a.path:<{width}}  {_size(a.per_device_bytes):>11}  {a.dtype}[{shape}]')
  lines.append('To fit:')
  lines += [f'  - {h}' for h in hints(plan, config)]
  return '\n'.join(lines)


# --- command line ----------------------------------------------------------------------


def _define_flags():
  """The command's flags, defined only when it runs (train/__main__.py also has --config)."""
  return dict(
      config=config_flags.DEFINE_config_file('config', None, 'A configs/*.py file[:preset].',
                                             lock_config=True),
      topology=flags.DEFINE_string('topology', None, 'v5p-256, v5e-16, v4-32, v6e-64, a grid '
                                   'such as v5p:4x4x12, or cpu (this host\'s devices).'),
      hbm_gib=flags.DEFINE_float('hbm_gib', None, 'Memory per device in GiB instead of the '
                                 'chip\'s.'),
      json=flags.DEFINE_bool('json', False, 'Print the plan as JSON instead of the report.'),
  )


def _run(argv, flag) -> None:
  if len(argv) > 1:
    raise ConfigError(f'Unexpected arguments {argv[1:]}; every argument is a --flag.')
  config, topology = flag['config'].value, flag['topology'].value
  if config is None or not topology:
    raise ConfigError('Give --config=configs/<family>.py[:preset] and --topology (e.g. v5p-256).')
  hbm = int(flag['hbm_gib'].value * GIB) if flag['hbm_gib'].value else None
  plan = memory_plan(config, topology, hbm_bytes=hbm)
  if flag['json'].value:
    print(json.dumps(dataclasses.asdict(plan), indent=2))
  else:
    print(report(plan, config))


if __name__ == '__main__':
  _FLAGS = _define_flags()
  app.run(lambda argv: exit_on_user_error(lambda: _run(argv, _FLAGS)))
