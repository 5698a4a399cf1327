"""Renders a JobSet that trains with Kiln on a GKE TPU slice, and applies it with kubectl.

  python -m launch.gke --image=IMAGE --tpu=v5e --topology=4x4 [--name=kiln] \\
      [--dry_run] -- --config=configs/lm.py:llama_1b --workdir=/workdir/llama

Every pod of the slice runs `python -m train ARGS...`; GKE sets the TPU worker variables
(TPU_WORKER_HOSTNAMES, TPU_WORKER_ID) from which JAX finds its peers, so the command needs
no multi-host flags. --dry_run prints the manifest instead of applying it (save it and
`kubectl apply -f` it yourself, or read it first); without it, the manifest goes to
`kubectl apply -f -`. The hosts of a slice follow from the TPU kind and topology, as
GKE's TPU node pools make them: a v5e or v6e slice of at most 8 chips is one host, any
other slice has 4 chips per host. One slice: several (Multislice) would also need JAX's
MEGASCALE_* variables set per slice, which this recipe does not do.

A manifest, rather than a template file with placeholders, so that the numbers that must
agree (hosts = chips / chips per host = parallelism = completions, the node selector's
topology and the chips each pod requests) are computed once; tests/test_launch.py checks
the result against the JobSet CRD's schema.
"""

import argparse
import math
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence

import yaml

# GKE's node-selector value (cloud.google.com/gke-tpu-accelerator) of each TPU kind, and the
# number of topology dimensions its slices have.
ACCELERATORS = {
    'v4': ('tpu-v4-podslice', 3),
    'v5e': ('tpu-v5-lite-podslice', 2),
    'v5p': ('tpu-v5p-slice', 3),
    'v6e': ('tpu-v6e-slice', 2),
}
PLACEHOLDER_IMAGE = 'us-docker.pkg.dev/YOUR_PROJECT/kiln/kiln:latest'
_DNS_LABEL = re.compile(r'[a-z]([-a-z0-9]*[a-z0-9])?')


def chips_per_host(tpu: str, chips: int) -> int:
  """Chips on each host of a slice: v5e and v6e slices of up to 8 chips are one host."""
  if tpu in ('v5e', 'v6e') and chips <= 8:
    return chips
  return min(chips, 4)


def topology_chips(topology: str) -> int:
  return math.prod(int(d) for d in topology.split('x'))


def render(*, name: str, image: str, tpu: str, topology: str, args: Sequence[str], claim: str,
           mount: str, max_restarts: int, grace_s: int) -> dict:
  """The JobSet manifest, as a dict (yaml.safe_dump writes it)."""
  accelerator, _ = ACCELERATORS[tpu]
  chips = topology_chips(topology)
  per_host = chips_per_host(tpu, chips)
  hosts = chips // per_host
  pod = {
      'restartPolicy': 'Never',
      'terminationGracePeriodSeconds': grace_s,  # time to save a checkpoint after SIGTERM
      'nodeSelector': {
          'cloud.google.com/gke-tpu-accelerator': accelerator,
          'cloud.google.com/gke-tpu-topology': topology,
      },
      'containers': [{
          'name': 'kiln',
          'image': image,
          'command': ['python', '-m', 'train', *args],
          'resources': {'limits': {'google.com/tpu': per_host}},
          'volumeMounts': [{'name': 'workdir', 'mountPath': mount}],
      }],
      'volumes': [{'name': 'workdir', 'persistentVolumeClaim': {'claimName': claim}}],
  }
  return {
      'apiVersion': 'jobset.x-k8s.io/v1alpha2',
      'kind': 'JobSet',
      'metadata': {
          'name': name,
          # One slice per node pool: the pods of a replica land on the hosts of one slice.
          'annotations': {'alpha.jobset.sigs.k8s.io/exclusive-topology':
                          'cloud.google.com/gke-nodepool'},
      },
      'spec': {
          # A preempted or failed slice restarts the whole JobSet, which resumes from the
          # newest checkpoint in the shared workdir.
          'failurePolicy': {'maxRestarts': max_restarts},
          'replicatedJobs': [{
              'name': 'workers',
              'replicas': 1,  # one slice
              'template': {'spec': {
                  'parallelism': hosts,
                  'completions': hosts,
                  'backoffLimit': 0,
                  'template': {'spec': pod},
              }},
          }],
      },
  }


def to_yaml(manifest: dict, command: Sequence[str]) -> str:
  header = ('# A Kiln training JobSet, rendered by\n#   '
            + shlex.join(['python', '-m', 'launch.gke', *command]) + '\n')
  return header + yaml.safe_dump(manifest, sort_keys=False, width=100)


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one line, as every Kiln command's."""

  def error(self, message: str):
    print(f'Config error: {message}; see python -m launch.gke --help.', file=sys.stderr)
    sys.exit(2)


def check_args(parser: argparse.ArgumentParser, f: argparse.Namespace,
               args: Sequence[str]) -> None:
  """Every flag, before anything is rendered or applied."""
  if not _DNS_LABEL.fullmatch(f.name) or len(f.name) > 63:
    parser.error(f'--name={f.name!r} must be a DNS label: lower-case letters, digits and -, '
                 'starting with a letter, at most 63 characters')
  if f.tpu not in ACCELERATORS:
    parser.error(f'--tpu={f.tpu!r} is not a TPU kind GKE schedules; choose one of '
                 f'{", ".join(ACCELERATORS)}')
  dims = ACCELERATORS[f.tpu][1]
  if not re.fullmatch(r'[1-9]\d*(x[1-9]\d*)*', f.topology) or f.topology.count('x') + 1 != dims:
    example = '4x4' if dims == 2 else '2x2x4'
    parser.error(f'--topology={f.topology!r}: a {f.tpu} topology has {dims} dimensions, '
                 f'e.g. {example}')
  chips = topology_chips(f.topology)
  if chips % chips_per_host(f.tpu, chips):
    parser.error(f'--topology={f.topology} has {chips} chips, not a whole number of '
                 f'{chips_per_host(f.tpu, chips)}-chip hosts')
  if f.grace_s < 1:
    parser.error(f'--grace_s={f.grace_s} must be >= 1')
  if f.max_restarts < 0:
    parser.error(f'--max_restarts={f.max_restarts} must be >= 0')
  if not f.mount.startswith('/'):
    parser.error(f'--mount={f.mount!r} must be an absolute path in the container')
  if not args:
    parser.error('no arguments for python -m train; give them after --, e.g. -- '
                 '--config=configs/lm.py --workdir=/workdir/run')
  if not f.dry_run and f.image == PLACEHOLDER_IMAGE:
    parser.error('--image is the placeholder; give the image you built from this repository '
                 '(or pass --dry_run to see the manifest)')


def main(argv: Sequence[str] | None = None) -> int:
  parser = _Parser(prog='python -m launch.gke', description=__doc__.split('\n\n')[0],
                   usage='%(prog)s --image=IMAGE [--tpu=v5e --topology=4x4 ...] [--dry_run] '
                         '-- TRAIN_ARGS...')
  parser.add_argument('--name', default='kiln', help='The JobSet name (a DNS label).')
  parser.add_argument('--image', default=PLACEHOLDER_IMAGE,
                      help="A container of this repository with `pip install -e . 'jax[tpu]'`.")
  parser.add_argument('--tpu', default='v5e', help=f'TPU kind: {", ".join(ACCELERATORS)}.')
  parser.add_argument('--topology', default='4x4', help='Slice topology, e.g. 4x4 or 2x2x4.')
  parser.add_argument('--claim', default='kiln-filestore',
                      help='PersistentVolumeClaim of the shared workdir volume.')
  parser.add_argument('--mount', default='/workdir', help='Where that volume is mounted.')
  parser.add_argument('--max_restarts', type=int, default=3,
                      help='JobSet restarts after a failure or preemption.')
  parser.add_argument('--grace_s', type=int, default=300,
                      help='Seconds between SIGTERM and SIGKILL: time to save a checkpoint.')
  parser.add_argument('--dry_run', action='store_true',
                      help='Print the manifest instead of applying it.')
  parser.add_argument('args', nargs=argparse.REMAINDER, help='Arguments of python -m train.')
  argv = sys.argv[1:] if argv is None else list(argv)
  f = parser.parse_args(argv)
  args = f.args[1:] if f.args[:1] == ['--'] else f.args
  check_args(parser, f, args)
  manifest = to_yaml(render(name=f.name, image=f.image, tpu=f.tpu, topology=f.topology,
                            args=args, claim=f.claim, mount=f.mount,
                            max_restarts=f.max_restarts, grace_s=f.grace_s), argv)
  if f.dry_run:
    sys.stdout.write(manifest)
    return 0
  if shutil.which('kubectl') is None:
    print('Config error: kubectl is not on PATH; install it, or pass --dry_run and apply the '
          'manifest elsewhere.', file=sys.stderr)
    return 2
  return subprocess.run(['kubectl', 'apply', '-f', '-'], input=manifest, text=True).returncode


if __name__ == '__main__':
  sys.exit(main())
