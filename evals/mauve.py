"""MAUVE (Pillutla et al., 2021): how close a model's text distribution is to a reference one,
computed by the `mauve-text` package on features from a Kiln model, offline.

mauve-text featurises text with GPT-2 from the Hugging Face hub unless it is given
features; here it is always given features (by default the final-normed hidden state of
each text's last token, `evals.backend.KilnLM.features`), so it never loads a model or
touches the network. The numbers are then MAUVE in the Kiln model's feature space: they
compare runs with each other, not with published GPT-2-feature MAUVE scores.
"""

import importlib.util
import sys
from collections.abc import Callable, Sequence

import numpy as np

from data.errors import ConfigError, DataError

# compute_mauve's arguments that would make it featurise text itself (a hub download).
_FEATURIZING = ('p_text', 'q_text', 'p_tokens', 'q_tokens', 'featurize_model_name',
                'device_id', 'max_text_length', 'batch_size')


def _import_mauve():
  """Imports mauve-text with torch and transformers hidden, unless they are loaded already.

  mauve-text imports both at import time only for its own featurising, which Kiln never
  uses: hiding them saves about 10 s of imports per process, and leaves mauve-text no way to
  fetch GPT-2 even if asked. Its other imports (faiss, scikit-learn, and through it scipy,
  which looks torch up in sys.modules) are loaded first, with nothing hidden.
  """
  if importlib.util.find_spec('mauve') is None or importlib.util.find_spec('faiss') is None:
    raise ConfigError('MAUVE needs the optional packages mauve-text and faiss-cpu (GPLv3 and '
                      'MIT): install them with `pip install -e ".[mauve]"`.')
  import faiss  # noqa: F401
  import sklearn.decomposition  # noqa: F401
  import sklearn.metrics  # noqa: F401
  import sklearn.preprocessing  # noqa: F401

  hidden = [name for name in ('torch', 'transformers') if name not in sys.modules]
  for name in hidden:
    sys.modules[name] = None  # makes `import name` raise ImportError
  try:
    import mauve as mauve_lib
  finally:
    for name in hidden:
      del sys.modules[name]
  return mauve_lib


def mauve_from_features(p_features_NxD: np.ndarray, q_features_MxD: np.ndarray, *,
                        faiss_threads: int = 1, **mauve_kwargs) -> float:
  """MAUVE between two feature sets, one row per text, by `mauve.compute_mauve`
  (`mauve_kwargs`: its quantisation and scaling options, e.g. num_buckets, seed,
  mauve_scaling_factor). 1 for identical sets, near 0 for well separated ones.

  The k-means runs on `faiss_threads` OpenMP threads, one by default: MAUVE clusters at most
  a few thousand points, and faiss's spinning threads made it 200 times slower on a busy
  2-core machine (3 s against 0.015 s for 120 points).
  """
  import faiss

  mauve_lib = _import_mauve()
  featurizing = sorted(set(mauve_kwargs) & set(_FEATURIZING))
  if featurizing:
    raise ConfigError(f'mauve: {", ".join(featurizing)} would make mauve-text load GPT-2 '
                      'from the hub; pass features (features_fn) instead.')
  p, q = np.asarray(p_features_NxD), np.asarray(q_features_MxD)
  for name, x in (('p', p), ('q', q)):
    if x.ndim != 2 or len(x) < 2:
      raise DataError(f'mauve: the {name} features must be [N, D] with N >= 2; got shape '
                      f'{x.shape}.')
  if p.shape[1] != q.shape[1]:
    raise DataError(f'mauve: p and q features differ in width ({p.shape[1]} vs {q.shape[1]}).')
  threads = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(faiss_threads)
  try:
    out = mauve_lib.compute_mauve(p_features=p, q_features=q, **mauve_kwargs)
  finally:
    faiss.omp_set_num_threads(threads)
  return float(out.mauve)


def mauve(p_texts: Sequence[str], q_texts: Sequence[str], *,
          features_fn: Callable[[Sequence[str]], np.ndarray], **mauve_kwargs) -> float:
  """MAUVE between texts `p_texts` (e.g. a model's generations) and `q_texts` (e.g. the
  references), each featurised by `features_fn` (texts -> [N, D], such as
  `KilnLM.features`); `mauve_kwargs` go to `mauve_from_features`."""
  return mauve_from_features(np.asarray(features_fn(list(p_texts))),
                             np.asarray(features_fn(list(q_texts))), **mauve_kwargs)
