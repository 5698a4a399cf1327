"""Accelerator chips: memory and peak rates per chip, from the vendors' public spec sheets.

The one table that memory plans (`python -m launch.compile`), the planner (`python -m
launch.plan`) and MFU reports read. Rates are dense (no sparsity) per chip; a TPU v4 or v5p
chip has two TensorCores that JAX shows as one device ("megacore").
"""

import dataclasses

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int  # memory per chip
  bf16_flops: float  # peak dense bf16 FLOP/s per chip
  hbm_bandwidth: float  # bytes/s per chip
  # TPU slice names count TensorCores for v4 and v5p (v5p-8 is 4 chips) and chips for v5e
  # and v6e; 0 for GPUs, whose "slices" are counted in chips.
  cores_per_chip: int = 1


CHIPS: dict[str, Chip] = {
    'v4': Chip('v4', 32 * GIB, 275e12, 1.2e12, cores_per_chip=2),
    'v5e': Chip('v5e', 16 * GIB, 197e12, 8.19e11),
    'v5p': Chip('v5p', 95 * GIB, 459e12, 2.765e12, cores_per_chip=2),
    'v6e': Chip('v6e', 32 * GIB, 918e12, 1.64e12),
    'a100': Chip('a100', 80 * 10**9, 312e12, 2.039e12),
    'h100': Chip('h100', 80 * 10**9, 989e12, 3.35e12),
    'h200': Chip('h200', 141 * 10**9, 989e12, 4.8e12),
}


def get_chip(name: str) -> Chip:
  """The chip called `name` (case-insensitive), or a ValueError listing the known ones."""
  chip = CHIPS.get(name.lower())
  if chip is None:
    raise ValueError(f'Unknown chip {name!r}; known chips: {", ".join(CHIPS)}.')
  return chip
