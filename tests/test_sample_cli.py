"""`python -m train.sample` checks its flags before it restores or generates anything, says
what is wrong in one line, and overwrites nothing unless asked."""

import pathlib
import subprocess
import sys
import types

import pytest

from data.errors import ConfigError
from train import sample, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def lm_run(tmp_path_factory):
  """A two-step char-level LM run on a text without 'é'."""
  from configs import lm
  corpus = tmp_path_factory.mktemp('corpus') / 'input.txt'
  corpus.write_text('def f(x):\n    return x + 1\n' * 200)
  c = lm.get_config('tiny')
  c.data.update(source='text', path=str(corpus), seq_len=16)
  c.data.tokenizer.kind = 'char'
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64)
  c.update(steps=2, batch_size=8, eval_every=0, log_every=1)
  c.sample.max_new_tokens = 4
  workdir = tmp_path_factory.mktemp('run')
  trainer.train_and_evaluate(c, str(workdir))
  return workdir


def run_sample(*args):
  return subprocess.run([sys.executable, '-m', 'train.sample', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def flags(**overrides):
  values = dict(num_samples=1, scale=1, max_new_tokens=None, temperature=None, top_k=None,
                top_p=None, min_p=None, prompt=None, out=None, overwrite=False,
                quant='none')
  values.update(overrides)
  return types.SimpleNamespace(**values)


LM_CONFIG = {'task': 'lm', 'sample': {'prompt': 'def', 'max_new_tokens': 4, 'temperature': 1.0,
                                      'top_k': 0, 'top_p': 1.0, 'min_p': 0.0}}
IMAGE_CONFIG = {'task': 'diffusion', 'sample': {'grid_rows': 4}}


@pytest.mark.parametrize('overrides, config, message', [
    ({'num_samples': 0}, LM_CONFIG, r'--num_samples=0 must be >= 1'),
    ({'max_new_tokens': -3}, LM_CONFIG, r'--max_new_tokens=-3 must be >= 1'),
    ({'scale': 0}, IMAGE_CONFIG, r'--scale=0 must be >= 1'),
    ({'top_p': 0.0}, LM_CONFIG, r'--top_p=0.0 must be in \(0, 1\]'),
    ({'temperature': -1.0}, LM_CONFIG, r'--temperature=-1.0 must be >= 0'),
    ({'top_k': -2}, LM_CONFIG, r'--top_k=-2 must be >= 0'),
    ({'min_p': 1.0}, LM_CONFIG, r'--min_p=1.0 must be in \[0, 1\)'),
    ({'prompt': 'a'}, IMAGE_CONFIG, r"--prompt does not apply to this run: its task"),
    ({'quant': 'int3'}, LM_CONFIG, r"--quant='int3' is not allowed; choose one of none, int8"),
])
def test_bad_flags_are_named(overrides, config, message):
  import ml_collections
  with pytest.raises(ConfigError, match=message):
    sample.check_flags(flags(**overrides), ml_collections.ConfigDict(config))


def test_out_paths_are_checked_before_any_work(tmp_path):
  import ml_collections
  config = ml_collections.ConfigDict(IMAGE_CONFIG)
  existing = tmp_path / 'grid.png'
  existing.write_bytes(b'keep me')
  with pytest.raises(ConfigError, match='exists; choose another name or pass --overwrite'):
    sample.check_flags(flags(out=str(existing)), config)
  sample.check_flags(flags(out=str(existing), overwrite=True), config)
  with pytest.raises(ConfigError, match='is a directory'):
    sample.check_flags(flags(out=str(tmp_path)), config)
  with pytest.raises(ConfigError, match='does not exist'):
    sample.check_flags(flags(out=str(tmp_path / 'no' / 'grid.png')), config)
  # Several samples are numbered; each numbered name is checked.
  (tmp_path / 'many_1.png').write_bytes(b'keep me too')
  with pytest.raises(ConfigError, match=r'many_1.png.* exists'):
    sample.check_flags(flags(out=str(tmp_path / 'many.png'), num_samples=3), config)
  assert existing.read_bytes() == b'keep me'


def test_command_line_errors_are_one_line(lm_run, tmp_path):
  bad = run_sample(f'--workdir={lm_run}', '--num_samples=0')
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
      'Config error: --num_samples=0 must be >= 1.')
  assert 'Traceback' not in bad.stderr
  missing = run_sample(f'--workdir={tmp_path / "nowhere"}')
  assert missing.returncode == 2 and 'the --workdir of a training run' in missing.stderr
  # A character the run's vocabulary lacks is named, not silently dropped.
  unknown = run_sample(f'--workdir={lm_run}', '--prompt=déf')
  assert unknown.returncode == 2, unknown.stderr[-2000:]
  assert "cannot encode: 'é' (U+00E9)" in unknown.stderr and 'Traceback' not in unknown.stderr
  # --quant=int8 samples the model quantized at load (tests/test_quant_serving.py checks
  # what it computes).
  ok = run_sample(f'--workdir={lm_run}', '--prompt=def', '--num_samples=2', '--max_new_tokens=3',
                  '--quant=int8')
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert ok.stdout.count('--- sample ') == 2
