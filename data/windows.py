"""The LM's packed examples of a token stream, shared by the text pipeline
(data/lm_pipeline.py) and the ArrayRecord shards (data/packed.py).

Example i is the window stream[i*L : i*L + L + 1] (stride L, no overlap):
inputs are its first L tokens, targets its last L. Documents are packed
back to back; `segment_ids` number the documents within a row from 1 and
`positions` count from 0 at each document start (and at the row start).
"""

import numpy as np

Batch = dict[str, np.ndarray]


class TokenWindows:
  """The packed examples of one token stream: window i is stream[i*L : i*L + L + 1]."""

  def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int):
    self.tokens = tokens  # [N], the whole split, usually memory-mapped
    self.doc_starts = doc_starts  # [D], sorted offsets of document starts; [0] == 0
    self.seq_len = seq_len

  def __len__(self) -> int:
    return max(len(self.tokens) - 1, 0) // self.seq_len

  def __getitem__(self, i: int) -> Batch:
    start, seq_len = int(i) * self.seq_len, self.seq_len
    window_W = np.asarray(self.tokens[start:start + seq_len + 1], dtype=np.int32)
    offsets_L = np.arange(start, start + seq_len)
    # 1-based number (in the stream) of the document that holds each input token.
    doc_L = np.searchsorted(self.doc_starts, offsets_L, side='right')
    seg_start_L = np.maximum(self.doc_starts[doc_L - 1], start)
    return {
        'inputs': window_W[:-1],
        'targets': window_W[1:],
        'segment_ids': (doc_L - doc_L[0] + 1).astype(np.int32),
        'positions': (offsets_L - seg_start_L).astype(np.int32),
    }
