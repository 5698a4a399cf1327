"""Per-device memory of the LM train step under full fine-tuning, LoRA and QLoRA, from the
compiled program (nothing is allocated, no step runs), on fake CPU devices.

  JAX_NUM_CPU_DEVICES=8 python docs/baselines/lora_memory.py --preset=llama_1b
  JAX_NUM_CPU_DEVICES=8 python docs/baselines/lora_memory.py --preset=llama_7b

LoRA freezes the base (no gradient, no Adam moments: 12 of the 16 bytes a float32 parameter
costs in full fine-tuning); QLoRA also stores the frozen projections in NF4 (half a byte a
weight plus the block scales). `base B/param` is the stored base weights' bytes over the
base model's parameter count (embeddings and norms stay float32; `proj B/param` counts
the quantized projections alone).
"""

import argparse

import freeze_memory  # the compile-only step beside this script
import jax

from configs import lm
from model import lora, quant, transformer

MODES = {
    'full': {},
    'lora': {'rank': 16, 'alpha': 16.0},
    'qlora': {'rank': 16, 'alpha': 16.0, 'base_quant': 'nf4'},
}


def _stored_projection(name: str) -> bool:
  """A projection weight or one of its quantization scales (not an adapter)."""
  return any(name == p or name.startswith(p + '_scale') for p in quant.CONTRACTION_AXES)


def measure(preset: str, mode: str, batch: int, seq_len: int, n_layers: int = 0
            ) -> dict[str, float]:
  config = lm.get_config(preset)
  config.unlock()
  if n_layers:
    config.model.n_layers = n_layers
  config.model.lora.update(MODES[mode])
  task, abstract, stats, trainable = freeze_memory.compiled_step(config, batch, seq_len)
  flat = jax.tree_util.tree_flatten_with_path(abstract.params)[0]
  names = [p[-1].key for p, _ in flat]
  base = [x for n, (_, x) in zip(names, flat, strict=True) if not n.endswith((lora.A, lora.B))]
  proj = [x for n, (_, x) in zip(names, flat, strict=True) if _stored_projection(n)]
  cfg = task.model_cfg.base()
  proj_count = cfg.n_layers * transformer._block_matmul_params(cfg) + (
      0 if cfg.tie_embeddings else cfg.d_model * cfg.vocab_size)
  return dict(trainable=trainable, arguments=stats.argument_size_in_bytes,
              temporaries=stats.temp_size_in_bytes,
              base_per_param=quant.weight_bytes(base) / transformer.count_params(cfg),
              proj_per_param=quant.weight_bytes(proj) / proj_count)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='llama_1b')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=512)
  parser.add_argument('--modes', default='full,lora,qlora')
  parser.add_argument('--n_layers', type=int, default=0, help='0: the preset\'s')
  args = parser.parse_args()
  print(f'{args.preset}, batch {args.batch} x {args.seq_len}, FSDP over '
        f'{jax.device_count()} {jax.devices()[0].platform} devices, LoRA rank 16 on every '
        'projection; GiB per device')
  print(f'{"mode":6s} {"trainable":>14s} {"arguments":>10s} {"temporaries":>12s} '
        f'{"base B/param":>13s} {"proj B/param":>13s}')
  for mode in args.modes.split(','):
    m = measure(args.preset, mode, args.batch, args.seq_len, args.n_layers)
    print(f'{mode:6s} {m["trainable"]:14,d} {m["arguments"] / 2**30:10.2f} '
          f'{m["temporaries"] / 2**30:12.2f} {m["base_per_param"]:13.3f} '
          f'{m["proj_per_param"]:13.3f}', flush=True)


if __name__ == '__main__':
  main()
