"""The launch recipes, run here against stand-ins for the cluster tools: launch/tpu_vm.sh
against a `gcloud`, launch/slurm.sbatch against an `srun` and `python -m launch.gke`
against a `kubectl`, each a shim first on PATH that records its arguments. Each recipe's
--dry_run must print exactly what it then runs. The JobSet is validated against the JobSet
CRD's own schema, and two processes given only SLURM's variables find each other through
`jax.distributed.initialize()` as on a cluster."""

import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import tarfile
import textwrap

import jsonschema
import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]

# Appends [tool name, *argv] (and, for kubectl, what came on stdin) to $SHIM_LOG as one JSON
# line; `gcloud ... scp` also keeps a copy of the archive it would send.
SHIM = textwrap.dedent(f'''\
    #!{sys.executable}
    import json, os, shutil, sys
    entry = {{'argv': [os.path.basename(sys.argv[0]), *sys.argv[1:]], 'cwd': os.getcwd(),
             'env': {{k: v for k, v in os.environ.items() if k.startswith('SLURM_')}}}}
    if entry['argv'][0] == 'kubectl':
      entry['stdin'] = sys.stdin.read()
    if entry['argv'][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']:
      shutil.copy(sys.argv[5], os.path.join(os.path.dirname(os.environ['SHIM_LOG']), 'sent.tgz'))
    with open(os.environ['SHIM_LOG'], 'a') as f:
      f.write(json.dumps(entry) + '\\n')
    ''')


@pytest.fixture
def shims(tmp_path):
  """(environment with the shims first on PATH, function returning the recorded calls)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for tool in ('gcloud', 'srun', 'kubectl'):
    (bin_dir / tool).write_text(SHIM)
    (bin_dir / tool).chmod(0o755)
  log = tmp_path / 'calls.jsonl'
  env = {**os.environ, 'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', 'SHIM_LOG': str(log)}
  env = {k: v for k, v in env.items() if not k.startswith('SLURM_')}
  return env, lambda: [json.loads(line) for line in log.read_text().splitlines()]


def run(args, env, **kwargs):
  return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
                        **kwargs)


# --- TPU VM ------------------------------------------------------------------------------


def test_tpu_vm_runs_gcloud_on_every_worker_as_its_dry_run_says(shims, tmp_path):
  env, calls = shims
  command = 'python -m train --config=configs/lm.py --workdir=/mnt/shared/run'
  args = ['bash', 'launch/tpu_vm.sh', 'my-tpu', 'us-central2-b', command]
  dry = run([args[0], args[1], '--dry_run', *args[2:]], env)
  assert dry.returncode == 0, dry.stderr
  assert not (tmp_path / 'calls.jsonl').exists()  # a dry run runs nothing
  real = run(args, env)
  assert real.returncode == 0, real.stderr

  recorded = [c['argv'] for c in calls()]
  archive = recorded[0][5]  # a fresh temporary file in each run
  tpu = ['gcloud', 'compute', 'tpus', 'tpu-vm']
  where = ['--zone=us-central2-b', '--worker=all']
  assert recorded[0] == [*tpu, 'scp', archive, 'my-tpu:kiln.tar.gz', *where]
  assert recorded[1][:-1] == [*tpu, 'ssh', 'my-tpu', *where]
  assert recorded[2] == [*tpu, 'ssh', 'my-tpu', *where, f'--command=cd ~/kiln && {command}']
  assert len(recorded) == 3
  for argv in recorded[1:]:  # what each worker's shell runs is valid shell
    remote = argv[-1].removeprefix('--command=')
    assert subprocess.run(['bash', '-n', '-c', remote]).returncode == 0, remote
  assert 'pip install' in recorded[1][-1] and 'jax[tpu]' in recorded[1][-1]
  # The archive holds this checkout's tracked files.
  with tarfile.open(tmp_path / 'sent.tgz') as tar:
    assert {'launch/tpu_vm.sh', 'train/__main__.py', 'pyproject.toml'} <= set(tar.getnames())

  # The dry run printed the same commands (after `git archive`), one a line.
  lines = [shlex.split(line) for line in dry.stdout.splitlines()]
  assert lines[0][:3] == ['git', '-C', str(REPO)] and lines[0][-1] == 'HEAD'
  dry_archive = lines[1][5]
  assert [[archive if w == dry_archive else w for w in line] for line in lines[1:]] == recorded


def test_tpu_vm_usage_error(shims):
  env, _ = shims
  bad = run(['bash', 'launch/tpu_vm.sh', 'my-tpu', 'zone'], env)
  assert bad.returncode == 2 and bad.stderr.startswith('usage:')


# --- SLURM ---------------------------------------------------------------------------------


def test_slurm_batch_script_runs_srun_as_its_dry_run_says(shims, tmp_path):
  env, calls = shims
  env = {**env, 'SLURM_JOB_ID': '4242', 'SLURM_SUBMIT_DIR': str(tmp_path),
         'SLURM_JOB_NUM_NODES': '4', 'SLURM_NODELIST': 'gpu[01-04]'}
  train_args = ['--config=configs/lm.py:llama_1b', '--workdir=/shared/my run']
  dry = run(['bash', 'launch/slurm.sbatch', '--dry_run', *train_args], env)
  assert dry.returncode == 0, dry.stderr
  assert not (tmp_path / 'calls.jsonl').exists()
  real = run(['bash', 'launch/slurm.sbatch', *train_args], env)
  assert real.returncode == 0, real.stderr
  [call] = calls()
  assert call['argv'] == ['srun', '--kill-on-bad-exit=1', 'python', '-u', '-m', 'train',
                          *train_args]
  assert call['cwd'] == str(tmp_path)  # the directory sbatch was called from
  assert call['env']['SLURM_JOB_ID'] == '4242'
  *environment, srun_line = dry.stdout.splitlines()
  assert shlex.split(srun_line) == call['argv']
  assert 'SLURM_NODELIST=gpu[01-04]' in environment


def _free_slurm_job_id() -> int:
  """A job id whose coordinator port (JAX: 61440 + id % 4096) is free here."""
  for job_id in range(os.getpid() % 4096, os.getpid() % 4096 + 4096):
    with socket.socket() as s:
      try:
        s.bind(('localhost', 61440 + job_id % 4096))
        return 100_000 + job_id
      except OSError:
        continue
  raise RuntimeError('no free port in 61440-65535')


# Process i of a SLURM job step: train/__main__.py's own distributed init (no flags), then a
# sum over one device per process.
TASK = textwrap.dedent('''\
    import json
    import jax, numpy as np
    from absl import flags
    from jax.sharding import NamedSharding, PartitionSpec as P
    import train.__main__ as main
    flags.FLAGS(['task'])
    assert main.detect_cluster(__import__('os').environ) == 'SLURM'
    main.init_distributed()
    mesh = jax.make_mesh((jax.device_count(),), ('p',))
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('p')),
                                               np.array([10.0 ** jax.process_index()]))
    total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    print(json.dumps({'index': jax.process_index(), 'count': jax.process_count(),
                      'devices': jax.device_count(), 'sum': float(total)}))
    ''')


def test_two_processes_find_each_other_from_slurm_variables():
  job_id = _free_slurm_job_id()
  base = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  base.update(JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1', SLURM_JOB_ID=str(job_id),
              SLURM_NTASKS='2', SLURM_NNODES='1', SLURM_STEP_NUM_NODES='1',
              SLURM_NODELIST='localhost', SLURM_STEP_NODELIST='localhost',
              PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
  procs = [subprocess.Popen([sys.executable, '-c', TASK], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**base, 'SLURM_PROCID': str(i), 'SLURM_LOCALID': str(i)})
           for i in range(2)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  assert [r['index'] for r in results] == [0, 1]
  for r in results:  # both see both, and agree on 10**0 + 10**1
    assert r['count'] == 2 and r['devices'] == 2 and r['sum'] == 11.0


# --- GKE -----------------------------------------------------------------------------------


def _strict(schema):
  """The schema with unknown fields rejected, as the API server's strict field validation
  does (kubectl apply --validate=strict): every object with listed properties and no
  x-kubernetes-preserve-unknown-fields gets additionalProperties: false."""
  if isinstance(schema, list):
    return [_strict(s) for s in schema]
  if not isinstance(schema, dict):
    return schema
  out = {k: _strict(v) for k, v in schema.items()}
  if ('properties' in out and 'additionalProperties' not in out
      and not out.get('x-kubernetes-preserve-unknown-fields')):
    out['additionalProperties'] = False
  return out


@pytest.fixture(scope='module')
def jobset_validator():
  schema = yaml.safe_load((REPO / 'tests' / 'data' / 'jobset_v1alpha2_schema.yaml').read_text())
  return jsonschema.Draft7Validator(_strict(schema))


def gke(*args, env=None):
  return run([sys.executable, '-m', 'launch.gke', *args], env or os.environ)


TRAIN = ['--config=configs/lm.py:llama_1b', '--workdir=/workdir/llama']


@pytest.mark.parametrize('tpu, topology, hosts, chips_per_host, accelerator', [
    # Hosts and chips per host of GKE's TPU node pools (cloud.google.com/kubernetes-engine/
    # docs/concepts/plan-tpus): v5e/v6e up to 2x4 on one host, else 4 chips a host.
    ('v5e', '4x4', 4, 4, 'tpu-v5-lite-podslice'),
    ('v5e', '2x4', 1, 8, 'tpu-v5-lite-podslice'),
    ('v6e', '16x16', 64, 4, 'tpu-v6e-slice'),
    ('v5p', '2x2x4', 4, 4, 'tpu-v5p-slice'),
    ('v4', '2x2x1', 1, 4, 'tpu-v4-podslice'),
])
def test_jobset_manifest_is_valid_and_sized_for_the_slice(jobset_validator, tpu, topology,
                                                         hosts, chips_per_host, accelerator):
  out = gke('--dry_run', f'--tpu={tpu}', f'--topology={topology}', '--', *TRAIN)
  assert out.returncode == 0, out.stderr
  manifest = yaml.safe_load(out.stdout)
  jobset_validator.validate(manifest)
  [workers] = manifest['spec']['replicatedJobs']
  job = workers['template']['spec']
  pod = job['template']['spec']
  assert workers['replicas'] == 1
  assert job['parallelism'] == job['completions'] == hosts
  assert pod['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': accelerator,
                                 'cloud.google.com/gke-tpu-topology': topology}
  [container] = pod['containers']
  assert container['resources']['limits'] == {'google.com/tpu': chips_per_host}
  assert container['command'] == ['python', '-m', 'train', *TRAIN]


def test_schema_check_is_not_vacuous(jobset_validator):
  out = gke('--dry_run', '--', *TRAIN)
  manifest = yaml.safe_load(out.stdout)
  job = manifest['spec']['replicatedJobs'][0]['template']['spec']
  for breakage in ({'parallelism': 'four'}, {'paralelism': 4}):
    broken = json.loads(json.dumps(manifest))
    broken['spec']['replicatedJobs'][0]['template']['spec'] = {**job, **breakage}
    with pytest.raises(jsonschema.ValidationError):
      jobset_validator.validate(broken)


def test_gke_applies_what_its_dry_run_prints(shims):
  env, calls = shims
  flags = ['--image=us-docker.pkg.dev/p/kiln/kiln:1', '--name=kiln-run', '--', *TRAIN]
  dry = gke('--dry_run', *flags, env=env)
  real = gke(*flags, env=env)
  assert real.returncode == 0, real.stderr
  [call] = calls()
  assert call['argv'] == ['kubectl', 'apply', '-f', '-']
  assert yaml.safe_load(call['stdin']) == yaml.safe_load(dry.stdout)
  assert yaml.safe_load(dry.stdout)['metadata']['name'] == 'kiln-run'


@pytest.mark.parametrize('args, message', [
    (['--tpu=v3', '--dry_run'], "--tpu='v3' is not a TPU kind GKE schedules"),
    (['--topology=2x2x2', '--dry_run'], "--topology='2x2x2': a v5e topology has 2 dimensions"),
    (['--name=Kiln_run', '--dry_run'], "--name='Kiln_run' must be a DNS label"),
    ([], '--image is the placeholder'),
])
def test_gke_flag_errors_are_one_line(args, message):
  out = gke(*args, '--', *TRAIN)
  assert out.returncode == 2 and out.stderr.count('\n') == 1, out.stderr
  assert out.stderr.startswith('Config error: ') and message in out.stderr
