"""Stages 2 and 3: exact and near-duplicate removal, as Beam transforms.

Both keep, of each group of duplicates, the document with the smallest id
(the first one read), so results do not depend on the runner or the order in
which workers see documents.

Exact: documents are grouped by a 128-bit BLAKE2 hash of their (normalised)
text.

Near (MinHash LSH, see minhash.py): signatures are computed in batches; each
document emits one (band, band key) bucket per band; a bucket with several
documents links each of them to its smallest id (a star keeps the bucket
connected with one edge per member). Clusters are the connected components of
all links, found by a union-find whose root is always the smallest id in its
component. Like datatrove, the union-find runs as one combine: its input is
one edge per duplicate, not per document, so it stays small next to the
corpus. The documents are then joined with the removal list by id.
"""

import hashlib

import apache_beam as beam
import ml_collections

from data.curate import minhash, report


class _KeepFirstOfGroup(report.CountingDoFn):
  """(hash, documents with that hash) -> the one with the smallest id."""

  def process(self, element):
    _, docs = element
    docs = sorted(docs, key=lambda d: d['id'])
    keeper = docs[0]
    size = _size(keeper['text'])
    self.stats.add(keeper['id'], size, size, None)
    for doc in docs[1:]:
      self.stats.add(doc['id'], _size(doc['text']), None,
                     'exact duplicate', f'(same as {report.doc_id(keeper["id"])}) {doc["text"]}')
    yield keeper


def _size(text: str) -> int:
  return len(text.encode('utf-8', errors='surrogatepass'))


def _content_hash(doc: dict) -> bytes:
  return hashlib.blake2b(doc['text'].encode('utf-8', errors='surrogatepass'),
                         digest_size=16).digest()


class ExactDedup(beam.PTransform):
  """documents -> (unique documents, counts)."""

  def __init__(self, max_examples: int):
    super().__init__()
    self.max_examples = max_examples

  def expand(self, docs):
    outputs = (docs
               | 'Hash' >> beam.Map(lambda d: (_content_hash(d), d))
               | 'Group' >> beam.GroupByKey()
               | 'KeepFirst' >> beam.ParDo(_KeepFirstOfGroup('exact_dedup', self.max_examples))
               .with_outputs(report.STATS, main='docs'))
    return outputs.docs, outputs[report.STATS]


# --- near duplicates --------------------------------------------------------------------


class _BucketKeys(beam.DoFn):
  """A batch of documents -> ((band, band key), id) for every band of each document."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg = cfg

  def setup(self):
    self.hasher = minhash.MinHasher(bands=self.cfg.bands, rows=self.cfg.rows,
                                    ngram=self.cfg.ngram, seed=self.cfg.seed)

  def process(self, docs):
    signatures, has_words = self.hasher.signatures([d['text'] for d in docs])
    keys_DxB = self.hasher.band_keys(signatures)
    for doc, keys, ok in zip(docs, keys_DxB.tolist(), has_words, strict=True):
      if ok:
        for band, key in enumerate(keys):
          yield (band, key), doc['id']


def _star_edges(element):
  """A bucket's members -> (member, smallest member) for each other member."""
  _, ids = element
  ids = sorted(ids)
  for other in ids[1:]:
    yield other, ids[0]


class UnionFind(beam.CombineFn):
  """Edges (a, b) -> {node: smallest node of its component} for every non-root node."""

  def create_accumulator(self) -> dict:
    return {}

  @staticmethod
  def _root(parent: dict, node):
    root = node
    while parent.get(root, root) != root:
      root = parent[root]
    while node != root:  # path compression
      parent[node], node = root, parent[node]
    return root

  def _union(self, parent: dict, a, b) -> None:
    ra, rb = self._root(parent, a), self._root(parent, b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)  # the root is the smallest id in the component
    parent.setdefault(min(ra, rb), min(ra, rb))

  def add_input(self, parent: dict, edge) -> dict:
    self._union(parent, *edge)
    return parent

  def merge_accumulators(self, accumulators) -> dict:
    accumulators = iter(accumulators)
    merged = next(accumulators)
    for other in accumulators:
      for node, parent in other.items():
        self._union(merged, node, parent)
    return merged

  def extract_output(self, parent: dict) -> dict:
    return {node: root for node in parent if (root := self._root(parent, node)) != node}


class _DropClustered(report.CountingDoFn):
  """(id, {'doc': [doc], 'keeper': [id of the cluster's first] or []}) -> kept documents."""

  def process(self, element):
    _, joined = element
    (doc,), keepers = joined['doc'], joined['keeper']
    size = _size(doc['text'])
    if keepers:
      self.stats.add(doc['id'], size, None, 'near duplicate',
                     f'(cluster of {report.doc_id(keepers[0])}) {doc["text"]}')
    else:
      self.stats.add(doc['id'], size, size, None)
      yield doc


class NearDedup(beam.PTransform):
  """documents -> (documents with one per near-duplicate cluster, counts)."""

  def __init__(self, cfg: ml_collections.ConfigDict, max_examples: int):
    super().__init__()
    self.cfg, self.max_examples = cfg, max_examples

  def expand(self, docs):
    drops = (docs
             | 'Batch' >> beam.BatchElements(min_batch_size=1,
                                             max_batch_size=self.cfg.batch_size)
             | 'Buckets' >> beam.ParDo(_BucketKeys(self.cfg))
             | 'GroupBuckets' >> beam.GroupByKey()
             | 'Edges' >> beam.FlatMap(_star_edges)
             | 'Clusters' >> beam.CombineGlobally(UnionFind())
             | 'Removals' >> beam.FlatMap(lambda roots: sorted(roots.items())))
    keyed = docs | 'ById' >> beam.Map(lambda d: (d['id'], d))
    outputs = ({'doc': keyed, 'keeper': drops}
               | 'Join' >> beam.CoGroupByKey()
               | 'Drop' >> beam.ParDo(_DropClustered('near_dedup', self.max_examples))
               .with_outputs(report.STATS, main='docs'))
    return outputs.docs, outputs[report.STATS]
