"""Trains a model: `python -m train --config=configs/lm.py[:preset] --workdir=DIR`.

Intentionally short: flags -> distributed init -> config -> trainer.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from data.errors import exit_on_user_error

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/*.py file[:preset].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard events, '
                               'the tokenizer and the resolved config.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Total number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')


def _cluster_detected() -> bool:
  """Whether JAX would find a cluster (TPU VM pod, SLURM, Kubernetes, MPI) by itself."""
  try:
    from jax._src import clusters
    return any(not env.opt_in_only_method and env.is_env_present()
               for env in clusters.ClusterEnv._cluster_types)
  except (ImportError, AttributeError):
    return False


def init_distributed() -> None:
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError('Give all of --coordinator_address, --num_processes and --process_id, '
                           'or none of them.')
    # Processes on CPU devices need a collectives backend to talk to each other;
    # the setting only affects the CPU client.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _cluster_detected():
    jax.distributed.initialize()


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of orbax and grain (one line per file they touch)."""

  def filter(self, record) -> bool:
    noisy = '/orbax/' in record.pathname or '/grain/' in record.pathname
    return record.levelno >= logging.logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError('Both --config and --workdir are required.')
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


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown `--config.key` reported as a config error.

  ml_collections raises a bare AttributeError (with a did-you-mean hint) for a key
  the schema lacks; absl would show it as a traceback.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    detail = e
    while isinstance(detail, BaseException) and detail.args:  # AttributeError(KeyError(str))
      detail = detail.args[0]
    detail = str(detail).replace('\n', '. ')
    detail += '' if detail.endswith(('.', '?')) else '.'
    print(f'Config error: unknown config key {detail} Every key, with its default, is in '
          'the file named by --config.', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
