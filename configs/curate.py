"""Data curation: raw text -> clean, deduplicated jsonl shards and a report.

Run (DirectRunner on all local cores):

  python -m data.curate --config=configs/curate.py --input='/data/raw/*.jsonl' --output=/data/clean

Any key can be overridden (`--config.language.languages="('en','de')"`,
`--config.near_dedup.enabled=False`); other flags go to Beam
(`--runner=DataflowRunner --project=... --region=... --temp_location=gs://...`).
Then tokenize for training:

  python -m data.tokenize --input=/data/clean --output=/data/tokens

Thresholds are the published defaults: Gopher (Rae et al. 2021, table A1),
C4 (TFDS c4_utils), FineWeb (Penedo et al. 2024), MinHash as FineWeb's
(14 bands x 8 rows of word 5-grams), language as FineWeb's (English, 0.65),
PII as Dolma's (more than 5 matches drops the document).
"""

import ml_collections

from data.curate import DEFAULT_TOXIC_WORDS


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  if preset:
    raise ValueError(f'configs/curate.py has no presets (got {preset!r}); override keys instead.')
  c = ml_collections.ConfigDict()
  c.input = ml_collections.ConfigDict(dict(
      text_field='text',  # jsonl/parquet field with the text; other fields become metadata
      max_doc_bytes=10_000_000,  # larger records are skipped (counted in the report)
  ))
  c.output = ml_collections.ConfigDict(dict(
      num_shards=16,  # each shard is sorted in memory by one worker: size it to fit
  ))
  c.report = ml_collections.ConfigDict(dict(examples=3))  # examples per stage in the report

  c.normalize = ml_collections.ConfigDict(dict(
      enabled=True, nfc=True, control_chars=True, whitespace=True))
  c.exact_dedup = ml_collections.ConfigDict(dict(enabled=True))
  c.near_dedup = ml_collections.ConfigDict(dict(
      enabled=True,
      bands=14,
      rows=8,  # bands * rows permutations; the pair threshold is about (1/bands)**(1/rows)
      ngram=5,  # shingles: word n-grams
      seed=1,
      batch_size=256,  # documents per vectorised signature batch
  ))
  c.language = ml_collections.ConfigDict(dict(
      enabled=True,
      languages=('en',),  # ISO 639-1 codes to keep; () keeps any language above the threshold
      threshold=0.65,
      max_chars=10_000,  # characters read per document (0: all)
  ))
  c.gopher_quality = ml_collections.ConfigDict(dict(
      enabled=True,
      min_words=50,
      max_words=100_000,
      min_mean_word_length=3.0,
      max_mean_word_length=10.0,
      max_symbol_word_ratio=0.1,  # '#' and '...' each, per word
      max_bullet_lines_ratio=0.9,
      max_ellipsis_lines_ratio=0.3,
      min_alpha_words_ratio=0.8,
      min_stop_words=2,
      stop_words=('the', 'be', 'to', 'of', 'and', 'that', 'have', 'with'),
  ))
  c.gopher_repetition = ml_collections.ConfigDict(dict(
      enabled=True,
      max_dup_line_frac=0.3,
      max_dup_paragraph_frac=0.3,
      max_dup_line_char_frac=0.2,
      max_dup_paragraph_char_frac=0.2,
      top_ngram_sizes=(2, 3, 4),
      max_top_ngram_char_frac=(0.20, 0.18, 0.16),
      dup_ngram_sizes=(5, 6, 7, 8, 9, 10),
      max_dup_ngram_char_frac=(0.15, 0.14, 0.13, 0.12, 0.11, 0.10),
  ))
  c.c4 = ml_collections.ConfigDict(dict(
      enabled=True,
      min_words_per_line=5,
      min_sentences=3,
      max_word_length=1000,
      remove_citations=True,
      filter_no_terminal_punct=True,
      filter_lorem_ipsum=True,
      filter_javascript=True,
      filter_curly_bracket=True,
      filter_policy=True,
  ))
  c.fineweb = ml_collections.ConfigDict(dict(
      enabled=True,
      min_line_punct_frac=0.12,  # dropped if at most this share of lines ends in punctuation
      max_short_line_frac=0.67,  # dropped if at least this share of lines is short
      short_line_chars=30,
      max_dup_line_char_frac=0.1,
  ))
  c.toxicity = ml_collections.ConfigDict(dict(
      enabled=True,
      word_list=DEFAULT_TOXIC_WORDS,
      max_hits=0,  # C4: one listed word drops the document
      classifier='',  # 'module:function', texts -> scores in [0, 1]; '' = none
      classifier_threshold=0.5,
      classifier_batch_size=64,
  ))
  c.pii = ml_collections.ConfigDict(dict(
      enabled=True,
      types=('email', 'ip', 'card', 'ssn', 'phone'),
      max_hits=5,
  ))
  c.perplexity = ml_collections.ConfigDict(dict(
      enabled=False,
      workdir='',  # a Kiln LM training run (python -m train --workdir=...)
      max_perplexity=1000.0,  # per token of that run's tokenizer; no published value fits all
      batch_size=16,
  ))
  c.decontamination = ml_collections.ConfigDict(dict(
      enabled=False,
      eval_files='',  # comma-separated globs of jsonl/parquet/text evaluation files
      ngram=13,  # GPT-3's 13-gram overlap
  ))
  return c
