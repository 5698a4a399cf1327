"""Accelerator chips by the names slices and price lists use: memory, bandwidth and slice
counting per chip, from the vendors' public spec sheets, for memory plans (`python -m
launch.compile`) and the planner (`python -m launch.plan`).

Peak bf16 FLOP/s come from the trainer's MFU table (train/metrics.py PEAK_FLOPS, keyed by
the device kind JAX reports), so a planned MFU and a logged one use the same peak. Rates are
dense (no sparsity) per chip; a TPU v4 or v5p chip has two TensorCores that JAX shows as one
device ("megacore").
"""

import dataclasses

from train import metrics

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


def _chip(name: str, device_kind: str, hbm_bytes: int, hbm_bandwidth: float,
          cores_per_chip: int = 1) -> Chip:
  return Chip(name, hbm_bytes, metrics.PEAK_FLOPS[device_kind], hbm_bandwidth, cores_per_chip)


CHIPS: dict[str, Chip] = {
    'v4': _chip('v4', 'TPU v4', 32 * GIB, 1.2e12, cores_per_chip=2),
    'v5e': _chip('v5e', 'TPU v5 lite', 16 * GIB, 8.19e11),
    'v5p': _chip('v5p', 'TPU v5p', 95 * GIB, 2.765e12, cores_per_chip=2),
    'v6e': _chip('v6e', 'TPU v6 lite', 32 * GIB, 1.64e12),
    'a100': _chip('a100', 'NVIDIA A100-SXM4-80GB', 80 * 10**9, 2.039e12),
    'h100': _chip('h100', 'NVIDIA H100 80GB HBM3', 80 * 10**9, 3.35e12),
    'h200': _chip('h200', 'NVIDIA H200', 141 * 10**9, 4.8e12),
}


def get_chip(name: str) -> Chip:
  """The chip called `name` (case-insensitive), or a ValueError listing the known ones."""
  chip = CHIPS.get(name.lower())
  if chip is None:
    raise ValueError(f'Unknown chip {name!r}; known chips: {", ".join(CHIPS)}.')
  return chip
