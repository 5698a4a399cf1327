"""The device mesh, and the map from logical axis names to its axes.

Parallelism is applied to a model here, in one place: layers name their axes
('embed', 'heads', ...), a model's rules table maps those names to the mesh
axes, and the trainer jits the step with the resulting shardings.

Mesh axes, outermost first (`mesh.<axis>` config keys; every axis but one defaults to 1):
  data     data parallelism (replicated parameters)
  stage    pipeline stages (the 'layers' of a pipelined model)
  fsdp     data parallelism with parameters and optimizer state sharded
  expert   expert parallelism (MoE experts); also splits the batch outside the experts
  context  context parallelism (splits the sequence of activations)
  tensor   tensor parallelism (heads, MLP and vocab dimensions)

The mesh uses Auto axis types rather than jax's Explicit default: with Auto
the compiler inserts FSDP all-gathers and tensor-parallel reductions itself,
so the layers stay free of `reshard` calls, which Explicit mode would require
wherever two operands are sharded along a contracted axis.
"""

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from data.errors import ConfigError

AXES = ('data', 'stage', 'fsdp', 'expert', 'context', 'tensor')
# Examples are split over the data-parallel axes (the expert axis is one outside the experts).
BATCH_AXES = ('data', 'fsdp', 'expert')

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves `mesh.<axis>` for each of AXES (-1 fills) against the device count. Axes a
  config lacks (a run saved before they existed) are 1."""
  sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
  known = int(np.prod([s for s in sizes if s != -1]))
  # The new axes are named only when set: most runs use data, fsdp and tensor alone.
  desc = ', '.join(f'mesh.{a}={s}' for a, s in zip(AXES, sizes, strict=True)
                   if a in ('data', 'fsdp', 'tensor') or s != 1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'The mesh ({desc}) does not divide the {num_devices} devices: '
                        f'the fixed axes multiply to {known}.')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ConfigError(f'The mesh ({desc}) needs {int(np.prod(sizes))} devices but there are '
                      f'{num_devices}; set one axis to -1 to fill the rest.')
  return tuple(sizes)


def unpipelined(mesh_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`mesh_cfg` with its pipeline stages turned into data parallelism (mesh.stage=1 on the
  same devices): what the tools that load a run (sampling, serving, export) use, since
  decoding never pipelines."""
  out = ml_collections.ConfigDict(mesh_cfg.to_dict())
  stages = int(out.get('stage', 1))
  if stages != 1 and 'stage' in out:
    if int(out.get('data', -1)) != -1 and stages != -1:
      out.data = int(out.data) * stages
    elif stages == -1:
      out.data = -1
    out.stage = 1
  return out


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def data_parallel_size(mesh: Mesh | dict) -> int:
  """How many ways the batch splits; `mesh` may be a Mesh or its {axis: size} shape."""
  shape = mesh.shape if isinstance(mesh, Mesh) else mesh
  return int(np.prod([shape.get(a, 1) for a in BATCH_AXES]))


def logical_to_mesh(spec: P, rules: Rules) -> P:
  """Maps one PartitionSpec of logical names to mesh axes.

  A mesh axis is used at most once per array: a later dimension whose rule
  names an axis already taken is left unsharded.
  """
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in spec:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(f'Logical axis {name!r} has no entry in the rules table {sorted(table)}.')
    axes = table[name]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def _axes_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return int(np.prod([mesh.shape[n] for n in names]))


def shardings(abstract_tree, logical_specs, mesh: Mesh, rules: Rules):
  """NamedShardings for `abstract_tree` from its logical specs.

  Every sharded dimension must divide evenly by its mesh axes; otherwise the
  error names the array and the axis, before anything compiles.
  """
  specs_with_path = jax.tree_util.tree_flatten_with_path(
      logical_specs, is_leaf=lambda x: isinstance(x, P))[0]
  leaves, treedef = jax.tree.flatten(abstract_tree)
  if len(leaves) != len(specs_with_path):
    raise ValueError('The logical specs do not match the state tree.')
  out = []
  for leaf, (path, spec) in zip(leaves, specs_with_path, strict=True):
    mesh_spec = logical_to_mesh(spec, rules)
    for dim, entry in enumerate(mesh_spec):
      size = _axes_size(mesh, entry)
      if leaf.shape[dim] % size:
        raise ConfigError(
            f'{jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}; its dimension {dim} '
            f'({spec[dim]!r}) cannot be split over mesh axis {entry!r} of size {size}. '
            'Change the mesh or the model size.')
    out.append(NamedSharding(mesh, mesh_spec))
  return jax.tree.unflatten(treedef, out)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
