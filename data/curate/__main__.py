"""Curates raw text: `python -m data.curate --config=configs/curate.py --input=GLOB --output=DIR`.

Flags other than --config(.*), --input, --output and --overwrite are Beam pipeline
options (--runner, --direct_num_workers, --project, ...). Prints the report's table
at the end; the full report is OUTPUT/report.json. An --output that already holds
files is refused unless --overwrite (which replaces an earlier run's shards and report).
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from data import cli
from data.errors import ConfigError, exit_on_user_error

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/curate.py', lock_config=True)
_INPUT = flags.DEFINE_string('input', None, 'Comma-separated globs of jsonl, parquet or text '
                             'files (local, gs://, s3://, hdfs://).')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory for the shards and report.json.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace the shards and report of an earlier '
                               'run in --output (else a non-empty --output is refused).')


def main(argv):
  def curate():
    if _CONFIG.value is None or not _INPUT.value or not _OUTPUT.value:
      raise ConfigError('--config, --input and --output are all required, e.g. python -m '
                        'data.curate --config=configs/curate.py --input=raw/*.jsonl --output=out.')
    # absl shows INFO; Beam's runner logs every worker's every step at INFO.
    logging.getLogger('apache_beam').setLevel(logging.WARNING)
    from data.curate import pipeline, report  # Beam is slow to import: not for --help

    options = pipeline.pipeline_options(argv[1:])
    result = pipeline.run(_CONFIG.value, _INPUT.value, _OUTPUT.value, options,
                          overwrite=_OVERWRITE.value)
    print(report.table(result))
    print(f'Kept {result["kept"]["docs"]:,} documents in {_OUTPUT.value} '
          f'(report: {_OUTPUT.value}/report.json).')

  exit_on_user_error(curate)


def _parse_flags(argv: list[str]) -> list[str]:
  """Parses our flags; the rest (Beam's pipeline options) goes to main as argv[1:]."""
  return cli.parse_flags(argv, known_only=True)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
