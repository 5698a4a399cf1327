"""Mixture-of-experts MLP (Mixtral, Qwen2-MoE) with dropless grouped matmuls and expert
parallelism.

Shape letters: T tokens (B * L flattened), D d_model, E experts, k experts per token,
F expert mlp dim, A = T * k (token, expert) assignments, R rows an expert shard receives.

Routing (router logits in float32, `x @ router`):
  topk_softmax  Mixtral: the top k logits, softmax over those k.
  softmax_topk  Qwen2-MoE with norm_topk_prob=False: softmax over all E experts, the top k
                probabilities kept as they are (not renormalised).
Each token's output is sum_j weight_j * SwiGLU_{expert_j}(x), plus an optional shared
dense SwiGLU expert, optionally times sigmoid(x @ shared_gate) (Qwen2-MoE).

Auxiliary losses (float32, per layer; the model averages them over layers):
  balance  Switch Transformer's E * sum_e f_e * P_e, f_e the fraction of tokens routed to
           expert e (counting each of a token's k choices, so sum_e f_e = k, as in HF's
           Mixtral/Qwen2-MoE load_balancing_loss_func), P_e the mean softmax probability of
           e over all E. It is k when perfectly balanced.
  z        ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2.
  dropped  the fraction of the A assignments a capacity limit dropped (0 when dropless).

Capacity: dropless by default. With capacity_factor cf > 0 every expert takes at most
C = ceil(cf * T * k / E) assignments of the T tokens of the (global) batch; an assignment
over its expert's capacity contributes nothing. Priority goes to first choices over
second choices (GShard's order), then to earlier tokens (row-major over B, L): the
assignments are ranked in the order [choice, token]. The limit is computed on the global
batch, so the same tokens drop on every mesh.

Expert computation: the assignments are sorted by expert and run through
`jax.lax.ragged_dot` (a grouped matmul: each expert's weights on its contiguous rows), so no
token is padded to a capacity and none is dropped unless capacity_factor says so.

Expert parallelism (`expert` mesh axis; `expert_mlp` splits over `tensor`): per device, in
a `jax.shard_map` over the trainer's mesh, each device's tokens (the batch splits over
data, fsdp and expert) are packed into one slot buffer per destination expert shard,
exchanged with `jax.lax.all_to_all`, sorted by local expert and run through ragged_dot,
then sent back the same way and combined with the routing weights. A tensor-parallel split
of F leaves partial sums that one psum over `tensor` completes on the combined [T, D]
output. The buffers are static: a destination slot buffer holds up to min(T * k, E_local *
C) rows, the most that can go there, so dispatch never drops. XLA:CPU has no
`ragged_all_to_all` (checked on jax 0.10.2: "UNIMPLEMENTED: HLO opcode ragged-all-to-all"),
so the padded all_to_all is used everywhere; padding rows sort past the experts' groups and
cost ragged_dot nothing where the kernel skips them (GPU/TPU). When the batch does not
split over the batch axes (one-sequence decoding), tokens stay replicated and each expert
shard computes its own experts for all of them, followed by a psum over `expert`.

Cost on CPU: XLA:CPU computes ragged_dot as if every row met every expert (measured on
jax 0.10.2: 12x the time of one dense matmul of the same rows with 8 experts, 4096 x 128 @
128 x 192), so on CPU an MoE step costs far more than its dense twin with the same active
parameters (docs/baselines/moe_step.py). tokamax's ragged_dot kernels (GPU, TPU) would be
the maintained alternative, but tokamax 0.0.17 needs Python >= 3.12 and Kiln runs 3.11.

Why written here rather than taken from a library: MaxText's and levanter's MoE layers are
tied to their own model and sharding APIs; the routing math is a few lines, and
`ragged_dot` / `all_to_all` are JAX's own primitives.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

ROUTERS = ('topk_softmax', 'softmax_topk')
INIT_STD = 0.02
BATCH_AXES = ('data', 'fsdp', 'expert')
EXPERT_AXIS = 'expert'
TENSOR_AXIS = 'tensor'
# Mesh axes that may split the sequence of activations (context parallelism).
LENGTH_AXES = ('context',)
AUX_NAMES = ('moe_balance_loss', 'moe_z_loss', 'moe_dropped_fraction')


# ---------------------------------------------------------------------------
# Routing and its losses (pure functions; tests check them against numpy).
# ---------------------------------------------------------------------------


def route(logits_TxE: jax.Array, top_k: int, router: str) -> tuple[jax.Array, jax.Array]:
  """(weights_TxK float32, experts_TxK int32) of float32 router logits, best first."""
  logits_TxE = logits_TxE.astype(jnp.float32)
  if router == 'topk_softmax':
    top_TxK, experts_TxK = jax.lax.top_k(logits_TxE, top_k)
    return jax.nn.softmax(top_TxK, axis=-1), experts_TxK.astype(jnp.int32)
  if router == 'softmax_topk':
    weights_TxK, experts_TxK = jax.lax.top_k(jax.nn.softmax(logits_TxE, axis=-1), top_k)
    return weights_TxK, experts_TxK.astype(jnp.int32)
  raise ValueError(f'router={router!r} is not one of {", ".join(ROUTERS)}.')


def balance_loss(logits_TxE: jax.Array, experts_TxK: jax.Array) -> jax.Array:
  """Switch's load-balancing loss E * sum_e f_e * P_e (module docstring), float32."""
  n_experts = logits_TxE.shape[-1]
  probs_E = jnp.mean(jax.nn.softmax(logits_TxE.astype(jnp.float32), axis=-1), axis=0)
  counts_E = jnp.sum(jax.nn.one_hot(experts_TxK, n_experts, dtype=jnp.float32), axis=(0, 1))
  fraction_E = counts_E / experts_TxK.shape[0]
  return n_experts * jnp.sum(fraction_E * probs_E)


def z_loss(logits_TxE: jax.Array) -> jax.Array:
  """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2, float32."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxE.astype(jnp.float32), axis=-1)))


def capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
  """Assignments one expert may take: ceil(cf * T * k / E); 0 means dropless (no limit)."""
  if capacity_factor <= 0:
    return 0
  return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def capacity_keep(experts_TxK: jax.Array, n_experts: int, limit: int) -> jax.Array:
  """bool keep_TxK: whether each assignment is within its expert's first `limit`, ranked in
  the order [choice, token] (module docstring)."""
  order_KT = experts_TxK.T.reshape(-1)
  onehot = jax.nn.one_hot(order_KT, n_experts, dtype=jnp.int32)
  rank_KT = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=-1) - 1
  return (rank_KT < limit).reshape(experts_TxK.shape[1], -1).T


# ---------------------------------------------------------------------------
# The experts: sort, grouped matmuls, (all-to-all), combine.
# ---------------------------------------------------------------------------


def _grouped_swiglu(x_RxD, ids_R, n_local, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
  """SwiGLU of each row by its local expert `ids_R` (n_local: no expert, output 0)."""
  order_R = jnp.argsort(ids_R, stable=True)
  sizes_E = jnp.sum(ids_R[:, None] == jnp.arange(n_local)[None, :], axis=0).astype(jnp.int32)
  xs_RxD = x_RxD[order_R]
  dtype = x_RxD.dtype
  gate_RxF = jax.lax.ragged_dot(xs_RxD, w_gate_ExDxF.astype(dtype), sizes_E)
  up_RxF = jax.lax.ragged_dot(xs_RxD, w_up_ExDxF.astype(dtype), sizes_E)
  h_RxF = jax.nn.silu(gate_RxF) * up_RxF
  ys_RxD = jax.lax.ragged_dot(h_RxF, w_down_ExFxD.astype(dtype), sizes_E)
  # Rows past the groups (no expert) come out of ragged_dot as zeros.
  return jnp.zeros_like(ys_RxD).at[order_R].set(ys_RxD)


def _experts_local(x_TxD, experts_TxK, weights_TxK, w_gate, w_up, w_down, *, n_experts,
                   ep_axis, ep_size, a2a, tp_axis, slots):
  """One device's share of the expert layer (module docstring). experts_TxK holds global
  expert ids, n_experts for a dropped assignment; weights are 0 there."""
  t, k = experts_TxK.shape
  n_local = w_gate.shape[0]
  expert_A = experts_TxK.reshape(-1)
  token_A = jnp.arange(t * k) // k
  valid_A = expert_A < n_experts
  if a2a:
    # Pack each assignment into the slot buffer of the shard that holds its expert.
    dest_A = jnp.where(valid_A, expert_A // n_local, ep_size)
    onehot = (dest_A[:, None] == jnp.arange(ep_size)[None, :]).astype(jnp.int32)
    slot_A = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=-1) - 1
    index_A = jnp.where(valid_A, dest_A * slots + slot_A, ep_size * slots)  # past the end: none
    send_RxD = jnp.zeros((ep_size * slots, x_TxD.shape[-1]), x_TxD.dtype).at[index_A].set(
        x_TxD[token_A], mode='drop')
    send_ids_R = jnp.full((ep_size * slots,), n_local, jnp.int32).at[index_A].set(
        expert_A % n_local, mode='drop')
    recv_RxD = jax.lax.all_to_all(send_RxD, ep_axis, 0, 0, tiled=True)
    recv_ids_R = jax.lax.all_to_all(send_ids_R, ep_axis, 0, 0, tiled=True)
    out_RxD = _grouped_swiglu(recv_RxD, recv_ids_R, n_local, w_gate, w_up, w_down)
    back_RxD = jax.lax.all_to_all(out_RxD, ep_axis, 0, 0, tiled=True)
    y_AxD = back_RxD.at[index_A].get(mode='fill', fill_value=0)
  else:
    first = 0
    if ep_axis:
      first = jax.lax.axis_index(ep_axis) * n_local
      # Each shard's rows differ from here on: an explicit cast makes the transpose sum the
      # shards' input gradients (left implicit, x's gradient came out wrong on jax 0.10.2).
      x_TxD = jax.lax.pcast(x_TxD, ep_axis, to='varying')
    mine_A = valid_A & (expert_A >= first) & (expert_A < first + n_local)
    ids_A = jnp.where(mine_A, expert_A - first, n_local)
    y_AxD = _grouped_swiglu(x_TxD[token_A], ids_A, n_local, w_gate, w_up, w_down)
  out_TxD = jnp.sum(y_AxD.reshape(t, k, -1).astype(jnp.float32) * weights_TxK[..., None],
                    axis=1)
  reduce_axes = tuple(a for a in (tp_axis, None if a2a else ep_axis) if a)
  if reduce_axes:
    out_TxD = jax.lax.psum(out_TxD, reduce_axes)
  return out_TxD


def experts(x_BxLxD, experts_BxLxK, weights_BxLxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *,
            capacity_limit: int = 0) -> jax.Array:
  """float32 sum_j weights_j * SwiGLU_{experts_j}(x), per device under the current mesh
  (expert parallel when it has an `expert` axis; module docstring). Assignments with
  expert id E (dropped) contribute 0."""
  n_experts = w_gate_ExDxF.shape[0]
  b, length, d = x_BxLxD.shape
  k = experts_BxLxK.shape[-1]
  mesh = jax.sharding.get_abstract_mesh()

  def size(axis):
    return mesh.shape[axis] if axis in mesh.axis_names else 1

  def local(x, e, w, wg, wu, wd, **kw):
    bl, ll = x.shape[:2]
    out = _experts_local(x.reshape(bl * ll, d), e.reshape(bl * ll, k), w.reshape(bl * ll, k),
                         wg, wu, wd, n_experts=n_experts, **kw)
    return out.reshape(bl, ll, d)

  if mesh.empty or mesh.size == 1:
    return local(x_BxLxD, experts_BxLxK, weights_BxLxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                 ep_axis=None, ep_size=1, a2a=False, tp_axis=None, slots=0)
  ep = size(EXPERT_AXIS)
  if n_experts % ep:
    raise ValueError(f'{n_experts} experts do not split over mesh axis {EXPERT_AXIS!r} of '
                     f'size {ep}.')
  tp = size(TENSOR_AXIS)
  tp_axis = TENSOR_AXIS if tp > 1 and w_gate_ExDxF.shape[-1] % tp == 0 else None
  batch_axes = tuple(a for a in BATCH_AXES if size(a) > 1)
  if b % math.prod(size(a) for a in batch_axes):
    batch_axes = ()  # tokens stay replicated: each expert shard runs its experts on all
  length_axes = tuple(a for a in LENGTH_AXES if size(a) > 1)
  if length % math.prod(size(a) for a in length_axes):
    length_axes = ()
  a2a = ep > 1 and EXPERT_AXIS in batch_axes
  ep_axis = EXPERT_AXIS if ep > 1 else None
  tokens_local = (b // math.prod(size(a) for a in batch_axes)) * (
      length // math.prod(size(a) for a in length_axes))
  slots = tokens_local * k
  if capacity_limit:
    slots = min(slots, (n_experts // ep) * capacity_limit)
  tok = P(batch_axes or None, length_axes or None, None)
  wspec = P(ep_axis, None, tp_axis)
  dspec = P(ep_axis, tp_axis, None)
  # Inside another shard_map (a pipeline stage's), only the axes still automatic are ours.
  free = frozenset(a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
                   if t != jax.sharding.AxisType.Manual)
  fn = jax.shard_map(
      lambda *a: local(*a, ep_axis=ep_axis, ep_size=ep, a2a=a2a, tp_axis=tp_axis, slots=slots),
      in_specs=(tok, tok, tok, wspec, wspec, dspec), out_specs=tok,
      axis_names=free if len(free) < len(mesh.axis_names) else frozenset())
  return fn(x_BxLxD, experts_BxLxK, weights_BxLxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)


# ---------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------


def _param(rngs: nnx.Rngs, shape, names, std, dtype) -> nnx.Param:
  init = jax.nn.initializers.normal(stddev=std)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


class SharedMlp(nnx.Module):
  """The shared expert: a dense SwiGLU of width shared_mlp_dim that every token takes."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
    d, f, pd = cfg.d_model, cfg.shared_mlp_dim, cfg.param_dtype
    self.w_gate = _param(rngs, (d, f), ('embed', 'mlp'), INIT_STD, pd)
    self.w_up = _param(rngs, (d, f), ('embed', 'mlp'), INIT_STD, pd)
    self.w_down = _param(rngs, (f, d), ('mlp', 'embed'),
                         INIT_STD / math.sqrt(2 * cfg.n_layers), pd)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dt = x_BxLxD.dtype
    gate_BxLxF = jnp.einsum('bld,df->blf', x_BxLxD, self.w_gate[...].astype(dt))
    up_BxLxF = jnp.einsum('bld,df->blf', x_BxLxD, self.w_up[...].astype(dt))
    return jnp.einsum('blf,fd->bld', jax.nn.silu(gate_BxLxF) * up_BxLxF,
                      self.w_down[...].astype(dt))


class MoeMlp(nnx.Module):
  """The MoE MLP of one block (every block's, stacked along 'layers').

  Parameters (HF interop, train/convert.py, reads and writes exactly these):
    router [D, E] ('embed', None); w_gate, w_up [E, D, F] ('expert', 'embed', 'expert_mlp');
    w_down [E, F, D] ('expert', 'expert_mlp', 'embed'); with shared_mlp_dim > 0
    shared.{w_gate,w_up} [D, Fs] ('embed', 'mlp'), shared.w_down [Fs, D] ('mlp', 'embed');
    with shared_gate, shared_gate [D, 1] ('embed', None).
  Init as the dense MLP: N(0, 0.02) inputs, N(0, 0.02 / sqrt(2 * n_layers)) down projections.
  """

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
    if cfg.quant != 'none' or cfg.lora_rank:
      raise ValueError('The MoE experts have no quantized storage or LoRA adapters (model.moe '
                       'with model.lora or a quantized model is not supported).')
    self.cfg = cfg
    d, e, f, pd = cfg.d_model, cfg.n_experts, cfg.expert_mlp_dim, cfg.param_dtype
    out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
    self.router = _param(rngs, (d, e), ('embed', None), INIT_STD, pd)
    self.w_gate = _param(rngs, (e, d, f), ('expert', 'embed', 'expert_mlp'), INIT_STD, pd)
    self.w_up = _param(rngs, (e, d, f), ('expert', 'embed', 'expert_mlp'), INIT_STD, pd)
    self.w_down = _param(rngs, (e, f, d), ('expert', 'expert_mlp', 'embed'), out_std, pd)
    if cfg.shared_mlp_dim > 0:
      self.shared = SharedMlp(cfg, rngs=rngs)
      if cfg.shared_gate:
        self.shared_gate = _param(rngs, (d, 1), ('embed', None), INIT_STD, pd)

  def __call__(self, x_BxLxD: jax.Array, *, dropless: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """(out_BxLxD in x's dtype, aux_3 float32 [balance, z, dropped]); `dropless` ignores
    the capacity limit (decoding)."""
    cfg = self.cfg
    b, length, _ = x_BxLxD.shape
    logits_BxLxE = jnp.einsum('bld,de->ble', x_BxLxD.astype(jnp.float32),
                              self.router[...].astype(jnp.float32))
    logits_TxE = logits_BxLxE.reshape(b * length, -1)
    weights_BxLxK, experts_BxLxK = route(logits_BxLxE, cfg.top_k, cfg.router)
    experts_TxK = experts_BxLxK.reshape(b * length, -1)
    aux = [balance_loss(logits_TxE, experts_TxK), z_loss(logits_TxE), jnp.float32(0.0)]
    limit = 0 if dropless else capacity(b * length, cfg.top_k, cfg.n_experts,
                                        cfg.capacity_factor)
    if limit:
      keep_BxLxK = capacity_keep(experts_TxK, cfg.n_experts, limit).reshape(experts_BxLxK.shape)
      experts_BxLxK = jnp.where(keep_BxLxK, experts_BxLxK, cfg.n_experts)
      weights_BxLxK = jnp.where(keep_BxLxK, weights_BxLxK, 0.0)
      aux[2] = 1.0 - jnp.mean(keep_BxLxK.astype(jnp.float32))
    # Cast before the shard_map, so that FSDP gathers the weights in the compute dtype.
    dt = x_BxLxD.dtype
    out_BxLxD = experts(x_BxLxD, experts_BxLxK, weights_BxLxK, self.w_gate[...].astype(dt),
                        self.w_up[...].astype(dt), self.w_down[...].astype(dt),
                        capacity_limit=limit)
    if cfg.shared_mlp_dim > 0:
      shared_BxLxD = self.shared(x_BxLxD).astype(jnp.float32)
      if cfg.shared_gate:
        gate_BxLx1 = jnp.einsum('bld,do->blo', x_BxLxD.astype(jnp.float32),
                                self.shared_gate[...].astype(jnp.float32))
        shared_BxLxD = jax.nn.sigmoid(gate_BxLx1) * shared_BxLxD
      out_BxLxD = out_BxLxD + shared_BxLxD
    return out_BxLxD.astype(x_BxLxD.dtype), jnp.stack(aux)
