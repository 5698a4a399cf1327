"""Every command line checks its arguments before any work, fails with one line that names
the argument and says what to do (exit status 2), and overwrites nothing unless asked.

One real subprocess per entry point (python -m train, train.convert, data.curate,
data.tokenize, launch.local) checks the whole path: the exit status, that stderr
holds that one line and no traceback, and that nothing was written. The other
cases call each command's argument checks directly, which is what the command
runs first.
"""

import os
import pathlib
import re
import subprocess
import sys
import types

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from data import cli, tokenizers
from data import tokenize as tokenize_lib
from data.curate import pipeline, write
from data.errors import ConfigError, DataError
from launch import local
from train import convert, hf_files

REPO = pathlib.Path(__file__).resolve().parents[1]
_LOG_LINE = re.compile(r'^[IWEF]\d{4} ')  # absl's log lines (INFO chatter of the libraries)


def run(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '1'}
  return subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
  """The one line a failed command printed (besides log lines); fails on anything else."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not _LOG_LINE.match(ln)]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def snapshot(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*'))
          if p.is_file()}


# --- python -m train ---------------------------------------------------------------


def test_train_with_a_missing_config_file(tmp_path):
  line = error_line(run('train', '--config=configs/nope.py', f'--workdir={tmp_path / "w"}'))
  assert line == ("Config error: --config=configs/nope.py: 'configs/nope.py' is not a file; "
                  'give a config file, e.g. --config=configs/lm.py[:preset].')
  assert not (tmp_path / 'w').exists()


def test_train_with_a_workdir_that_is_a_file(tmp_path):
  (tmp_path / 'f').write_text('keep me')
  line = error_line(run('train', '--config=configs/lm.py', f'--workdir={tmp_path / "f"}'))
  assert line == f'Data error: --workdir={tmp_path / "f"} is a file; give a directory.'
  assert snapshot(tmp_path) == {'f': b'keep me'}


def test_train_with_a_vocabulary_the_text_cannot_support(tmp_path):
  (tmp_path / 'tiny.txt').write_text('hello tiny world\n' * 50)
  line = error_line(run(
      'train', '--config=configs/lm.py', f'--workdir={tmp_path / "w"}',
      '--config.data.source=text', f'--config.data.path={tmp_path / "tiny.txt"}',
      '--config.data.tokenizer.vocab_size=5000', '--config.steps=1'))
  assert re.fullmatch(r'Data error: data\.tokenizer\.vocab_size=5000 is more than SentencePiece '
                      r'can build from this text; set it to \d+ or less, or train on more text\.',
                      line), line
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_the_vocabulary_size_named_in_the_error_works():
  """Oracle: SentencePiece trains at the size the message names, and not one above it."""
  text = ''.join(f'line {i}: the quick brown fox {i % 7}\n' for i in range(40))
  cfg = ml_collections.ConfigDict(dict(kind='sentencepiece', vocab_size=3000, model_type='bpe',
                                       train_chars=10**6))
  with pytest.raises(DataError, match=r'data\.tokenizer\.vocab_size=3000 is more') as e:
    tokenizers.train_sentencepiece(cfg, lambda: [text])
  most = int(re.search(r'set it to (\d+) or less', str(e.value))[1])
  cfg.vocab_size = most
  assert tokenizers.SentencePieceTokenizer(
      tokenizers.train_sentencepiece(cfg, lambda: [text])).vocab_size == most
  cfg.vocab_size = most + 1
  with pytest.raises(DataError, match=f'set it to {most} or less'):
    tokenizers.train_sentencepiece(cfg, lambda: [text])
  cfg.vocab_size = 10
  with pytest.raises(DataError, match=r'vocab_size=10 is less than the \d+ pieces this text '
                     r'needs .*; set it to \d+ or more\.'):
    tokenizers.train_sentencepiece(cfg, lambda: [text])


def test_output_directory_checks(tmp_path):
  (tmp_path / 'f').write_text('x')
  with pytest.raises(DataError, match=r'--workdir=.*/f is a file; give a directory\.'):
    cli.check_output_dir(str(tmp_path / 'f'), '--workdir')
  with pytest.raises(DataError, match=r'--workdir=.*/f/a/b cannot be created: .*/f is a file'):
    cli.check_output_dir(str(tmp_path / 'f' / 'a' / 'b'), '--workdir')
  cli.check_output_dir(str(tmp_path / 'new' / 'deeper'), '--workdir')  # creatable: fine
  assert not (tmp_path / 'new').exists()  # and checking created nothing


def _config_flags(tmp_path) -> flags.FlagValues:
  """A fresh flag set with a --config file flag, as the commands define it."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=True)
  flags.DEFINE_string('workdir', None, 'workdir', flag_values=fv)
  return fv


@pytest.mark.parametrize('args, expected', [
    (['--config=configs/lm.py:nope'], "Config error: --config=configs/lm.py: Unknown preset "
     "'nope' for configs/lm.py; choose one of tiny, nanogpt_cpu, gpt2_124m, llama_1b, llama_7b, "
     'llama_70b, moe_cpu, mixtral_8x7b.'),
    (['--config=configs/lm.py', '--config.stepz=3'], "Config error: unknown config key 'stepz'."),
    (['--config=configs/lm.py', '--config.steps=abc'], 'Config error: flag --config.steps=abc: '
     "invalid literal for int() with base 10: 'abc'"),
    (['--config', 'configs/nope.py'], "Config error: --config=configs/nope.py: 'configs/nope.py' "
     'is not a file; give a config file, e.g. --config=configs/lm.py[:preset].'),
    (['--config=configs/curate.py:x'], "Config error: --config=configs/curate.py: "
     "configs/curate.py has no presets (got 'x'); override keys instead."),
])
def test_flag_and_config_mistakes_are_one_line(tmp_path, capsys, monkeypatch, args, expected):
  monkeypatch.setattr(sys, 'argv', ['prog', *args])  # ml_collections reads overrides there
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(['prog', *args], flag_values=_config_flags(tmp_path))
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(expected) and '\n' not in err, err


def test_good_flags_parse(tmp_path, monkeypatch):
  fv = _config_flags(tmp_path)
  argv = ['prog', '--config=configs/lm.py:nanogpt_cpu', '--config.steps=7', '--workdir=w']
  monkeypatch.setattr(sys, 'argv', argv)
  rest = cli.parse_flags(argv, flag_values=fv)
  assert rest == ['prog'] and fv.config.steps == 7 and fv.workdir == 'w'


@pytest.mark.parametrize('environ, expected', [
    ({}, None),
    ({'TPU_SKIP_MDS_QUERY': '1'}, None),  # what jax sets on a machine without TPU chips
    ({'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n1', 'SLURM_NTASKS': '2',
      'SLURM_PROCID': '0', 'SLURM_LOCALID': '0', 'TPU_SKIP_MDS_QUERY': '1'}, 'SLURM'),
    ({'SLURM_JOB_ID': '7', 'TPU_SKIP_MDS_QUERY': '1'}, None),  # an allocation, not a job step
    ({'OMPI_MCA_orte_hnp_uri': '1;tcp://10.0.0.1:1234', 'TPU_SKIP_MDS_QUERY': '1'}, 'Open MPI'),
    ({'TPU_WORKER_HOSTNAMES': 'a,b', 'TPU_SKIP_MDS_QUERY': '1'}, 'GKE TPU'),
    ({'TPU_SKIP_MDS_QUERY': '1', 'TPU_LIBRARY_PATH': '/x/libtpu.so'}, None),
    ({'TPU_LIBRARY_PATH': '/x/libtpu.so'}, 'TPU VM'),
])
def test_cluster_detection(environ, expected):
  from train.__main__ import detect_cluster
  assert detect_cluster(environ) == expected


# --- python -m data.curate -----------------------------------------------------------


@pytest.fixture
def jsonl(tmp_path) -> pathlib.Path:
  path = tmp_path / 'in.jsonl'
  path.write_text('{"text": "hello world"}\n')
  return path


def test_curate_into_a_file_fails_before_the_pipeline(tmp_path, jsonl):
  out = tmp_path / 'out.txt'
  out.write_text('keep me')
  before = snapshot(tmp_path)
  line = error_line(run('data.curate', '--config=configs/curate.py', f'--input={jsonl}',
                        f'--output={out}'))
  assert line == f'Data error: --output={out} is a file; give a directory.'
  assert snapshot(tmp_path) == before


def test_curate_output_checks(tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  with pytest.raises(DataError, match=r'already holds other files \(notes\.txt\); give a new '
                     'or empty directory, or pass --overwrite'):
    pipeline.check_output(str(out))
  pipeline.check_output(str(out), overwrite=True)  # beside other files, when asked
  (out / 'docs-00000-of-00001.jsonl').write_text('old')
  (out / write.REPORT_FILE).write_text('{}')
  with pytest.raises(DataError, match='already holds curated shards or a report'):
    pipeline.check_output(str(out))
  assert snapshot(out) == {'notes.txt': b'mine', 'docs-00000-of-00001.jsonl': b'old',
                           write.REPORT_FILE: b'{}'}
  pipeline.check_output(str(out), overwrite=True)  # replaces the earlier run's output only
  assert snapshot(out) == {'notes.txt': b'mine'}
  pipeline.check_output(str(tmp_path / 'new'))
  assert (tmp_path / 'new').is_dir()


def test_curate_bad_beam_flag_value():
  with pytest.raises(ConfigError, match=r"^argument --direct_num_workers: invalid int value: "
                     r"'abc'; see Beam's pipeline options\.$"):
    pipeline.pipeline_options(['--direct_num_workers=abc'])


# --- python -m data.tokenize -----------------------------------------------------------


def tokenize_flags(**overrides) -> types.SimpleNamespace:
  f = dict(input='', output='', seq_len=16, vocab_size=300, num_shards=1,
           train_chars=10**6, val_fraction=0.1, overwrite=False)
  return types.SimpleNamespace(**{**f, **overrides})


def test_tokenize_into_a_non_empty_directory(tmp_path, jsonl):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'notes.txt').write_text('keep me')
  before = snapshot(tmp_path)
  line = error_line(run('data.tokenize', f'--input={jsonl}', f'--output={out}'))
  assert line == (f'Data error: --output={out} is not empty (it holds notes.txt); give a new or '
                  'empty directory, or pass --overwrite to replace what this command wrote there.')
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize('overrides, error, match', [
    (dict(seq_len=0), ConfigError, r'^--seq_len=0 must be >= 1\.$'),
    (dict(num_shards=-1), ConfigError, r'^--num_shards=-1 must be >= 1\.$'),
    (dict(vocab_size=0), ConfigError, r'^--vocab_size=0 must be >= 1\.$'),
    (dict(val_fraction=1.0), ConfigError, r'^--val_fraction=1\.0 must be in \(0, 1\)'),
    (dict(input=''), ConfigError, '--input and --output are required'),
    (dict(input='{tmp}/none*.jsonl'), DataError, 'matches no files'),
    (dict(output='{tmp}/in.jsonl'), DataError, r'--output=.*in\.jsonl is a file'),
])
def test_tokenize_flag_checks(tmp_path, jsonl, overrides, error, match):
  f = tokenize_flags(input=str(jsonl), output=str(tmp_path / 'out'))
  for key, value in overrides.items():
    setattr(f, key, value.format(tmp=tmp_path) if isinstance(value, str) else value)
  with pytest.raises(error, match=match):
    tokenize_lib.check_args(f)
  assert not (tmp_path / 'out').exists()


def test_tokenize_overwrite_replaces_only_its_own_files(tmp_path, jsonl):
  out = tmp_path / 'out'
  (out / 'tokenizer').mkdir(parents=True)
  for name in ('meta.json', 'train-00000-of-00001.array_record', 'tokenizer/spm.model',
               'notes.txt'):
    (out / name).write_text('old')
  tokenize_lib.check_args(tokenize_flags(input=str(jsonl), output=str(out), overwrite=True))
  assert snapshot(out) == {'notes.txt': b'old'}


# --- python -m train.convert -----------------------------------------------------------


def convert_flags(**overrides) -> types.SimpleNamespace:
  f = dict(hf_dir='', workdir='', param_dtype='float32', dtype='', seq_len=0, fsdp=1,
           tensor=1, expert=1, max_shard_gb=5.0, overwrite=False)
  return types.SimpleNamespace(**{**f, **overrides})


def test_convert_import_from_a_missing_directory(tmp_path):
  line = error_line(run('train.convert', 'import', f'--hf_dir={tmp_path / "none"}',
                        f'--workdir={tmp_path / "w"}'))
  assert line == f"Data error: --hf_dir='{tmp_path / 'none'}' does not exist; check the path."
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('command, overrides, error, match', [
    ('convert', {}, ConfigError, 'Give one command, import or export'),
    ('import', dict(hf_dir=''), ConfigError, 'Both --hf_dir and --workdir are required'),
    ('import', dict(fsdp=0), ConfigError, r'^--fsdp=0 must be -1 \(all devices\) or >= 1\.$'),
    ('import', dict(dtype='int8'), ConfigError, r"^--dtype='int8': choose one of bfloat16"),
    ('import', dict(param_dtype='f32'), ConfigError, r"^--param_dtype='f32': choose one of"),
    ('import', dict(seq_len=-2), ConfigError, r'^--seq_len=-2 must be >= 0'),
    ('import', dict(workdir='{tmp}/full'), ConfigError,
     r'--workdir=.*full exists and is not empty; give a new directory, or pass --overwrite'),
    ('import', dict(hf_dir='{tmp}/full/notes.txt'), DataError, 'is not a directory'),
    ('export', dict(max_shard_gb=0.0), ConfigError, r'^--max_shard_gb=0\.0 must be > 0\.$'),
    ('export', dict(workdir='{tmp}/none'), DataError, 'does not exist'),
    ('export', dict(hf_dir='{tmp}/full'), ConfigError, r'--hf_dir=.*full exists and is not'),
    ('export', dict(dtype='fp8'), ConfigError, r"^--dtype='fp8': choose one of"),
])
def test_convert_flag_checks(tmp_path, command, overrides, error, match):
  (tmp_path / 'hf').mkdir()
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'notes.txt').write_text('keep me')
  f = convert_flags(hf_dir=str(tmp_path / 'hf'), workdir=str(tmp_path / 'out'))
  if command == 'export':
    f = convert_flags(workdir=str(tmp_path / 'hf'), hf_dir=str(tmp_path / 'out'))
  for key, value in overrides.items():
    setattr(f, key, value.format(tmp=tmp_path) if isinstance(value, str) else value)
  before = snapshot(tmp_path)
  with pytest.raises(error, match=match):
    convert.check_args(['prog', command], f)
  assert snapshot(tmp_path) == before and not (tmp_path / 'out').exists()


def test_convert_overwrite_replaces_the_output_only_once_it_is_whole(tmp_path):
  target = tmp_path / 'out'
  target.mkdir()
  (target / 'old.txt').write_text('old')
  with pytest.raises(KeyboardInterrupt):
    with hf_files.Staging(str(target), replace=True) as tmp:
      (pathlib.Path(tmp) / 'new.txt').write_text('new')
      raise KeyboardInterrupt  # killed mid-conversion: the old output stays
  assert snapshot(tmp_path) == {'out/old.txt': b'old'}
  with hf_files.Staging(str(target), replace=True) as tmp:
    (pathlib.Path(tmp) / 'new.txt').write_text('new')
  assert snapshot(tmp_path) == {'out/new.txt': b'new'}


# --- python -m launch.local --------------------------------------------------------------


def test_launch_with_a_bad_port():
  line = error_line(run('launch.local', '--port=70000', '--', '--config=configs/lm.py'))
  assert line == ('Config error: --port=70000 must be in [1, 65535] (or left out: a free port); '
                  'see python -m launch.local --help.')


@pytest.mark.parametrize('args, message', [
    (['--num_processes=0', '--', '--x'], '--num_processes=0 must be >= 1'),
    (['--num_processes=two', '--', '--x'], "argument --num_processes: invalid int value: 'two'"),
    (['--grace_s=-1', '--', '--x'], '--grace_s=-1.0 must be >= 0'),
    (['--module=trian', '--', '--x'], "--module='trian' is not a module Python can find here"),
    (['--module=nope.sub', '--', '--x'], "--module='nope.sub' is not a module Python can find"),
    ([], 'no arguments for the processes; give them after --'),
])
def test_launch_flag_checks(capsys, args, message):
  with pytest.raises(SystemExit) as e:
    local.main(args)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(f'Config error: {message}') and err.count('\n') == 1, err



def test_a_port_in_use_is_one_config_error():
  """python -m serve and python -m evals.human check their port before any model loads."""
  import socket
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(ConfigError, match=rf'--port={port} is in use; choose another --port'):
      cli.check_port_free('127.0.0.1', port)
  with pytest.raises(ConfigError, match=r"--host='no.such.host.invalid' does not resolve"):
    cli.check_port_free('no.such.host.invalid', 8000)
