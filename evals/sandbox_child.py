"""The sandbox's child process (see evals/sandbox.py): limits, an audit hook, then the program.

Run as `python -I -B sandbox_child.py WORK PROGRAM MEMORY_MB CPU_S FILE_MB`. It sets the
rlimits, installs the audit hook that confines writes to WORK and refuses sockets,
processes and ctypes, and then runs PROGRAM as `__main__`. A MemoryError that the program
does not catch exits with MEMORY_EXIT, so that the parent can tell it from other failures.
Importing this module (the parent does, for MEMORY_EXIT) runs nothing.
"""

import os
import resource
import sys
import traceback

MEMORY_EXIT = 71

# Events whose first N arguments are paths that must lie inside the writable directory.
_PATH_EVENTS = {'os.remove': 1, 'os.rmdir': 1, 'os.mkdir': 1, 'os.rename': 2, 'os.chmod': 1,
                'os.chown': 1, 'os.chflags': 1, 'os.truncate': 1, 'os.utime': 1,
                'os.setxattr': 1, 'os.removexattr': 1, 'shutil.rmtree': 1,
                'shutil.copyfile': 2, 'shutil.copytree': 2, 'shutil.move': 2,
                'shutil.unpack_archive': 2}
# Events refused outright: the network, new processes (which the hook would not follow),
# links (a way out of the directory), native code.
_REFUSED = frozenset({
    'socket.connect', 'socket.bind', 'socket.sendto', 'socket.sendmsg', 'socket.getaddrinfo',
    'socket.gethostbyname', 'socket.gethostbyname_ex', 'socket.gethostbyaddr',
    'os.fork', 'os.forkpty', 'os.exec', 'os.spawn', 'os.posix_spawn', 'os.system',
    'subprocess.Popen', 'os.startfile', 'os.symlink', 'os.link', 'ctypes.dlopen',
    'ctypes.dlsym', 'ctypes.cdata', 'webbrowser.open', 'urllib.Request'})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _set_limits(memory_mb: int, cpu_s: int, file_mb: int) -> None:
  mib = 1 << 20
  for limit, value in ((resource.RLIMIT_AS, memory_mb * mib), (resource.RLIMIT_CPU, cpu_s),
                       (resource.RLIMIT_FSIZE, file_mb * mib), (resource.RLIMIT_NOFILE, 256),
                       (resource.RLIMIT_NPROC, 64), (resource.RLIMIT_CORE, 0)):
    try:
      resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
      pass  # above a hard limit this process already has: the lower one stays


def _audit_hook(work: str):
  """The hook that refuses what the program may not do. The functions it calls are bound
  here, so that a program that reassigns `os.path.realpath` does not change its answers."""
  work = os.path.realpath(work) + os.sep
  realpath, join, getcwd, fspath, getpid = (os.path.realpath, os.path.join, os.getcwd,
                                            os.fspath, os.getpid)

  def inside(path) -> bool:
    if isinstance(path, int):
      return True  # an fd that the process already holds
    path = fspath(path)
    if isinstance(path, bytes):
      path = path.decode('utf-8', 'surrogateescape')
    return (realpath(join(getcwd(), path)) + os.sep).startswith(work)

  def refuse(event, args):
    raise PermissionError(f'sandbox: {event}{tuple(args)!r} is not allowed')

  def hook(event: str, args: tuple) -> None:
    if event == 'open':
      path, mode, flags = args
      writes = (flags or 0) & _WRITE_FLAGS or any(c in (mode or '') for c in 'wax+')
      if writes and not inside(path):
        refuse(event, args[:2])
    elif event in _PATH_EVENTS:
      paths = args[:_PATH_EVENTS[event]]
      if not all(inside(p) for p in paths if p is not None):
        refuse(event, paths)
    elif event == 'sqlite3.connect':
      if args[0] not in (':memory:', b':memory:', '') and not inside(args[0]):
        refuse(event, args[:1])
    elif event in ('os.kill', 'os.killpg'):
      if args[0] not in (0, getpid()):
        refuse(event, args)
    elif event in _REFUSED:
      refuse(event, args)
  return hook


def main(work: str, program: str, memory_mb: str, cpu_s: str, file_mb: str) -> None:
  _set_limits(int(memory_mb), int(cpu_s), int(file_mb))
  with open(program, encoding='utf-8') as f:
    code = compile(f.read(), 'program.py', 'exec')
  sys.addaudithook(_audit_hook(work))  # from here on, nothing can remove it
  sys.argv = ['program.py']
  try:
    exec(code, {'__name__': '__main__', '__builtins__': __builtins__})
  except MemoryError:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(MEMORY_EXIT)


if __name__ == '__main__':
  main(*sys.argv[1:6])
