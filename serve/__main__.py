"""Serves a run over an OpenAI-compatible HTTP API.

  python -m serve --workdir=DIR [--host=127.0.0.1 --port=8000 --quant=none|int8|int4
                                 --max_slots=32 --max_queue=256 --model_name=NAME]

DIR is a Kiln LM run or a Hugging Face import (`python -m train.convert import`). Every
flag is checked, and the port tried, before the model loads. SIGTERM or Ctrl-C stops
accepting connections, lets the requests in flight finish, then exits.
"""

import os

from absl import app, flags, logging

from data import cli
from data.errors import ConfigError, exit_on_user_error

_QUANT = ('none', 'int8', 'int4')
# Engine keyword arguments a flag may set; None leaves the engine's default.
_ENGINE_FLAGS = ('max_slots', 'max_queue', 'page_size', 'num_pages', 'max_seq_len',
                 'prefill_chunk')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  exit_on_user_error(_serve)


def check_flags(f) -> None:
  """Every check on the flags, before anything loads."""
  from train.runs import load_run_config

  if not f.workdir:
    raise ConfigError('--workdir is required: the --workdir of a training run or an import.')
  load_run_config(f.workdir)  # a run directory, or one line saying it is not
  if f.quant not in _QUANT:
    raise ConfigError(f'--quant={f.quant!r} is not allowed; choose one of {", ".join(_QUANT)}.')
  if not 1 <= f.port <= 65535:
    raise ConfigError(f'--port={f.port} must be in [1, 65535].')
  for name in _ENGINE_FLAGS:
    value = getattr(f, name)
    if value is not None and value < 1:
      raise ConfigError(f'--{name}={value} must be >= 1.')
  if f.max_n < 1:
    raise ConfigError(f'--max_n={f.max_n} must be >= 1.')
  cli.check_port_free(f.host, f.port)


def _serve() -> None:
  f = flags.FLAGS
  check_flags(f)
  import uvicorn

  from data.chat import load_chat_template
  from serve.engine import load_engine
  from serve.server import create_app, tokenizer_info

  kwargs = {name: getattr(f, name) for name in _ENGINE_FLAGS if getattr(f, name) is not None}
  engine, tokenizer = load_engine(f.workdir, quant=f.quant, **kwargs)
  template = load_chat_template(f.workdir, tokenizer)
  name = f.model_name or os.path.basename(os.path.normpath(f.workdir))
  app_ = create_app(engine, tokenizer, model_name=name, chat_template=template,
                    max_n=f.max_n, tokenizer_info=tokenizer_info(tokenizer, template))
  engine.start()
  logging.info('Serving %s from %s at http://%s:%d/v1', name, f.workdir, f.host, f.port)
  try:
    # uvicorn turns SIGTERM and SIGINT into a graceful shutdown: no new connections,
    # the responses in flight run to their end (no timeout), then run() returns.
    uvicorn.run(app_, host=f.host, port=f.port, log_level=f.log_level,
                timeout_graceful_shutdown=None)
  finally:
    engine.shutdown(drain=True)


def _define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A Kiln run directory or an HF import.')
  flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (0.0.0.0: all interfaces).')
  flags.DEFINE_integer('port', 8000, 'Port to listen on.')
  flags.DEFINE_string('quant', 'none', 'Weight quantization at load: none, int8 or int4.')
  flags.DEFINE_string('model_name', None, 'The model id clients send (default: the workdir '
                      'folder name).')
  flags.DEFINE_integer('max_n', 16, 'The largest n (completions per prompt) a request may ask.')
  flags.DEFINE_integer('max_slots', None, 'Requests decoded at once (engine default).')
  flags.DEFINE_integer('max_queue', None, 'Requests waiting beyond the slots before new ones '
                       'get 429 (engine default).')
  flags.DEFINE_integer('page_size', None, 'Tokens per KV-cache page (engine default).')
  flags.DEFINE_integer('num_pages', None, 'KV-cache pages (engine default).')
  flags.DEFINE_integer('max_seq_len', None, 'Context limit, prompt plus completion (engine '
                       'default: the model\'s).')
  flags.DEFINE_integer('prefill_chunk', None, 'Prompt tokens prefilled per step (engine '
                       'default).')
  flags.DEFINE_enum('log_level', 'info', ['critical', 'error', 'warning', 'info', 'debug'],
                    "uvicorn's log level.")


if __name__ == '__main__':
  _define_flags()
  app.run(main)
