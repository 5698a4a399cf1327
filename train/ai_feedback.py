"""Preference pairs labelled by a judge instead of people (RLAIF, the constitutional-AI idea).

  python -m train.ai_feedback --policy=RUN --prompts=prompts.jsonl --output=prefs.jsonl \
      --judge=rule:sorted            # or --judge=JUDGE_RUN [--principles=principles.txt]
      [--samples=2] [--max_tokens=64] [--temperature=1.0] [--top_p=1.0] [--stop='\\n']
      [--seed=0] [--tie_margin=0] [--overwrite]

The policy (any LM-family run: lm, sft, dpo, distill, or an import) samples `--samples`
completions of every prompt, all submitted at once to the continuous-batching engine
(serve/engine.py). A judge then ranks the candidates of each prompt, and the best and the
worst become one pair: {"prompt", "chosen", "rejected"}, plus the judge's metadata
("judge", "judge_score", "candidates"), which data/preference_data.py ignores, so the
reward-model and DPO tasks read the file unchanged (`--config.data.source=jsonl
--config.data.path=prefs.jsonl`). Ties are skipped and counted, as are candidates that the
preference reader would drop (identical, or an empty completion).

Judges:
  rule:NAME  a Python function (prompt, completion) -> score, higher is better, from the
             registry below (`register_rule` adds one): `sorted` (the embedded sort task of
             data/preference_data.py), `shorter`, `no_repeats`. A pair whose scores are
             equal is a tie.
  RUN        a Kiln LM run asked, in a prompt that states the principles (a written default
             set, or one per line of --principles), which of two responses, "A" or "B",
             follows them better. Its preference for the first candidate x over y is
               s(x, y) = ([lp(A) - lp(B) | A=x, B=y] - [lp(A) - lp(B) | A=y, B=x]) / 2,
             the log-odds of its answer averaged over both orders. Position bias (a
             judge that favours "A") cancels, and s(y, x) = -s(x, y) exactly: swapping the
             candidates mirrors the decision. s = 0 (within --tie_margin) is a tie.
With more than two samples every pair is compared; a candidate's score is its summed
preference over the others, and the pair is the top against the bottom.

Prompts file: `.jsonl` with an object per line whose "prompt" is a string (a preference
jsonl works as it is), or any other file with one prompt per line (taken without its
newline). Prompts are encoded as in training and sampling: BOS (when the tokenizer has
one), then the text.
"""

import collections
import dataclasses
import itertools
import json
import re
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath

from data import storage, tokenizers
from data.errors import ConfigError, DataError, exit_on_user_error
from model import decode

# The default constitution: short, general principles (a --principles file replaces them).
DEFAULT_PRINCIPLES = (
    'The response does exactly what the prompt asks.',
    'The response is correct.',
    'The response is concise and does not repeat itself.',
    'The response is harmless and honest.',
)
ANSWERS = ('A', 'B')
SCORE_ROWS = 8  # rows per compiled judge pass (each width gets one program)


# --- inputs --------------------------------------------------------------------


def read_prompts(path: str) -> list[str]:
  """The prompts of `path` (module docstring).

  Raises:
    DataError: no such file, a bad jsonl line (its number named), or no prompt.
  """
  p = epath.Path(path)
  if not path or not p.exists() or p.is_dir():
    raise DataError(f'--prompts={path!r} is not a file; give a jsonl of {{"prompt": ...}} or '
                    'a text file with one prompt per line.')
  text = p.read_text(encoding='utf-8')
  prompts = []
  if path.endswith('.jsonl'):
    for n, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        raise DataError(f'--prompts={path}, line {n}: not valid JSON.') from None
      if not isinstance(record, dict) or not isinstance(record.get('prompt'), str):
        raise DataError(f'--prompts={path}, line {n}: needs a string "prompt" field (message '
                        'lists are not supported here; render them to text first).')
      prompts.append(record['prompt'])
  else:
    prompts = [line for line in text.splitlines() if line.strip()]
  prompts = [prompt for prompt in prompts if prompt.strip()]
  if not prompts:
    raise DataError(f'--prompts={path} has no prompts.')
  return prompts


def read_principles(path: str) -> tuple[str, ...]:
  """The principles of `path`, one per non-empty line (a leading '-' or '*' dropped), or
  the default set for ''."""
  if not path:
    return DEFAULT_PRINCIPLES
  p = epath.Path(path)
  if not p.exists() or p.is_dir():
    raise DataError(f'--principles={path!r} is not a file; give a text file with one '
                    'principle per line.')
  lines = [re.sub(r'^[-*]\s*', '', line.strip()) for line in p.read_text().splitlines()]
  principles = tuple(line for line in lines if line)
  if not principles:
    raise DataError(f'--principles={path} has no principles.')
  return principles


# --- rules -----------------------------------------------------------------------

Rule = Callable[[str, str], float]  # (prompt, completion) -> score, higher is better
RULES: dict[str, Rule] = {}


def register_rule(name: str):
  """Decorator: makes `fn(prompt, completion) -> float` the judge `rule:<name>`."""
  def add(fn: Rule) -> Rule:
    RULES[name] = fn
    return fn
  return add


def _words(text: str) -> list[str]:
  return re.findall(r'[a-z]+', text.lower())


@register_rule('sorted')
def sorted_rule(prompt: str, completion: str) -> float:
  """The embedded sort task (`sort: w1 w2 ...`): 1 for exactly the prompt's words in
  sorted order, plus half the share of adjacent completion words in ascending order; so
  the exact answer always beats any other."""
  asked = _words(prompt.split(':', 1)[-1])
  given = _words(completion)
  in_order = (sum(a <= b for a, b in itertools.pairwise(given)) / (len(given) - 1)
              if len(given) > 1 else 0.0)
  return float(given == sorted(asked)) + 0.5 * in_order


@register_rule('shorter')
def shorter_rule(prompt: str, completion: str) -> float:
  """The shorter completion wins (characters, ends stripped)."""
  del prompt
  return -float(len(completion.strip()))


@register_rule('no_repeats')
def no_repeats_rule(prompt: str, completion: str) -> float:
  """Fewer repeated words wins: minus the words that occurred earlier in the completion."""
  del prompt
  words = _words(completion)
  return -float(len(words) - len(set(words)))


def get_rule(name: str) -> Rule:
  if name not in RULES:
    raise ConfigError(f'--judge=rule:{name}: no such rule; choose one of '
                      f'{", ".join("rule:" + n for n in sorted(RULES))}, or a judge run '
                      'directory.')
  return RULES[name]


# --- judges: an antisymmetric preference matrix per prompt ---------------------------


class RuleJudge:
  """s[i, j] = rule(prompt, c_i) - rule(prompt, c_j)."""

  def __init__(self, name: str):
    self.name = f'rule:{name}'
    self.rule = get_rule(name)

  def preferences(self, prompts: Sequence[str],
                  candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
    out = []
    for prompt, cands in zip(prompts, candidates, strict=True):
      scores = np.asarray([self.rule(prompt, c) for c in cands], np.float64)
      out.append(scores[:, None] - scores[None, :])
    return out


def judge_prompt(principles: Sequence[str], prompt: str, a: str, b: str) -> str:
  """The text the judge continues with 'A' or 'B' (constitutional AI's comparison prompt)."""
  rules = '\n'.join(f'- {p}' for p in principles)
  return (f'Compare two responses to a prompt against these principles:\n{rules}\n\n'
          f'Prompt: {prompt}\nResponse A: {a}\nResponse B: {b}\n'
          'Which response follows the principles better? Answer A or B.\nAnswer: ')


class ModelJudge:
  """A Kiln LM comparing candidates in both orders (module docstring)."""

  def __init__(self, name: str, graphdef, params, tokenizer: tokenizers.Tokenizer,
               principles: Sequence[str], max_positions: int | None = None):
    self.name, self.graphdef, self.params = name, graphdef, params
    self.tokenizer, self.principles = tokenizer, tuple(principles)
    self.max_positions = max_positions
    bos = tokenizer.bos_id
    self._bos = [bos] if bos >= 0 else []
    self._answers = [list(tokenizer.encode(a)) for a in ANSWERS]
    self._score = jax.jit(lambda p, t, n: decode.score(self.graphdef, p, t, n,
                                                       vocab_limit=tokenizer.vocab_size)[0])

  def preferences(self, prompts: Sequence[str],
                  candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
    # Rows: for every prompt, ordered pair (i, j), i != j, and answer: the judge prompt with
    # A = c_i, B = c_j, then the answer. Scored in one batched pass over all prompts.
    rows, starts, keys = [], [], []
    for n, (prompt, cands) in enumerate(zip(prompts, candidates, strict=True)):
      for i in range(len(cands)):
        for j in range(len(cands)):
          if i == j:
            continue
          head = self._bos + list(self.tokenizer.encode(
              judge_prompt(self.principles, prompt, cands[i], cands[j])))
          for answer in self._answers:
            rows.append(head + answer)
            starts.append(len(head))
            keys.append((n, i, j))
    lp = self._answer_logprobs(rows, starts)
    out = [np.zeros((len(c), len(c))) for c in candidates]
    d = {}  # (n, i, j) -> lp(A) - lp(B) with A = c_i, B = c_j
    for r in range(0, len(rows), 2):
      d[keys[r]] = lp[r] - lp[r + 1]
    for (n, i, j), value in d.items():
      out[n][i, j] = (value - d[(n, j, i)]) / 2.0
    return out

  def _answer_logprobs(self, rows: list[list[int]], starts: list[int]) -> np.ndarray:
    """Summed log-probs of each row's tokens from `starts[r]` on, in chunks of SCORE_ROWS
    rows padded to a power-of-two width (a few compiled programs for any input)."""
    width = 16
    while width < max(len(r) for r in rows):
      width *= 2
    if self.max_positions and width > self.max_positions:
      width = max(len(r) for r in rows)
      if width > self.max_positions:
        raise ConfigError(f'A judge prompt has {width} tokens, more than the judge\'s '
                          f'{self.max_positions} positions; shorten the prompts, '
                          '--max_tokens or the principles.')
    out = np.zeros(len(rows))
    for lo in range(0, len(rows), SCORE_ROWS):
      chunk = rows[lo:lo + SCORE_ROWS]
      tokens = np.zeros((SCORE_ROWS, width), np.int32)
      lengths = np.ones((SCORE_ROWS,), np.int32)
      for k, row in enumerate(chunk):
        tokens[k, :len(row)] = row
        lengths[k] = len(row)
      lp_BxL = np.asarray(jax.device_get(self._score(self.params, tokens, lengths)))
      for k, row in enumerate(chunk):
        out[lo + k] = lp_BxL[k, starts[lo + k]:len(row)].sum()
    return out


# --- sampling, labelling, writing ----------------------------------------------------


def sample_candidates(engine, tokenizer: tokenizers.Tokenizer, prompts: Sequence[str], *,
                      samples: int, max_tokens: int, temperature: float, top_p: float,
                      stop: Sequence[str], seed: int) -> list[list[str]]:
  """`samples` completions of every prompt from `engine` (serve/engine.py), all submitted
  at once and run to the end on this thread. Request (prompt n, sample k) samples with seed
  `seed * 1_000_003 + n * samples + k`, so a rerun gives the same candidates."""
  from serve import engine as engine_lib  # serve sits beside train; only this tool needs it

  bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
  eos = getattr(tokenizer, 'eos_id', -1)
  streams = []
  for n, prompt in enumerate(prompts):
    ids = tuple(bos + list(tokenizer.encode(prompt)))
    if len(ids) >= engine.max_seq_len:
      raise DataError(f'Prompt {n + 1} has {len(ids)} tokens; the policy\'s context is '
                      f'{engine.max_seq_len}, and completions need room.')
    for k in range(samples):
      request = engine_lib.Request(
          prompt_ids=ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
          seed=(seed * 1_000_003 + n * samples + k) % 2**31,
          stop_token_ids=(eos,) if eos >= 0 else (), stop=tuple(stop))
      streams.append(engine.submit(request))
  while not engine.idle:
    engine.step()
  texts = [''.join(event.text for event in stream.poll()) for stream in streams]
  return [texts[n * samples:(n + 1) * samples] for n in range(len(prompts))]


@dataclasses.dataclass
class Labelled:
  records: list[dict]
  skipped: collections.Counter


def label(prompts: Sequence[str], candidates: Sequence[Sequence[str]], judge, *,
          tie_margin: float = 0.0) -> Labelled:
  """One preference record per prompt whose best and worst candidates differ by more than
  `tie_margin` (module docstring); the others are counted by reason."""
  records, skipped = [], collections.Counter()
  for prompt, cands, s in zip(prompts, candidates, judge.preferences(prompts, candidates),
                              strict=True):
    totals = s.sum(axis=1)
    best, worst = int(np.argmax(totals)), int(np.argmin(totals))
    if best == worst or s[best, worst] <= tie_margin:
      skipped['a tie'] += 1
    elif cands[best] == cands[worst]:
      skipped['identical completions'] += 1
    elif not cands[best].strip() or not cands[worst].strip():
      skipped['an empty completion'] += 1
    else:
      records.append({'prompt': prompt, 'chosen': cands[best], 'rejected': cands[worst],
                      'judge': judge.name, 'judge_score': float(s[best, worst]),
                      'candidates': len(cands)})
  return Labelled(records, skipped)


def write_pairs(path: str, records: Sequence[dict]) -> None:
  data = ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records)
  storage.write_atomic(epath.Path(path), data.encode('utf-8'))


# --- the command -------------------------------------------------------------------


def check_flags(f) -> None:
  """Every check that needs no model, before anything loads."""
  for name in ('policy', 'prompts', 'output', 'judge'):
    if not getattr(f, name):
      raise ConfigError(f'--{name} is required (python -m train.ai_feedback --help).')
  if f.samples < 2:
    raise ConfigError(f'--samples={f.samples} must be >= 2: a pair needs two candidates.')
  if f.max_tokens < 1:
    raise ConfigError(f'--max_tokens={f.max_tokens} must be >= 1.')
  if f.temperature < 0 or not 0.0 < f.top_p <= 1.0:
    raise ConfigError(f'--temperature={f.temperature} must be >= 0 and --top_p={f.top_p} in '
                      '(0, 1]; identical greedy samples give no pairs, so sample (> 0).')
  if f.tie_margin < 0:
    raise ConfigError(f'--tie_margin={f.tie_margin} must be >= 0.')
  if f.judge.startswith('rule:'):
    get_rule(f.judge.removeprefix('rule:'))
    if f.principles:
      raise ConfigError('--principles applies to a judge model, not to a rule judge.')
  for name in ('policy',) + (() if f.judge.startswith('rule:') else ('judge',)):
    run = getattr(f, name)
    if not (epath.Path(run) / 'config.json').exists():
      raise ConfigError(f'--{name}={run!r} is not a run directory (no config.json); give '
                        'the --workdir of a training run or of train.convert import.')
  out = epath.Path(f.output)
  if out.is_dir():
    raise ConfigError(f'--output={f.output} is a directory; give a file such as prefs.jsonl.')
  if out.exists() and not f.overwrite:
    raise ConfigError(f'--output={f.output} exists; choose another name or pass --overwrite.')
  if not out.parent.is_dir():
    raise ConfigError(f'--output={f.output}: the directory {out.parent} does not exist.')


def load_model_judge(run_dir: str, principles: Sequence[str]) -> ModelJudge:
  """The judge run's inference model (LoRA merged) on its mesh, as `train.sample` loads it."""
  from train import runs
  from train.tasks import get_task
  from train.tasks.lm import LMTask

  config = runs.load_run_config(run_dir)
  task = get_task(config)
  if not (isinstance(task, LMTask) and task.makes_text):
    raise ConfigError(f'--judge={run_dir} is a {config.task!r} run; a judge answers A or B, '
                      'so it must be a language model (lm, sft, dpo, distill, an import).')
  task.setup_inference(run_dir)
  state, _ = runs.restore_latest(task, config, run_dir)
  cfg = task.inference_model_cfg
  return ModelJudge(run_dir, task.inference_graphdef, task.inference_params(state),
                    task.tokenizer, principles,
                    cfg.max_positions if cfg.position == 'learned' else None)


def run(f) -> int:
  """The command, with its flags as attributes of `f`; returns the pairs written."""
  check_flags(f)
  prompts = read_prompts(f.prompts)
  if f.judge.startswith('rule:'):
    judge = RuleJudge(f.judge.removeprefix('rule:'))
  else:
    judge = load_model_judge(f.judge, read_principles(f.principles))

  from serve.engine import load_engine
  try:
    engine, tokenizer = load_engine(f.policy, max_queue=max(256, len(prompts) * f.samples))
  except ConfigError as e:
    raise ConfigError(f'--policy: {e}') from None
  stop = [s.replace('\\n', '\n').replace('\\t', '\t') for s in f.stop or ()]
  candidates = sample_candidates(engine, tokenizer, prompts, samples=f.samples,
                                 max_tokens=f.max_tokens, temperature=f.temperature,
                                 top_p=f.top_p, stop=stop, seed=f.seed)
  labelled = label(prompts, candidates, judge, tie_margin=f.tie_margin)
  write_pairs(f.output, labelled.records)
  skipped = ', '.join(f'{n} with {reason}' for reason, n in sorted(labelled.skipped.items()))
  print(f'Wrote {len(labelled.records)} pairs from {len(prompts)} prompts to {f.output} '
        f'(judge {judge.name}); skipped {skipped or "none"}.')
  if not labelled.records:
    logging.warning('No pair was written: every prompt was a tie or had unusable candidates.')
  return len(labelled.records)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  exit_on_user_error(lambda: run(flags.FLAGS))


def define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program (or a test
  asks), so that importing its functions never clashes with another program's flags."""
  flags.DEFINE_string('policy', None, 'The run that samples the candidates (an LM-family run).')
  flags.DEFINE_string('prompts', None, 'A jsonl of {"prompt": ...} or a file of one prompt '
                      'per line.')
  flags.DEFINE_string('output', None, 'The preference jsonl to write.')
  flags.DEFINE_string('judge', None, 'rule:NAME (sorted, shorter, no_repeats) or a judge run.')
  flags.DEFINE_string('principles', '', 'A judge run: a file of principles, one per line '
                      '(default: a short general set).')
  flags.DEFINE_integer('samples', 2, 'Candidates per prompt (>= 2).')
  flags.DEFINE_integer('max_tokens', 64, 'New tokens per candidate.')
  flags.DEFINE_float('temperature', 1.0, 'Sampling temperature of the policy.')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling of the policy; 1 disables it.')
  flags.DEFINE_multi_string('stop', [], 'A string that ends a candidate (not kept; \\n and '
                            '\\t as written mean a newline and a tab); repeat for several.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_float('tie_margin', 0.0, 'A preference at most this strong is a tie (a judge '
                     "run: in nats of its answer's log-odds).")
  flags.DEFINE_boolean('overwrite', False, 'Replace an existing --output file.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
