"""Runs whose workdir and data are gs:// URLs, against a real GCS emulator.

The emulator (gcp-storage-emulator, in memory) listens on a loopback port for
the module's tests. Every layer of a run reaches it: gcsfs (under etils.epath)
through STORAGE_EMULATOR_HOST, and TensorStore (under orbax) through
TENSORSTORE_GCS_HTTP_URL. GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false keeps gcsfs
from probing the bucket type over gRPC first (the emulator speaks only HTTP, and
with credentials that probe waits 60 s before falling back). jax's profiler has
its own GCS client, which cannot be pointed at an emulator; the trainer never
lets it write a URL (traces go to a local directory and are copied up through
epath), so what the profiler leaves in the bucket is tested here too.

Oracles: the same run in a local workdir (losses bitwise, final state equal), a
SIGKILLed gs:// run resumed against the straight one, and files read back through
gcsfs against what the data gives.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data import images, packed, sources, tokenizers

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # per subprocess
BUCKET = 'kiln-test'
STEPS = 40  # the kill test needs checkpoints after the first one it sees
PROFILE_STEP = 3


@pytest.fixture(scope='module')
def gcs():
  """A GCS emulator with one empty bucket; yields a gcsfs filesystem on it."""
  from gcp_storage_emulator import server as emulator
  from gcp_storage_emulator.handlers import objects

  # GCS sends an object's generation in the x-goog-generation header of a download;
  # the emulator does not, and TensorStore needs it to rewrite an OCDBT manifest
  # conditionally (else 'Malformed StorageGeneration' when orbax commits in rounds).
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = obj['generation']
    except Exception:  # a missing object: the original handler answers 404
      pass
    return download(request, response, storage, *args, **kwargs)

  objects.download = download_with_generation  # objects.get (alt=media) calls it by name
  for _, methods in emulator.HANDLERS:
    for method, handler in methods.items():
      if handler is download:
        methods[method] = download_with_generation

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}'
  server = emulator.create_server('127.0.0.1', port, in_memory=True, default_bucket=BUCKET)
  server.start()
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
         'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,  # google-cloud-cpp, under ArrayRecord
         'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # for this process's epath and orbax, and the runs it starts
  import gcsfs.core  # after the environment: gcsfs reads GCSFS_EXPERIMENTAL_... on import
  try:
    yield gcsfs.core.GCSFileSystem(endpoint_url=url, token='anon', skip_instance_cache=True)
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.stop()
    objects.download = download
    for _, methods in emulator.HANDLERS:
      for method, handler in methods.items():
        if handler is download_with_generation:
          methods[method] = download


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> pathlib.Path:
  """Two text files (~40 KB of Python source) in a local directory."""
  import argparse
  import textwrap
  directory = tmp_path_factory.mktemp('corpus')
  for i, module in enumerate((textwrap, argparse)):
    (directory / f'part-{i}.txt').write_text(pathlib.Path(module.__file__).read_text()[:20_000])
  return directory


@pytest.fixture(scope='module')
def gs_corpus(gcs, corpus) -> str:
  """The corpus uploaded to the bucket; returns its glob URL."""
  for path in sorted(corpus.iterdir()):
    gcs.pipe(f'{BUCKET}/corpus/{path.name}', path.read_bytes())
  return f'gs://{BUCKET}/corpus/*.txt'


def train_cmd(data_path: str, workdir: str, *overrides: str) -> list[str]:
  return [
      sys.executable, '-m', 'train', '--config=configs/lm.py', f'--workdir={workdir}',
      '--config.data.source=text', f'--config.data.path={data_path}',
      '--config.data.tokenizer.kind=char', '--config.model.d_model=32',
      '--config.model.n_layers=1', '--config.model.n_heads=2', '--config.model.n_kv_heads=1',
      '--config.model.dtype=float32', '--config.data.seq_len=16', '--config.batch_size=8',
      '--config.eval_every=0', '--config.log_every=1', '--config.optimizer.warmup_steps=2',
      # Fixed, so that the schedule (and so every step) does not depend on `steps`.
      f'--config.optimizer.decay_steps={STEPS}', '--config.checkpoint.every=5',
      '--config.checkpoint.keep=1000', *overrides]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
  proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, 'JAX_NUM_CPU_DEVICES': '1'},
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, f'{cmd} exited {proc.returncode}:\n{proc.stderr[-4000:]}'
  return proc


def losses(logdir: pathlib.Path) -> dict[int, list[float]]:
  acc = EventAccumulator(str(logdir), size_guidance={'scalars': 0})
  acc.Reload()
  out: dict[int, list[float]] = {}
  for event in acc.Scalars('train/loss'):
    out.setdefault(event.step, []).append(event.value)
  return out


def gs_losses(gcs, run_dir: str, tmp_path: pathlib.Path) -> dict[int, list[float]]:
  """The train/loss events of a gs:// run, downloaded through gcsfs."""
  local = tmp_path / 'events'
  local.mkdir(parents=True)
  files = gcs.glob(f'{BUCKET}/{run_dir}/events.out.tfevents.*')
  assert files, gcs.ls(f'{BUCKET}/{run_dir}')
  for f in files:
    gcs.get(f, str(local / f.rsplit('/', 1)[1]))
  return losses(local)


def restore(directory: str):
  """The train state in an orbax checkpoint directory (a path or gs:// URL), as numpy."""
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(directory).item_metadata.tree)
  return jax.tree.map(np.asarray, checkpointer.restore(directory, target))


def assert_trees_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b),
                          strict=True):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def step_dirs(gcs, run_dir: str) -> list[int]:
  """Checkpoint steps that orbax committed (commit_success.txt is its mark on GCS)."""
  marks = gcs.glob(f'{BUCKET}/{run_dir}/checkpoints/*/commit_success.txt')
  return sorted(int(m.split('/')[-2]) for m in marks)


# --- one run straight through: in the bucket and on local disk -------------------------


@pytest.fixture(scope='module')
def local_run(corpus, tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp('local_run')
  run(train_cmd(str(corpus / '*.txt'), str(workdir), f'--config.steps={STEPS}'))
  return workdir


@pytest.fixture(scope='module')
def gs_run(gcs, gs_corpus) -> str:
  """The same run, its data and workdir in the bucket, with a profiler trace."""
  run(train_cmd(gs_corpus, f'gs://{BUCKET}/straight', f'--config.steps={STEPS}',
                f'--config.profile.start_step={PROFILE_STEP}', '--config.profile.num_steps=1'))
  return 'straight'


def test_gs_run_trains_as_a_local_run(gcs, gs_run, local_run, tmp_path):
  """data.path as a gs:// glob and a gs:// workdir: the losses and the state of a local run."""
  logged = gs_losses(gcs, gs_run, tmp_path)
  local = losses(local_run)
  assert sorted(logged) == list(range(1, STEPS + 1))
  assert logged == local  # bitwise, every step logged once
  assert step_dirs(gcs, gs_run) == list(range(5, STEPS + 1, 5))
  assert_trees_equal(restore(f'gs://{BUCKET}/{gs_run}/checkpoints/{STEPS}/state'),
                     restore(str(local_run / 'checkpoints' / str(STEPS) / 'state')))


def test_gs_run_writes_its_files_to_the_bucket(gcs, gs_run, local_run, corpus):
  run_dir = f'{BUCKET}/{gs_run}'
  config = json.loads(gcs.cat(f'{run_dir}/config.json'))
  assert config['steps'] == STEPS and config['data']['path'].startswith('gs://')

  # The tokenizer: the characters of the training split, as read from local files.
  cfg = ml_collections.ConfigDict({**config['data'], 'path': str(corpus / '*.txt')})
  train_docs = list(sources.read_documents(cfg, 'train'))
  tokenizer = tokenizers.load_tokenizer(f'gs://{run_dir}')
  assert tokenizer.chars == sorted(set(''.join(train_docs)))

  # The token cache: the encoded training documents, back to back (char level: no BOS).
  [cached] = gcs.glob(f'{run_dir}/data/*/train.tokens.npy')
  with gcs.open(cached, 'rb') as f:
    tokens = np.load(f)
  np.testing.assert_array_equal(tokens, np.concatenate([tokenizer.encode(d) for d in train_docs]))

  # The data iterator's state beside the train state, as in the local run.
  local_data = local_run / 'checkpoints' / str(STEPS) / 'data'
  # (commit_success.txt, orbax's mark of a whole save, names the directory it was written in.)
  local_files = [p for p in sorted(local_data.rglob('*'))
                 if p.is_file() and p.name != 'commit_success.txt']
  assert local_files
  for path in local_files:
    remote = f'{run_dir}/checkpoints/{STEPS}/data/{path.relative_to(local_data)}'
    assert gcs.cat(remote) == path.read_bytes(), remote

  # The profiler's trace of step PROFILE_STEP, copied up from its local directory.
  assert gcs.glob(f'{run_dir}/plugins/profile/*/*.xplane.pb')


# --- SIGKILL mid-run, then resume from the bucket -----------------------------------------


def test_gs_kill_9_and_resume_is_exact(gcs, gs_corpus, gs_run, tmp_path):
  run_dir = 'killed'
  log = tmp_path / 'log.txt'
  # Same steps as the straight run, `steps` aside (the schedule is fixed by decay_steps).
  cmd = train_cmd(gs_corpus, f'gs://{BUCKET}/{run_dir}', '--config.steps=100000')
  with open(log, 'w') as f:
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, 'JAX_NUM_CPU_DEVICES': '1'},
                            stdout=f, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + TIMEOUT_S
  while not step_dirs(gcs, run_dir):
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f'No checkpoint before the run ended or timed out:\n{log.read_text()[-4000:]}')
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)

  latest = step_dirs(gcs, run_dir)[-1]
  assert latest < STEPS, f'the run reached checkpoint {latest} before the kill'
  rerun = run(train_cmd(gs_corpus, f'gs://{BUCKET}/{run_dir}', f'--config.steps={STEPS}'))
  assert f'Resuming from step {latest}' in rerun.stderr

  straight = gs_losses(gcs, gs_run, tmp_path / 'straight')
  resumed = gs_losses(gcs, run_dir, tmp_path / 'resumed')
  for step in range(latest + 1, STEPS + 1):
    assert resumed[step] == straight[step], f'step {step}'  # bitwise, logged once
  assert_trees_equal(restore(f'gs://{BUCKET}/{gs_run}/checkpoints/{STEPS}/state'),
                     restore(f'gs://{BUCKET}/{run_dir}/checkpoints/{STEPS}/state'))


# --- data paths as URLs, read in this process ----------------------------------------------


@pytest.mark.parametrize('source', ['text', 'jsonl'])
def test_documents_from_a_url_are_the_local_ones(gcs, tmp_path, source):
  local = tmp_path / 'docs'
  local.mkdir()
  for i in range(3):
    lines = [json.dumps({'text': f'document {i}.{j} ' * (j + 1)}) for j in range(20)]
    (local / f'{i}.{source}').write_text('\n'.join(lines) + '\n')
    gcs.pipe(f'{BUCKET}/docs-{source}/{i}.{source}', (local / f'{i}.{source}').read_bytes())
  for pattern in (f'*.{source}', f'1.{source}'):  # a glob and a single file
    cfg, url_cfg = (ml_collections.ConfigDict(dict(
        source=source, path=path, name='', data_dir='', text_field='text', val_fraction=0.3))
        for path in (str(local / pattern), f'gs://{BUCKET}/docs-{source}/{pattern}'))
    for split in sources.SPLITS:
      assert list(sources.read_documents(url_cfg, split)) == list(
          sources.read_documents(cfg, split))
  with pytest.raises(sources.DataError, match='No files match'):
    sources.expand_path(f'gs://{BUCKET}/docs-{source}/*.nothing')


def test_images_from_a_url_are_the_local_ones(gcs, tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (12, 8, 8), dtype=np.uint8)
  labels = np.arange(12) % 3
  np.savez(tmp_path / 'data.npz', images=pixels, labels=labels)
  gcs.pipe(f'{BUCKET}/images/data.npz', (tmp_path / 'data.npz').read_bytes())
  for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
    path = tmp_path / 'folder' / f'class{label}' / f'{i}.png'
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    gcs.pipe(f'{BUCKET}/images/folder/class{label}/{i}.png', path.read_bytes())

  for source, local, url in (('npz', tmp_path / 'data.npz', f'gs://{BUCKET}/images/data.npz'),
                             ('folder', tmp_path / 'folder', f'gs://{BUCKET}/images/folder')):
    cfg = ml_collections.ConfigDict(dict(source=source, path=str(local), name='', data_dir='',
                                         eval_fraction=0.25, image_size=8, channels=1,
                                         num_classes=3, random_flip=False))
    url_cfg = ml_collections.ConfigDict({**cfg.to_dict(), 'path': url})
    for split in images.SPLITS:
      got, want = images.load_split(url_cfg, split), images.load_split(cfg, split)
      np.testing.assert_array_equal(got[0], want[0])
      np.testing.assert_array_equal(got[1], want[1])


def test_arrayrecord_shards_from_a_url_are_the_local_ones(gcs, tmp_path):
  from data import tokenize as tokenize_lib
  (tmp_path / 'docs.jsonl').write_text(''.join(
      json.dumps({'text': f'document {i} ' * (i + 3)}) + '\n' for i in range(40)))
  local = tmp_path / 'shards'
  tokenize_lib.tokenize(str(tmp_path / 'docs.jsonl'), str(local), seq_len=8,
                        tokenizer_cfg=ml_collections.ConfigDict({'kind': 'byte'}),
                        val_fraction=0.2, num_shards=2)
  gcs.put(str(local), f'{BUCKET}/shards', recursive=True)
  url = f'gs://{BUCKET}/shards'
  for split in sources.SPLITS:
    got, want = packed.PackedWindows(url, split, 8), packed.PackedWindows(str(local), split, 8)
    assert len(got) == len(want) > 0
    for i in range(len(want)):
      assert_trees_equal(got[i], want[i])
  workdir = f'gs://{BUCKET}/adopting'
  assert packed.adopt_tokenizer(url, workdir).vocab_size == tokenizers.ByteTokenizer.vocab_size
  assert gcs.cat(f'{BUCKET}/adopting/tokenizer/{tokenizers.META_FILE}') == (
      local / 'tokenizer' / tokenizers.META_FILE).read_bytes()


def test_events_reach_the_bucket_before_close(gcs, tmp_path):
  """With sync_secs=0 every event is copied up at once: a killed run loses none."""
  from train import metrics
  writer = metrics.SummaryWriter(f'gs://{BUCKET}/events', sync_secs=0.0)
  for step in (1, 2, 3):
    writer.scalars(step, {'train/loss': 1.0 / step})
  synced = gs_losses(gcs, 'events', tmp_path / 'before_close')
  writer.close()
  assert synced == {step: [np.float32(1.0 / step)] for step in (1, 2, 3)}
  assert not os.path.exists(writer._staging.local)  # the local copy goes at close
