"""Curation benchmarks (numbers in docs/benchmarks.md, "Data curation").

  python -m data.curate.bench minhash [--max_mb=8]
  python -m data.curate.bench pipeline [--max_mb=16 --workers=1,2 --files=16]
  python -m data.curate.bench stages [--max_mb=4]

minhash: Kiln's MinHash (signatures + LSH bucketing + candidate pairs) against
datasketch's MinHash + MinHashLSH with the same permutations (14 bands x 8
rows) and the same shingles (lowercased word 5-grams), on the same documents,
in one process pinned to one core, alternating the two twice and keeping each
one's best time.

stages: each per-document stage alone, in this process, on every document
(no Beam), and MinHash signatures + band keys: where the time goes.

pipeline: the whole curation pipeline (configs/curate.py defaults) on the
DirectRunner with 1 and then 2 worker processes; MB/s is input text per
second of wall time, worker start-up included.

The corpus is real text shipped with Python and Kiln: the Python reference
manual's topics (pydoc_data), Tiny Shakespeare cut into ~2 KB scenes, then
standard-library modules until --max_mb. Nothing is downloaded.
"""

import json
import logging
import os
import pathlib
import pydoc_data.topics
import re
import resource
import tempfile
import time

from absl import app, flags

from data import sources

_SHAKESPEARE = (pathlib.Path(__file__).resolve().parents[3] / 'shared' / 'data'
                / 'tinyshakespeare.txt')


def corpus(max_bytes: float) -> list[str]:
  """Real documents, prose first, up to `max_bytes` of UTF-8."""
  docs = list(pydoc_data.topics.topics.values())
  if _SHAKESPEARE.exists():
    text = _SHAKESPEARE.read_text(encoding='utf-8')
    scenes, piece = [], []
    for block in text.split('\n\n'):
      piece.append(block)
      if sum(map(len, piece)) > 2000:
        scenes.append('\n\n'.join(piece))
        piece = []
    docs += scenes
  root = sources.stdlib_root()
  for rel in sources.stdlib_modules():
    try:
      docs.append(pathlib.Path(root, rel).read_text(encoding='utf-8'))
    except UnicodeDecodeError:
      continue
  out, total = [], 0
  for doc in docs:
    size = len(doc.encode('utf-8'))
    if total + size > max_bytes:
      break
    out.append(doc)
    total += size
  return out


def _pin_to_one_core() -> None:
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def kiln_minhash(texts: list[str]) -> set:
  import numpy as np

  from configs import curate
  from data.curate import minhash

  cfg = curate.get_config().near_dedup
  hasher = minhash.MinHasher(bands=cfg.bands, rows=cfg.rows, ngram=cfg.ngram, seed=cfg.seed)
  keys, kept = [], []
  for lo in range(0, len(texts), cfg.batch_size):
    sigs, has_words = hasher.signatures(texts[lo:lo + cfg.batch_size])
    keys.append(hasher.band_keys(sigs)[has_words])
    kept.append(np.flatnonzero(has_words) + lo)
  index = np.concatenate(kept)
  return {(int(index[a]), int(index[b]))
          for a, b in minhash.candidate_pairs(np.concatenate(keys)).tolist()}


def datasketch_minhash(texts: list[str]) -> set:
  from datasketch import MinHash, MinHashLSH

  from configs import curate

  cfg = curate.get_config().near_dedup
  num_perm = cfg.bands * cfg.rows
  lsh = MinHashLSH(num_perm=num_perm, params=(cfg.bands, cfg.rows))
  hashes = {}
  for i, text in enumerate(texts):
    w = re.findall(r'\w+', text.lower())
    if not w:
      continue
    n = min(cfg.ngram, len(w))
    shingles = {' '.join(w[j:j + n]).encode('utf-8') for j in range(len(w) - n + 1)}
    m = MinHash(num_perm=num_perm, seed=cfg.seed)
    m.update_batch(list(shingles))
    lsh.insert(i, m)
    hashes[i] = m
  pairs = set()
  for i, m in hashes.items():
    pairs.update((min(i, j), max(i, j)) for j in lsh.query(m) if j != i)
  return pairs


def bench_minhash(max_mb: float) -> None:
  _pin_to_one_core()
  texts = corpus(max_mb * 1e6)
  mb = sum(len(t.encode('utf-8')) for t in texts) / 1e6
  kiln_minhash(texts[:50])  # first call builds the word-character table; not a run
  best = {'kiln': float('inf'), 'datasketch': float('inf')}
  pairs = {}
  for _ in range(2):
    for name, fn in (('kiln', kiln_minhash), ('datasketch', datasketch_minhash)):
      start = time.perf_counter()
      pairs[name] = fn(texts)
      best[name] = min(best[name], time.perf_counter() - start)
  print(f'{len(texts):,} documents, {mb:.2f} MB, 14 bands x 8 rows, word 5-grams, one core')
  for name, seconds in best.items():
    print(f'{name:>10}: {seconds:7.2f} s  {len(texts) / seconds:9,.0f} docs/s  '
          f'{mb / seconds:6.2f} MB/s  {len(pairs[name]):,} candidate pairs')
  print(f'speed-up: {best["datasketch"] / best["kiln"]:.1f}x per core')
  # Both are randomised: judge their pairs by exact Jaccard similarity of the shingle sets.
  cfg_threshold = (1 / 14) ** (1 / 8)
  union = pairs['kiln'] | pairs['datasketch']
  similar = {p for p in union if _jaccard(texts[p[0]], texts[p[1]]) >= cfg_threshold}
  for name in best:
    print(f'{name:>10}: {len(pairs[name] & similar):,} of its {len(pairs[name]):,} pairs have '
          f'exact Jaccard >= {cfg_threshold:.2f}; it finds {len(pairs[name] & similar):,} of the '
          f'{len(similar):,} such pairs that either finds')


def _jaccard(a: str, b: str) -> float:
  sets = []
  for text in (a, b):
    w = re.findall(r'\w+', text.lower())
    n = min(5, len(w))
    sets.append({tuple(w[i:i + n]) for i in range(len(w) - n + 1)})
  return len(sets[0] & sets[1]) / len(sets[0] | sets[1])


def bench_pipeline(max_mb: float, workers: list[int], files: int) -> None:
  from configs import curate
  from data.curate import pipeline

  texts = corpus(max_mb * 1e6)
  with tempfile.TemporaryDirectory() as tmp:
    # Files are what workers read in parallel, as in any real corpus of many shards.
    for shard in range(files):
      with open(os.path.join(tmp, f'corpus-{shard:03d}.jsonl'), 'w', encoding='utf-8') as f:
        for text in texts[shard::files]:
          f.write(json.dumps({'text': text}) + '\n')
    path = os.path.join(tmp, 'corpus-*.jsonl')
    for n in workers:
      options = pipeline.pipeline_options(['--direct_running_mode=multi_processing',
                                           f'--direct_num_workers={n}'])
      load = os.getloadavg()[0]
      start, cpu_start = time.perf_counter(), _cpu_seconds()
      report = pipeline.run(curate.get_config(), path, os.path.join(tmp, f'out{n}'), options)
      seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
      mb = report['read']['bytes_in'] / 1e6
      print(f'{n} worker(s): {len(texts):,} documents, {mb:.2f} MB in {seconds:.1f} s: '
            f'{mb / seconds:.2f} MB/s; {cpu:.1f} CPU-s (driver and workers): '
            f'{mb / cpu:.2f} MB per CPU-s; load average {load:.1f} before; '
            f'{report["kept"]["docs"]:,} documents kept')
      for row in report['stages']:
        print(f'    {row["stage"]:<18} removed {row["docs_removed"]:>6,} docs '
              f'{row["bytes_removed"] / 1e6:8.2f} MB')


def bench_stages(max_mb: float) -> None:
  from configs import curate
  from data.curate import minhash, pipeline

  config = curate.get_config()
  texts = corpus(max_mb * 1e6)
  mb = sum(len(t.encode('utf-8')) for t in texts) / 1e6
  docs = [{'id': ('bench', i), 'text': t, 'metadata': {}} for i, t in enumerate(texts)]
  print(f'{len(texts):,} documents, {mb:.2f} MB; every stage sees every document')
  for name in ('normalize', 'language', 'gopher_quality', 'gopher_repetition', 'c4', 'fineweb',
               'toxicity', 'pii'):
    stage = pipeline.make_stage(name, config)
    stage.setup()
    start = time.perf_counter()
    for doc in docs:
      stage.process_batch([doc])
    seconds = time.perf_counter() - start
    print(f'{name:>18}: {seconds:6.2f} s  {mb / seconds:6.2f} MB/s')
  cfg = config.near_dedup
  hasher = minhash.MinHasher(bands=cfg.bands, rows=cfg.rows, ngram=cfg.ngram, seed=cfg.seed)
  start = time.perf_counter()
  for lo in range(0, len(texts), cfg.batch_size):
    hasher.band_keys(hasher.signatures(texts[lo:lo + cfg.batch_size])[0])
  seconds = time.perf_counter() - start
  print(f'{"minhash":>18}: {seconds:6.2f} s  {mb / seconds:6.2f} MB/s')


def _cpu_seconds() -> float:
  """User + system CPU time of this process and of its finished children (the workers)."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
      resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv):
  logging.getLogger('apache_beam').setLevel(logging.WARNING)
  if len(argv) != 2 or argv[1] not in ('minhash', 'pipeline', 'stages'):
    raise app.UsageError('Usage: python -m data.curate.bench minhash|pipeline|stages [--max_mb=N]')
  if argv[1] == 'minhash':
    bench_minhash(flags.FLAGS.max_mb or 8)
  elif argv[1] == 'stages':
    bench_stages(flags.FLAGS.max_mb or 4)
  else:
    bench_pipeline(flags.FLAGS.max_mb or 16, [int(w) for w in flags.FLAGS.workers],
                   flags.FLAGS.files)


def _define_flags() -> None:
  """The command-line flags, defined only when this module runs as a program, so that
  importing its functions never clashes with another program's flags."""
  flags.DEFINE_float('max_mb', None, 'Corpus MB (minhash 8, pipeline 16, stages 4).')
  flags.DEFINE_list('workers', ['1', '2'], 'Worker processes for the pipeline runs.')
  flags.DEFINE_integer('files', 16, 'Input files the pipeline benchmark writes.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
