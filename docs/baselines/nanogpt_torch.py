"""The side-by-side baseline for `configs/lm.py:nanogpt_cpu`: nanoGPT's CPU "baby GPT"
setting in plain PyTorch, timed on the same machine in the same session.

  pip install torch==2.13.0
  python docs/baselines/nanogpt_torch.py --data=../shared/data/tinyshakespeare.txt

The model and loop follow nanoGPT's published setting (config/train_shakespeare_char.py
with its CPU overrides: 4 layers, 4 heads, width 128, context 64, batch 12, 2000 steps,
dropout 0, AdamW with beta2 0.99 and weight decay 0.1 on matrices, clipping at 1.0, lr
1e-3 with 100 warmup steps and cosine decay to 1e-4, eval on 20 random batches): a GPT-2
block (LayerNorm without bias, GELU MLP of 4x width, learned positions, tied head) over
characters, random windows of the first 90% of the text, validation on the last 10%.
Written here from that description; it prints ms/step (steps 100 onwards, after warm-up)
and the validation loss at the end.
"""

import argparse
import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):

  def __init__(self, d: int, heads: int):
    super().__init__()
    self.heads = heads
    self.ln1 = nn.LayerNorm(d, bias=False)
    self.qkv = nn.Linear(d, 3 * d, bias=False)
    self.proj = nn.Linear(d, d, bias=False)
    self.ln2 = nn.LayerNorm(d, bias=False)
    self.up = nn.Linear(d, 4 * d, bias=False)
    self.down = nn.Linear(4 * d, d, bias=False)

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
    q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
    return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):

  def __init__(self, vocab: int, context: int, d: int, layers: int, heads: int):
    super().__init__()
    self.tok = nn.Embedding(vocab, d)
    self.pos = nn.Embedding(context, d)
    self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
    self.ln_f = nn.LayerNorm(d, bias=False)
    self.apply(self._init)
    for name, p in self.named_parameters():  # GPT-2's scaled residual projections
      if name.endswith(('proj.weight', 'down.weight')):
        nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

  @staticmethod
  def _init(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, 0.0, 0.02)

  def forward(self, idx, targets):
    x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
    for block in self.blocks:
      x = block(x)
    logits = self.ln_f(x) @ self.tok.weight.T
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', required=True, help='A text file (tinyshakespeare).')
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--seed', type=int, default=1337)
  args = parser.parse_args()
  torch.manual_seed(args.seed)
  rng = np.random.default_rng(args.seed)

  text = open(args.data, encoding='utf-8').read()
  chars = sorted(set(text))
  lookup = {c: i for i, c in enumerate(chars)}
  ids = np.array([lookup[c] for c in text], dtype=np.int64)
  cut = int(0.9 * len(ids))
  splits = {'train': ids[:cut], 'val': ids[cut:]}
  context, batch, steps = 64, 12, args.steps

  def get_batch(split):
    data = splits[split]
    starts = rng.integers(0, len(data) - context, batch)
    x = torch.from_numpy(np.stack([data[s:s + context] for s in starts]))
    y = torch.from_numpy(np.stack([data[s + 1:s + 1 + context] for s in starts]))
    return x, y

  model = GPT(len(chars), context, 128, 4, 4)
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.1},
                           {'params': no_decay, 'weight_decay': 0.0}], lr=1e-3,
                          betas=(0.9, 0.99))

  def lr_at(it):
    if it < 100:
      return 1e-3 * (it + 1) / 101
    ratio = (it - 100) / (steps - 100)
    return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

  @torch.no_grad()
  def val_loss():
    model.eval()
    losses = [model(*get_batch('val')).item() for _ in range(20)]
    model.train()
    return float(np.mean(losses))

  timed_from = min(100, steps - 1)
  for it in range(steps):
    if it == timed_from:
      start = time.perf_counter()
    for group in opt.param_groups:
      group['lr'] = lr_at(it)
    loss = model(*get_batch('train'))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if it % 200 == 0:
      print(f'step {it}: train loss {loss.item():.4f}', flush=True)
  ms = (time.perf_counter() - start) / (steps - timed_from) * 1000
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads: {ms:.1f} ms/step '
        f'(steps {timed_from}-{steps}), val loss {val_loss():.4f} after {steps} steps')


if __name__ == '__main__':
  main()
