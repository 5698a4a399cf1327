"""Per-device memory of the LM train step with each memory lever off and on, from the
compiled program (nothing is allocated, no step runs).

On a TPU topology, compiled on a CPU host with libtpu (`pip install -e ".[aot]"`):

  python docs/baselines/memory_levers.py --topology=v5e:2x2

or on fake CPU devices (the CPU compiler places host-offloaded buffers in the one memory it
has, so offloading shows only in the TPU numbers):

  JAX_NUM_CPU_DEVICES=4 python docs/baselines/memory_levers.py

The levers (config keys): `model.remat` (none | full | dots | offload_dots | outputs |
offload_outputs, model/transformer.py REMAT_POLICIES), `optimizer.offload` (the Adam moments
wait in host memory), and `model.dtype=float16` with `optimizer.loss_scale=dynamic`. The
model is FSDP-sharded over every device. `device` and `host` are arguments + temporaries +
outputs not aliased to (donated) arguments, per device.
"""

import argparse
import sys

import jax

from configs import lm
from train import mesh as mesh_lib
from train import trainer
from train.tasks.lm import LMTask

# name -> config overrides on top of the preset (llama_1b: bfloat16 compute, remat='dots').
LEVERS = {
    'remat=none': {'model.remat': 'none'},
    'remat=dots (preset)': {},
    'remat=full': {'model.remat': 'full'},
    'remat=offload_dots': {'model.remat': 'offload_dots'},
    'remat=outputs': {'model.remat': 'outputs'},
    'remat=offload_outputs': {'model.remat': 'offload_outputs'},
    'optimizer.offload': {'optimizer.offload': True},
    'float16 + dynamic loss scale': {'model.dtype': 'float16',
                                     'optimizer.loss_scale': 'dynamic'},
    'offload_dots + optimizer.offload': {'model.remat': 'offload_dots',
                                         'optimizer.offload': True},
}


def compiled_memory(config, devices, batch: int, seq_len: int):
  """XLA's memory analysis of the LM train step `config` describes, FSDP over `devices`."""
  config.update(batch_size=batch)
  config.data.seq_len = seq_len
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  task = LMTask(config)
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  lowered, _ = trainer.lower_train_step(task, config, mesh)
  return lowered.compile().memory_analysis()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='llama_1b')
  parser.add_argument('--topology', default='', help="e.g. 'v5e:2x2'; '' = this host's devices")
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=2048)
  parser.add_argument('--n_layers', type=int, default=0, help='0: the preset\'s')
  parser.add_argument('--levers', default=','.join(LEVERS), help='comma-separated row names')
  parser.add_argument('--num_devices', type=int, default=0,
                      help='the first N devices only (0: all); one device compiles fastest')
  args = parser.parse_args()
  if args.topology:
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(args.topology, 'tpu').devices
  else:
    devices = jax.devices()
  devices = devices[:args.num_devices] if args.num_devices else devices
  shape = lm.get_config(args.preset).model
  layers = args.n_layers or shape.n_layers
  print(f'{args.preset} (d_model {shape.d_model}, {layers} layers), batch {args.batch} x '
        f'{args.seq_len}, FSDP over {len(devices)} {devices[0].device_kind} devices; '
        'GiB per device')
  print(f'{"lever":34s} {"args":>7s} {"temp":>7s} {"device":>7s} {"host":>7s}')
  for name in args.levers.split(','):
    config = lm.get_config(args.preset)
    config.unlock()
    if args.n_layers:
      config.model.n_layers = args.n_layers
    config.update_from_flattened_dict(LEVERS[name])
    s = compiled_memory(config, devices, args.batch, args.seq_len)
    device = (s.argument_size_in_bytes + s.temp_size_in_bytes + s.output_size_in_bytes
              - s.alias_size_in_bytes)
    host = (s.host_argument_size_in_bytes + s.host_temp_size_in_bytes
            + s.host_output_size_in_bytes - s.host_alias_size_in_bytes)
    g = 2.0 ** 30
    print(f'{name:34s} {s.argument_size_in_bytes / g:7.2f} {s.temp_size_in_bytes / g:7.2f} '
          f'{device / g:7.2f} {host / g:7.2f}', flush=True)


if __name__ == '__main__':
  sys.exit(main())
