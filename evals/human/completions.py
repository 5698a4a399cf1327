"""The items of a comparison: prompts read from a file, and each run's completion of them.

A prompts file is either JSON lines (a name ending in `.jsonl`), one object per line with
`"prompt": "text"` or `"messages": [{"role", "content"}, ...]`, or plain text, one prompt
per nonblank line. A conversation is rendered with the run's chat template and ends with
the generation prompt, as the server's `/v1/chat/completions` renders it; a text prompt
gets BOS in front, as the server's `/v1/completions` gives a string prompt.

Completions are generated once, before the page is served, and kept in the output folder:
`completions.jsonl` holds one line per item, `{"item", "prompt", "a", "b"}` (`prompt` a
string or a message list), and `run.json` the settings that made them. A restart reads
them back instead of generating again. The file is also a seam: completions made any other
way can be compared by writing that file and serving the folder without `--a`/`--b`.
"""

import json
import os
import pathlib
from collections.abc import Sequence

from data.errors import ConfigError, DataError

COMPLETIONS_FILE = 'completions.jsonl'
SETTINGS_FILE = 'run.json'
MODELS = ('a', 'b')


def read_prompts(path: str) -> tuple[list[str | list[dict]], list[str]]:
  """The prompts of `path` (strings, or message lists: module docstring), and where each
  is (`path:line`), for error messages.

  Raises:
    DataError: the file is missing, empty, or has a line that is not a prompt; the message
      names the file and the line.
  """
  p = pathlib.Path(path)
  if not p.is_file():
    raise DataError(f'--prompts={path} is not a file.')
  try:
    lines = p.read_text(encoding='utf-8').splitlines()
  except UnicodeDecodeError as e:
    raise DataError(f'{path} is not UTF-8 text ({e.reason} at byte {e.start}).') from None
  prompts, places = [], []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    places.append(f'{path}:{number}')
    prompts.append(_json_prompt(line, places[-1]) if p.suffix == '.jsonl' else line)
  if not prompts:
    raise DataError(f'{path} holds no prompts: write one per line (plain text), or one JSON '
                    'object per line with "prompt" or "messages" (a .jsonl file).')
  return prompts, places


def _json_prompt(line: str, where: str) -> str | list[dict]:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f'{where}: not valid JSON ({e.msg}, column {e.colno}).') from None
  return prompt_of(record, where)


def prompt_of(record: object, where: str) -> str | list[dict]:
  """The prompt of one JSON record, checked: a nonempty string or a list of messages."""
  if not isinstance(record, dict) or ('prompt' in record) == ('messages' in record):
    raise DataError(f'{where}: give an object with exactly one of "prompt" (a string) and '
                    '"messages" (a list of {"role", "content"}).')
  if 'prompt' in record:
    prompt = record['prompt']
    if not isinstance(prompt, str) or not prompt:
      raise DataError(f'{where}: "prompt" must be a nonempty string.')
    return prompt
  messages = record['messages']
  if not isinstance(messages, list) or not messages:
    raise DataError(f'{where}: "messages" must be a nonempty list.')
  for i, m in enumerate(messages):
    if not (isinstance(m, dict) and isinstance(m.get('role'), str)
            and isinstance(m.get('content'), str)):
      raise DataError(f'{where}: messages[{i}] must be an object with a string "role" and '
                      'a string "content".')
  return [{'role': m['role'], 'content': m['content']} for m in messages]


def generate(workdir: str, prompts: Sequence[str | list[dict]], *, max_tokens: int,
             temperature: float, top_p: float, seed: int,
             places: Sequence[str] | None = None, **engine_kwargs) -> list[str]:
  """The completion of each prompt by the run in `workdir`, through the engine.

  Every prompt is submitted at once, so the engine batches them; prompt i samples with the
  seed `seed + i`, so a rerun gives the same text. A prompt whose tokens leave no room in
  the run's context is an error naming where it is (`places[i]`, from `read_prompts`);
  otherwise the completion is cut at `max_tokens` or where the context ends.
  """
  from data.chat import load_chat_template
  from serve.engine import Request, load_engine

  engine, tokenizer = load_engine(workdir, max_queue=max(len(prompts), 1), **engine_kwargs)
  template = load_chat_template(workdir, tokenizer)
  bos, eos = getattr(tokenizer, 'bos_id', -1), getattr(tokenizer, 'eos_id', -1)
  end_of_turn = getattr(tokenizer, 'special_tokens', {}).get(template.end_of_turn)
  streams = []
  for i, prompt in enumerate(prompts):
    where = places[i] if places else f'prompt {i + 1}'
    if isinstance(prompt, str):  # as the server's /v1/completions encodes a string
      ids = ([bos] if bos >= 0 else []) + template.encode(prompt)
      stops = [eos] if eos >= 0 else []
    else:  # as its /v1/chat/completions renders messages
      try:
        ids = template.encode(template.render(prompt, add_generation_prompt=True))
      except DataError as e:
        raise DataError(f'{where}: {e}') from None
      stops = [t for t in (eos, end_of_turn) if t is not None and t >= 0]
    room = engine.max_seq_len - len(ids)
    if not ids or room < 1:
      raise DataError(f'{where}: the prompt is {len(ids)} tokens, which leaves no room in the '
                      f'context of {engine.max_seq_len} tokens of {workdir}; shorten it.')
    streams.append(engine.submit(Request(
        prompt_ids=tuple(ids), max_tokens=min(max_tokens, room), temperature=temperature,
        top_p=top_p, seed=(seed + i) % 2**32, stop_token_ids=tuple(dict.fromkeys(stops)))))
  while not engine.idle:
    engine.step()
  return [''.join(event.text for event in stream.poll()) for stream in streams]


def settings(a: str, b: str, prompts: str, **generation) -> dict:
  """What made a folder's completions: the runs and the prompts file as absolute paths, and
  the generation settings. A restart with other settings is refused (`check_settings`)."""
  return {'a': os.path.abspath(a), 'b': os.path.abspath(b),
          'prompts': os.path.abspath(prompts), **generation}


def check_settings(output: str, wanted: dict) -> None:
  """Raises ConfigError when `output` holds completions made with other settings."""
  path = pathlib.Path(output) / SETTINGS_FILE
  if not path.exists():
    raise ConfigError(f'{output} has {COMPLETIONS_FILE} but no {SETTINGS_FILE}, so it was not '
                      'made by these runs: serve it without --a/--b/--prompts, or choose a new '
                      '--output.')
  try:
    made = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f'{path} is not valid JSON ({e.msg}).') from None
  differ = [f'{k}={made.get(k)!r}' for k in wanted if made.get(k) != wanted[k]]
  if differ:
    raise ConfigError(f'{output} holds completions made with {", ".join(differ)}; rerun with '
                      'those settings (or without --a/--b/--prompts), or choose a new --output.')


def save(output: str, prompts: Sequence, texts: dict[str, list[str]], made_by: dict) -> None:
  """Writes run.json and completions.jsonl, each complete or not at all (renamed into
  place), so a crash during generation leaves nothing a restart would mistake for done."""
  out = pathlib.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  lines = [json.dumps({'item': i, 'prompt': prompt, 'a': texts['a'][i], 'b': texts['b'][i]},
                      ensure_ascii=False) for i, prompt in enumerate(prompts)]
  _write_atomic(out / SETTINGS_FILE, json.dumps(made_by, indent=2) + '\n')
  _write_atomic(out / COMPLETIONS_FILE, '\n'.join(lines) + '\n')


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text, encoding='utf-8')
  os.replace(tmp, path)


def load(output: str) -> list[dict]:
  """The items of `output`/completions.jsonl, checked: item i on line i + 1.

  Raises:
    DataError: a line that is not an item, naming the file and the line.
  """
  path = pathlib.Path(output) / COMPLETIONS_FILE
  items = []
  for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
    if not line.strip():
      continue
    where = f'{path}:{number}'
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f'{where}: not valid JSON ({e.msg}).') from None
    if not isinstance(record, dict):
      raise DataError(f'{where}: not a JSON object.')
    prompt = prompt_of({'prompt': record.get('prompt')} if not isinstance(
        record.get('prompt'), list) else {'messages': record['prompt']}, where)
    if record.get('item') != len(items):
      raise DataError(f'{where}: "item" is {record.get("item")!r}; items are numbered 0, 1, '
                      '... in file order.')
    for model in MODELS:
      if not isinstance(record.get(model), str):
        raise DataError(f'{where}: {model!r} (model {model.upper()}\'s completion) must be a '
                        'string.')
    items.append({'item': len(items), 'prompt': prompt, 'a': record['a'], 'b': record['b']})
  if not items:
    raise DataError(f'{path} holds no items.')
  return items
