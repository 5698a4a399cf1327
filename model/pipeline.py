"""Pipeline parallelism over the 'stage' mesh axis: the transformer's stacked layers run as
S stages, each on its own slice of the devices, with microbatches flowing between them.

The stacked parameters keep the tree and the [N, ...] 'layers' axis of the unpipelined
model (a pipelined checkpoint resumes or serves without a pipeline, and back); 'layers'
maps to the 'stage' mesh axis, so stage s stores layers [s * N/S, (s+1) * N/S).

Schedules (both inside the jitted step; autodiff writes the backward pass):
  gpipe     each stage runs N/S consecutive layers; M microbatches go forward one after
            another, then the backward runs in reverse. T = M + S - 1 iterations, of which
            S - 1 are a stage's bubble: (S - 1) / (M + S - 1).
  circular  MaxText's interleaved schedule: the layers split into R * S chunks and stage s
            runs chunks s, s + S, s + 2S, ... (R "repeats"), so a microbatch passes through
            the S stages R times. T = R * M + S - 1 iterations, bubble (S - 1) / (R*M + S - 1).
            Needs M >= S (a microbatch's next repeat starts only after its previous one
            left the last stage). Because the stored tree is the unpipelined one, stage s
            does not hold its chunks: each step gathers them (an all-to-all of the block
            weights, and of their gradients back); MaxText instead stores pipelined layers
            with explicit repeat and stage axes.

How it runs: `jax.shard_map` is manual over 'stage' only (the other axes stay automatic,
so FSDP and tensor parallelism still split each stage's layers and its microbatch). Each of
the T iterations, every stage runs its chunk on the microbatch it holds, then
`jax.lax.ppermute` hands every output to the next stage (the last stage's to the first,
which files it in a buffer of the M microbatches' activations: the next repeat's input, or
after the last repeat the result). Idle iterations (the bubble) run on stale inputs and
their outputs are ignored, so every iteration has the same static shape.

Written here rather than taken from a library: MaxText's pipeline is a Linen module tied to
its own config and its own pipelined parameter layout; this is the same idea in ~150 lines
for the NNX stacked blocks and the unpipelined tree.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

AXIS = 'stage'
SCHEDULES = ('gpipe', 'circular')


def num_stages() -> int:
  """The size of the 'stage' axis of the mesh in context (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AXIS not in mesh.axis_names:
    return 1
  return int(mesh.shape[AXIS])


def resolve_microbatches(microbatches: int, stages: int) -> int:
  """`model.pipeline.microbatches`, with -1 meaning 2 * stages (bubble (S-1)/(3S-1))."""
  return 2 * stages if microbatches == -1 else microbatches


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """The share of stage-iterations that are idle: (S - 1) / (R * M + S - 1)."""
  return (stages - 1) / (repeats * microbatches + stages - 1)


def check(n_layers: int, stages: int, microbatches: int, schedule: str, repeats: int,
          batch: int, data_parallel: int) -> str | None:
  """What is wrong with this pipeline (one line naming the keys), or None.

  `batch` is the rows of one forward (batch_size / grad_accum); every microbatch must split
  over the `data_parallel` ways of the batch axes.
  """
  if schedule not in SCHEDULES:
    return f'model.pipeline.schedule={schedule!r}: choose one of {", ".join(SCHEDULES)}.'
  if repeats < 1 or (schedule == 'gpipe' and repeats != 1):
    return (f'model.pipeline.repeats={repeats}: gpipe needs 1; circular takes any '
            'repeats >= 1.')
  if microbatches < 1:
    return f'model.pipeline.microbatches={microbatches}: use -1 (2 * mesh.stage) or >= 1.'
  if stages == 1:
    return None
  if n_layers % (stages * repeats):
    return (f'model.n_layers={n_layers} does not split into mesh.stage={stages} stages x '
            f'model.pipeline.repeats={repeats}: it must be a multiple of {stages * repeats}.')
  if schedule == 'circular' and microbatches < stages:
    return (f'model.pipeline.microbatches={microbatches} is below mesh.stage={stages}: the '
            'circular schedule needs at least one microbatch per stage.')
  if batch % (microbatches * data_parallel):
    return (f'The per-step batch of {batch} rows (batch_size / grad_accum) must split into '
            f'model.pipeline.microbatches={microbatches} microbatches of a multiple of the '
            f'data-parallel size {data_parallel}.')
  return None


def _to_stage_order(w, stages: int, repeats: int):
  """[N, ...] in layer order -> [N, ...] with stage s's R chunks at rows
  [s * N/S, (s+1) * N/S), repeat-major: row s*(R*C) + r*C + j holds layer (r*S + s)*C + j."""
  if repeats == 1:
    return w
  n = w.shape[0]
  c = n // (stages * repeats)
  w = w.reshape(repeats, stages, c, *w.shape[1:])
  return jnp.swapaxes(w, 0, 1).reshape(n, *w.shape[3:])


def split_rows(x, m: int):
  """[B, ...] -> [M, B/M, ...], rows taken with stride M so that every microbatch spreads
  over all the data-parallel shards (as train/optim.py's gradient accumulation)."""
  return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def merge_rows(x):
  """The inverse of `split_rows`."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def run(chunk_fn: Callable, weights, x_BxLxD: jax.Array, per_row, keys_N, *, stages: int,
        microbatches: int, repeats: int):
  """Runs the stacked layers `weights` (a pytree of [N, ...] leaves, N in layer order) as a
  pipeline over the 'stage' axis of the mesh in context.

  Args:
    chunk_fn: (weights of C = N / (S*R) consecutive layers, x_bxLxD, per_row of the
      microbatch, keys [C] or None) -> x_bxLxD: the unpipelined layer stack on a chunk.
    weights: the stacked layer parameters.
    x_BxLxD: the input activations of the whole batch.
    per_row: a pytree of [B, ...] arrays (positions, segment ids; None leaves allowed) that
      follow their rows into the microbatches.
    keys_N: per-layer dropout keys or None; microbatch m uses fold_in(key, m).
    stages, microbatches, repeats: S, M, R.

  Returns:
    the output activations x_BxLxD, as the unpipelined stack would give them.
  """
  s_count, m_count, r_count = stages, microbatches, repeats
  iterations = r_count * m_count + s_count - 1
  weights = jax.tree.map(lambda w: _to_stage_order(w, s_count, r_count), weights)
  x_MxbxLxD = split_rows(x_BxLxD, m_count)
  per_row_M = jax.tree.map(lambda a: split_rows(a, m_count), per_row)
  if keys_N is not None:
    keys_N = _to_stage_order(jax.random.key_data(keys_N), s_count, r_count)
  stage_spec = lambda tree: jax.tree.map(lambda _: P(AXIS), tree)  # noqa: E731

  def stage_fn(weights, x_MxbxLxD, per_row_M, keys_N):
    """One stage's loop, manual over 'stage': its weights are its R chunks of C layers."""
    s = jax.lax.axis_index(AXIS)
    chunks = jax.tree.map(lambda w: w.reshape(r_count, w.shape[0] // r_count, *w.shape[1:]),
                          weights)
    key_chunks = None if keys_N is None else keys_N.reshape(r_count, -1, *keys_N.shape[1:])
    shift = [(i, (i + 1) % s_count) for i in range(s_count)]

    def body(carry, t):
      held_bxLxD, buf_MxbxLxD = carry
      item = t - s  # the microbatch-repeat this stage works on: repeat item // M
      live = (item >= 0) & (item < r_count * m_count)
      item = jnp.clip(item, 0, r_count * m_count - 1)
      m, r = item % m_count, item // m_count
      # Stage 0 takes its input from the buffer (embeddings, or the last repeat's output).
      first = jax.lax.dynamic_index_in_dim(buf_MxbxLxD, t % m_count, keepdims=False)
      x_bxLxD = jnp.where(s == 0, first, held_bxLxD)
      chunk = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, r, keepdims=False),
                           chunks)
      rows = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, m, keepdims=False),
                          per_row_M)
      keys = None
      if key_chunks is not None:
        keys = jax.random.wrap_key_data(
            jax.lax.dynamic_index_in_dim(key_chunks, r, keepdims=False))
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, m)
      y_bxLxD = chunk_fn(chunk, x_bxLxD, rows, keys)
      y_bxLxD = jnp.where(live, y_bxLxD, x_bxLxD)
      received_bxLxD = jax.lax.ppermute(y_bxLxD, AXIS, shift)
      # On stage 0 the received value is the last stage's output of item t - (S - 1).
      done = t - (s_count - 1)
      slot = jnp.clip(done, 0, None) % m_count
      keep = (s == 0) & (done >= 0)
      old = jax.lax.dynamic_index_in_dim(buf_MxbxLxD, slot, keepdims=False)
      buf_MxbxLxD = jax.lax.dynamic_update_index_in_dim(
          buf_MxbxLxD, jnp.where(keep, received_bxLxD, old), slot, 0)
      return (received_bxLxD, buf_MxbxLxD), None

    init = (jnp.zeros_like(x_MxbxLxD[0]), x_MxbxLxD)
    (_, buf_MxbxLxD), _ = jax.lax.scan(body, init, jnp.arange(iterations))
    return buf_MxbxLxD[None]  # stage 0's buffer holds the result

  out_SxMxbxLxD = jax.shard_map(
      stage_fn, in_specs=(stage_spec(weights), P(), jax.tree.map(lambda _: P(), per_row_M),
                          None if keys_N is None else P(AXIS)),
      out_specs=P(AXIS), axis_names={AXIS}, check_vma=False,
  )(weights, x_MxbxLxD, per_row_M, keys_N)
  return merge_rows(out_SxMxbxLxD[0])
