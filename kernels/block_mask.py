"""Which keys a query sees, by element and by block: the mask every attention kernel applies.

The rules are those of kernels/attention_reference.py (causal, sliding window,
the queries as the last L positions of the keys), plus the two lengths that
padding adds: rows at or past `q_len` and keys at or past `kv_len` are padding.
Segment ids are data, not structure, so each kernel compares them itself.

Everything here works on Python ints and on traced int32 scalars alike, so one
definition serves the kernels' index maps, their loop bounds and their element
masks. Block ranges are inclusive: (first, last), empty when last < first.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockMask:
  """The static part of an attention mask (hashable: it is a jit static argument).

  Attributes:
    q_len: real query length L (the kernel may see more rows, of padding).
    kv_len: real key length S.
    causal: key j visible to query i only if j <= pos(i).
    window: (left, right) sliding window or None (see the reference).
  """
  q_len: int
  kv_len: int
  causal: bool = False
  window: tuple[int, int] | None = None

  @property
  def q_offset(self) -> int:
    """pos(i) = i + q_offset: the queries are the last q_len positions."""
    return self.kv_len - self.q_len

  def needs_element_mask(self, padded_kv_len: int) -> bool:
    """Whether any key can be invisible to some query (ignoring segment ids)."""
    return self.causal or self.window is not None or padded_kv_len > self.kv_len

  def _reach(self) -> tuple[int | None, int | None]:
    """How far left and right of pos(i) a query sees; None is unbounded."""
    left = right = None
    if self.window is not None:
      left, right = self.window
    if self.causal:
      right = 0 if right is None else min(right, 0)
    return left, right

  def visible(self, q_row, k_col):
    """Element mask for broadcastable int32 arrays of query rows and key columns."""
    pos = q_row + self.q_offset
    left, right = self._reach()
    ok = k_col < self.kv_len
    if right is not None:
      ok = ok & (k_col <= pos + right)
    if left is not None:
      ok = ok & (k_col >= pos - left)
    return ok

  def kv_blocks(self, q_block, block_q: int, block_k: int):
    """Key blocks (first, last) that some row of query block `q_block` sees."""
    left, right = self._reach()
    first_pos = q_block * block_q + self.q_offset
    last_pos = first_pos + block_q - 1
    lo = 0 if left is None else jnp.maximum(first_pos - left, 0)
    hi = self.kv_len - 1 if right is None else jnp.minimum(last_pos + right, self.kv_len - 1)
    # hi >= -1 keeps both divisions on non-negative numbers (floor == truncation).
    hi = jnp.maximum(hi, -1)
    return _div(lo, block_k), _div(hi + block_k, block_k) - 1

  def q_blocks(self, k_block, block_k: int, block_q: int):
    """Query blocks (first, last) with some real row that sees key block `k_block`."""
    left, right = self._reach()
    first_k = k_block * block_k
    last_k = jnp.minimum(first_k + block_k - 1, self.kv_len - 1)
    # Row r sees key j iff pos(r) - left <= j <= pos(r) + right.
    lo = 0 if right is None else jnp.maximum(first_k - right - self.q_offset, 0)
    hi = self.q_len - 1 if left is None else jnp.minimum(
        last_k + left - self.q_offset, self.q_len - 1)
    hi = jnp.where(last_k < first_k, -1, jnp.maximum(hi, -1))  # a block of padding keys
    return _div(lo, block_q), _div(hi + block_q, block_q) - 1


def _div(a, b: int):
  """Integer division of a non-negative int or int32 scalar by a positive constant."""
  if isinstance(a, int):
    return a // b
  return jax.lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def clamp(index, first, last, num_blocks: int):
  """`index` moved into [first, last] (and into the grid).

  Index maps use it so that a block the kernel skips maps to one it already
  holds: the pipeline then issues no copy for it.
  """
  return jnp.clip(jnp.clip(index, first, jnp.maximum(last, first)), 0, num_blocks - 1)
