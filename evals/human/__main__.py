"""Serves the blind side-by-side page, or prints the summary of one.

  python -m evals.human --a=DIR1 --b=DIR2 --prompts=FILE --output=DIR
      [--host=127.0.0.1 --port=8765 --max_tokens=128 --temperature=1.0 --top_p=1.0 --seed=0]
  python -m evals.human --output=DIR        # serve DIR's completions again (or hand-made ones)
  python -m evals.human --summary=DIR       # print the summary; writes DIR/summary.json

The first form generates both runs' completions (unless DIR already has them from the
same settings), writes them into DIR and serves the page at http://HOST:PORT/ until
Ctrl-C; the summary is at /summary. Every flag, the runs, the prompts file and the port
are checked before a model loads; a mistake is one line on stderr and exit status 2.
"""

import json
import pathlib

from absl import app, flags, logging

from data import cli
from data.errors import ConfigError, DataError, exit_on_user_error
from evals.human import completions, stats
from evals.human.store import Store


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  exit_on_user_error(_summary if flags.FLAGS.summary else _serve)


def _summary() -> None:
  print(summary_text(flags.FLAGS.summary))


def summary_text(output: str) -> str:
  """The summary of an --output folder as text; also written to `output`/summary.json."""
  if not (pathlib.Path(output) / completions.COMPLETIONS_FILE).exists():
    raise DataError(f'--summary={output} has no {completions.COMPLETIONS_FILE}: is it the '
                    '--output of python -m evals.human?')
  store = Store(output, completions.load(output))
  summary = stats.summarize(store.judgements, len(store.items))
  path = pathlib.Path(output) / 'summary.json'
  path.write_text(json.dumps(summary, indent=2) + '\n')
  return f'{stats.format_summary(summary)}\n(as JSON in {path})'


def _generation(f) -> dict:
  return dict(max_tokens=f.max_tokens, temperature=f.temperature, top_p=f.top_p, seed=f.seed)


def check_flags(f) -> tuple[tuple[list, list] | None, dict | None]:
  """Every check before a model loads. Returns the prompts (with their places in the file)
  and the settings to generate with, or (None, None) when the output folder's completions
  are to be served as they are."""
  if not f.output:
    raise ConfigError('--output is required: the folder that keeps the completions and the '
                      'judgements.')
  out = pathlib.Path(f.output)
  if out.exists() and not out.is_dir():
    raise ConfigError(f'--output={f.output} is a file; give a folder.')
  if not 1 <= f.port <= 65535:
    raise ConfigError(f'--port={f.port} must be in [1, 65535].')
  if f.max_tokens < 1:
    raise ConfigError(f'--max_tokens={f.max_tokens} must be >= 1.')
  if f.temperature < 0:
    raise ConfigError(f'--temperature={f.temperature} must be >= 0 (0 is greedy).')
  if not 0 < f.top_p <= 1:
    raise ConfigError(f'--top_p={f.top_p} must be in (0, 1].')
  given = [name for name in ('a', 'b', 'prompts') if getattr(f, name)]
  have = (out / completions.COMPLETIONS_FILE).exists()
  prompts = made_by = None
  if given or not have:
    if len(given) < 3:
      missing = ', '.join(f'--{n}' for n in ('a', 'b', 'prompts') if n not in given)
      raise ConfigError(f'{missing} required: the two runs to compare and the prompts file '
                        f'(or an --output that already holds {completions.COMPLETIONS_FILE}).')
    from train.runs import load_run_config
    for name in ('a', 'b'):
      load_run_config(getattr(f, name))  # a run folder, or one line saying it is not
    prompts = completions.read_prompts(f.prompts)
    made_by = completions.settings(f.a, f.b, f.prompts, **_generation(f))
    if have:
      completions.check_settings(f.output, made_by)
      prompts = made_by = None
  else:
    completions.load(f.output)  # hand-made completions: checked now, not after a model loads
  cli.check_port_free(f.host, f.port)
  return prompts, made_by


def build(f) -> Store:
  """The checked flags' store: the output folder's items (generated first when it has
  none, or not from these settings) and the judgements made so far."""
  prompts, made_by = check_flags(f)
  if prompts is not None:
    texts = {}
    for model in completions.MODELS:
      workdir = getattr(f, model)
      logging.info('Generating %d completions with %s (model %s)', len(prompts[0]), workdir,
                   model.upper())
      texts[model] = completions.generate(workdir, prompts[0], places=prompts[1],
                                          **_generation(f))
    completions.save(f.output, prompts[0], texts, made_by)
  return Store(f.output, completions.load(f.output), seed=f.seed)


def _serve() -> None:
  f = flags.FLAGS
  store = build(f)
  import uvicorn

  from evals.human.app import create_app
  logging.info('%d items, %d judgements so far; judge at http://%s:%d/ (summary at /summary)',
               len(store.items), len(store.judgements), f.host, f.port)
  uvicorn.run(create_app(store), host=f.host, port=f.port, log_level=f.log_level)


def _define_flags() -> None:
  flags.DEFINE_string('a', None, 'Run folder of model A (a Kiln LM-family run or an import).')
  flags.DEFINE_string('b', None, 'Run folder of model B.')
  flags.DEFINE_string('prompts', None, 'Prompts: a .jsonl of {"prompt"} or {"messages"}, or '
                      'plain text with one prompt per line.')
  flags.DEFINE_string('output', None, 'Folder for the completions, judgements and '
                      'preferences; a restart reads it back.')
  flags.DEFINE_string('summary', None, 'Print the summary of this --output folder and exit.')
  flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (0.0.0.0: all interfaces).')
  flags.DEFINE_integer('port', 8765, 'Port to listen on.')
  flags.DEFINE_integer('max_tokens', 128, 'New tokens per completion, at most.')
  flags.DEFINE_float('temperature', 1.0, 'Sampling temperature (0: greedy).')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass.')
  flags.DEFINE_integer('seed', 0, 'Seed of the sampling (prompt i uses seed + i) and of each '
                       "annotator's order of items and sides.")
  flags.DEFINE_enum('log_level', 'info', ['critical', 'error', 'warning', 'info', 'debug'],
                    "uvicorn's log level.")


if __name__ == '__main__':
  _define_flags()
  app.run(main)
