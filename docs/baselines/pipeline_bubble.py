"""The pipeline bubble (model/pipeline.py), in theory, counted and measured
(docs/benchmarks.md, Pipeline parallelism).

  JAX_NUM_CPU_DEVICES=8 python docs/baselines/pipeline_bubble.py
  JAX_NUM_CPU_DEVICES=8 python docs/baselines/pipeline_bubble.py --stages=4 --microbatches=4,8,16

From the project root. For each schedule and microbatch count M it prints
  theory    (S - 1) / (R * M + S - 1)
  counted   the idle (stage, iteration) pairs of the schedule `pipeline.run` executes
  measured  1 - t(unpipelined) / t(pipelined): the compiled forward and backward of an
            8-layer model on the same 8 fake CPU devices, unpipelined (mesh.data=8) and at
            mesh.stage=S (data = 8 / S), same global batch, best of several timings; in
            wall time and in this process's CPU time (steadier where other work shares
            the machine).

Why the measurement works on fake devices: they share the host's cores, so a stage's idle
iteration is not idle time here but wasted work (it runs its layers on a stale input and
drops the result), and the total work grows by 1 / (1 - bubble). On real chips the same
iterations are idle time instead. What the measurement adds beyond the count: the cost of
the pipeline's own work (the hand-offs between stages, the microbatch buffer, and for the
circular schedule the gathering of each stage's non-contiguous layers), which makes the
measured fraction larger than the theory.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from configs import lm
from model import pipeline, transformer
from train import mesh as mesh_lib


def model_config(schedule: str, repeats: int, microbatches: int, layers: int, d_model: int):
  c = lm.get_config('tiny').model
  c.unlock()
  c.update(d_model=d_model, n_layers=layers, n_heads=4, n_kv_heads=4, dtype='float32',
           scan_unroll=1)
  c.pipeline.update(schedule=schedule, repeats=repeats, microbatches=microbatches)
  return transformer.TransformerConfig.from_config(c, 256)


def best_seconds(fn, *args, reps: int) -> tuple[float, float]:
  """(best wall seconds, best CPU seconds of this process) of one call, after compiling. The
  CPU time is the steadier of the two on a machine that other work shares."""
  jax.block_until_ready(fn(*args))  # compiles
  wall = cpu = float('inf')
  for _ in range(reps):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall = min(wall, time.perf_counter() - start)
    cpu = min(cpu, time.process_time() - start_cpu)
  return wall, cpu


def step_time(cfg, stages: int, tokens_BxL, reps: int) -> tuple[float, float]:
  """Best (wall, CPU) seconds of one forward and backward (mean next-token NLL) at
  mesh.stage=stages."""
  with nnx.use_eager_sharding(False):
    model = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def loss(params, tokens_BxL):
    logits_BxLxV = nnx.merge(graphdef, params)(tokens_BxL[:, :-1])
    target_BxL = jnp.take_along_axis(logits_BxLxV, tokens_BxL[:, 1:, None], -1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits_BxLxV, -1) - target_BxL)

  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, stage=stages)))
  with jax.set_mesh(mesh):
    return best_seconds(jax.jit(jax.value_and_grad(loss)), params, tokens_BxL, reps=reps)


def counted_bubble(stages: int, microbatches: int, repeats: int) -> float:
  """Idle (stage, iteration) pairs of the schedule: stage s works on item t - s at iteration
  t, for R * M items, over R * M + S - 1 iterations."""
  iterations = repeats * microbatches + stages - 1
  idle = sum(not 0 <= t - s < repeats * microbatches
             for s in range(stages) for t in range(iterations))
  return idle / (stages * iterations)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--stages', type=int, default=2)
  parser.add_argument('--microbatches', default='2,4,8')
  parser.add_argument('--repeats', type=int, default=2, help="the circular schedule's R")
  parser.add_argument('--layers', type=int, default=8)
  parser.add_argument('--d_model', type=int, default=64)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seq_len', type=int, default=64)
  parser.add_argument('--reps', type=int, default=3)
  args = parser.parse_args()
  s = args.stages
  tokens_BxL = jax.random.randint(jax.random.key(0), (args.batch, args.seq_len + 1), 0, 256)
  base = step_time(model_config('gpipe', 1, 1, args.layers, args.d_model), 1, tokens_BxL,
                   args.reps)
  print(f'{jax.device_count()} {jax.devices()[0].platform} devices; {args.layers} layers, '
        f'd_model {args.d_model}, batch {args.batch} x {args.seq_len} tokens; unpipelined '
        f'forward+backward {base[0] * 1000:.0f} ms wall, {base[1] * 1000:.0f} ms CPU', flush=True)
  print('schedule   S  R   M  theory  counted  measured(wall)  measured(CPU)  wall_ms  cpu_ms')
  for m in (int(x) for x in args.microbatches.split(',')):
    for schedule, r in (('gpipe', 1), ('circular', args.repeats)):
      problem = pipeline.check(args.layers, s, m, schedule, r, args.batch,
                               jax.device_count() // s)
      if problem:
        print(f'{schedule:9s} {s:2d} {r:2d} {m:3d}  skipped: {problem}')
        continue
      wall, cpu = step_time(model_config(schedule, r, m, args.layers, args.d_model), s,
                            tokens_BxL, args.reps)
      print(f'{schedule:9s} {s:2d} {r:2d} {m:3d}  {pipeline.bubble_fraction(s, m, r):6.3f}  '
            f'{counted_bubble(s, m, r):7.3f}  {1 - base[0] / wall:14.3f}  '
            f'{1 - base[1] / cpu:13.3f}  {wall * 1000:7.0f}  {cpu * 1000:6.0f}', flush=True)


if __name__ == '__main__':
  main()
