"""notebooks/quickstart.ipynb runs headless, cell by cell, in a Jupyter kernel (nbclient), with
smaller runs injected after its parameters cell as papermill injects them; any cell error
fails the test. Its outputs show what the notebook promises: the LM's loss fell, samples,
an inline PNG grid of digits, a progress bar and four served completions."""

import base64
import io
import os
import pathlib
import re

import nbclient
import nbformat
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'notebooks' / 'quickstart.ipynb'
LM_STEPS, DIFFUSION_STEPS = 40, 6


@pytest.fixture(scope='module')
def executed(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('notebook')
  corpus = tmp / 'corpus.txt'
  corpus.write_text('def add(a, b):\n    return a + b\n\n' * 300)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  at = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', []))
  lm_overrides = ['data.source=text', f'data.path={corpus}', 'data.tokenizer.kind=char',
                  'data.seq_len=32', 'model.d_model=32', 'model.n_layers=1', 'model.n_heads=2',
                  'model.n_kv_heads=1', 'batch_size=8', 'eval_every=0', 'log_every=10',
                  'optimizer.warmup_steps=5', 'sample.max_new_tokens=16']
  diffusion_overrides = ['batch_size=8', 'log_every=2', 'model.base_channels=8',
                         'model.channel_mult=(1,)', 'model.attention_resolutions=()',
                         'model.norm_groups=4', 'sample.steps=2', 'sample.grid_rows=4',
                         'sample.batch_size=16']
  injected = nbformat.v4.new_code_cell('\n'.join([
      f'WORKDIR = {str(tmp / "runs")!r}', f'LM_STEPS = {LM_STEPS}',
      f'LM_OVERRIDES = {lm_overrides!r}', f'DIFFUSION_STEPS = {DIFFUSION_STEPS}',
      f'DIFFUSION_OVERRIDES = {diffusion_overrides!r}',
      'TENSORBOARD = False  # a TensorBoard server would outlive the kernel']),
      metadata={'tags': ['injected-parameters']})
  nb.cells.insert(at + 1, injected)
  # The kernel imports this checkout and runs on one CPU device (no 8-way fake mesh needed).
  with pytest.MonkeyPatch.context() as env:
    env.setenv('PYTHONPATH', os.pathsep.join(filter(None, [str(REPO),
                                                           os.environ.get('PYTHONPATH')])))
    env.setenv('JAX_NUM_CPU_DEVICES', '1')
    nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': str(tmp)}}).execute()
  return nb


def _cell(nb, fragment: str):
  return next(c for c in nb.cells if c.cell_type == 'code' and fragment in c.source)


def _text(cell, name: str = 'stdout') -> str:
  return ''.join(o.get('text', '') for o in cell.outputs
                 if o.output_type == 'stream' and o.name == name)


def test_lm_trains_with_a_progress_bar_and_samples(executed):
  cell = _cell(executed, 'lm_result = trainer.train_and_evaluate')
  m = re.search(r'LM loss ([\d.]+) at step 1 -> ([\d.]+) at step (\d+)', _text(cell))
  assert m, _text(cell)
  first, last, step = float(m[1]), float(m[2]), int(m[3])
  assert step == LM_STEPS and last < first - 0.5  # from ~ln(vocab) to the corpus' few chars
  # tqdm.auto: a widget where ipywidgets is installed, else a text bar on stderr.
  widget = any('application/vnd.jupyter.widget-view+json' in o.get('data', {})
               for o in cell.outputs)
  assert widget or f'{LM_STEPS}/{LM_STEPS}' in _text(cell, 'stderr')
  samples = _text(_cell(executed, 'sample.sample(lm_dir'))
  assert samples.count('--- sample ') == 2 and '\ndef' in samples


def test_diffusion_grid_is_shown_inline(executed):
  cell = _cell(executed, 'diffusion.get_config')
  pngs = [o['data']['image/png'] for o in cell.outputs if 'image/png' in o.get('data', {})]
  assert len(pngs) == 1
  image = Image.open(io.BytesIO(base64.b64decode(pngs[0])))
  # 4 x 4 digits of 8 x 8 pixels (and the grid's borders), scaled 4 times.
  assert image.width >= 4 * 4 * 8 and image.width % 4 == 0
  assert f'at step {DIFFUSION_STEPS}' in _text(cell)


def test_engine_serves_every_prompt(executed):
  lines = _text(_cell(executed, 'load_engine(lm_dir')).splitlines()
  for prompt in ('def', 'class', 'import', 'for'):
    assert any(line.startswith(repr(prompt)[:-1]) for line in lines), lines
  assert lines[-1].startswith('4 requests, ')


def test_override_reads_values_as_the_command_line_does():
  """train.config.override (the notebook's overrides) against the command line's parsing of
  the same `--config.key=value` flags of the same config file."""
  from absl import flags
  from ml_collections import config_flags

  from configs import lm
  from data.errors import ConfigError
  from train.config import override

  assignments = ['steps=7', 'model.n_layers=2', 'optimizer.lr=0.002', 'model.tie_embeddings=false',
                 "optimizer.lr_mults=(('emb.*', 0.5),)", 'sample.prompt=a=b']
  argv = ['train', f'--config={REPO / "configs" / "lm.py"}:tiny',
          *[f'--config.{a}' for a in assignments]]
  cli = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=cli, sys_argv=argv)  # as train/__main__
  cli(argv)
  tiny = lm.get_config('tiny')
  ours = override(tiny, assignments)
  assert ours.to_dict() == cli.config.to_dict() and ours.is_locked
  assert (ours.steps, ours.optimizer.lr_mults, tiny.steps) == (7, (('emb.*', 0.5),), 1000)
  for bad, message in [('model.nlayers=3', 'unknown config key'),
                       ('steps=many', "invalid literal for int() with base 10: 'many'"),
                       ('steps', "is not key=value")]:
    with pytest.raises(ConfigError, match=re.escape(message)):
      override(tiny, [bad])
