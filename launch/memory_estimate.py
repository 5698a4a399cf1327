"""An analytic count of a train step's memory per device, and the mesh the planner proposes.

Used where no ahead-of-time TPU compile is at hand (`launch.compile` needs libtpu); the
planner labels every number from here an estimate. The count is the one in the ZeRO and
Megatron papers (Rajbhandari et al. 2020; Korthikanti et al. 2022), for Kiln's Llama
block and AdamW:

- parameters, gradients (the parameter dtype) and Adam's two moments (float32), split over
  fsdp x tensor (the 'embed' axis over fsdp, heads / mlp / vocab over tensor);
- activations saved for the backward pass, per token and layer, by `model.remat`:
  'full' keeps each block's input, 'dots' also the outputs of the projections (the matmuls
  without batch dimensions; the attention scores are recomputed), 'none' everything the
  block computes, the attention probabilities included (XLA attention, T x T per head);
- one block's full working set while its backward pass runs, and the float32 logits and
  their gradient, tokens x vocab.

It is a floor, not a prediction: XLA's temporaries (gathered FSDP weights, fused loss
intermediates, collective buffers) can be several times the count. For llama_1b with one
sequence a device on v5e-16 the TPU compile's temporaries were 36.6 GB against a count of
6.4 GB (launch/README.md). Where it matters, compile (`python -m launch.compile`).
"""

import dataclasses

import jax.numpy as jnp

from model import transformer

# Fraction of HBM the planner lets a step use: XLA's own buffers, fragmentation and the
# input pipeline take the rest.
HBM_HEADROOM = 0.85


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device of one train step."""
  params: float
  grads: float
  optimizer: float
  activations: float
  logits: float

  @property
  def total(self) -> float:
    return self.params + self.grads + self.optimizer + self.activations + self.logits


def _saved_per_token_layer(cfg: transformer.TransformerConfig, seq_len: int, remat: str,
                           tensor: int) -> float:
  """Bytes one token leaves in one block for the backward pass under `remat`."""
  act = jnp.dtype(cfg.dtype).itemsize
  d, f = cfg.d_model, cfg.mlp_dim
  q, kv = cfg.n_heads * cfg.head_dim / tensor, 2 * cfg.n_kv_heads * cfg.head_dim / tensor
  mlp_hidden = (2 if cfg.mlp == 'swiglu' else 1) * f / tensor
  block_input = d * act
  projections = (q + kv + q + d + mlp_hidden + d) * act  # q, k, v, attn out, o, mlp in/out
  if remat == 'full':
    return block_input
  if remat == 'dots':
    return block_input + projections
  norms_and_residuals = 4 * d * act
  rope_and_activation = (q + kv / 2 + 2 * f / tensor) * act
  probs = 2 * cfg.n_heads / tensor * seq_len * 4  # float32 scores and probabilities
  return block_input + projections + norms_and_residuals + rope_and_activation + probs


def estimate(cfg: transformer.TransformerConfig, batch_size: int, seq_len: int,
             mesh: dict[str, int], grad_accum: int = 1) -> MemoryEstimate:
  """Per-device bytes of a train step of `cfg` on `batch_size` x `seq_len` tokens in
  `grad_accum` microbatches, with the parameters split over mesh['fsdp'] x mesh['tensor'] and
  the batch over data x fsdp x expert.
  """
  n = transformer.count_params(cfg)
  shard = mesh.get('fsdp', 1) * mesh.get('tensor', 1)
  param_bytes = jnp.dtype(cfg.param_dtype).itemsize
  batch_split = mesh.get('data', 1) * mesh.get('fsdp', 1) * mesh.get('expert', 1) * grad_accum
  tokens = batch_size / batch_split * seq_len / mesh.get('context', 1)
  tensor = mesh.get('tensor', 1)
  saved = cfg.n_layers * _saved_per_token_layer(cfg, seq_len, cfg.remat, tensor)
  working = _saved_per_token_layer(cfg, seq_len, 'none', tensor) if cfg.remat != 'none' else 0
  return MemoryEstimate(
      params=n * param_bytes / shard,
      grads=n * param_bytes / shard,
      optimizer=2 * n * 4 / shard,
      activations=tokens * (saved + working),
      logits=2 * tokens * cfg.vocab_size / tensor * 4,
  )


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the planner splits a step over the devices: the mesh and the microbatches."""
  mesh: dict[str, int]
  grad_accum: int
  memory: MemoryEstimate


def propose_layout(cfg: transformer.TransformerConfig, batch_size: int, seq_len: int,
                   n_devices: int, hbm_bytes: float) -> Layout:
  """The smallest fsdp (a divisor of `n_devices`) whose estimate fits HBM_HEADROOM of
  `hbm_bytes`, the rest of the devices data parallel; if fsdp over every device does not fit,
  as many microbatches (grad_accum, a divisor of the batch per device) as it takes; else the
  last try, whose estimate says by how much it does not fit. `batch_size` must divide by
  `n_devices`.
  """
  limit = HBM_HEADROOM * hbm_bytes
  for fsdp in [k for k in range(1, n_devices + 1) if n_devices % k == 0]:
    mesh = {'data': n_devices // fsdp, 'fsdp': fsdp, 'tensor': 1}
    est = estimate(cfg, batch_size, seq_len, mesh)
    if est.total <= limit:
      return Layout(mesh, 1, est)
  per_device = batch_size // n_devices
  for accum in [k for k in range(2, per_device + 1) if per_device % k == 0]:
    est = estimate(cfg, batch_size, seq_len, mesh, accum)
    if est.total <= limit:
      return Layout(mesh, accum, est)
  accum = max(per_device, 1)
  return Layout(mesh, accum, estimate(cfg, batch_size, seq_len, mesh, accum))


def roofline_seconds(flops: float, bytes_accessed: float, peak_flops: float,
                     bandwidth: float) -> float:
  """The lower bound on one device's step time: compute-bound or memory-bound, whichever is
  slower (the roofline; overlap, communication and launch overheads only add to it)."""
  return max(flops / peak_flops, bytes_accessed / bandwidth)
