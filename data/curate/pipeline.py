"""The curation pipeline: read -> stages in order -> sorted shards + report.

`run` checks the config and the paths on the driver (so mistakes fail before
any worker starts), builds the Beam graph and runs it on the runner that the
pipeline options name. The same graph runs on the DirectRunner and on
Dataflow, Flink or Spark.
"""

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

import apache_beam as beam
import ml_collections
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
  DirectOptions,
  PipelineOptions,
  StandardOptions,
  WorkerOptions,
)

from data.curate import dedup, normalize, pii, progress, read, report, stages, toxicity, write
from data.errors import ConfigError, DataError, check_positive, get, require

# Pipeline order. Stages that are switched off are skipped (and absent from the report).
STAGES = ('normalize', 'exact_dedup', 'near_dedup', 'language', 'gopher_quality',
          'gopher_repetition', 'c4', 'fineweb', 'toxicity', 'pii', 'perplexity',
          'decontamination')


def enabled_stages(config: ml_collections.ConfigDict) -> list[str]:
  return [name for name in STAGES if config[name].enabled]


def expand_inputs(patterns: str) -> list[str]:
  """The sorted files matched by comma-separated globs (local or any Beam filesystem)."""
  files = []
  for pattern in [p.strip() for p in patterns.split(',') if p.strip()]:
    try:
      matched = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except Exception as e:  # Beam wraps every filesystem's error in its own type
      raise DataError(f'Cannot list input {pattern!r} ({e}).') from None
    matched = [p for p in matched if not os.path.isdir(p)]
    if not matched:
      raise DataError(f'No files match {pattern!r}; check the path or glob (e.g. '
                      f"--input='/data/*.jsonl').")
    files += matched
  if not files:
    raise DataError('No input given; pass --input=GLOB.')
  return sorted(set(files))


def check_output(output_dir: str, overwrite: bool = False) -> None:
  """A directory for this run's shards alone: not a file, and empty unless `overwrite`,
  which deletes an earlier run's shards and report there (and nothing else)."""
  # In an object store (gs://, s3://) a directory is a prefix: only a file "exists".
  remote_file = '://' in output_dir and FileSystems.exists(output_dir.rstrip('/'))
  if os.path.isfile(output_dir) or remote_file:
    raise DataError(f'--output={output_dir} is a file; give a directory.')
  if not FileSystems.exists(output_dir):
    FileSystems.mkdirs(output_dir)
    return
  old = [m.path for m in FileSystems.match([FileSystems.join(output_dir, 'docs-*.jsonl')])[0]
         .metadata_list]
  report_file = FileSystems.join(output_dir, write.REPORT_FILE)
  old += [report_file] if FileSystems.exists(report_file) else []
  if overwrite:
    if old:
      FileSystems.delete(old)
    return
  if old:
    raise DataError(f'--output={output_dir} already holds curated shards or a report; give a '
                    'new directory, or pass --overwrite to replace them.')
  other = sorted(os.path.basename(m.path.rstrip('/')) for m in
                 FileSystems.match([FileSystems.join(output_dir, '*')])[0].metadata_list)
  if other:
    shown = ', '.join(other[:3]) + (', ...' if len(other) > 3 else '')
    raise DataError(f'--output={output_dir} already holds other files ({shown}); give a new or '
                    'empty directory, or pass --overwrite to write beside them.')


def make_stage(name: str, config: ml_collections.ConfigDict) -> stages.Stage:
  cfg = config[name]
  if name == 'normalize':
    return stages.Normalize(cfg)
  if name == 'language':
    return stages.Language(cfg)
  if name in ('gopher_quality', 'gopher_repetition', 'fineweb'):
    return stages.Rule(name, cfg)
  if name == 'c4':
    return stages.C4(cfg)
  if name == 'toxicity':
    return stages.Toxicity(cfg)
  if name == 'pii':
    return stages.PII(cfg)
  if name == 'perplexity':
    return stages.Perplexity(cfg)
  raise ValueError(f'{name} is not a per-document stage.')


class _EvalNgrams(beam.CombineFn):
  """Evaluation texts -> sorted unique uint64 hashes of their word n-grams."""

  def __init__(self, n: int, normalize_cfg: ml_collections.ConfigDict):
    # Evaluation texts are normalised as the corpus is, so that both spell words alike.
    self.n = n
    self.normalizer = normalize.Normalizer(normalize_cfg) if normalize_cfg.enabled else None

  def create_accumulator(self):
    return np.zeros(0, np.uint64)

  def add_input(self, acc, text):
    if self.normalizer:
      text = self.normalizer(text)
    return np.union1d(acc, stages.eval_ngrams([text], self.n))

  def merge_accumulators(self, accumulators):
    return np.unique(np.concatenate(list(accumulators)))

  def extract_output(self, acc):
    return acc


def build(p: beam.Pipeline, config: ml_collections.ConfigDict, files: Sequence[str],
          output_dir: str, *, input_pattern: str, eval_files: Sequence[str] = (),
          progress_dir: str | None = None) -> None:
  """Adds the whole curation pipeline to `p`."""
  k = config.report.examples
  read_out = (p | 'Files' >> beam.Create(list(files))
              | 'SpreadFiles' >> beam.Reshuffle()
              | 'Read' >> beam.ParDo(read.ReadFile(config.input, k, progress_dir))
              .with_outputs(report.STATS, main='docs'))
  docs, counts = read_out.docs, [read_out[report.STATS]]
  names = enabled_stages(config)
  for name in names:
    if name == 'exact_dedup':
      docs, stage_counts = docs | name >> dedup.ExactDedup(k)
    elif name == 'near_dedup':
      docs, stage_counts = docs | name >> dedup.NearDedup(config.near_dedup, k)
    elif name == 'decontamination':
      eval_texts = (p | 'EvalFiles' >> beam.Create(list(eval_files))
                    | 'ReadEval' >> beam.ParDo(read.ReadFile(config.input, 0)).with_outputs(
                        report.STATS, main='docs')).docs
      ngrams = eval_texts | 'EvalNgrams' >> beam.Map(lambda d: d['text']) | beam.CombineGlobally(
          _EvalNgrams(config.decontamination.ngram, config.normalize))
      docs, stage_counts = stages.run_stage(docs, stages.Decontaminate(config.decontamination), k,
                                            [beam.pvalue.AsSingleton(ngrams)])
    else:
      docs, stage_counts = stages.run_stage(docs, make_stage(name, config), k)
    counts.append(stage_counts)

  _ = docs | 'WriteShards' >> write.WriteShards(output_dir, config.output.num_shards,
                                                progress_dir)
  _ = (counts
       | 'AllCounts' >> beam.Flatten()
       | 'MergeCounts' >> beam.CombineGlobally(report.MergeStats())
       | 'WriteReport' >> beam.Map(_write_report, names, input_pattern, output_dir))


def _write_report(stats: dict, names: list[str], input_pattern: str, output_dir: str) -> None:
  full = report.build_report(stats, names, input_pattern=input_pattern, output_dir=output_dir)
  write.write_atomic(FileSystems.join(output_dir, write.REPORT_FILE),
                     report.dumps(full).encode('utf-8', errors='surrogatepass'))


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
  """Beam options from flags; on the DirectRunner, all local cores by default.

  Raises DataError for flags no Beam runner knows (a typo would otherwise be
  ignored with a warning, and the run would go to the wrong place).
  """
  options = PipelineOptions(list(beam_args))
  usage = io.StringIO()
  try:
    with contextlib.redirect_stderr(usage):  # argparse prints the usage of every option
      unknown = sorted(set(options.get_all_options(retain_unknown_options=True))
                       - set(options.get_all_options()))
  except SystemExit:  # argparse's exit on a value it cannot parse
    error = usage.getvalue().strip().splitlines()[-1].split('error: ', 1)[-1]
    raise ConfigError(f'{error}; see Beam\'s pipeline options.') from None
  if unknown:
    raise DataError(f'Unknown flags: {", ".join("--" + u for u in unknown)}. Flags other than '
                    '--config, --input and --output go to Beam; see its pipeline options.')
  if is_direct(options):
    direct = options.view_as(DirectOptions)
    given = ' '.join(beam_args)
    if '--direct_running_mode' not in given:
      direct.direct_running_mode = 'multi_processing'
    if '--direct_num_workers' not in given:
      direct.direct_num_workers = 0  # 0: one worker per CPU core
    if '--default_sdk_harness_log_level' not in given:
      # Worker processes log every bundle at INFO; the progress line says enough.
      options.view_as(WorkerOptions).default_sdk_harness_log_level = 'WARNING'
  return options


def is_direct(options: PipelineOptions) -> bool:
  runner = options.view_as(StandardOptions).runner
  return runner is None or runner.lower() in ('directrunner', 'direct')


def make_pipeline(options: PipelineOptions) -> beam.Pipeline:
  """A pipeline on the runner the options name.

  The DirectRunner is run as Beam's FnApiRunner, which is what Beam's
  DirectRunner runs batch pipelines on (in-memory, multi-threaded or one
  worker process per core), without its first attempt to download and start
  the Prism runner binary, which needs the internet and ignores
  --direct_running_mode. `--runner=PrismRunner` still asks for Prism.
  """
  if not is_direct(options):
    return beam.Pipeline(options=options)
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  from apache_beam.runners.portability.portable_runner import JobServiceHandle

  # As Beam's DirectRunner builds it: the workers get the options too (log level, ...).
  encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
  provision = fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
  return beam.Pipeline(runner=fn_runner.FnApiRunner(provision_info=provision), options=options)


def run(config: ml_collections.ConfigDict, input_pattern: str, output_dir: str,
        options: PipelineOptions, overwrite: bool = False) -> dict:
  """Runs the pipeline and returns the report (also written to OUTPUT/report.json).

  Everything is checked before the pipeline starts: the config, the inputs and the
  output (see `check_output`; `overwrite` replaces an earlier run's output).
  """
  check_config(config)
  files = expand_inputs(input_pattern)
  eval_files = []
  if config.decontamination.enabled:
    eval_files = expand_inputs(config.decontamination.eval_files)
  check_output(output_dir, overwrite)
  progress_dir = tempfile.mkdtemp(prefix='kiln-curate-') if is_direct(options) else None
  try:
    p = make_pipeline(options)
    build(p, config, files, output_dir, input_pattern=input_pattern, eval_files=eval_files,
          progress_dir=progress_dir)
    with progress.Watcher(progress_dir) if progress_dir else contextlib.nullcontext():
      p.run().wait_until_finish()
  finally:
    if progress_dir:
      shutil.rmtree(progress_dir, ignore_errors=True)
  write.write_empty_shards(output_dir, config.output.num_shards)
  with FileSystems.open(FileSystems.join(output_dir, write.REPORT_FILE)) as f:
    return json.loads(f.read().decode('utf-8'))


# --- config checks ----------------------------------------------------------------------


def _fraction(config, *keys: str) -> None:
  for key in keys:
    value = get(config, key)
    require(0.0 <= value <= 1.0, f'{key}={value!r} must be in [0, 1].')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Value checks, before anything runs; each error names the key and what it may be."""
  require(bool(config.input.text_field), 'input.text_field must name the field with the text.')
  check_positive(config, 'input.max_doc_bytes', 'output.num_shards', 'near_dedup.bands',
                 'near_dedup.rows', 'near_dedup.ngram', 'near_dedup.batch_size',
                 'toxicity.classifier_batch_size', 'perplexity.batch_size',
                 'decontamination.ngram', 'fineweb.short_line_chars', 'c4.max_word_length')
  check_positive(config, 'report.examples', 'language.max_chars', 'toxicity.max_hits',
                 'pii.max_hits', 'c4.min_words_per_line', 'c4.min_sentences',
                 'gopher_quality.min_words', 'gopher_quality.min_stop_words', allow_zero=True)
  _fraction(config, 'language.threshold', 'gopher_quality.max_symbol_word_ratio',
            'gopher_quality.max_bullet_lines_ratio', 'gopher_quality.max_ellipsis_lines_ratio',
            'gopher_quality.min_alpha_words_ratio', 'fineweb.min_line_punct_frac',
            'fineweb.max_short_line_frac', 'fineweb.max_dup_line_char_frac',
            'toxicity.classifier_threshold',
            *(f'gopher_repetition.max_dup_{u}_{k}' for u in ('line', 'paragraph')
              for k in ('frac', 'char_frac')))
  q = config.gopher_quality
  require(q.min_words <= q.max_words, f'gopher_quality.min_words={q.min_words} must not exceed '
          f'gopher_quality.max_words={q.max_words}.')
  r = config.gopher_repetition
  for sizes, limits in (('top_ngram_sizes', 'max_top_ngram_char_frac'),
                        ('dup_ngram_sizes', 'max_dup_ngram_char_frac')):
    require(len(r[sizes]) == len(r[limits]), f'gopher_repetition.{sizes} and '
            f'gopher_repetition.{limits} must have the same length (one limit per n-gram size).')
    require(all(1 <= n <= 64 for n in r[sizes]),
            f'gopher_repetition.{sizes}={tuple(r[sizes])} must hold sizes in [1, 64].')
  require(config.near_dedup.ngram <= 64 and config.decontamination.ngram <= 64,
          'near_dedup.ngram and decontamination.ngram must be at most 64 words.')
  if config.language.enabled:
    _check_languages(config.language.languages)
  unknown = set(config.pii.types) - set(pii.TYPES)
  require(not unknown, f'pii.types has {sorted(unknown)}; choose from {", ".join(pii.TYPES)}.')
  if config.toxicity.enabled and config.toxicity.classifier:
    toxicity.load_classifier(config.toxicity.classifier)
  if config.perplexity.enabled:
    check_positive(config, 'perplexity.max_perplexity')
    require(bool(config.perplexity.workdir), 'perplexity.enabled needs perplexity.workdir: the '
            '--workdir of a Kiln LM training run.')
    require(os.path.exists(os.path.join(config.perplexity.workdir, 'config.json')),
            f'perplexity.workdir={config.perplexity.workdir!r} is not the workdir of a training '
            'run (it has no config.json).')
  if config.decontamination.enabled:
    require(bool(config.decontamination.eval_files), 'decontamination.enabled needs '
            'decontamination.eval_files: comma-separated globs of evaluation files.')


def _check_languages(languages: Sequence[str]) -> None:
  known = set(stages.language_identifier().labels)
  unknown = sorted(set(languages) - known)
  require(not unknown, f'language.languages has {unknown}, which the language model does not '
          f'know; it knows: {", ".join(sorted(known))}.')
