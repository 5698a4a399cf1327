"""The Beam curation pipeline end to end, on a small corpus of real and crafted documents.

Oracles: documents planted with a known fate (an exact and a near duplicate,
French, a listed word, an e-mail address, broken records) checked against the
stage that must remove or edit them; a run on the in-memory runner against a
run of the command line on worker processes (byte-identical output); the
union-find against breadth-first search; every good record against the
output of a run with every stage switched off.
"""

import gzip
import json
import os
import pathlib
import pydoc_data.topics
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import curate
from data.curate import dedup, minhash, pipeline, write
from data.errors import ConfigError, DataError

REPO = pathlib.Path(__file__).resolve().parents[1]

# Hand-written English paragraphs that pass every filter; each is planted with one twist.
CLEAN = {
    'river': 'The river runs past the old mill and the village green on its way to the sea.\n'
             'Every spring the farmers walk along the bank and check the fences by the water.\n'
             'In summer the children swim near the bridge while their parents sit in the shade.\n'
             'When autumn comes, the leaves fall into the stream and drift toward the town.\n'
             'The winter is quiet, and only the water breaks the silence of the frozen fields.',
    'kitchen': 'My grandmother kept a small kitchen with a blue door and a window on the yard.\n'
               'She baked bread every morning and gave the first loaf to the neighbours.\n'
               'The smell of yeast and butter filled the stairs before anyone was awake.\n'
               'On Sundays she made a pie with apples from the tree behind the shed.\n'
               'We ate it warm at the long table and argued about the news of the week.',
    'station': 'The train station was built in stone more than a hundred years ago.\n'
               'Its clock has stopped twice, and both times the town paid to have it mended.\n'
               'Travellers wait on wooden benches that have been painted green many times.\n'
               'The station master knows most of them by name and asks about their families.\n'
               'At night the last train leaves at ten, and the lamps are put out soon after.',
    'garden': 'Our garden is small, but it gets the sun for most of the afternoon.\n'
              'We grow beans and tomatoes along the fence and herbs in pots by the door.\n'
              'A pair of robins nests in the hedge every year and watches us dig.\n'
              'In dry weeks we carry water from the rain barrel with an old tin can.\n'
              'By the end of the summer there is more food than the two of us can eat.',
}
FRENCH = ('Le renard brun rapide saute par-dessus le chien paresseux pendant que les enfants '
          'jouent dans le jardin. ' * 3)


def in_memory(cfg, input_glob: str, output: pathlib.Path) -> dict:
  options = pipeline.pipeline_options(['--direct_running_mode=in_memory',
                                       '--direct_num_workers=1'])
  return pipeline.run(cfg, input_glob, str(output), options)


def read_output(output: pathlib.Path) -> dict[str, dict]:
  docs = {}
  for shard in sorted(output.glob('docs-*.jsonl')):
    for line in shard.read_text(encoding='utf-8').splitlines():
      record = json.loads(line)
      docs[record['id']] = record
  return docs


def all_off(cfg):
  for name in pipeline.STAGES:
    cfg[name].enabled = False
  return cfg


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> pathlib.Path:
  d = tmp_path_factory.mktemp('raw')
  topics = list(pydoc_data.topics.topics.values())[:40]
  near = CLEAN['station'].replace('hundred', 'thousand')
  lines = [json.dumps({'text': t, 'topic': i}) for i, t in enumerate(topics)]
  lines += [json.dumps({'text': CLEAN['river'], 'source': 'crafted'}),
            json.dumps({'text': CLEAN['station']}),
            '{"text": "an unterminated string',  # malformed JSON
            json.dumps({'text': '   \n  '}),  # empty document
            json.dumps({'title': 'no text field'}),
            '',  # a blank line is not a record
            json.dumps({'text': 'x ' * 60_000})]  # larger than max_doc_bytes (100,000)
  (d / 'a.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  with open(d / 'b.jsonl', 'wb') as f:
    f.write(b'{"text": "caf\xe9 au lait"}\n')  # Latin-1 byte: not UTF-8
    f.write(json.dumps({'text': CLEAN['river']}).encode() + b'\n')  # exact duplicate
    f.write(json.dumps({'text': near}).encode() + b'\n')  # near duplicate
    f.write(json.dumps({'text': FRENCH}).encode() + b'\n')
  with gzip.open(d / 'c.jsonl.gz', 'wt', encoding='utf-8') as f:
    f.write(json.dumps({'text': CLEAN['kitchen'] + '\nPlease write to jane.doe@example.com '
                                                   'about it today.'}) + '\n')
    f.write(json.dumps({'text': CLEAN['garden'] + '\nThis porn line should go.'}) + '\n')
  pq.write_table(pa.table({'text': [topics[0] + ' (parquet copy)', None], 'row': [1, 2]}),
                 d / 'd.parquet')
  (d / 'e.txt').write_text(topics[1] + '\nA plain text file.', encoding='utf-8')
  (d / 'f.txt').write_bytes(b'\xff\xfe not utf-8')
  return d


def corpus_config():
  cfg = curate.get_config()
  cfg.input.max_doc_bytes = 100_000
  cfg.output.num_shards = 3
  return cfg


@pytest.fixture(scope='module')
def curated(corpus, tmp_path_factory) -> tuple[pathlib.Path, dict]:
  out = tmp_path_factory.mktemp('curated') / 'out'
  return out, in_memory(corpus_config(), str(corpus / '*'), out)


def test_planted_documents_meet_their_stages(corpus, curated):
  out, report = curated
  docs = read_output(out)
  by_text = {d['text']: d for d in docs.values()}
  stages = {s['stage']: s for s in report['stages']}
  a, b, c = (str(corpus / name) for name in ('a.jsonl', 'b.jsonl', 'c.jsonl.gz'))

  assert {r: v['docs'] for r, v in report['read']['reasons'].items()} == {
      'malformed JSON': 1, 'empty document': 1, "no string field 'text'": 2,
      'larger than input.max_doc_bytes=100000': 1, 'bytes that are not UTF-8': 2}

  river = by_text[CLEAN['river']]
  assert river['id'] == f'{a}:41' and river['metadata']['source'] == 'crafted'
  assert river['metadata']['language'] == 'en'
  assert f'{b}:2' not in docs  # the later copy
  assert stages['exact_dedup']['reasons']['exact duplicate']['docs'] == 1

  assert f'{a}:42' in docs and f'{b}:3' not in docs
  assert stages['near_dedup']['reasons']['near duplicate']['docs'] >= 1

  assert stages['language']['reasons']['language fr']['docs'] == 1
  assert f'{b}:4' not in docs

  kitchen = docs[f'{c}:1']
  assert kitchen['text'].endswith('Please write to <EMAIL_ADDRESS> about it today.')
  assert stages['pii']['reasons']['edited: PII replaced']['docs'] >= 1
  assert f'{c}:2' not in docs
  assert stages['toxicity']['reasons']['more than 0 listed words']['docs'] == 1
  assert 'jane.doe' not in json.dumps(report)

  # The counts chain: what leaves a stage enters the next, and the last is the output.
  rows = [report['read']] + report['stages']
  for before, after in zip(rows, rows[1:], strict=False):
    assert (after['docs_in'], after['bytes_in']) == (before['docs_out'], before['bytes_out'])
  assert report['kept']['docs'] == len(docs)
  assert report['kept']['bytes'] == sum(len(d['text'].encode()) for d in docs.values())
  for row in rows:
    assert row['docs_removed'] == sum(v['docs'] for r, v in row['reasons'].items()
                                      if not r.startswith('edited'))
    assert len(row['examples']) <= 3
  assert sorted(p.name for p in out.glob('docs-*')) == [write.shard_name(i, 3) for i in range(3)]


def test_command_line_on_worker_processes_writes_identical_output(corpus, curated, tmp_path):
  out, report = curated
  cli_out = tmp_path / 'cli'
  proc = subprocess.run(
      [sys.executable, '-m', 'data.curate', '--config=configs/curate.py',
       f'--input={corpus}/*', f'--output={cli_out}', '--config.input.max_doc_bytes=100000',
       '--config.output.num_shards=3', '--direct_num_workers=2'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'curate: ' in proc.stderr and 'MB/s' in proc.stderr  # the progress line
  assert 'near_dedup' in proc.stdout and 'Kept' in proc.stdout  # the table
  for shard in sorted(out.glob('docs-*.jsonl')):
    assert (cli_out / shard.name).read_bytes() == shard.read_bytes(), shard.name
  cli_report = json.loads((cli_out / 'report.json').read_text())
  assert {**cli_report, 'output': None} == {**report, 'output': None}


def test_no_good_record_is_lost(corpus, tmp_path):
  report = in_memory(all_off(corpus_config()), str(corpus / '*'), tmp_path / 'out')
  docs = read_output(tmp_path / 'out')
  expected = set()
  for name in ('a.jsonl', 'b.jsonl'):
    with open(corpus / name, 'rb') as f:
      for number, line in enumerate(f, start=1):
        try:
          record = json.loads(line.decode('utf-8'))
        except ValueError:
          continue
        text = record.get('text')
        if isinstance(text, str) and text.strip() and len(line) <= 100_000:
          expected.add(f'{corpus / name}:{number}')
  expected |= {f'{corpus / "c.jsonl.gz"}:1', f'{corpus / "c.jsonl.gz"}:2',
               f'{corpus / "d.parquet"}:1', f'{corpus / "e.txt"}:1'}
  assert set(docs) == expected
  assert docs[f'{corpus / "d.parquet"}:1']['metadata'] == {'row': 1}
  assert report['stages'] == []


def test_near_duplicate_clusters_are_transitive(tmp_path):
  """A chain of small edits: A~B~C~D~E, all one cluster, although A and E are not flagged."""
  rng = np.random.default_rng(0)
  base = list(pydoc_data.topics.topics.values())[5].split()[:200]
  chain = [base]
  for _ in range(4):
    edited = list(chain[-1])
    for i in rng.choice(len(edited), 3, replace=False):
      edited[i] = f'zq{rng.integers(10**9)}'
    chain.append(edited)
  texts = [' '.join(t) for t in chain]
  cfg = curate.get_config().near_dedup
  h = minhash.MinHasher(bands=cfg.bands, rows=cfg.rows, ngram=cfg.ngram, seed=cfg.seed)
  pairs = {tuple(p) for p in minhash.candidate_pairs(h.band_keys(h.signatures(texts)[0]))}
  assert (0, 4) not in pairs and {(0, 1), (1, 2), (2, 3), (3, 4)} & pairs  # the premise
  path = tmp_path / 'chain.jsonl'
  path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
  config = all_off(curate.get_config())
  config.near_dedup.enabled = True
  report = in_memory(config, str(path), tmp_path / 'out')
  assert list(read_output(tmp_path / 'out')) == [f'{path}:1']  # the first of the cluster
  assert report['stages'][0]['reasons']['near duplicate']['docs'] == 4


def test_union_find_against_breadth_first_search():
  rng = np.random.default_rng(0)
  edges = [tuple(int(v) for v in rng.integers(0, 60, 2)) for _ in range(50)]
  uf = dedup.UnionFind()
  parts = [uf.create_accumulator() for _ in range(3)]
  for i, edge in enumerate(edges):  # three workers' partial results, then merged
    uf.add_input(parts[i % 3], edge)
  roots = uf.extract_output(uf.merge_accumulators(parts))
  neighbours = {}
  for a, b in edges:
    neighbours.setdefault(a, set()).add(b)
    neighbours.setdefault(b, set()).add(a)
  expected, seen = {}, set()
  for start in sorted(neighbours):
    if start in seen:
      continue
    component, frontier = {start}, [start]
    while frontier:
      for n in neighbours[frontier.pop()] - component:
        component.add(n)
        frontier.append(n)
    seen |= component
    expected.update({n: min(component) for n in component if n != min(component)})
  assert roots == expected


def test_decontamination_removes_documents_sharing_a_13_gram(tmp_path):
  words = CLEAN['river'].split()
  eval_file = tmp_path / 'eval.jsonl'
  # The benchmark quotes 13 words of 'river' (other case, other punctuation) and 12 of 'kitchen'.
  eval_file.write_text(json.dumps({'text': 'Q: ' + ' '.join(words[3:16]).upper() + '?'}) + '\n' +
                       json.dumps({'text': ' '.join(CLEAN['kitchen'].split()[:12])}) + '\n')
  path = tmp_path / 'docs.jsonl'
  path.write_text(''.join(json.dumps({'text': CLEAN[k]}) + '\n' for k in ('river', 'kitchen')))
  config = all_off(curate.get_config())
  config.decontamination.update(enabled=True, eval_files=str(eval_file))
  report = in_memory(config, str(path), tmp_path / 'out')
  assert list(read_output(tmp_path / 'out')) == [f'{path}:2']
  assert report['stages'][0]['reasons'] == {
      'shares a 13-gram with the evaluation files': {'docs': 1,
                                                     'bytes': len(CLEAN['river'].encode())}}


def test_bad_config_and_paths_fail_before_running(corpus, tmp_path):
  def fails(error, match, config=None, input_glob=str(corpus / '*.jsonl'), out=tmp_path / 'o'):
    with pytest.raises(error, match=match):
      in_memory(config or curate.get_config(), input_glob, out)
  cfg = curate.get_config()
  cfg.language.languages = ('en', 'xx')
  fails(ConfigError, r"language.languages has \['xx'\]", cfg)
  cfg = curate.get_config()
  cfg.gopher_repetition.max_dup_ngram_char_frac = (0.1, 0.1)
  fails(ConfigError, 'must have the same length', cfg)
  cfg = curate.get_config()
  cfg.decontamination.enabled = True
  fails(ConfigError, 'needs decontamination.eval_files', cfg)
  cfg = curate.get_config()
  cfg.perplexity.update(enabled=True, workdir=str(tmp_path))
  fails(ConfigError, 'is not the workdir of a training run', cfg)
  fails(DataError, 'No files match', input_glob=str(tmp_path / 'nothing*.jsonl'))
  os.makedirs(tmp_path / 'used')
  (tmp_path / 'used' / write.REPORT_FILE).write_text('{}')
  fails(DataError, 'already holds curated shards', out=tmp_path / 'used')
  with pytest.raises(DataError, match='Unknown flags: --runer'):
    pipeline.pipeline_options(['--runer=DataflowRunner'])


def test_beam_counters_match_the_report(corpus, tmp_path):
  """The counters a cluster runner shows while running equal the report's numbers."""
  options = pipeline.pipeline_options(['--direct_running_mode=in_memory',
                                       '--direct_num_workers=1'])
  p = pipeline.make_pipeline(options)
  os.makedirs(tmp_path / 'out')
  pipeline.build(p, corpus_config(), pipeline.expand_inputs(str(corpus / '*')),
                 str(tmp_path / 'out'), input_pattern='raw')
  result = p.run()
  result.wait_until_finish()
  counters = {c.key.metric.name: c.committed for c in result.metrics().query()['counters']
              if c.key.metric.namespace == 'kiln_curate'}
  report = json.loads((tmp_path / 'out' / write.REPORT_FILE).read_text())
  for row in [report['read']] + report['stages']:
    for field in ('docs_in', 'bytes_in', 'docs_out', 'bytes_out'):
      assert counters[f'{row["stage"]}_{field}'] == row[field], (row['stage'], field)
