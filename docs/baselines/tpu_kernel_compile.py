"""Compiles Kiln's Pallas TPU flash attention (Mosaic, not interpret mode) for TPU chips on
this CPU host, forward and backward, and prints each chip's compile time and memory.

  /path/to/venv-with-libtpu/bin/python docs/baselines/tpu_kernel_compile.py \\
      [--chips=v4,v5e,v5p,v6e] [--seq_len=4096] [--batch=1] [--heads=32] [--kv_heads=8]

The call is the model's: kernels/flash_attention.py `flash_attention` with causal masking,
grouped-query heads (32 query heads over 8 k/v heads by default) and bfloat16 inputs of
4096 tokens, differentiated (the dK/dV and dQ kernels), with the block sizes the wrapper
picks for the chip. Each chip's program is compiled for one compile-only device of a small
slice (`jax.experimental.topologies`), which runs Mosaic's checks of the kernels (block
shapes, VMEM use, layouts) without a TPU. Needs libtpu: `pip install "kiln[aot]"`; it is
a benchmark rather than a test because libtpu is about 700 MB (docs/benchmarks.md).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from kernels import flash_attention as flash  # noqa: E402

# A small slice of each chip: the kernel runs on one of its devices.
SLICES = {'v4': 'v4:2x2x1', 'v5e': 'v5e:2x2', 'v5p': 'v5p:2x2x1', 'v6e': 'v6e:2x2'}
MiB = 1024**2


def compile_for(chip: str, args) -> dict:
  from jax.experimental import topologies
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # compile-only: no chip to lock
  device = topologies.get_topology_desc(SLICES[chip], 'tpu').devices[0]
  blocks = flash.default_block_sizes('tpu', device.device_kind)

  def loss(q, k, v):
    out = flash.flash_attention(q, k, v, causal=True, backend='tpu', interpret=False,
                                block_sizes=blocks)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  sharding = SingleDeviceSharding(device)
  q = jax.ShapeDtypeStruct((args.batch, args.seq_len, args.heads, args.head_dim), jnp.bfloat16,
                           sharding=sharding)
  kv = jax.ShapeDtypeStruct((args.batch, args.seq_len, args.kv_heads, args.head_dim),
                            jnp.bfloat16, sharding=sharding)
  start, cpu = time.perf_counter(), time.process_time()
  compiled = step.lower(q, kv, kv).compile()
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list | tuple) else cost) or {}
  hlo = compiled.as_text()
  return dict(chip=chip, device_kind=device.device_kind, blocks=blocks, seconds=seconds,
              cpu_seconds=cpu, arguments=memory.argument_size_in_bytes,
              outputs=memory.output_size_in_bytes, temp=memory.temp_size_in_bytes,
              code=memory.generated_code_size_in_bytes, flops=cost.get('flops', 0.0),
              mosaic_calls=hlo.count('custom_call_target="tpu_custom_call"'))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--chips', default=','.join(SLICES))
  parser.add_argument('--seq_len', type=int, default=4096)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--heads', type=int, default=32)
  parser.add_argument('--kv_heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=128)
  args = parser.parse_args()
  print(f'flash attention fwd+bwd, causal, bf16, q [{args.batch}, {args.seq_len}, {args.heads}, '
        f'{args.head_dim}], k/v {args.kv_heads} heads; jax {jax.__version__}')
  print('| chip | device kind | blocks (q, k) | compile s (CPU s) | Mosaic kernels | '
        'args MiB | out MiB | temp MiB | code MiB |')
  print('|---|---|---|---|---|---|---|---|---|')
  for chip in args.chips.split(','):
    r = compile_for(chip, args)
    b = r['blocks']
    print(f"| {chip} | {r['device_kind']} | {b.block_q}, {b.block_k} | {r['seconds']:.1f} "
          f"({r['cpu_seconds']:.1f}) | {r['mosaic_calls']} | {r['arguments'] / MiB:.1f} | "
          f"{r['outputs'] / MiB:.1f} | {r['temp'] / MiB:.1f} | {r['code'] / MiB:.2f} |",
          flush=True)


if __name__ == '__main__':
  main()
