"""Data curation on Apache Beam: raw text -> clean, deduplicated jsonl shards + a report.

  python -m data.curate --config=configs/curate.py --input=GLOB --output=DIR [--runner=...]

Stages, in order, each switched by `config.<stage>.enabled`: normalize,
exact_dedup, near_dedup (MinHash LSH), language, gopher_quality,
gopher_repetition, c4, fineweb, toxicity, pii, perplexity, decontamination.
Modules: read (inputs), stages (per-document stages), dedup, minhash, words,
quality, pii, toxicity, normalize, report, write (outputs), progress,
pipeline (the graph and the config checks).
"""

import os

DEFAULT_TOXIC_WORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'toxic_words.txt')
