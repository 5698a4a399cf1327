"""Trains a model: `python -m train --config=configs/lm.py[:preset] --workdir=DIR`.

Intentionally short: flags -> distributed init -> config -> trainer.
"""

import importlib.util
import os
import sys
from collections.abc import Mapping

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from data import cli
from data.errors import ConfigError, exit_on_user_error

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/*.py file[:preset].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard events, '
                               'the tokenizer and the resolved config.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Total number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')


# How a scheduler announces a multi-process job that jax.distributed.initialize() can
# configure without arguments (its cluster detection), by environment variables.
_CLUSTER_ENV = (  # (cluster, variables that must all be set)
    ('SLURM', ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
               'SLURM_LOCALID')),
    ('Open MPI', ('OMPI_MCA_orte_hnp_uri',)),
    ('GKE TPU', ('TPU_WORKER_HOSTNAMES',)),
    ('GKE TPU', ('TPU_PROCESS_ADDRESSES',)),
)


def detect_cluster(environ: Mapping[str, str]) -> str | None:
  """The cluster this process runs in (TPU VM, SLURM, Kubernetes, MPI), or None.

  Read after `import jax`: on a machine without TPU chips jax sets
  TPU_SKIP_MDS_QUERY, so a TPU VM is one with libtpu and chips, whose peers JAX finds
  in the TPU metadata. Kubernetes counts only with the `kubernetes` package, which
  JAX needs to read the pods.
  """
  for name, keys in _CLUSTER_ENV:
    if all(k in environ for k in keys):
      return name
  if 'KUBERNETES_SERVICE_HOST' in environ and importlib.util.find_spec('kubernetes'):
    return 'Kubernetes'
  if 'TPU_SKIP_MDS_QUERY' not in environ and (
      environ.get('TPU_LIBRARY_PATH') or importlib.util.find_spec('libtpu')):
    return 'TPU VM'
  return None


def init_distributed() -> None:
  if _COORDINATOR.value is not None:  # all three, checked by check_args
    # Processes on CPU devices need a collectives backend to talk to each other;
    # the setting only affects the CPU client.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif cluster := detect_cluster(os.environ):
    logging.info('Running on %s: jax.distributed.initialize() finds the other processes.', cluster)
    jax.distributed.initialize()


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of orbax and grain (one line per file they touch)."""

  def filter(self, record) -> bool:
    noisy = '/orbax/' in record.pathname or '/grain/' in record.pathname
    return record.levelno >= logging.logging.WARNING or not noisy


def check_args(argv) -> None:
  if len(argv) > 1:
    raise ConfigError(f'Unexpected arguments {argv[1:]}; every argument is a --flag.')
  if _CONFIG.value is None or not _WORKDIR.value:
    raise ConfigError('Both --config and --workdir are required, e.g. python -m train '
                      '--config=configs/lm.py --workdir=/tmp/run.')
  cli.check_output_dir(_WORKDIR.value, '--workdir')
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ConfigError('Give all of --coordinator_address, --num_processes and --process_id, '
                        'or none of them.')
    if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
      raise ConfigError(f'--process_id={_PROCESS_ID.value} must be in [0, --num_processes='
                        f'{_NUM_PROCESSES.value}).')


def main(argv):
  exit_on_user_error(lambda: check_args(argv))
  logging.get_absl_logger().addFilter(_QuietLibraries())
  init_distributed()
  from train import trainer  # after distributed init, which must precede any device use

  def run():
    try:
      result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except trainer.NonFiniteError as e:  # diverged: the message says where the good state is
      logging.error('%s', e)
      print(f'Training diverged: {e}', file=sys.stderr)
      sys.exit(3)
    if jax.process_index() == 0:
      for tag, sample in result.samples.items():
        if isinstance(sample, str):
          print(f'--- {tag} ---\n{sample}')

  exit_on_user_error(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
