"""TensorBoard events, MFU, the console progress line and profiler traces.

Event files are written with tensorboard's own TensorFlow-free writer and
protos, so runs need no TensorFlow. That writer appends record by record, which
object stores cannot do (through gcsfs it would overwrite the file with each
record), and jax's profiler reaches gs:// only through its own client (which
ignores storage emulators): so for a URL logdir both write into a local
directory whose files are copied up (`data.storage.LocalStaging`).
"""

import collections
import io
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from data import storage


class SummaryWriter:
  """Scalars, text and images as TensorBoard events in `logdir` (process 0 only).

  A URL `logdir` receives a copy of the local event file at each `flush()`, at
  `close()` and at least every `sync_secs` while events arrive.
  """

  def __init__(self, logdir: str, enabled: bool = True, sync_secs: float = 60.0):
    self._staging = storage.LocalStaging(logdir, 'kiln-events-') if enabled else None
    self._writer = EventFileWriter(self._staging.local) if enabled else None
    self._sync_secs = sync_secs
    self._last_sync = time.monotonic()

  def _add(self, step: int, values: Sequence[summary_pb2.Summary.Value]) -> None:
    if self._writer is None:
      return
    event = event_pb2.Event(wall_time=time.time(), step=int(step),
                            summary=summary_pb2.Summary(value=list(values)))
    self._writer.add_event(event)
    if self._staging.remote and time.monotonic() - self._last_sync > self._sync_secs:
      self.flush()

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                     for k, v in values.items()])

  def text(self, step: int, tag: str, text: str) -> None:
    tensor = tensor_pb2.TensorProto(
        dtype='DT_STRING', string_val=[text.encode('utf-8')],
        tensor_shape=tensor_shape_pb2.TensorShapeProto())
    meta = text_metadata.create_summary_metadata(display_name=tag, description='')
    self._add(step, [summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)])

  def images(self, step: int, tag: str, images_NxHxWxC: np.ndarray) -> None:
    """Images as float in [0, 1] or uint8, with 1 or 3 channels."""
    images = np.asarray(images_NxHxWxC)
    if images.dtype != np.uint8:
      images = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
    values = []
    for i, image_HxWxC in enumerate(images):
      buf = io.BytesIO()
      Image.fromarray(image_HxWxC[..., 0] if image_HxWxC.shape[-1] == 1 else image_HxWxC).save(
          buf, format='PNG')
      h, w, c = image_HxWxC.shape
      encoded = summary_pb2.Summary.Image(height=h, width=w, colorspace=c,
                                          encoded_image_string=buf.getvalue())
      name = tag if len(images) == 1 else f'{tag}/{i}'
      values.append(summary_pb2.Summary.Value(
          tag=name, image=encoded,
          metadata=image_metadata.create_summary_metadata(display_name=name, description='')))
    self._add(step, values)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._staging.sync()
      self._last_sync = time.monotonic()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._staging.close()


# Dense bf16 peak FLOP/s per chip, by jax `device_kind`, from the vendors' data sheets.
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e
    'TPU v5': 459e12,  # v5p
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,  # v6e (Trillium)
    'NVIDIA H100 80GB HBM3': 989e12,  # SXM
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H100 NVL': 835e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA A100-SXM4-40GB': 312e12,
    'NVIDIA A100-PCIE-40GB': 312e12,
    'NVIDIA A100 80GB PCIe': 312e12,
    'NVIDIA L4': 121e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  for kind, peak in PEAK_FLOPS.items():  # e.g. 'NVIDIA H200 NVL' or a suffixed H100 name
    if device_kind.startswith(kind):
      return peak
  return None


def flops_metrics(flops_per_step: float, step_seconds: float, devices) -> dict[str, float]:
  """`train/mfu` where every device has a known peak, else achieved `train/model_tflops`."""
  achieved = flops_per_step / step_seconds
  peaks = [peak_flops_per_device(d.device_kind) for d in devices]
  if all(p is not None for p in peaks):
    return {'train/mfu': achieved / sum(peaks)}
  return {'train/model_tflops': achieved / 1e12}


class Progress:
  """A short console line per log interval, with an ETA from recent step times; with `bar`,
  also a tqdm progress bar (tqdm.auto: a widget in notebooks, text in a terminal) that
  advances every step and shows the loss of the last line. The bar is for notebooks; the
  command line keeps it off, since its redraws garble log files."""

  def __init__(self, total_steps: int, start_step: int, window: int = 5, bar: bool = False):
    self.total = total_steps
    self._last = (start_step, time.perf_counter())
    self._rates: collections.deque[float] = collections.deque(maxlen=window)
    self._bar = None
    if bar and jax.process_index() == 0:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit='step', desc='train')

  def advance(self, step: int) -> None:
    """Step `step` has finished (moves the bar)."""
    if self._bar is not None and step > self._bar.n:
      self._bar.update(step - self._bar.n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def line(self, step: int, scalars: Mapping[str, float]) -> str:
    now = time.perf_counter()
    last_step, last_time = self._last
    if step > last_step:
      self._rates.append((now - last_time) / (step - last_step))
    self._last = (step, now)
    sec_per_step = float(np.mean(self._rates)) if self._rates else 0.0
    eta = _duration((self.total - step) * sec_per_step)
    parts = [f'step {step}/{self.total}']
    for key in ('train/loss', 'train/grad_norm', 'train/lr'):
      if key in scalars:
        parts.append(f'{key.split("/")[1]} {scalars[key]:.4g}')
    for key, value in scalars.items():
      if key.endswith('_per_sec'):
        parts.append(f'{key.split("/")[1].replace("_per_sec", "/s")} {value:,.0f}')
    parts.append(f'{sec_per_step * 1000:.0f} ms/step')
    parts.append(f'eta {eta}')
    text = ' | '.join(parts)
    if jax.process_index() == 0:
      logging.info('%s', text)
    if self._bar is not None:  # the bar shows its own step count, rate and ETA
      self._bar.set_postfix_str(' | '.join(parts[1:-2]), refresh=False)
    return text


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class Profiler:
  """A jax.profiler trace of steps [start_step, start_step + num_steps) under `logdir`.

  For a URL `logdir` the trace goes to a local directory, copied up when it stops.
  """

  def __init__(self, logdir: str, start_step: int, num_steps: int):
    self.logdir = logdir
    self.start = start_step
    self.stop = start_step + num_steps - 1
    self._staging: storage.LocalStaging | None = None  # while a trace is running

  @property
  def _active(self) -> bool:
    return self._staging is not None

  def maybe_start(self, step: int) -> None:
    if self.start >= 0 and step == self.start and not self._active:
      self._staging = storage.LocalStaging(self.logdir, 'kiln-profile-')
      jax.profiler.start_trace(self._staging.local)

  def maybe_stop(self, step: int, block_on=None) -> None:
    if self._active and step >= self.stop:
      if block_on is not None:
        jax.block_until_ready(block_on)
      jax.profiler.stop_trace()
      self._staging.close()
      self._staging = None
      logging.info('Wrote a profiler trace of steps %d-%d to %s/plugins/profile.', self.start,
                   self.stop, self.logdir)
