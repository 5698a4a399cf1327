"""The KV-cache page allocator: reference-counted pages and prefix caching.

The engine's cache holds `num_pages` physical pages of `page_size` positions each; a
sequence owns a list of them (its page table), allocated as its tokens arrive, so memory
grows with the tokens in flight rather than with slots times the context length.

Prefix caching, as vLLM does it: every full page of prompt tokens is named by a hash
chain, sha256(parent's hash + the page's token ids), so a page's name fixes the whole
prefix up to its end. A request whose prompt starts with the same blocks takes the
existing pages (their reference count goes up) instead of computing them again. Shared
pages are full and hold prompt tokens only, so nobody ever writes them again. A page whose
count falls to zero keeps its contents and its name, and is reused (least recently
released first) only when no never-named page is left, so a later request with the same
prefix can still find it.

Hand-written rather than taken from a library: it is a free list and two dicts, and no
maintained JAX serving library exposes its allocator as an API.
"""

import collections
import hashlib
from collections.abc import Sequence

import numpy as np


def block_hashes(tokens: Sequence[int], page_size: int) -> list[bytes]:
  """The hash chain of the full `page_size` blocks of `tokens` (a partial last block has
  none): entry i names tokens[: (i + 1) * page_size]."""
  hashes, parent = [], b''
  for start in range(0, len(tokens) - page_size + 1, page_size):
    block = np.asarray(tokens[start:start + page_size], np.int64).tobytes()
    parent = hashlib.sha256(parent + block).digest()
    hashes.append(parent)
  return hashes


class OutOfPages(Exception):
  """`allocate` found no free page (the scheduler checks `available` first)."""


class PageAllocator:
  """Physical pages with reference counts and a prefix cache keyed by `block_hashes`.

  Not thread-safe: only the engine's step loop calls it.
  """

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 1 or page_size < 1:
      raise ValueError(f'num_pages={num_pages} and page_size={page_size} must be positive.')
    self.num_pages = num_pages
    self.page_size = page_size
    self._refs = np.zeros(num_pages, np.int64)
    self._free = collections.deque(range(num_pages))    # unnamed, count 0
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # named, 0
    self._by_hash: dict[bytes, int] = {}
    self._hash_of: dict[int, bytes] = {}

  # --- counts ----------------------------------------------------------------

  @property
  def available(self) -> int:
    """Pages `allocate` can hand out now (free, plus cached ones nobody holds)."""
    return len(self._free) + len(self._evictable)

  @property
  def in_use(self) -> int:
    """Pages held by at least one sequence; a shared page counts once."""
    return self.num_pages - self.available

  @property
  def cached(self) -> int:
    """Pages with a prefix-cache name (held or not)."""
    return len(self._hash_of)

  def refcount(self, page: int) -> int:
    return int(self._refs[page])

  # --- allocation ------------------------------------------------------------

  def allocate(self) -> int:
    """A page for one sequence's new tokens (count 1); evicts the least recently released
    cached page when no unnamed one is left."""
    if self._free:
      page = self._free.popleft()
    elif self._evictable:
      page, _ = self._evictable.popitem(last=False)
      del self._by_hash[self._hash_of.pop(page)]
    else:
      raise OutOfPages(f'All {self.num_pages} KV-cache pages are in use.')
    self._refs[page] = 1
    return page

  def release(self, pages: Sequence[int]) -> None:
    """Drops one reference to each page; a page nobody holds becomes free (or evictable,
    keeping its contents, when it is named)."""
    for page in pages:
      if self._refs[page] <= 0:
        raise ValueError(f'Page {page} released more often than it was taken.')
      self._refs[page] -= 1
      if self._refs[page] == 0:
        if page in self._hash_of:
          self._evictable[page] = None
        else:
          self._free.append(page)

  # --- prefix cache ----------------------------------------------------------

  def lookup(self, hashes: Sequence[bytes]) -> list[int]:
    """The cached pages of the longest prefix of `hashes` (nothing is taken)."""
    pages = []
    for h in hashes:
      page = self._by_hash.get(h)
      if page is None:
        break
      pages.append(page)
    return pages

  def share(self, pages: Sequence[int]) -> None:
    """Takes one reference to each cached page (from `lookup`)."""
    for page in pages:
      if self._refs[page] == 0:
        del self._evictable[page]
      self._refs[page] += 1

  def register(self, page: int, block_hash: bytes) -> None:
    """Names a held page whose positions are all computed prompt tokens, so later prompts
    with the same prefix can share it. A name that already has a page keeps that one."""
    if block_hash in self._by_hash or page in self._hash_of:
      return
    self._by_hash[block_hash] = page
    self._hash_of[page] = block_hash
