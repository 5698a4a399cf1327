"""Tests for kernels/bench.py: its arithmetic and its output, at a tiny size on CPU.

The bench's numbers are only meaningful on accelerators; these tests check
that it is ready to run there: FLOPs by hand, every implementation on the bench's
inputs against a float64 numpy attention, the error column recomputed, the
markdown section it rewrites, and the command line at its smallest size.
"""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import bench, bench_decode
from model import attention as attention_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_flops_are_the_two_forward_matmuls_halved_when_causal():
  full = bench.Shape(batch=2, seq_len=512, heads=16, kv_heads=4, head_dim=128, causal=False)
  assert full.forward_flops() == 4 * 2 * 16 * 512 * 512 * 128
  causal = bench.Shape(batch=2, seq_len=512, heads=16, kv_heads=4, head_dim=128, causal=True)
  assert causal.forward_flops() == full.forward_flops() / 2
  row = bench.Row('xla', full, fwd_ms=2.0, fwd_bwd_ms=7.0, max_err=0.0)
  assert row.tflops(row.fwd_ms, 1.0) == full.forward_flops() / 2e-3 / 1e12
  assert row.tflops(row.fwd_bwd_ms, 3.5) == row.tflops(row.fwd_ms, 1.0)


def test_shapes_keep_tokens_and_hidden_fixed():
  shapes = bench.shapes([512, 16384], [64, 128], [False, True], [False, True], tokens=16384,
                        hidden=2048, gqa_ratio=4)
  assert len(shapes) == 16
  for s in shapes:
    assert s.batch * s.seq_len == 16384 and s.heads * s.head_dim == 2048
    assert s.kv_heads in (s.heads, s.heads // 4)


def numpy_attention(q, k, v, causal: bool) -> np.ndarray:
  """Softmax attention in float64, grouped-query heads repeated: [B, L, H, D]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum('blhd,bshd->bhls', q, k) / np.sqrt(q.shape[-1])
  if causal:
    length = q.shape[1]
    logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum('bhls,bshd->blhd', p / p.sum(-1, keepdims=True), v)


def test_every_implementation_runs_on_the_same_inputs_and_is_checked():
  shape = bench.Shape(batch=1, seq_len=48, heads=2, kv_heads=1, head_dim=16, causal=True)
  rows = bench.bench_shape(shape, ['pallas', 'xla', 'cudnn'], jnp.bfloat16, repeats=1, iters=1)
  by_impl = {r.impl: r for r in rows}
  assert set(by_impl) == {'pallas', 'xla', 'cudnn'}
  assert by_impl['cudnn'].note == 'needs an NVIDIA GPU' and by_impl['cudnn'].fwd_ms is None
  assert by_impl['xla'].max_err == 0.0  # XLA is the bench's reference

  # The bench's inputs, drawn the same way, against an independent float64 attention:
  # both bf16 implementations are right, and the error column is pallas against xla.
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 48, h, 16)), jnp.bfloat16) for h in (2, 1, 1))
  want = numpy_attention(q, k, v, causal=True)
  out = {impl: np.asarray(jax.jit(lambda q, k, v, impl=impl: attention_lib.attention(
      q, k, v, causal=True, implementation=impl))(q, k, v), np.float64)
         for impl in ('xla', 'pallas')}
  for impl, got in out.items():
    # bf16 outputs (8-bit mantissa) of values up to ~2: within a few of their ulps.
    np.testing.assert_allclose(got, want, atol=3e-2, err_msg=impl)
  rel = np.max(np.abs(out['pallas'] - out['xla'])) / np.max(np.abs(out['xla']))
  np.testing.assert_allclose(by_impl['pallas'].max_err, rel, rtol=1e-6)
  assert 0.0 < by_impl['pallas'].max_err < 2e-2  # bf16 kernel against bf16 XLA: close, not equal
  for impl in ('pallas', 'xla'):
    assert by_impl[impl].fwd_ms > 0 and by_impl[impl].fwd_bwd_ms > 0
  text = bench.table(rows)
  assert text.count('\n') == 4 and '| pallas | 48 | 16 | yes | 2/1 | 1 |' in text


def test_section_is_written_per_device_and_replaced_on_rerun(tmp_path):
  path = tmp_path / 'benchmarks.md'
  original = (REPO / 'docs' / 'benchmarks.md').read_text()
  path.write_text(original)
  bench.write_section(str(path), 'NVIDIA H100', 'python -m kernels.bench', '| table one |')
  bench.write_section(str(path), 'TPU v5p', 'python -m kernels.bench', '| table two |')
  bench.write_section(str(path), 'NVIDIA H100', 'python -m kernels.bench', '| table three |')
  text = path.read_text()
  assert '| table one |' not in text and '| table two |' in text and '| table three |' in text
  attention = text[text.index(bench.SECTION):]
  assert attention.index('NVIDIA H100') < attention.index('TPU v5p')  # replaced in place
  assert attention.count('\n\n### `python -m kernels.bench` on ') == 2  # headings, own paragraphs
  # Everything outside the attention section is untouched.
  before = original[:original.index(bench.SECTION)]
  after = original[original.index('\n## ', original.index(bench.SECTION)):]
  assert text.startswith(before) and text.endswith(after)


def test_command_line_prints_a_table_and_writes_its_section(tmp_path):
  output = tmp_path / 'benchmarks.md'
  output.write_text((REPO / 'docs' / 'benchmarks.md').read_text())
  proc = subprocess.run(
      [sys.executable, '-m', 'kernels.bench', '--seq_lens=32', '--head_dims=16',
       '--impls=xla,pallas', '--causal=true', '--gqa=false', '--tokens=32', '--hidden=32',
       '--repeats=1', '--iters=1', f'--output={output}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'interpret mode' in proc.stdout
  header = '| impl | L | D | causal | heads q/kv | batch |'
  table = proc.stdout[proc.stdout.index(header):].splitlines()
  assert table[2].startswith('| xla | 32 | 16 | yes | 2/2 | 1 |'), proc.stdout
  assert table[3].startswith('| pallas | 32 | 16 | yes | 2/2 | 1 |'), proc.stdout
  assert f'Wrote {output}.' in proc.stdout
  section = output.read_text()[output.read_text().index(bench.SECTION):]
  assert table[3] in section and '--seq_lens=32' in section


def test_decode_bench_checks_the_kernel_and_writes_its_own_section(tmp_path):
  """kernels/bench_decode.py: the kernel's row is checked against the gather path's, GB/s
  is the keys and values over the time, and its section leaves the attention one alone."""
  rows = bench_decode.bench_attention(2, 32, ['pallas', 'xla'], heads=4, kv_heads=2,
                                      head_dim=16, page_size=8, dtype=jnp.float32, repeats=1,
                                      iters=1)
  by_impl = {r.impl: r for r in rows}
  assert by_impl['xla'].max_err == 0.0 and 0.0 <= by_impl['pallas'].max_err < 1e-5
  for r in rows:
    assert r.gb_per_s == pytest.approx(2 * 2 * 32 * 2 * 16 * 4 / (r.ms * 1e-3) / 1e9)
  row = bench_decode.GenerateRow('pallas', 8, prefill_ms=10.0, step_ms=1.0, total_ms=200.0,
                                 new_tokens=100)
  assert row.tokens_per_s == 8 * 100 / 0.2

  path = tmp_path / 'benchmarks.md'
  original = (REPO / 'docs' / 'benchmarks.md').read_text()
  path.write_text(original)
  for body in ('| one |', '| two |'):
    bench.write_section(str(path), 'NVIDIA H200', 'python -m kernels.bench_decode', body,
                        section=bench_decode.SECTION, program='kernels.bench_decode')
  text = path.read_text()
  assert text.startswith(original.rstrip('\n'))  # appended after everything else
  decoding = text[text.index(bench_decode.SECTION):]
  assert '| one |' not in decoding and '| two |' in decoding
  assert decoding.count('### `python -m kernels.bench_decode` on NVIDIA H200') == 1
