"""Starts N processes of one multi-process job on this machine.

  python -m launch.local --num_processes=2 [--module=train] -- \
      --config=configs/lm.py --workdir=/tmp/two [--config.key=value ...]

Process i runs `python -m <module> <args after --> --coordinator_address=localhost:PORT
--num_processes=N --process_id=i` with this environment unchanged (so
JAX_NUM_CPU_DEVICES, if set, is the device count of *each* process). Their
output lines come back prefixed with `[i]`. If any process fails, the others
are terminated and the launcher exits non-zero; SIGTERM and SIGINT sent to the
launcher are passed on to every process (a preemption, for the trainer).
"""

import argparse
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence


def free_port() -> int:
  try:
    import portpicker
    return portpicker.pick_unused_port()
  except ImportError:  # portpicker is optional; the OS's choice is nearly as good
    with socket.socket() as s:
      s.bind(('localhost', 0))
      return s.getsockname()[1]


def process_command(module: str, args: Sequence[str], address: str, num_processes: int,
                    process_id: int) -> list[str]:
  return [sys.executable, '-u', '-m', module, *args, f'--coordinator_address={address}',
          f'--num_processes={num_processes}', f'--process_id={process_id}']


def _relay(index: int, stream, lock: threading.Lock) -> None:
  """Copies one process's output to ours, each line prefixed with `[index]`."""
  for line in iter(stream.readline, b''):
    with lock:
      try:
        sys.stdout.buffer.write(f'[{index}] '.encode() + line)
        sys.stdout.buffer.flush()
      except (BrokenPipeError, ValueError):  # our reader went away; keep draining the child
        pass
  stream.close()


def exit_code(returncode: int) -> int:
  """A child's return code as a shell would report it (128+N for death by signal N)."""
  return 128 - returncode if returncode < 0 else returncode


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
  """SIGTERM to every live process, SIGKILL to those still alive after `grace_s`."""
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(module: str, args: Sequence[str], num_processes: int, port: int | None = None,
           grace_s: float = 10.0) -> int:
  """Runs the job to completion; returns 0, or the exit code of the first process that failed."""
  address = f'localhost:{port or free_port()}'
  lock = threading.Lock()
  procs, relays = [], []
  for i in range(num_processes):
    p = subprocess.Popen(process_command(module, args, address, num_processes, i),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
    procs.append(p)
    relays.append(threading.Thread(target=_relay, args=(i, p.stdout, lock), daemon=True))
    relays[-1].start()

  def forward(signum, frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  failed = None
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = next((i for i, code in enumerate(codes) if code), None)  # None and 0 are falsy
      if failed is not None or all(code is not None for code in codes):
        break
      time.sleep(0.1)
    if failed is not None:
      print(f'[launch] process {failed} exited with code {exit_code(procs[failed].returncode)}; '
            'stopping the others.', file=sys.stderr, flush=True)
      _stop(procs, grace_s)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    if any(p.poll() is None for p in procs):  # the launcher itself is failing
      _stop(procs, grace_s)
    for t in relays:
      t.join(timeout=5.0)
  return 0 if failed is None else max(exit_code(procs[failed].returncode), 1)


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one line (not the usage block), as every Kiln command's."""

  def error(self, message: str):
    print(f'Config error: {message}; see python -m launch.local --help.', file=sys.stderr)
    sys.exit(2)


def check_args(parser: argparse.ArgumentParser, flags: argparse.Namespace,
               args: Sequence[str]) -> None:
  """The flags, before any process starts."""
  if flags.num_processes < 1:
    parser.error(f'--num_processes={flags.num_processes} must be >= 1')
  if flags.port is not None and not 0 < flags.port < 65536:
    parser.error(f'--port={flags.port} must be in [1, 65535] (or left out: a free port)')
  if flags.grace_s < 0:
    parser.error(f'--grace_s={flags.grace_s} must be >= 0')
  try:
    found = importlib.util.find_spec(flags.module) is not None
  except (ImportError, ValueError):  # a parent package that does not exist, or an empty name
    found = False
  if not found:
    parser.error(f'--module={flags.module!r} is not a module Python can find here (e.g. train)')
  if not args:
    parser.error('no arguments for the processes; give them after --, e.g. -- '
                 '--config=configs/lm.py --workdir=/tmp/run')


def main(argv: Sequence[str] | None = None) -> int:
  parser = _Parser(
      prog='python -m launch.local', description=__doc__.split('\n\n')[0],
      usage='%(prog)s --num_processes=N [--module=train] -- ARGS...')
  parser.add_argument('--num_processes', type=int, default=2, help='How many processes.')
  parser.add_argument('--module', default='train', help='The module each process runs.')
  parser.add_argument('--port', type=int, default=None,
                      help='Coordinator port on localhost (default: a free one).')
  parser.add_argument('--grace_s', type=float, default=10.0,
                      help='Seconds the others get to exit after SIGTERM when one fails.')
  parser.add_argument('args', nargs=argparse.REMAINDER,
                      help='Arguments for every process, after `--`.')
  flags = parser.parse_args(argv)
  args = flags.args[1:] if flags.args[:1] == ['--'] else flags.args
  check_args(parser, flags, args)
  return launch(flags.module, args, flags.num_processes, flags.port, flags.grace_s)


if __name__ == '__main__':
  sys.exit(main())
