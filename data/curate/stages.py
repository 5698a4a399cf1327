"""The per-document stages, and the DoFn that runs any of them inside Beam.

A stage looks at one document (or a batch, for model-backed stages) and
returns a `Verdict`: the document to keep (possibly edited, possibly with new
metadata) or None, and why it was removed or edited. Stages are plain Python
objects, so tests run them without Beam; heavy state (a language model, the
word-list regex) is built in `setup`, once per worker.

The dedup stages need every document at once and live in `dedup.py`.
"""

import functools
import types
from collections.abc import Sequence
from typing import NamedTuple

import apache_beam as beam
import ml_collections
import numpy as np

from data.curate import normalize, pii, quality, report, toxicity, words


class Verdict(NamedTuple):
  doc: dict | None  # None: removed
  reason: str | None = None  # why removed, or 'edited: ...' when kept but changed
  excerpt: str | None = None  # what the report shows (default: the removed text)



class Stage:
  """A per-document stage; subclasses set `name` and implement `process`."""

  name = ''
  batch_size = 1  # > 1: `process_batch` gets lists of up to this many documents

  def setup(self) -> None:
    """Builds what is expensive or unpicklable; runs once per worker before any document."""

  def process(self, doc: dict, *side_inputs) -> Verdict:
    raise NotImplementedError

  def process_batch(self, docs: Sequence[dict], *side_inputs) -> list[Verdict]:
    return [self.process(doc, *side_inputs) for doc in docs]


def plain(cfg: ml_collections.ConfigDict) -> types.SimpleNamespace:
  """The config block as a plain namespace: rules read it per line, and ConfigDict is slow."""
  return types.SimpleNamespace(**cfg.to_dict())


def _with_text(doc: dict, text: str) -> dict:
  return {**doc, 'text': text}


def _with_metadata(doc: dict, **fields) -> dict:
  return {**doc, 'metadata': {**doc['metadata'], **fields}}


class Normalize(Stage):
  name = 'normalize'

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.normalizer = normalize.Normalizer(cfg)

  def process(self, doc):
    text = self.normalizer(doc['text'])
    if not text:
      return Verdict(None, 'empty after normalisation')
    if text == doc['text']:
      return Verdict(doc)
    return Verdict(_with_text(doc, text), 'edited: normalised')


class Language(Stage):
  """Keeps documents whose most likely language is in `languages` with at least `threshold`.

  py3langid's model ships inside the package (97 languages, no download); it
  reads the first `max_chars` characters (0: all), because it walks the text
  byte by byte in Python. The language and its probability join the metadata.
  """

  name = 'language'

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.languages = tuple(cfg.languages)
    self.threshold = cfg.threshold
    self.max_chars = cfg.max_chars

  def setup(self):
    self.identifier = language_identifier()

  def process(self, doc):
    text = doc['text'][:self.max_chars] if self.max_chars else doc['text']
    language, probability = self.identifier.classify(text)
    if self.languages and language not in self.languages:
      return Verdict(None, f'language {language}')
    if probability < self.threshold:
      return Verdict(None, f'language probability below {self.threshold}')
    return Verdict(_with_metadata(doc, language=language, language_score=round(probability, 4)))


@functools.cache
def language_identifier():
  """py3langid's model with probabilities, loaded once per process (it takes a second)."""
  from py3langid.langid import MODEL_FILE, LanguageIdentifier
  return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class Rule(Stage):
  """A quality rule family from `quality`: text -> reason or None."""

  def __init__(self, name: str, cfg: ml_collections.ConfigDict):
    self.name, self.cfg = name, plain(cfg)
    self.rule = {'gopher_quality': quality.gopher_quality,
                 'gopher_repetition': quality.gopher_repetition,
                 'fineweb': quality.fineweb}[name]

  def process(self, doc):
    reason = self.rule(doc['text'], self.cfg)
    return Verdict(None if reason else doc, reason)


class C4(Stage):
  name = 'c4'

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg = plain(cfg)

  def process(self, doc):
    text, reason = quality.c4(doc['text'], self.cfg)
    if text is None:
      return Verdict(None, reason)
    if text == doc['text']:
      return Verdict(doc)
    kept = set(text.split('\n'))
    removed = '\n'.join(line for line in doc['text'].split('\n') if line.strip() not in kept)
    return Verdict(_with_text(doc, text), 'edited: lines removed', removed)


class Toxicity(Stage):
  name = 'toxicity'

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg = cfg
    # Read now, on the driver, so a missing list fails before the pipeline starts.
    self.entries = toxicity.read_word_list(cfg.word_list)
    self.batch_size = cfg.classifier_batch_size if cfg.classifier else 1

  def setup(self):
    self.word_filter = toxicity.WordListFilter(self.entries)
    self.classifier = toxicity.load_classifier(self.cfg.classifier) if self.cfg.classifier else None

  def process_batch(self, docs):
    scores = [None] * len(docs)
    if self.classifier is not None:
      scores = [float(s) for s in self.classifier([d['text'] for d in docs])]
      if len(scores) != len(docs):
        raise ValueError(f'toxicity.classifier={self.cfg.classifier!r} returned {len(scores)} '
                         f'scores for {len(docs)} texts.')
    verdicts = []
    for doc, score in zip(docs, scores, strict=True):
      if self.word_filter.hits(doc['text']) > self.cfg.max_hits:
        verdicts.append(Verdict(None, f'more than {self.cfg.max_hits} listed words'))
      elif score is not None and score >= self.cfg.classifier_threshold:
        verdicts.append(Verdict(None, f'classifier score at least {self.cfg.classifier_threshold}'))
      else:
        verdicts.append(Verdict(doc))
    return verdicts


class PII(Stage):
  name = 'pii'

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.types, self.max_hits = tuple(cfg.types), cfg.max_hits

  def process(self, doc):
    text, matches = pii.scrub(doc['text'], self.types)
    if len(matches) > self.max_hits:
      return Verdict(None, f'more than {self.max_hits} PII matches', text)
    if not matches:
      return Verdict(doc)
    return Verdict(_with_text(doc, text), 'edited: PII replaced', text)


class Perplexity(Stage):
  """Drops documents whose perplexity under a Kiln LM checkpoint exceeds `max_perplexity`.

  The model is read from the run directory by model.scoring (the parameters
  only, on one device, no trainer); documents are scored in batches.
  """

  name = 'perplexity'

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.workdir, self.max_perplexity = cfg.workdir, cfg.max_perplexity
    self.batch_size = cfg.batch_size

  def setup(self):
    from model import scoring  # JAX and the model: only on the workers that score
    self.score = scoring.load_scorer(self.workdir)

  def process_batch(self, docs):
    nll = self.score([d['text'] for d in docs])
    verdicts = []
    for doc, doc_nll in zip(docs, nll, strict=True):
      if np.isnan(doc_nll):  # a one-token document: nothing to judge it by
        verdicts.append(Verdict(doc))
        continue
      perplexity = float(np.exp(min(doc_nll, 80.0)))
      if perplexity > self.max_perplexity:
        verdicts.append(Verdict(None, f'perplexity above {self.max_perplexity}'))
      else:
        verdicts.append(Verdict(_with_metadata(doc, perplexity=round(perplexity, 3))))
    return verdicts


class Decontaminate(Stage):
  """Drops documents that share a word n-gram with the evaluation files.

  The evaluation n-grams (sorted uint64 hashes) arrive as a side input.
  """

  name = 'decontamination'

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.n = cfg.ngram

  def process(self, doc, eval_ngrams: np.ndarray):
    word_hashes, _ = words.words(doc['text'])
    grams = words.ngrams(word_hashes, self.n)
    if len(grams) and len(eval_ngrams):
      hits = np.isin(grams, eval_ngrams, assume_unique=False)
      if hits.any():
        return Verdict(None, f'shares a {self.n}-gram with the evaluation files')
    return Verdict(doc)


def eval_ngrams(texts: Sequence[str], n: int) -> np.ndarray:
  """Sorted unique uint64 hashes of the word n-grams of `texts`.

  A text of fewer than n words has none: no n-gram of a document can match it
  (GPT-3's decontamination skips such examples too).
  """
  grams = [words.ngrams(words.words(text)[0], n) for text in texts]
  return np.unique(np.concatenate(grams)) if grams else np.zeros(0, np.uint64)


# --- running a stage in Beam ------------------------------------------------------------


class StageDoFn(report.CountingDoFn):
  """Runs one stage: kept documents to the main output, counts to report.STATS."""

  def __init__(self, stage: Stage, max_examples: int):
    super().__init__(stage.name, max_examples)
    self.stage = stage

  def setup(self):
    self.stage.setup()

  def process(self, element, *side_inputs):
    docs = element if self.stage.batch_size > 1 else [element]
    for doc, verdict in zip(docs, self.stage.process_batch(docs, *side_inputs), strict=True):
      yield from self._count(doc, verdict)

  def _count(self, doc: dict, verdict: Verdict):
    bytes_in = _size(doc['text'])
    out = verdict.doc
    bytes_out = None if out is None else (bytes_in if out['text'] is doc['text']
                                          else _size(out['text']))
    excerpt = verdict.excerpt if verdict.excerpt is not None else doc['text']
    self.stats.add(doc['id'], bytes_in, bytes_out, verdict.reason, excerpt)
    if out is not None:
      yield out


def _size(text: str) -> int:
  return len(text.encode('utf-8', errors='surrogatepass'))


def run_stage(docs: beam.PCollection, stage: Stage, max_examples: int,
              side_inputs: Sequence = ()) -> tuple[beam.PCollection, beam.PCollection]:
  """(kept documents, (name, StageStats) counts) of `stage` applied to `docs`."""
  if stage.batch_size > 1:
    docs = docs | f'Batch {stage.name}' >> beam.BatchElements(
        min_batch_size=1, max_batch_size=stage.batch_size)
  outputs = docs | stage.name >> beam.ParDo(
      StageDoFn(stage, max_examples), *side_inputs).with_outputs(report.STATS, main='docs')
  return outputs.docs, outputs[report.STATS]
