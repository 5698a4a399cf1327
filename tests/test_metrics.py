"""TensorBoard events read back through tensorboard's own reader; MFU by hand."""

import glob
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from train import metrics


def _read(logdir):
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.IMAGES: 0,
                             event_accumulator.SCALARS: 0})
  acc.Reload()
  return acc


def test_scalars_text_and_images_read_back(tmp_path):
  writer = metrics.SummaryWriter(str(tmp_path))
  writer.scalars(1, {'train/loss': 2.5, 'train/lr': 1e-3})
  writer.scalars(2, {'train/loss': 2.25})
  writer.text(2, 'samples/text', 'def f():\n  return 1')
  rng = np.random.default_rng(0)
  writer.images(3, 'samples/grid', rng.uniform(size=(2, 8, 8, 1)))
  writer.close()

  acc = _read(str(tmp_path))
  loss = [(e.step, e.value) for e in acc.Scalars('train/loss')]
  assert loss == [(1, 2.5), (2, 2.25)]
  assert np.isclose(acc.Scalars('train/lr')[0].value, 1e-3)
  text = acc.Tensors('samples/text')[0]
  assert text.step == 2
  assert text.tensor_proto.string_val[0].decode() == 'def f():\n  return 1'
  images = acc.Images('samples/grid/1')
  assert images[0].step == 3 and (images[0].width, images[0].height) == (8, 8)


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metrics.SummaryWriter(str(tmp_path), enabled=False)
  writer.scalars(1, {'a': 1.0})
  writer.close()
  assert os.listdir(tmp_path) == []


def test_flops_metrics_mfu_and_cpu():
  h100 = types.SimpleNamespace(device_kind='NVIDIA H100 80GB HBM3')
  out = metrics.flops_metrics(flops_per_step=989e12, step_seconds=2.0, devices=[h100, h100])
  # 989 TFLOP in 2 s on two chips of 989 TFLOP/s peak each: a quarter of the peak.
  assert np.isclose(out['train/mfu'], 0.25)
  out = metrics.flops_metrics(flops_per_step=3e12, step_seconds=1.5, devices=jax.devices())
  assert out == {'train/model_tflops': 2.0}


def test_progress_line_has_step_and_eta():
  progress = metrics.Progress(total_steps=100, start_step=0)
  line = progress.line(10, {'train/loss': 3.0, 'train/tokens_per_sec': 1234.0})
  assert 'step 10/100' in line and 'loss 3' in line and 'eta' in line and 'tokens/s 1,234' in line


def test_profiler_writes_a_trace(tmp_path):
  profiler = metrics.Profiler(str(tmp_path), start_step=2, num_steps=2)
  f = jax.jit(lambda x: jnp.sin(x) @ x)
  x = jnp.ones((64, 64))
  for step in range(1, 5):
    profiler.maybe_start(step)
    y = f(x)
    profiler.maybe_stop(step, block_on=y)
  traces = glob.glob(str(tmp_path / 'plugins' / 'profile' / '*' / '*'))
  assert traces, 'no trace under plugins/profile'
